//! The product's layout as a test (tier 0): no import cycle among its files, and none among its
//! top-level modules; no source file over 900 lines; every file opens with a module header
//! (`//!`) saying what it owns; and the product does not depend on the lab or the guest's test
//! application. Read from the sources with `syn`: a `use` (or a `crate::`/`super::` path) of an
//! item is an edge to the file that defines it, following re-exports.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use syn::visit::Visit;

const MAX_LINES: usize = 900;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A module of the crate: its file, and what its file declares.
#[derive(Default, Debug)]
struct Module {
    file: PathBuf,
    /// Child modules by name → their module path.
    children: BTreeMap<String, Vec<String>>,
    /// Names brought in by `use` (public or not: children reach them through `super::`) →
    /// the absolute path they stand for.
    imports: BTreeMap<String, Vec<String>>,
}

/// Every module of the crate, by path (`[]` is the crate root), and every path each file uses.
#[derive(Default)]
struct Crate {
    modules: BTreeMap<Vec<String>, Module>,
    /// (file, absolute path used).
    uses: Vec<(PathBuf, Vec<String>)>,
}

struct FileVisitor<'a> {
    krate: &'a mut Crate,
    file: PathBuf,
    dir: PathBuf,
    /// The module being visited (inline modules nest inside the file's).
    module: Vec<String>,
    /// Whether the file's own directory holds its children (`mod.rs`, `lib.rs`).
    owns_dir: bool,
}

impl FileVisitor<'_> {
    /// A path as written in `module` → absolute (`None`: an external crate or a local name).
    fn absolute(&self, segments: &[String]) -> Option<Vec<String>> {
        let mut at = self.module.clone();
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                at.clear();
                rest = &rest[1..];
            }
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    at.pop();
                    rest = &rest[1..];
                }
            }
            Some("self") => rest = &rest[1..],
            // A child module of this one (`pub use service::Agent` in a `mod.rs`).
            Some(first)
                if self
                    .krate
                    .modules
                    .get(&self.module)
                    .is_some_and(|m| m.children.contains_key(first)) => {}
            _ => return None,
        }
        at.extend(rest.iter().cloned());
        Some(at)
    }

    fn record_use(&mut self, tree: &syn::UseTree, prefix: Vec<String>) {
        match tree {
            syn::UseTree::Path(p) => {
                let mut prefix = prefix;
                prefix.push(p.ident.to_string());
                self.record_use(&p.tree, prefix);
            }
            syn::UseTree::Name(n) => {
                let name = n.ident.to_string();
                let mut full = prefix;
                if name != "self" {
                    full.push(name.clone());
                }
                self.bind(&name, full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix;
                full.push(r.ident.to_string());
                self.bind(&r.rename.to_string(), full);
            }
            syn::UseTree::Glob(_) => {
                if let Some(abs) = self.absolute(&prefix) {
                    self.krate.uses.push((self.file.clone(), abs));
                }
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.record_use(t, prefix.clone());
                }
            }
        }
    }

    fn bind(&mut self, name: &str, full: Vec<String>) {
        if let Some(abs) = self.absolute(&full) {
            let local = if name == "self" {
                full.last().cloned().unwrap_or_default()
            } else {
                name.to_owned()
            };
            self.krate
                .modules
                .entry(self.module.clone())
                .or_default()
                .imports
                .insert(local, abs.clone());
            self.krate.uses.push((self.file.clone(), abs));
        }
    }
}

