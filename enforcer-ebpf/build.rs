use which::which;

/// The eBPF build needs `bpf-linker`, which cargo cannot track as a dependency: rebuild when the
/// binary on PATH changes (e.g. after `scripts/setup.sh` installs a new version).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run scripts/setup.sh");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
