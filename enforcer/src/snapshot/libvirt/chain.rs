//! Keeping a VM's disk chains short and never broken when instant snapshots go away (deleted,
//! aborted). Every instant snapshot adds a file to a disk's chain (the overlay the VM went on)
//! and every restore one more (the overlay the restored VM boots on). What is still needed is
//! every remaining snapshot's frozen disk, every pre-copy copy's backing file, the domain's own
//! disk, and everything below them. A file of ours (`<vm>.<target>.<tag>.qcow2`, made by a
//! snapshot or a restore) that nothing needs is deleted; one that is needed only as a link in
//! the middle of a chain is merged into the file above it, as libvirt's block-pull and
//! block-commit do, so deleting snapshots gives the space back. Files we did not make (the
//! domain's original disks) are never touched.
//!
//! [`plan`] decides one step at a time from the files and their backing files (pure, tested
//! here); [`Libvirt::shorten_chains`] reads the files, carries each step out (a live block job
//! when the running VM has the files open, `qemu-img rebase` when none does) and asks again.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use tracing::{info, warn};
use virt::sys;

use super::{
    Libvirt,
    disks::{
        CAPTURES, COPIES, DiskCapture, DiskCopy, backing_of, format_of, path_str, qemu_img,
        read_list, write_list_at,
    },
    xml::file_disks,
};

/// One step of keeping a chain short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing needs it.
    Delete(PathBuf),
    /// `drop` is a link between the running VM's active file and `base`: pull its data up into
    /// the active file (live block pull down to `base`), then delete it.
    Pull { base: PathBuf, drop: PathBuf },
    /// `top` (a snapshot's frozen disk, in the running VM's chain) sits on `base`, a link
    /// nothing else needs: commit `top` into `base` (live block commit), so `base` becomes that
    /// snapshot's frozen disk, and delete `top`.
    Commit { top: PathBuf, base: PathBuf },
    /// `drop` is a link below `child`, which no running VM has open: rebase `child` onto
    /// `base` (its data from `drop` copied in), then delete `drop`.
    Rebase {
        child: PathBuf,
        base: PathBuf,
        drop: PathBuf,
    },
}

/// The disk files of one disk of one VM, as far as the chain goes.
#[derive(Clone, Debug, Default)]
pub(super) struct Chains {
    /// Files we made (may be deleted or merged).
    pub(super) ours: Vec<PathBuf>,
    /// Each known file's backing file.
    pub(super) backing: HashMap<PathBuf, PathBuf>,
    /// What must stay readable as it is: snapshots' frozen disks, pre-copy copies' backing
    /// files, the domain's own disk.
    pub(super) roots: HashSet<PathBuf>,
    /// Roots that must also keep their name (pre-copy copies' backing files, the domain's
    /// disk when it does not run, its persistent definition's disk): never merged away.
    pub(super) pinned: HashSet<PathBuf>,
    /// The running domain's chain, active file first (empty when the domain does not run).
    pub(super) live: Vec<PathBuf>,
}

impl Chains {
    fn needed(&self) -> HashSet<PathBuf> {
        let mut needed = HashSet::new();
        for root in self.roots.iter().chain(&self.live) {
            let mut at = Some(root.clone());
            while let Some(f) = at {
                if !needed.insert(f.clone()) {
                    break;
                }
                at = self.backing.get(&f).cloned();
            }
        }
        needed
    }

    fn children<'a>(&'a self, of: &'a Path) -> impl Iterator<Item = &'a PathBuf> + 'a {
        self.backing
            .iter()
            .filter(move |(_, b)| b.as_path() == of)
            .map(|(c, _)| c)
    }
}