impl<'ast> Visit<'ast> for FileVisitor<'_> {
    // `pub(super)`, `pub(crate)`: a visibility, not a use.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.record_use(&u.tree, Vec::new());
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if matches!(
            segments.first().map(String::as_str),
            Some("crate" | "super")
        ) && let Some(abs) = self.absolute(&segments)
        {
            self.krate.uses.push((self.file.clone(), abs));
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let name = m.ident.to_string();
        let mut child = self.module.clone();
        child.push(name.clone());
        self.krate
            .modules
            .entry(self.module.clone())
            .or_default()
            .children
            .insert(name.clone(), child.clone());
        match &m.content {
            // Inline: the same file, one module deeper.
            Some((_, items)) => {
                self.krate.modules.entry(child.clone()).or_default().file = self.file.clone();
                let outer = std::mem::replace(&mut self.module, child);
                for item in items {
                    self.visit_item(item);
                }
                self.module = outer;
            }
            None => {
                let explicit = m.attrs.iter().find_map(|a| {
                    let syn::Meta::NameValue(nv) = &a.meta else {
                        return None;
                    };
                    if !nv.path.is_ident("path") {
                        return None;
                    }
                    let syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) = &nv.value
                    else {
                        return None;
                    };
                    Some(s.value())
                });
                let base = if self.owns_dir {
                    self.dir.clone()
                } else {
                    self.dir.join(self.file.file_stem().expect("a file name"))
                };
                let file = match explicit {
                    Some(p) => self.dir.join(p),
                    None if base.join(format!("{name}.rs")).exists() => {
                        base.join(format!("{name}.rs"))
                    }
                    None => base.join(&name).join("mod.rs"),
                };
                load(self.krate, &file, child);
            }
        }
    }
}

fn load(krate: &mut Crate, file: &Path, module: Vec<String>) {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    krate.modules.entry(module.clone()).or_default().file = file.to_owned();
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut v = FileVisitor {
        krate,
        file: file.to_owned(),
        dir: file.parent().expect("a directory").to_owned(),
        module,
        owns_dir: matches!(name, "mod.rs" | "lib.rs"),
    };
    v.visit_file(&ast);
}

impl Crate {
    /// The file that defines what `path` names, following modules and re-exports.
    fn file_of(&self, path: &[String], depth: usize) -> Option<PathBuf> {
        if depth > 16 {
            return None;
        }
        let mut at: Vec<String> = Vec::new();
        for (i, seg) in path.iter().enumerate() {
            let module = self.modules.get(&at)?;
            if let Some(child) = module.children.get(seg) {
                at = child.clone();
                continue;
            }
            if let Some(target) = module.imports.get(seg) {
                let mut next = target.clone();
                next.extend(path[i + 1..].iter().cloned());
                return self.file_of(&next, depth + 1);
            }
            // An item defined in this module's file.
            return Some(module.file.clone());
        }
        self.modules.get(&at).map(|m| m.file.clone())
    }
}

/// Strongly connected components of more than one node (Tarjan).
fn cycles<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct St<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on: BTreeSet<N>,
        next: usize,
        out: Vec<Vec<N>>,
    }
    fn go<N: Ord + Clone>(n: &N, e: &BTreeMap<N, BTreeSet<N>>, s: &mut St<N>) {
        s.index.insert(n.clone(), s.next);
        s.low.insert(n.clone(), s.next);
        s.next += 1;
        s.stack.push(n.clone());
        s.on.insert(n.clone());
        for m in e.get(n).into_iter().flatten() {
            if !s.index.contains_key(m) {
                go(m, e, s);
                let l = s.low[m].min(s.low[n]);
                s.low.insert(n.clone(), l);
            } else if s.on.contains(m) {
                let l = s.index[m].min(s.low[n]);
                s.low.insert(n.clone(), l);
            }
        }
        if s.low[n] == s.index[n] {
            let mut scc = Vec::new();
            while let Some(m) = s.stack.pop() {
                s.on.remove(&m);
                let done = m == *n;
                scc.push(m);
                if done {
                    break;
                }
            }
            if scc.len() > 1 {
                s.out.push(scc);
            }
        }
    }
    let mut s = St {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for n in edges.keys() {
        if !s.index.contains_key(n) {
            go(n, edges, &mut s);
        }
    }
    s.out
}

fn product() -> (Crate, BTreeMap<PathBuf, BTreeSet<PathBuf>>) {
    graph(&src())
}

