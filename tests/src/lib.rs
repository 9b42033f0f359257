//! Shared pieces of the privileged test tiers. These tests need root (CAP_BPF, CAP_NET_ADMIN):
//! they fail loudly without it rather than skip, so a green run always means they ran.

use std::{
    io,
    net::UdpSocket,
    os::fd::RawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer_lab::traffic::Message;

/// Panics (fails the test) unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF and network namespaces); run the suite as root"
    );
}

/// A pin root private to one test, removed (detaching everything) when dropped.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn new(test: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/enforcer-test-{}-{n}-{test}",
            std::process::id()
        ));
        let _ = enforcer::datapath::teardown(&path);
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A unix socket for this test's daemon API, named after the pin root (removed with it).
    pub fn api_socket(&self) -> enforcer::api::Endpoint {
        let name = self.0.file_name().expect("a pin root has a name");
        enforcer::api::Endpoint::Unix(
            Path::new("/run/enforcer").join(format!("{}.sock", name.to_string_lossy())),
        )
    }
}

/// A daemon on `bridge` and `pins`, serving `pins`' API socket, tc-attached; no buffer, no
/// snapshots, no TLS: what each test changes starts from here.
pub fn daemon_config(bridge: &str, pins: &PinRoot) -> enforcer::daemon::DaemonConfig {
    enforcer::daemon::DaemonConfig {
        ports: enforcer::datapath::ports::PortSource::Bridge(bridge.to_owned()),
        pin_root: pins.path().to_owned(),
        attach: enforcer::datapath::AttachMode::Tc,
        listen: pins.api_socket(),
        token: None,
        api_group: None,
        tls: None,
        type3_mode: None,
        hold: None,
        snapshots: None,
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = enforcer::datapath::teardown(&self.0);
        if let enforcer::api::Endpoint::Unix(socket) = self.api_socket() {
            let _ = std::fs::remove_file(socket);
        }
        // The daemons on it are gone: its lock file goes too (a test's pin root is its own).
        let _ = std::fs::remove_file(enforcer::daemon::lock::lock_path(&self.0));
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
    assert!(
        out.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
}

/// Creates a BPF hash map of the given layout and pins it at `path` (to play a map left by
/// another build).
pub fn pin_hash_map(
    path: &Path,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};

    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_map_type};
    let bpf = |cmd: bpf_cmd, attr: &mut bpf_attr| {
        // SAFETY: `attr` is a valid bpf_attr for `cmd`, and any pointer in it outlives the call.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_int,
                attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>() as libc::c_uint,
            )
        }
    };
    // SAFETY: bpf_attr is a plain C union of integers; all-zero is its "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_1.map_type = bpf_map_type::BPF_MAP_TYPE_HASH as u32;
    attr.__bindgen_anon_1.key_size = key_size;
    attr.__bindgen_anon_1.value_size = value_size;
    attr.__bindgen_anon_1.max_entries = max_entries;
    let fd = bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let name = CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = name.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd as u32;
    let r = bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr);
    // SAFETY: closing the map fd we created; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Asserts a buffer lost nothing of any kind it knows of: no fate but `reinjected`, no frame
/// without room for its hold header, none refused on its way back.
pub fn assert_no_hold_losses(report: &enforcer::hold::HoldReport) {
    let losses = report.losses();
    assert!(
        losses.values().all(|n| *n == 0),
        "the buffer lost frames: {losses:?}"
    );
}

/// Registers every VM of `vms` in group 1 at epoch 0 (what most tests start from).
pub async fn register_all(
    client: &enforcer::api::client::Client,
    vms: &[enforcer_lab::netns::LabVm],
) {
    for vm in vms {
        client
            .register_vm(vm.mac, 1, &vm.port, Some(0))
            .await
            .expect("registering a VM");
    }
}

/// Runs a command (`args[0]` and its arguments); fails the test with its stderr if it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command when dropped, even when the test fails: what removes what a test set up
/// (an ifb device, an nft table).
pub struct Undo(pub Vec<String>);

impl Drop for Undo {
    fn drop(&mut self) {
        let _ = Command::new(&self.0[0]).args(&self.0[1..]).output();
    }
}

/// Messages received at one VM, with the instant each arrived.
pub struct Inbox {
    got: Arc<Mutex<Vec<(Message, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Inbox {
    pub fn new(socket: UdpSocket) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        // Re-injection is a burst: room for all of it even if this thread is descheduled.
        enforcer_lab::netns::force_rcvbuf(&socket, 64 << 20).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (got, stop) = (got.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf)
                        && let Some(m) = Message::decode(&buf[..n])
                    {
                        got.lock().unwrap().push((m, Instant::now()));
                    }
                }
            })
        };
        Self {
            got,
            stop,
            thread: Some(thread),
        }
    }

    pub fn from(&self, sender: u16) -> Vec<(Message, Instant)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m.from == sender)
            .copied()
            .collect()
    }

    pub fn finish(mut self) -> Vec<(Message, Instant)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

/// Sends `count` numbered messages from `from` to each of `to`, one every `gap`.
pub fn send_stream(
    socket: &UdpSocket,
    from: u16,
    to: &[(u16, std::net::SocketAddrV4)],
    first: u32,
    count: u32,
    color: u32,
    gap: Duration,
) {
    for seq in first..first + count {
        for (idx, addr) in to {
            let m = Message {
                from,
                to: *idx,
                seq,
                color,
            };
            socket.send_to(&m.encode(), addr).unwrap();
        }
        thread::sleep(gap);
    }
}

/// Datagrams received on `socket` within `window`, in arrival order.
pub fn receive_all(socket: &UdpSocket, window: Duration) -> Vec<Vec<u8>> {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

/// A datagram of `len` bytes: its number, then a pattern of it.
pub fn datagram(seq: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = seq.to_be_bytes().to_vec();
    d.extend((0..len - 4).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8));
    d
}