/// The next step, or `None` when the chain is as short as it can be.
pub(super) fn plan(c: &Chains) -> Option<Step> {
    let needed = c.needed();
    // Unneeded files first, the ones nothing sits on before their backing files.
    if let Some(f) = c
        .ours
        .iter()
        .filter(|f| !needed.contains(*f))
        .find(|f| c.children(f).next().is_none())
    {
        return Some(Step::Delete(f.clone()));
    }
    let active = c.live.first();
    // A link is merged away only when exactly one file, of any kind, sits on it.
    let only_child = |f: &Path| -> Option<PathBuf> {
        let kids: Vec<&PathBuf> = c.children(f).collect();
        match kids.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    };
    for f in c
        .ours
        .iter()
        .filter(|f| needed.contains(*f) && !c.roots.contains(*f) && Some(*f) != active)
    {
        let (Some(base), Some(child)) = (c.backing.get(f), only_child(f)) else {
            continue;
        };
        let step = if Some(&child) == active {
            Step::Pull {
                base: base.clone(),
                drop: f.clone(),
            }
        } else if c.live.contains(&child) {
            // The snapshot that froze `child` gets `f` instead: only when `child` is ours, its
            // name free to go, and exactly one file (the running one) sits on it.
            if !c.ours.contains(&child)
                || c.pinned.contains(&child)
                || only_child(&child).is_none_or(|above| !c.live.contains(&above))
            {
                continue;
            }
            Step::Commit {
                top: child,
                base: f.clone(),
            }
        } else {
            Step::Rebase {
                child,
                base: base.clone(),
                drop: f.clone(),
            }
        };
        return Some(step);
    }
    None
}

/// Whether `file` is one we made for `vm`'s disk `target`: `<vm>.<target>.<tag>.qcow2`.
pub(super) fn ours(file: &Path, vm: &str, target: &str) -> bool {
    file.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(&format!("{vm}.{target}.")))
        .and_then(|n| n.strip_suffix(".qcow2"))
        .is_some_and(|tag| !tag.is_empty() && !tag.contains('/'))
}