/// The crate whose sources are in `dir`, and its file-level import edges.
fn graph(dir: &Path) -> (Crate, BTreeMap<PathBuf, BTreeSet<PathBuf>>) {
    let mut krate = Crate::default();
    load(&mut krate, &dir.join("lib.rs"), Vec::new());
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (file, path) in &krate.uses {
        if let Some(target) = krate.file_of(path, 0)
            && target != *file
        {
            edges.entry(file.clone()).or_default().insert(target);
        }
    }
    (krate, edges)
}

fn rel(p: &Path) -> String {
    p.strip_prefix(src()).unwrap_or(p).display().to_string()
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let (krate, edges) = product();
    assert!(krate.modules.len() > 40, "the module tree was read");
    // The reading finds the edges it should (through re-exports, to the defining file).
    let edge = |a: &str, b: &str| {
        edges
            .get(&src().join(a))
            .is_some_and(|t| t.contains(&src().join(b)))
    };
    assert!(edge("api/vms.rs", "agent/service.rs"));
    assert!(
        edge("agent/service.rs", "hold/buffer.rs"),
        "via hold's re-export"
    );
    assert!(
        edge("hold/core_tests.rs", "hold/core.rs"),
        "via `use super::*`"
    );
    let found: Vec<Vec<String>> = cycles(&edges)
        .into_iter()
        .map(|c| c.iter().map(|p| rel(p)).collect())
        .collect();
    let detail: Vec<String> = cycles(&edges)
        .iter()
        .flatten()
        .map(|f| {
            let to: Vec<String> = edges[f].iter().map(|t| rel(t)).collect();
            format!("{} -> {}", rel(f), to.join(", "))
        })
        .collect();
    assert!(
        found.is_empty(),
        "import cycles among files: {found:#?}\n{detail:#?}"
    );
    // The types the kernel and userspace share, too.
    let common = Path::new(env!("CARGO_MANIFEST_DIR")).join("../enforcer-common/src");
    let (_, edges) = graph(&common);
    assert!(!edges.is_empty());
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "import cycles in enforcer-common: {found:#?}"
    );
}

#[test]
fn the_top_level_modules_are_layered() {
    let (_, edges) = product();
    let top = |p: &Path| -> String {
        let r = rel(p);
        r.split('/')
            .next()
            .unwrap_or(&r)
            .trim_end_matches(".rs")
            .to_owned()
    };
    let mut layers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &edges {
        for to in tos {
            let (a, b) = (top(from), top(to));
            if a != b && a != "lib" {
                layers.entry(a).or_default().insert(b);
            }
        }
    }
    let found = cycles(&layers);
    assert!(
        found.is_empty(),
        "import cycles among top-level modules: {found:?}\n{layers:#?}"
    );
    // The bottom stays the bottom.
    for low in ["model", "sched", "sync"] {
        assert!(
            layers
                .get(low)
                .is_none_or(|to| to.iter().all(|t| t == "model")),
            "{low} imports {:?}",
            layers[low]
        );
    }
}

#[test]
fn every_file_is_short_and_says_what_it_owns() {
    let (krate, _) = product();
    let files: BTreeSet<&PathBuf> = krate.modules.values().map(|m| &m.file).collect();
    for file in files {
        let text = fs::read_to_string(file).unwrap();
        let lines = text.lines().count();
        assert!(
            lines <= MAX_LINES,
            "{} has {lines} lines (at most {MAX_LINES})",
            rel(file)
        );
        assert!(
            text.starts_with("//!"),
            "{} does not open with a module header (//!)",
            rel(file)
        );
    }
}

#[test]
fn the_product_does_not_depend_on_the_lab() {
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("enforcer/Cargo.toml");
    for lab in ["enforcer-guest", "enforcer-lab"] {
        assert!(
            !manifest.contains(lab),
            "enforcer/Cargo.toml names {lab}: the product must not depend on the lab"
        );
    }
}
