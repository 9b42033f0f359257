//! Shared pieces of the privileged test tiers. These tests need root (CAP_BPF, CAP_NET_ADMIN):
//! they fail loudly without it rather than skip, so a green run always means they ran.

use std::{
    io,
    os::fd::RawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};


/// Panics (fails the test) unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (BPF and network namespaces); run the suite as root");
}

/// A pin root private to one test, removed (detaching everything) when dropped.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn new(test: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/sys/fs/bpf/enforcer-test-{}-{n}-{test}", std::process::id()));
        let _ = enforcer::datapath::teardown(&path);
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = enforcer::datapath::teardown(&self.0);
    }
}

/// A short lab prefix unique to this process and call (interface names are limited to 15).
pub fn lab_prefix(tag: char) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("t{tag}{:02}{}", std::process::id() % 100, n % 10)
}

/// Runs a loaded program once over `frame` with BPF_PROG_TEST_RUN; returns its return value.
/// Without a context the kernel runs it as if the frame arrived on the loopback device.
pub fn test_run(prog_fd: RawFd, frame: &[u8]) -> io::Result<u32> {
    enforcer::datapath::prog_test_run(prog_fd, frame, 1).map(|(retval, _)| retval)
}

/// An Ethernet frame: dst, src, ethertype, then `payload_len` bytes.
pub fn frame(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend((0..payload_len).map(|i| i as u8));
    f
}

/// `bpftool map dump pinned PATH` as JSON.
pub fn bpftool_dump(path: &Path) -> serde_json::Value {
    let out = Command::new("bpftool")
        .args(["--json", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("running bpftool (installed by scripts/setup.sh)");
    assert!(out.status.success(), "bpftool failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
}