impl Libvirt {
    /// Shortens the chains of every disk of `vm` after a snapshot of it went away (see the
    /// module header), with `store` holding the snapshots that remain. Best effort: a step
    /// that fails is logged and leaves every file in place.
    pub(super) fn shorten_chains(&self, vm: &str, store: &Path) {
        if self.jobs.lock().expect("jobs lock").contains_key(vm) {
            // A snapshot of it is in progress: its frozen disks are in no list yet.
            warn!(vm, "not shortening disk chains during a snapshot");
            return;
        }
        let Ok(dom) = self.domain(vm) else {
            return;
        };
        let running = dom.is_active().unwrap_or(false);
        // A persistent domain boots next time from its definition's disks: they stay.
        let defined: Vec<PathBuf> = if dom.is_persistent().unwrap_or(false) {
            dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                .ok()
                .and_then(|x| file_disks(&x).ok())
                .map(|d| d.into_iter().map(|d| d.file).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let Some(disks) = dom.xml_desc(0).ok().and_then(|x| file_disks(&x).ok()) else {
            return;
        };
        for disk in disks {
            for _ in 0..32 {
                let chains =
                    read_chains(vm, &disk.target, &disk.file, running, store).map(|mut c| {
                        c.roots.extend(defined.iter().cloned());
                        c.pinned.extend(defined.iter().cloned());
                        c
                    });
                let chains = match chains {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(vm, disk = disk.target, %e, "reading the disk's chain");
                        break;
                    }
                };
                let Some(step) = plan(&chains) else {
                    break;
                };
                info!(vm, disk = disk.target, ?step, "shortening the disk's chain");
                if let Err(e) = self.carry_out(vm, &disk.target, &step, store) {
                    warn!(vm, disk = disk.target, ?step, %e, "shortening the disk's chain");
                    break;
                }
            }
        }
    }

    fn carry_out(&self, vm: &str, target: &str, step: &Step, store: &Path) -> Result<(), String> {
        let remove =
            |f: &Path| std::fs::remove_file(f).map_err(|e| format!("{}: {e}", f.display()));
        match step {
            Step::Delete(f) => remove(f),
            Step::Pull { base, drop } => {
                let active = self.active_file(vm, target)?;
                self.block_job(vm, target, |dom, disk| {
                    let base = cstring(base)?;
                    // SAFETY: a live domain and NUL-terminated strings that outlive the call.
                    Ok(unsafe { sys::virDomainBlockRebase(dom, disk, base.as_ptr(), 0, 0) })
                })?;
                // A job that failed ends like one that succeeded: look before deleting.
                moved_onto(&active, base, drop)?;
                remove(drop)
            }
            Step::Commit { top, base } => {
                let above = self.file_above(vm, target, top)?;
                self.block_job(vm, target, |dom, disk| {
                    let (base, top) = (cstring(base)?, cstring(top)?);
                    // SAFETY: as above.
                    Ok(unsafe {
                        sys::virDomainBlockCommit(dom, disk, base.as_ptr(), top.as_ptr(), 0, 0)
                    })
                })?;
                moved_onto(&above, base, top)?;
                reassign_frozen(store, vm, target, top, base)?;
                remove(top)
            }
            Step::Rebase { child, base, drop } => {
                let format = format_of(base)?;
                qemu_img(&[
                    "rebase",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    format.name(),
                    "-b",
                    path_str(base)?,
                    path_str(child)?,
                ])?;
                remove(drop)
            }
        }
    }

    /// The file the running domain's disk `target` is on.
    fn active_file(&self, vm: &str, target: &str) -> Result<PathBuf, String> {
        let xml = self.live_xml(vm).map_err(|e| e.to_string())?;
        file_disks(&xml)?
            .into_iter()
            .find(|d| d.target == target)
            .map(|d| d.file)
            .ok_or_else(|| format!("the domain has no disk {target}"))
    }

    /// The file of the running chain that sits right on `file`.
    fn file_above(&self, vm: &str, target: &str, file: &Path) -> Result<PathBuf, String> {
        let mut at = self.active_file(vm, target)?;
        for _ in 0..256 {
            match backing_of(&at)? {
                Some(b) if b == file => return Ok(at),
                Some(b) => at = b,
                None => break,
            }
        }
        Err(format!("{} is not in the running chain", file.display()))
    }

    /// Starts a block job on the domain's disk `target` and waits until it is over.
    fn block_job(
        &self,
        vm: &str,
        target: &str,
        start: impl FnOnce(sys::virDomainPtr, *const std::ffi::c_char) -> Result<i32, String>,
    ) -> Result<(), String> {
        let dom = self.domain(vm).map_err(|e| e.to_string())?;
        let disk = CString::new(target).map_err(|e| e.to_string())?;
        // SAFETY: `dom` outlives every use of its pointer in this function.
        let ptr = unsafe { dom.as_ptr() };
        if start(ptr, disk.as_ptr())? < 0 {
            return Err(virt::error::Error::last_error().to_string());
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let mut info = sys::virDomainBlockJobInfo {
                type_: 0,
                bandwidth: 0,
                cur: 0,
                end: 0,
            };
            // SAFETY: a live domain, a NUL-terminated disk name and an info block we own.
            let r = unsafe { sys::virDomainGetBlockJobInfo(ptr, disk.as_ptr(), &mut info, 0) };
            match r {
                0 => return Ok(()),
                r if r < 0 => return Err(virt::error::Error::last_error().to_string()),
                _ if Instant::now() > deadline => return Err("the block job did not end".into()),
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// After a block job: `file` must now sit on `base`, `gone` left the chain.
fn moved_onto(file: &Path, base: &Path, gone: &Path) -> Result<(), String> {
    match backing_of(file)? {
        Some(b) if b == base => Ok(()),
        other => Err(format!(
            "the block job did not take {} out: {} is on {other:?}",
            gone.display(),
            file.display()
        )),
    }
}

fn cstring(p: &Path) -> Result<CString, String> {
    CString::new(path_str(p)?).map_err(|e| e.to_string())
}

/// The chains of `vm`'s disk `target` whose file the domain uses is `file`.
fn read_chains(
    vm: &str,
    target: &str,
    file: &Path,
    running: bool,
    store: &Path,
) -> Result<Chains, String> {
    let mut c = Chains::default();
    let dir = file.parent().unwrap_or(Path::new("/"));
    c.ours = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| ours(p, vm, target))
        .collect();
    // Fails closed: a list that cannot be read could be protecting a file.
    let snapshots = std::fs::read_dir(store).map_err(|e| format!("{}: {e}", store.display()))?;
    for snapshot in snapshots {
        let at = snapshot.map_err(|e| e.to_string())?.path();
        let captures = at.join(format!("{vm}.{CAPTURES}"));
        if captures.exists() {
            c.roots.extend(
                read_list::<DiskCapture>(&captures)?
                    .into_iter()
                    .filter(|d| d.target == target)
                    .map(|d| d.frozen),
            );
        }
        let copies = at.join(format!("{vm}.{COPIES}"));
        if copies.exists() {
            for d in read_list::<DiskCopy>(&copies)?
                .into_iter()
                .filter(|d| d.target == target)
            {
                if let Some(b) = backing_of(&d.copy)? {
                    c.pinned.insert(b.clone());
                    c.roots.insert(b);
                }
            }
        }
    }
    let mut known: Vec<PathBuf> = c.ours.iter().chain(&c.roots).cloned().collect();
    known.push(file.to_owned());
    while let Some(f) = known.pop() {
        if c.backing.contains_key(&f) || !f.exists() {
            continue;
        }
        if let Some(b) = backing_of(&f)? {
            known.push(b.clone());
            c.backing.insert(f, b);
        }
    }
    if running {
        let mut at = Some(file.to_owned());
        while let Some(f) = at {
            at = c.backing.get(&f).cloned();
            c.live.push(f);
        }
    } else {
        c.roots.insert(file.to_owned());
        c.pinned.insert(file.to_owned());
    }
    Ok(c)
}

/// A live block commit merged `top` into `base`: the snapshots that froze `top` have `base`
/// from now on (their lists rewritten atomically).
fn reassign_frozen(
    store: &Path,
    vm: &str,
    target: &str,
    top: &Path,
    base: &Path,
) -> Result<(), String> {
    for snapshot in std::fs::read_dir(store).into_iter().flatten().flatten() {
        let list = snapshot.path().join(format!("{vm}.{CAPTURES}"));
        let Ok(mut captures) = read_list::<DiskCapture>(&list) else {
            continue;
        };
        let mut changed = false;
        for d in captures
            .iter_mut()
            .filter(|d| d.target == target && d.frozen == top)
        {
            d.frozen = base.to_owned();
            d.format = format_of(base)?;
            changed = true;
        }
        if changed {
            write_list_at(&list, &captures)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(format!("/d/{s}"))
    }

    fn chains(links: &[(&str, &str)], ours: &[&str], roots: &[&str], live: &[&str]) -> Chains {
        Chains {
            ours: ours.iter().map(|s| p(s)).collect(),
            backing: links.iter().map(|(f, b)| (p(f), p(b))).collect(),
            roots: roots.iter().map(|s| p(s)).collect(),
            pinned: HashSet::new(),
            live: live.iter().map(|s| p(s)).collect(),
        }
    }

    /// Runs the plan to the end on the graph, as the caller would.
    fn run(mut c: Chains) -> (Vec<Step>, Chains) {
        let mut steps = Vec::new();
        while let Some(step) = plan(&c) {
            assert!(steps.len() < 20, "no end: {steps:?}");
            match &step {
                Step::Delete(f) => {
                    assert!(c.children(f).next().is_none(), "deleted {f:?} under a file");
                    c.backing.remove(f);
                    c.ours.retain(|o| o != f);
                }
                Step::Pull { base, drop } => {
                    let active = c.live[0].clone();
                    c.backing.insert(active, base.clone());
                    c.backing.remove(drop);
                    c.ours.retain(|o| o != drop);
                    c.live.retain(|o| o != drop);
                }
                Step::Commit { top, base } => {
                    let above: Vec<PathBuf> = c.children(top).cloned().collect();
                    assert_eq!(above.len(), 1, "committed {top:?} under several files");
                    for a in above {
                        c.backing.insert(a, base.clone());
                    }
                    c.backing.remove(top);
                    c.ours.retain(|o| o != top);
                    c.live.retain(|o| o != top);
                    // The snapshot that froze `top` now has `base`.
                    if c.roots.remove(top) {
                        c.roots.insert(base.clone());
                    }
                }
                Step::Rebase { child, base, drop } => {
                    c.backing.insert(child.clone(), base.clone());
                    c.backing.remove(drop);
                    c.ours.retain(|o| o != drop);
                }
            }
            steps.push(step);
        }
        (steps, c)
    }

    #[test]
    fn the_newest_snapshot_deleted_is_pulled_into_the_running_disk() {
        // base ← s1 (frozen by the deleted snapshot) ← o1 (the VM runs on it).
        let c = chains(
            &[("s1", "base"), ("o1", "s1")],
            &["s1", "o1"],
            &[],
            &["o1", "s1", "base"],
        );
        let (steps, end) = run(c);
        assert_eq!(
            steps,
            vec![Step::Pull {
                base: p("base"),
                drop: p("s1")
            }]
        );
        assert_eq!(end.backing[&p("o1")], p("base"));
    }

    #[test]
    fn the_oldest_snapshot_deleted_is_committed_into_by_the_next() {
        // base ← a (frozen by the deleted snapshot) ← b (frozen by a kept one) ← o (running).
        let c = chains(
            &[("a", "base"), ("b", "a"), ("o", "b")],
            &["a", "b", "o"],
            &["b"],
            &["o", "b", "a", "base"],
        );
        let (steps, end) = run(c);
        assert_eq!(
            steps,
            vec![Step::Commit {
                top: p("b"),
                base: p("a")
            }]
        );
        assert_eq!(end.backing[&p("o")], p("a"));
        assert!(end.roots.contains(&p("a")), "the kept snapshot now has a");
    }

    #[test]
    fn dead_branches_go_and_links_off_the_running_chain_are_rebased() {
        // A restore of s (frozen by a kept snapshot) left the old branch o1 dead; the VM
        // runs on r. x was frozen by a deleted snapshot, below a kept pre-copy copy's base k.
        let c = chains(
            &[
                ("o1", "s"),
                ("r", "s"),
                ("s", "base"),
                ("x", "base"),
                ("k", "x"),
            ],
            &["o1", "r", "s", "x", "k"],
            &["s", "k"],
            &["r", "s", "base"],
        );
        let (steps, end) = run(c);
        assert!(steps.contains(&Step::Delete(p("o1"))), "{steps:?}");
        assert!(
            steps.contains(&Step::Rebase {
                child: p("k"),
                base: p("base"),
                drop: p("x")
            }),
            "{steps:?}"
        );
        assert_eq!(end.backing[&p("r")], p("s"), "the running chain untouched");
        assert_eq!(end.ours.len(), 3);
    }

    #[test]
    fn files_we_did_not_make_and_forks_stay() {
        // The user's disk u, frozen by a deleted snapshot: never touched. A link with two
        // needed children (two restores running from one snapshot's disk) stays.
        let c = chains(
            &[("o", "u"), ("a", "f"), ("b", "f"), ("f", "u")],
            &["o", "a", "b", "f"],
            &["a", "b"],
            &["o", "u"],
        );
        assert_eq!(plan(&c), None);
    }

    #[test]
    fn a_frozen_disk_with_another_file_on_it_is_not_committed_away() {
        // a (deleted snapshot's) ← b (kept snapshot's) ← r (running, a restore of b's
        // snapshot), and c (a third snapshot's frozen disk) also on b: committing b into a
        // would leave c on a deleted file.
        let c = chains(
            &[("a", "base"), ("b", "a"), ("r", "b"), ("c", "b")],
            &["a", "b", "r", "c"],
            &["b", "c"],
            &["r", "b", "a", "base"],
        );
        assert_eq!(plan(&c), None);
        // Nor when b is a pre-copy copy's backing file (its name must stay).
        let mut c = chains(
            &[("a", "base"), ("b", "a"), ("o", "b")],
            &["a", "b", "o"],
            &["b"],
            &["o", "b", "a", "base"],
        );
        c.pinned.insert(p("b"));
        assert_eq!(plan(&c), None);
        // Nor when b is not ours.
        let c = chains(
            &[("a", "base"), ("b", "a"), ("o", "b")],
            &["a", "o"],
            &["b"],
            &["o", "b", "a", "base"],
        );
        assert_eq!(plan(&c), None);
    }

    #[test]
    fn our_names_only() {
        assert!(ours(Path::new("/d/web1.vda.g-17-e2.qcow2"), "web1", "vda"));
        assert!(ours(Path::new("/d/web1.vda.r1796.qcow2"), "web1", "vda"));
        assert!(!ours(Path::new("/d/web1.qcow2"), "web1", "vda"));
        assert!(!ours(Path::new("/d/web1.vdb.x.qcow2"), "web1", "vda"));
        assert!(!ours(Path::new("/d/web10.vda.x.qcow2"), "web1", "vda"));
        assert!(!ours(Path::new("/d/web1.vda..qcow2"), "web1", "vda"));
    }
}
