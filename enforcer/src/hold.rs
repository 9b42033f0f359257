//! The buffer daemon: holds Type-3 frames and re-injects them, in order, right after their
//! receiver advances (mode `buffer`).
//!
//! Path of a held frame:
//! 1. The port program (tc or XDP) decides `Type3Held` (or `HeldForOrder`, see below), counts it
//!    in `hold_in_port[receiver slot]` / `hold_in_group[group]` and redirects it to the **hold
//!    device**: a veth pair `<name>` → `<name>p` owned by this daemon, in no bridge.
//! 2. `enforcer_hold` (XDP on `<name>p`) redirects it into the XSKMAP slot of this daemon's
//!    AF_XDP socket (copy mode; zero-copy does not exist on veth).
//! 3. One thread reads the RX ring, copies the frame out, gives the chunk straight back to the
//!    fill ring (so the kernel never starves), and queues the frame per receiver (unicast) or
//!    per group (broadcast/multicast), in arrival order, within a memory bound.
//! 4. When the API advances a receiver it writes the new epoch **and** a draining flag in one
//!    map update, then tells this thread. The thread re-injects the receiver's queue in order
//!    (an AF_PACKET send on the receiver's port: the frame goes straight to the VM; a held
//!    broadcast is copied to every other port of its group). While the flag is set, newer
//!    frames to that receiver are held too (`held_for_order`) and join the back of the queue,
//!    so none overtakes an older held frame of the same sender.
//! 5. The flag is cleared once the queue is empty, every frame the kernel counted for the
//!    receiver has been read, and none arrived for a quiet moment since the advance. After clearing, an RCU
//!    barrier (membarrier) waits out program runs that still saw the flag; if the kernel's count
//!    grew meanwhile a frame was held in that instant and a newer one may overtake it: that is
//!    counted as an `order_race` (detected, not prevented).
//!
//! Colors: a held frame's color is its sender's epoch as this thread knows it. The API updates
//! this thread's copy **before** it writes the map, so the color used here is never below the
//! one the datapath used: frames are only ever held longer, never released early.
//!
//! Accounting (invariant 4) is pinned in `hold_totals`, so a daemon that dies with frames held
//! is accounted for by the next one (`lost_restart`).

use std::{
    collections::{HashMap, VecDeque},
    ffi::CString,
    num::NonZeroU32,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command as Process,
    ptr::NonNull,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use enforcer_common::{
    FLAG_REMOTE, MAX_GROUPS, MAX_PORTS, MacKey, VmEpoch, hold_kernel, hold_totals, names, wire,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};
use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig};

use crate::{
    datapath::{Datapath, DatapathError, ifindex_of},
    epochs,
    learn::LearnedRing,
    mac::MacAddr,
};

/// Buffer settings.
#[derive(Clone, Debug)]
pub struct HoldOptions {
    /// Name of the hold device (the veth end the datapath redirects to; the socket side is
    /// `<name>p`). At most 14 characters.
    pub device: String,
    /// Memory bound for held frames, all receivers together. When reached, the newest frame
    /// is dropped and counted (`dropped_bound`).
    pub max_bytes: usize,
}

impl Default for HoldOptions {
    fn default() -> Self {
        Self {
            device: "enfhold".into(),
            max_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("hold device name {0:?} must be 1-14 characters")]
    BadName(String),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("AF_XDP socket on {device}: {detail}")]
    Xsk { device: String, detail: String },
    #[error("mapping the UMEM: {0}")]
    Mmap(std::io::Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

const FRAME_SIZE: u32 = 4096;
/// 8192 chunks of 4 KiB (32 MiB, touched only as used): the fill and RX rings of 4096 each can
/// both be full, which absorbs about 20 ms of line-rate small frames while the buffer thread is
/// descheduled on a busy host.
const UMEM_FRAMES: u32 = 8192;
const RING_SIZE: u32 = 4096;
const BATCH: u32 = 64;
/// How long a drained receiver must see no new held frame (counting from its advance) before
/// its flag is cleared.
const QUIET: Duration = Duration::from_millis(5);
/// How long to wait for frames the kernel counted but the socket has not delivered.
const RING_DEADLINE: Duration = Duration::from_millis(500);

/// Messages from the API to the buffer thread.
pub enum Command {
    /// A VM's entry as the map is about to hold it (`None`: being removed).
    Vm {
        mac: MacKey,
        vm: Option<VmEpoch>,
    },
    /// The map now has the VM at `epoch`, flagged draining.
    Advanced {
        mac: MacKey,
        epoch: u32,
    },
    /// The group's minimum epoch in the map rose to `min_epoch`, the group flagged draining.
    GroupAdvanced {
        group: u32,
        min_epoch: u32,
    },
    /// The group's snapshot was aborted: deliver everything held for it, whatever the colors.
    Release {
        group: u32,
    },
    Report(mpsc::Sender<HoldReport>),
    /// Stop. `graceful`: stop redirecting, take in what is in flight, drop (and count) what
    /// cannot be delivered, clear the flags. Otherwise vanish as a crashed daemon would.
    Stop {
        graceful: bool,
        done: mpsc::Sender<HoldReport>,
    },
}

/// One queue as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueReport {
    /// `vm <mac>` or `group <id>` (held broadcast/multicast).
    pub queue: String,
    pub frames: u64,
    pub bytes: u64,
    pub oldest_ms: u64,
    pub dropped_bound: u64,
    pub draining: bool,
}

/// What the buffer holds and has done.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HoldReport {
    pub device: String,
    pub held_frames: u64,
    pub held_bytes: u64,
    pub max_bytes: u64,
    pub queues: Vec<QueueReport>,
    /// Pinned totals by name (`received`, `reinjected`, `dropped_bound`, ...).
    pub totals: std::collections::BTreeMap<String, u64>,
    /// Frames the kernel could not hand to a socket (`no_socket`) or dropped at a full ring.
    pub kernel: std::collections::BTreeMap<String, u64>,
    /// Hold time of re-injected frames: (upper bound in seconds, cumulative count).
    pub hold_time_buckets: Vec<(f64, u64)>,
    pub hold_time_sum_seconds: f64,
    pub hold_time_count: u64,
    /// Per receiver (`vm <mac>`): frames its last advance released.
    #[serde(default)]
    pub released_at_advance: std::collections::BTreeMap<String, u64>,
}

impl HoldReport {
    pub fn total(&self, name: &str) -> u64 {
        self.totals.get(name).copied().unwrap_or(0)
    }

    /// The report's name of a receiver's queue.
    pub fn vm_queue(mac: MacAddr) -> String {
        format!("vm {mac}")
    }

    /// The report's name of a group's (broadcast) queue.
    pub fn group_queue(group: u32) -> String {
        format!("group {group}")
    }

    /// Queues of these VMs or this group that still hold frames or are draining.
    pub fn pending(&self, vms: &[MacAddr], group: u32) -> Vec<&str> {
        let mine: Vec<String> = vms
            .iter()
            .map(|m| Self::vm_queue(*m))
            .chain([Self::group_queue(group)])
            .collect();
        self.queues
            .iter()
            .filter(|q| mine.contains(&q.queue) && (q.frames > 0 || q.draining))
            .map(|q| q.queue.as_str())
            .collect()
    }

    /// Frames the VM's last advance released.
    pub fn released_at_advance_of(&self, mac: MacAddr) -> Option<u64> {
        self.released_at_advance.get(&Self::vm_queue(mac)).copied()
    }
}

/// Gives the calling thread a higher CFS weight (nice -15), so it runs promptly on a loaded
/// host (e.g. next to busy QEMU vCPUs). Root may; otherwise a warning and no change.
pub fn raise_this_thread(what: &str) {
    // SAFETY: setpriority on this thread (tid) with plain integers.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -15) };
    if r != 0 {
        warn!(err = %std::io::Error::last_os_error(), "raising the priority of {what}");
    }
}

/// Runs the calling thread under the real-time FIFO policy (lowest priority), so it preempts
/// ordinary threads the moment it wakes. Only for threads that block between short bursts of
/// work (the coordinator's per-VM threads, the libvirt event thread), never for pollers. Falls
/// back to [`raise_this_thread`] when not allowed.
pub fn make_this_thread_realtime(what: &str) {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on this thread (0) with a valid parameter block.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r != 0 {
        raise_this_thread(what);
    }
}

/// Back to ordinary scheduling (nice -15) after a real-time burst, before longer work.
pub fn leave_realtime(what: &str) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on this thread (0) with a valid parameter block.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    raise_this_thread(what);
}

/// Asks the buffer thread for a [`HoldReport`].
#[derive(Clone)]
/// `SCHED_FIFO` for a scope: [`make_this_thread_realtime`] now, [`leave_realtime`] when
/// dropped, also on an early return or a panic (a pooled thread must not stay real-time).
pub struct Realtime(&'static str);

impl Realtime {
    pub fn enter(what: &'static str) -> Self {
        make_this_thread_realtime(what);
        Self(what)
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        leave_realtime(self.0);
    }
}

pub struct Reporter(mpsc::Sender<Command>);

impl Reporter {
    pub fn report(&self) -> Option<HoldReport> {
        let (tx, rx) = mpsc::channel();
        self.0.send(Command::Report(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(5)).ok()
    }
}

/// Handle to the running buffer.
pub struct Buffer {
    commands: mpsc::Sender<Command>,
    thread: Option<thread::JoinHandle<()>>,
    device: HoldDevice,
    link_pin: std::path::PathBuf,
}

impl Buffer {
    /// Creates the hold device, binds the AF_XDP socket, accounts for what a previous daemon
    /// left, and starts the thread. From then on the datapath redirects held frames here.
    /// `learned`: the ring of colors learned from other hosts' frames, which this thread then
    /// consumes (see `learn.rs`).
    pub fn start(
        dp: Arc<Mutex<Datapath>>,
        opts: HoldOptions,
        learned: Option<LearnedRing>,
    ) -> Result<Self, HoldError> {
        let device = HoldDevice::create(&opts.device)?;
        let mut guard = dp.blocking_lock();
        let link_pin = guard.attach_hold_program(&device.socket_side)?;
        let socket = XskSocket::bind(&device.socket_side)?;
        guard.set_hold_socket(socket.rx.as_raw_fd())?;
        let mut state = State::new(&mut guard, opts.clone(), socket)?;
        // Only now, with a socket to take them, may the datapath hold frames.
        guard.set_hold_ifindex(device.ifindex)?;
        drop(guard);
        state.dp = Some(dp);
        state.learned = learned;
        let (commands, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("enforcer-hold".into())
            .spawn(move || state.run(rx))
            .map_err(|e| HoldError::Xsk {
                device: opts.device.clone(),
                detail: e.to_string(),
            })?;
        info!(
            device = opts.device,
            max_bytes = opts.max_bytes,
            "buffer daemon started"
        );
        Ok(Self {
            commands,
            thread: Some(thread),
            device,
            link_pin,
        })
    }

    pub fn send(&self, command: Command) {
        // The thread only stops on `Stop`; a send after that has nothing left to do.
        let _ = self.commands.send(command);
    }

    pub fn report(&self) -> Option<HoldReport> {
        self.reporter().report()
    }

    /// A way to ask for reports without holding on to the buffer (or a lock around it) while
    /// waiting for the answer.
    pub fn reporter(&self) -> Reporter {
        Reporter(self.commands.clone())
    }

    /// Stops the thread (see [`Command::Stop`]). Graceful: removes the hold device and its
    /// link. Otherwise both stay, as after a crash: frames still redirected to the device are
    /// counted by its program (`no_socket`) until the next daemon replaces it.
    pub fn stop(mut self, graceful: bool) -> Option<HoldReport> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Stop { graceful, done: tx });
        let report = rx.recv_timeout(Duration::from_secs(10)).ok();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if graceful {
            let _ = std::fs::remove_file(&self.link_pin);
            drop(self.device);
        } else {
            std::mem::forget(self.device);
        }
        report.filter(|_| graceful)
    }

    pub fn device(&self) -> &str {
        &self.device.name
    }
}

/// The veth pair held frames are redirected into; removed on drop.
struct HoldDevice {
    name: String,
    socket_side: String,
    ifindex: u32,
}

fn ip(args: &[&str]) -> Result<(), HoldError> {
    let out = Process::new("ip")
        .args(args)
        .output()
        .map_err(|e| HoldError::Ip {
            args: args.join(" "),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HoldError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        })
    }
}

impl HoldDevice {
    fn create(name: &str) -> Result<Self, HoldError> {
        if name.is_empty() || name.len() > 14 {
            return Err(HoldError::BadName(name.into()));
        }
        let socket_side = format!("{name}p");
        // A device left by a daemon that died is stale: replace it.
        let _ = Process::new("ip").args(["link", "del", name]).output();
        // One queue each way: the AF_XDP socket serves queue 0.
        ip(&[
            "link",
            "add",
            name,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
            "type",
            "veth",
            "peer",
            "name",
            &socket_side,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
        ])?;
        for dev in [name, socket_side.as_str()] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
            ip(&["link", "set", dev, "up"])?;
        }
        let ifindex = ifindex_of(name)?;
        Ok(Self {
            name: name.into(),
            socket_side,
            ifindex,
        })
    }
}

impl Drop for HoldDevice {
    fn drop(&mut self) {
        let _ = Process::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// Page-aligned anonymous memory for the UMEM.
struct UmemArea {
    ptr: NonNull<u8>,
    len: usize,
}

impl UmemArea {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a non-null pointer"),
            len,
        })
    }

    /// The bytes of a received frame.
    fn frame(&self, addr: u64, len: u32) -> &[u8] {
        let (start, len) = (addr as usize, len as usize);
        assert!(start + len <= self.len, "descriptor outside the UMEM");
        // SAFETY: within the mapping (checked); the kernel finished writing this chunk when it
        // put the descriptor on the RX ring, and it is not handed back until we refill it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len) }
    }
}

impl Drop for UmemArea {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once, after the socket using it is gone
        // (fields of `XskSocket` drop in declaration order, the area last).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

struct XskSocket {
    rx: RingRx,
    fill: DeviceQueue,
    _umem: Umem,
    free: Vec<u64>,
    area: UmemArea,
}

// SAFETY: the socket, its rings and its memory are created on the starting thread, moved into
// the buffer thread once, and used only there; nothing else keeps a pointer into them.
unsafe impl Send for XskSocket {}

impl XskSocket {
    fn bind(device: &str) -> Result<Self, HoldError> {
        let err = |detail: String| HoldError::Xsk {
            device: device.into(),
            detail,
        };
        let area = UmemArea::new((UMEM_FRAMES * FRAME_SIZE) as usize).map_err(HoldError::Mmap)?;
        let config = UmemConfig {
            fill_size: RING_SIZE,
            complete_size: RING_SIZE,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.len);
        // SAFETY: `area` is page aligned (mmap), `len` bytes long, and lives as long as the
        // socket (same struct, dropped after it).
        let umem = unsafe { Umem::new(config, slice) }.map_err(|e| err(format!("UMEM: {e}")))?;
        let mut iface = IfInfo::invalid();
        let name = CString::new(device).map_err(|e| err(e.to_string()))?;
        iface
            .from_name(&name)
            .map_err(|e| err(format!("interface: {e}")))?;
        iface.set_queue(0);
        let sock = Socket::with_shared(&iface, &umem).map_err(|e| err(format!("socket: {e}")))?;
        let mut fill = umem
            .fq_cq(&sock)
            .map_err(|e| err(format!("fill/completion rings: {e}")))?;
        const XDP_COPY: u16 = 1 << 1;
        let cfg = SocketConfig {
            rx_size: NonZeroU32::new(RING_SIZE),
            tx_size: None,
            bind_flags: XDP_COPY,
        };
        let rxtx = umem
            .rx_tx(&sock, &cfg)
            .map_err(|e| err(format!("rx ring: {e}")))?;
        let rx = rxtx
            .map_rx()
            .map_err(|e| err(format!("mapping rx ring: {e}")))?;
        umem.bind(&rxtx).map_err(|e| err(format!("bind: {e}")))?;
        let mut free: Vec<u64> = (0..UMEM_FRAMES)
            .map(|i| u64::from(i * FRAME_SIZE))
            .collect();
        let mut writer = fill.fill(RING_SIZE);
        let n = writer.capacity() as usize;
        writer.insert(free.drain(free.len() - n..));
        writer.commit();
        drop(writer);
        Ok(Self {
            rx,
            fill,
            _umem: umem,
            free,
            area,
        })
    }

    /// Hands freed chunks back to the kernel.
    fn refill(&mut self) {
        if self.free.is_empty() {
            return;
        }
        let mut writer = self.fill.fill(self.free.len() as u32);
        let n = writer.capacity() as usize;
        let start = self.free.len() - n;
        writer.insert(self.free.drain(start..));
        writer.commit();
    }

    /// The socket's statistics: (dropped, RX ring full, fill ring found empty).
    fn kernel_drops(&self) -> (u64, u64, u64) {
        // The rx ring owns the socket fd the statistics hang off.
        let mut stats = [0u64; 6];
        let mut len = std::mem::size_of_val(&stats) as libc::socklen_t;
        const SOL_XDP: libc::c_int = 283;
        const XDP_STATISTICS: libc::c_int = 7;
        // SAFETY: getsockopt into a buffer of the size we pass.
        let r = unsafe {
            libc::getsockopt(
                self.rx.as_raw_fd(),
                SOL_XDP,
                XDP_STATISTICS,
                stats.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            (stats[0], stats[3], stats[4])
        } else {
            (0, 0, 0)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Vm(MacKey),
    Group(u32),
}

struct Held {
    data: Vec<u8>,
    color: u32,
    sender: MacKey,
    arrived: Instant,
}

/// A FIFO in chunks of fixed capacity: growing it never moves what it holds (a `VecDeque` of
/// hundreds of thousands of frames would copy them all when it doubles, stalling the thread
/// while the kernel's rings fill up).
struct Fifo<T> {
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

const FIFO_CHUNK: usize = 1024;

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> Fifo<T> {
    fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(chunk) if chunk.len() < FIFO_CHUNK => chunk.push_back(item),
            _ => {
                let mut chunk = VecDeque::with_capacity(FIFO_CHUNK);
                chunk.push_back(item);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<T> {
        let chunk = self.chunks.front_mut()?;
        let item = chunk.pop_front();
        if chunk.is_empty() {
            self.chunks.pop_front();
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }
}

#[derive(Default)]
struct Queue {
    frames: Fifo<Held>,
    bytes: usize,
    dropped_bound: u64,
    last_arrival: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
enum Drain {
    /// Waiting for the queue to empty and go quiet. Quiet counts from `since` (the advance)
    /// too: frames the datapath redirected right after it may not have reached us yet.
    Pending { since: Instant },
    /// Flag cleared; waiting for frames the kernel counted to be read (until the deadline).
    Waiting { expected: u64, deadline: Instant },
}

const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0];

struct State {
    dp: Option<Arc<Mutex<Datapath>>>,
    opts: HoldOptions,
    socket: XskSocket,
    /// VMs as the API last announced them (ahead of, or equal to, the map).
    vms: HashMap<MacKey, VmEpoch>,
    /// Epoch the map has for each VM / minimum per group: what may be released.
    released_vm: HashMap<MacKey, u32>,
    released_group: HashMap<u32, u32>,
    queues: HashMap<Key, Queue>,
    drains: HashMap<Key, Drain>,
    /// Frames read per receiver slot / group, in the units of the kernel's hold counters.
    read_port: Vec<u64>,
    read_group: Vec<u64>,
    held_bytes: usize,
    /// Frames each VM's last advance released (what was held for it).
    released_at_advance: HashMap<MacKey, u64>,
    totals: Vec<u64>,
    inject: HashMap<u32, OwnedFd>,
    /// The `SO_MARK` each re-injection socket has now (frames to other hosts carry their
    /// color in it, see `enforcer_common::wire`).
    inject_marks: HashMap<u32, u32>,
    learned: Option<LearnedRing>,
    hold_hist: [u64; BUCKETS.len() + 1],
    hold_sum: f64,
    totals_dirty: bool,
}

impl State {
    fn new(dp: &mut Datapath, opts: HoldOptions, socket: XskSocket) -> Result<Self, HoldError> {
        let read_port = dp.per_cpu_sums(names::HOLD_IN_PORT)?;
        let read_group = dp.per_cpu_sums(names::HOLD_IN_GROUP)?;
        let no_socket = dp.per_cpu_sum(names::HOLD_KERNEL, hold_kernel::NO_SOCKET)?;
        let mut totals = dp.hold_totals()?;
        totals.resize(hold_totals::LEN as usize, 0);
        // What a previous daemon held in memory, or left unread in its ring, died with it.
        use hold_totals::*;
        let outcomes: u64 = [
            REINJECTED,
            DROPPED_BOUND,
            DROPPED_SHUTDOWN,
            LOST_RESTART,
            LOST_RING,
            DROPPED_UNKNOWN,
            INJECT_FAILED,
        ]
        .iter()
        .map(|i| totals[*i as usize])
        .sum();
        let in_memory = totals[RECEIVED as usize].saturating_sub(outcomes);
        let counted: u64 = read_port
            .iter()
            .chain(&read_group)
            .sum::<u64>()
            .saturating_sub(no_socket);
        let unread = counted.saturating_sub(totals[RECEIVED as usize]);
        if in_memory + unread > 0 {
            warn!(
                in_memory,
                unread, "frames held by a previous buffer daemon were lost with it"
            );
        }
        totals[LOST_RESTART as usize] += in_memory + unread;
        totals[RECEIVED as usize] += unread;
        dp.set_hold_totals(&totals)?;

        let mut vms = HashMap::new();
        let mut released_vm = HashMap::new();
        for (mac, vm) in epochs::EpochStore::vms(dp).map_err(HoldError::Datapath)? {
            vms.insert(mac, vm);
            released_vm.insert(mac, vm.epoch);
            // Nothing is held any more: a flag left by a dead daemon would route this VM's
            // traffic through userspace for ever.
            epochs::clear_vm_draining(dp, &mac).map_err(epoch_err)?;
        }
        let mut released_group = HashMap::new();
        for g in epochs::list_groups(dp).map_err(epoch_err)? {
            released_group.insert(g.group, g.min_epoch);
            epochs::clear_group_draining(dp, g.group).map_err(epoch_err)?;
        }
        Ok(Self {
            dp: None,
            opts,
            socket,
            vms,
            released_vm,
            released_group,
            queues: HashMap::new(),
            drains: HashMap::new(),
            read_port,
            read_group,
            held_bytes: 0,
            released_at_advance: HashMap::new(),
            totals,
            inject: HashMap::new(),
            inject_marks: HashMap::new(),
            learned: None,
            hold_hist: [0; BUCKETS.len() + 1],
            hold_sum: 0.0,
            totals_dirty: false,
        })
    }

    fn dp(&self) -> tokio::sync::MutexGuard<'_, Datapath> {
        self.dp
            .as_ref()
            .expect("set before the thread starts")
            .blocking_lock()
    }

    fn run(mut self, commands: mpsc::Receiver<Command>) {
        // The kernel's rings hold ~20 ms of small frames at line rate: this thread must not wait
        // behind busy threads for longer than that.
        raise_this_thread("the buffer thread");
        let mut last_flush = Instant::now();
        loop {
            let mut busy = false;
            loop {
                match commands.try_recv() {
                    Ok(Command::Stop { graceful, done }) => {
                        let report = if graceful {
                            Some(self.shutdown())
                        } else {
                            None
                        };
                        let _ = done.send(report.unwrap_or_default());
                        return;
                    }
                    Ok(cmd) => {
                        busy = true;
                        self.command(cmd);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // Every sender gone: the daemon is gone without a word. Behave as if it
                    // had crashed (the next one accounts for what was held).
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            busy |= self.apply_learned();
            busy |= self.receive();
            self.progress_drains();
            if self.totals_dirty && last_flush.elapsed() > Duration::from_millis(20) {
                self.flush_totals();
                last_flush = Instant::now();
            }
            if !busy {
                self.wait_for_frames(Duration::from_millis(1));
            }
        }
    }

    fn wait_for_frames(&self, timeout: Duration) {
        let pfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = vec![pfd(self.socket.rx.as_raw_fd())];
        if let Some(ring) = &self.learned {
            fds.push(pfd(ring.raw_fd()));
        }
        // SAFETY: valid pollfds for the duration of the call.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as libc::c_int,
            )
        };
    }

    /// Raises this host's views of VMs on other hosts to the colors their frames carried: our
    /// copy first (so colors assigned from now on never lag the map), then the map, flagged
    /// draining, then the frames held for that VM are released like after any advance.
    fn apply_learned(&mut self) -> bool {
        let Some(ring) = self.learned.as_mut() else {
            return false;
        };
        let learned = ring.drain();
        let applied = ring.applied.clone();
        let any = !learned.is_empty();
        for (mac, color) in learned {
            let dp_arc = self.dp.clone().expect("set before the thread starts");
            let mut dp = dp_arc.blocking_lock();
            let Ok(Some(current)) = epochs::EpochStore::vm(&mut *dp, &mac) else {
                continue;
            };
            if color <= current.epoch {
                // The coordinator's message got there first; keep our copy level with it.
                self.vms.insert(mac, current);
                continue;
            }
            self.vms.insert(
                mac,
                VmEpoch {
                    epoch: color,
                    ..current
                },
            );
            let change = epochs::set_epoch(&mut *dp, mac.into(), color, true);
            drop(dp);
            match change {
                Ok(change) => {
                    applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.command(Command::Advanced { mac, epoch: color });
                    if change.group_min_rose {
                        self.command(Command::GroupAdvanced {
                            group: change.vm.group,
                            min_epoch: change.group_min,
                        });
                    }
                }
                Err(err) => warn!(%err, "raising a learned view"),
            }
        }
        any
    }

    fn flush_totals(&mut self) {
        let totals = self.totals.clone();
        if let Err(err) = self.dp().set_hold_totals(&totals) {
            warn!(%err, "writing hold totals");
        }
        self.totals_dirty = false;
    }

    fn bump(&mut self, index: u32, n: u64) {
        self.totals[index as usize] += n;
        self.totals_dirty = true;
    }

    /// Reads what the ring has; returns whether there was anything.
    fn receive(&mut self) -> bool {
        let mut frames: Vec<Vec<u8>> = Vec::new();
        {
            let socket = &mut self.socket;
            if socket.rx.available() == 0 {
                return false;
            }
            let mut reader = socket.rx.receive(4 * BATCH);
            while let Some(desc) = reader.read() {
                frames.push(socket.area.frame(desc.addr, desc.len).to_vec());
                socket.free.push(desc.addr & !u64::from(FRAME_SIZE - 1));
            }
            reader.release();
        }
        self.socket.refill();
        // A held frame from another host may carry a color above our view of its sender; it
        // was reported to the ring before the frame reached the socket, so it is there now.
        self.apply_learned();
        let now = Instant::now();
        for data in frames {
            self.on_frame(data, now);
        }
        true
    }

    fn on_frame(&mut self, mut data: Vec<u8>, now: Instant) {
        self.bump(hold_totals::RECEIVED, 1);
        // The L4 checksum may still be left to offload: finish it, or the receiver drops it.
        crate::checksum::complete_l4_checksum(&mut data);
        if data.len() < 14 {
            self.bump(hold_totals::DROPPED_UNKNOWN, 1);
            return;
        }
        let dst = MacKey::new(data[0..6].try_into().expect("6 bytes"));
        let sender = MacKey::new(data[6..12].try_into().expect("6 bytes"));
        let sender_vm = self.vms.get(&sender).copied();
        // No longer registered: its frames are ordinary, color 0.
        let color = sender_vm.map_or(0, |vm| vm.epoch);
        let key = if dst.is_multicast() {
            match sender_vm {
                Some(vm) => {
                    self.read_group[vm.group as usize % MAX_GROUPS as usize] += 1;
                    Key::Group(vm.group)
                }
                None => {
                    self.bump(hold_totals::DROPPED_UNKNOWN, 1);
                    return;
                }
            }
        } else {
            match self.vms.get(&dst) {
                Some(vm) => {
                    self.read_port[vm.slot as usize % MAX_PORTS as usize] += 1;
                    Key::Vm(dst)
                }
                None => {
                    self.bump(hold_totals::DROPPED_UNKNOWN, 1);
                    return;
                }
            }
        };
        let released = self.released(key);
        let queue = self.queues.entry(key).or_default();
        queue.last_arrival = Some(now);
        if queue.frames.is_empty() && color <= released {
            self.inject(key, sender, color, &data, now);
            return;
        }
        if self.held_bytes + data.len() > self.opts.max_bytes {
            queue.dropped_bound += 1;
            self.bump(hold_totals::DROPPED_BOUND, 1);
            return;
        }
        self.held_bytes += data.len();
        queue.bytes += data.len();
        queue.frames.push_back(Held {
            data,
            color,
            sender,
            arrived: now,
        });
    }

    fn released(&self, key: Key) -> u32 {
        match key {
            Key::Vm(mac) => self.released_vm.get(&mac).copied().unwrap_or(0),
            Key::Group(g) => self.released_group.get(&g).copied().unwrap_or(0),
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Vm {
                mac,
                vm: Some(mut vm),
            } => {
                // A view of a VM on another host only rises while registered: this thread may
                // have raised it from a frame's color after an older change was queued.
                if vm.flags & FLAG_REMOTE != 0
                    && let Some(copy) = self.vms.get(&mac)
                {
                    vm.epoch = vm.epoch.max(copy.epoch);
                }
                self.released_vm.entry(mac).or_insert(vm.epoch);
                self.vms.insert(mac, vm);
            }
            Command::Vm { mac, vm: None } => {
                self.vms.remove(&mac);
                self.released_vm.remove(&mac);
                if let Some(q) = self.queues.remove(&Key::Vm(mac)) {
                    self.held_bytes -= q.bytes;
                    self.bump(hold_totals::DROPPED_UNKNOWN, q.frames.len() as u64);
                }
                self.drains.remove(&Key::Vm(mac));
            }
            Command::Advanced { mac, epoch } => {
                // Advances only raise (a queued older one must not lower a learned one).
                let released = self.released_vm.entry(mac).or_insert(epoch);
                *released = (*released).max(epoch);
                let n = self.flush(Key::Vm(mac), false);
                self.released_at_advance.insert(mac, n);
                self.drains.insert(
                    Key::Vm(mac),
                    Drain::Pending {
                        since: Instant::now(),
                    },
                );
            }
            Command::GroupAdvanced { group, min_epoch } => {
                self.released_group.insert(group, min_epoch);
                let _ = self.flush(Key::Group(group), false);
                self.drains.insert(
                    Key::Group(group),
                    Drain::Pending {
                        since: Instant::now(),
                    },
                );
            }
            Command::Release { group } => {
                let members: Vec<(MacKey, u32)> = self
                    .vms
                    .iter()
                    .filter(|(_, vm)| vm.group == group)
                    .map(|(m, vm)| (*m, vm.epoch))
                    .collect();
                let min = members.iter().map(|(_, e)| *e).min().unwrap_or(0);
                self.released_group.insert(group, min);
                for (mac, epoch) in &members {
                    self.released_vm.insert(*mac, *epoch);
                    let _ = self.flush(Key::Vm(*mac), true);
                    self.drains.insert(
                        Key::Vm(*mac),
                        Drain::Pending {
                            since: Instant::now(),
                        },
                    );
                }
                let _ = self.flush(Key::Group(group), true);
                self.drains.insert(
                    Key::Group(group),
                    Drain::Pending {
                        since: Instant::now(),
                    },
                );
            }
            Command::Report(tx) => {
                let _ = tx.send(self.report());
            }
            Command::Stop { .. } => unreachable!("handled by the loop"),
        }
    }

    /// Re-injects a queue's frames in order, as far as their colors allow (all with `force`),
    /// in batches (one `sendmmsg` each for a receiver's queue).
    /// Sends what may be released from a queue, in order; returns how many frames left it.
    fn flush(&mut self, key: Key, force: bool) -> u64 {
        let released = self.released(key);
        let mut released_frames = 0;
        loop {
            let Some(q) = self.queues.get_mut(&key) else {
                return released_frames;
            };
            let mut batch = Vec::new();
            while batch.len() < BATCH as usize {
                match q.frames.front() {
                    Some(front) if force || front.color <= released => {
                        let held = q.frames.pop_front().expect("front exists");
                        q.bytes -= held.data.len();
                        batch.push(held);
                    }
                    _ => break,
                }
            }
            if batch.is_empty() {
                return released_frames;
            }
            released_frames += batch.len() as u64;
            self.held_bytes -= batch.iter().map(|h| h.data.len()).sum::<usize>();
            match key {
                Key::Vm(mac) => {
                    let receiver = self.vms.get(&mac).copied();
                    let mut sent = 0;
                    // Runs of one color: to another host, each run goes with its color mark.
                    while let Some(receiver) = receiver
                        && sent < batch.len()
                    {
                        let color = batch[sent].color;
                        let run = batch[sent..]
                            .iter()
                            .take_while(|h| h.color == color)
                            .count();
                        let frames: Vec<&[u8]> = batch[sent..sent + run]
                            .iter()
                            .map(|h| h.data.as_slice())
                            .collect();
                        let mark = remote_mark(&receiver, color);
                        let n = self.send_frames(receiver.ifindex, &frames, mark);
                        sent += n;
                        if n < run {
                            break;
                        }
                    }
                    for held in &batch[..sent] {
                        self.record_reinjected(held.arrived);
                    }
                    self.bump(hold_totals::INJECT_FAILED, (batch.len() - sent) as u64);
                }
                Key::Group(_) => {
                    for held in batch {
                        self.inject(key, held.sender, held.color, &held.data, held.arrived);
                    }
                }
            }
        }
    }

    /// Sends one frame to its receiver's port (a broadcast: to every other port of its group).
    fn inject(&mut self, key: Key, sender: MacKey, color: u32, data: &[u8], arrived: Instant) {
        let mut ports: Vec<(u32, u32)> = match key {
            Key::Vm(mac) => self
                .vms
                .get(&mac)
                .map(|vm| vec![(vm.ifindex, remote_mark(vm, color))])
                .unwrap_or_default(),
            Key::Group(g) => {
                let from = self.vms.get(&sender).map(|vm| vm.ifindex);
                self.vms
                    .values()
                    .filter(|vm| vm.group == g && Some(vm.ifindex) != from)
                    .map(|vm| (vm.ifindex, remote_mark(vm, color)))
                    .collect()
            }
        };
        // VMs on another host share the overlay port: one copy goes out there.
        ports.sort_unstable();
        ports.dedup();
        let mut ok = !ports.is_empty() || matches!(key, Key::Group(_));
        for (port, mark) in ports {
            ok &= self.send_frames(port, &[data], mark) == 1;
        }
        if ok {
            self.record_reinjected(arrived);
        } else {
            self.bump(hold_totals::INJECT_FAILED, 1);
        }
    }

    fn record_reinjected(&mut self, arrived: Instant) {
        self.bump(hold_totals::REINJECTED, 1);
        let held = arrived.elapsed().as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| held <= *b)
            .unwrap_or(BUCKETS.len());
        self.hold_hist[bucket] += 1;
        self.hold_sum += held;
    }

    fn inject_socket(&mut self, ifindex: u32) -> Option<libc::c_int> {
        if let Some(fd) = self.inject.get(&ifindex) {
            return Some(fd.as_raw_fd());
        }
        match packet_socket(ifindex) {
            Ok(fd) => {
                let raw = fd.as_raw_fd();
                self.inject.insert(ifindex, fd);
                self.inject_marks.remove(&ifindex);
                Some(raw)
            }
            Err(err) => {
                warn!(ifindex, %err, "re-injection socket");
                None
            }
        }
    }

    /// Sends frames out of a port, in order, with as few system calls as it can (`sendmmsg`);
    /// waits out a full queue rather than lose a frame. Returns how many were sent.
    fn send_frames(&mut self, ifindex: u32, frames: &[&[u8]], mark: u32) -> usize {
        let Some(fd) = self.inject_socket(ifindex) else {
            return 0;
        };
        if self.inject_marks.get(&ifindex).copied().unwrap_or(0) != mark {
            let value = mark as libc::c_int;
            // SAFETY: a valid socket and a c_int option value that outlives the call.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&value as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                warn!(ifindex, err = %std::io::Error::last_os_error(), "setting the color mark");
                return 0;
            }
            self.inject_marks.insert(ifindex, mark);
        }
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid empty message.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut sent = 0;
        let mut waits = 0;
        while sent < messages.len() {
            // SAFETY: `messages[sent..]` are valid headers pointing at `iovecs`, which point at
            // the frames; all outlive the call.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    messages[sent..].as_mut_ptr(),
                    (messages.len() - sent) as u32,
                    0,
                )
            };
            if r > 0 {
                sent += r as usize;
                continue;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                // The port's queue is full: wait for it rather than lose the frame.
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) if waits < 1000 => {
                    waits += 1;
                    thread::sleep(Duration::from_micros(20));
                }
                _ => {
                    warn!(ifindex, %err, "re-injecting held frames");
                    self.inject.remove(&ifindex);
                    break;
                }
            }
        }
        sent
    }

    fn kernel_count(&self, key: Key) -> Option<u64> {
        let mut dp = self.dp();
        let r = match key {
            Key::Vm(mac) => {
                let slot = self.vms.get(&mac)?.slot;
                dp.per_cpu_sum(names::HOLD_IN_PORT, slot)
            }
            Key::Group(g) => dp.per_cpu_sum(names::HOLD_IN_GROUP, g),
        };
        r.ok()
    }

    fn read_count(&mut self, key: Key) -> Option<&mut u64> {
        match key {
            Key::Vm(mac) => {
                let slot = self.vms.get(&mac)?.slot as usize;
                self.read_port.get_mut(slot)
            }
            Key::Group(g) => self.read_group.get_mut(g as usize),
        }
    }

    fn clear_flag(&self, key: Key) {
        let mut dp = self.dp();
        let r = match key {
            Key::Vm(mac) => epochs::clear_vm_draining(&mut *dp, &mac),
            Key::Group(g) => epochs::clear_group_draining(&mut *dp, g),
        };
        if let Err(err) = r {
            warn!(%err, "clearing a draining flag");
        }
    }

    fn progress_drains(&mut self) {
        if self.drains.is_empty() {
            return;
        }
        let now = Instant::now();
        let keys: Vec<(Key, Drain)> = self.drains.iter().map(|(k, d)| (*k, *d)).collect();
        for (key, drain) in keys {
            let queue_empty = self.queues.get(&key).is_none_or(|q| q.frames.is_empty());
            let last_arrival = self.queues.get(&key).and_then(|q| q.last_arrival);
            let Some(read) = self.read_count(key).map(|r| *r) else {
                self.drains.remove(&key);
                continue;
            };
            match drain {
                Drain::Pending { since } => {
                    let latest = last_arrival.map_or(since, |t| t.max(since));
                    if !queue_empty || now - latest < QUIET {
                        continue;
                    }
                    let Some(before) = self.kernel_count(key) else {
                        continue;
                    };
                    if before > read {
                        // Counted but not yet read: let it arrive first, unless nothing came for
                        // so long that it was lost on the way (a full ring): count it, go on.
                        if now - latest < RING_DEADLINE {
                            continue;
                        }
                        let missing = before - read;
                        if let Some(r) = self.read_count(key) {
                            *r = before;
                        }
                        self.bump(hold_totals::LOST_RING, missing);
                        self.bump(hold_totals::RECEIVED, missing);
                    }
                    self.clear_flag(key);
                    rcu_barrier();
                    let after = self.kernel_count(key).unwrap_or(before);
                    if after == read {
                        self.drains.remove(&key);
                    } else {
                        self.bump(hold_totals::ORDER_RACES, 1);
                        self.drains.insert(
                            key,
                            Drain::Waiting {
                                expected: after,
                                deadline: now + RING_DEADLINE,
                            },
                        );
                    }
                }
                Drain::Waiting { expected, deadline } => {
                    if read >= expected {
                        self.drains.remove(&key);
                    } else if now > deadline {
                        let missing = expected - read;
                        if let Some(r) = self.read_count(key) {
                            *r = expected;
                        }
                        self.bump(hold_totals::LOST_RING, missing);
                        self.bump(hold_totals::RECEIVED, missing);
                        self.drains.remove(&key);
                    }
                }
            }
        }
    }

    fn report(&self) -> HoldReport {
        let now = Instant::now();
        let mut queues: Vec<QueueReport> = self
            .queues
            .iter()
            .filter(|(k, q)| {
                !q.frames.is_empty() || q.dropped_bound > 0 || self.drains.contains_key(k)
            })
            .map(|(k, q)| QueueReport {
                queue: match k {
                    Key::Vm(mac) => HoldReport::vm_queue(MacAddr::from(*mac)),
                    Key::Group(g) => HoldReport::group_queue(*g),
                },
                frames: q.frames.len() as u64,
                bytes: q.bytes as u64,
                oldest_ms: q
                    .frames
                    .front()
                    .map_or(0, |h| (now - h.arrived).as_millis() as u64),
                dropped_bound: q.dropped_bound,
                draining: self.drains.contains_key(k),
            })
            .collect();
        queues.sort_by(|a, b| a.queue.cmp(&b.queue));
        let mut kernel = std::collections::BTreeMap::new();
        if let Ok(n) = self
            .dp()
            .per_cpu_sum(names::HOLD_KERNEL, hold_kernel::NO_SOCKET)
        {
            kernel.insert("no_socket".to_owned(), n);
        }
        let (dropped, ring_full, fill_empty) = self.socket.kernel_drops();
        kernel.insert("socket_dropped".to_owned(), dropped);
        kernel.insert("ring_full".to_owned(), ring_full);
        kernel.insert("fill_ring_empty".to_owned(), fill_empty);
        let mut cumulative = 0;
        let mut hold_time_buckets = Vec::new();
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.hold_hist[i];
            hold_time_buckets.push((*le, cumulative));
        }
        let count = cumulative + self.hold_hist[BUCKETS.len()];
        HoldReport {
            device: self.opts.device.clone(),
            held_frames: self.queues.values().map(|q| q.frames.len() as u64).sum(),
            held_bytes: self.held_bytes as u64,
            max_bytes: self.opts.max_bytes as u64,
            queues,
            totals: hold_totals::NAMES
                .iter()
                .map(|(i, n)| ((*n).to_owned(), self.totals[*i as usize]))
                .collect(),
            kernel,
            hold_time_buckets,
            hold_time_sum_seconds: self.hold_sum,
            hold_time_count: count,
            released_at_advance: self
                .released_at_advance
                .iter()
                .map(|(mac, n)| (HoldReport::vm_queue(MacAddr::from(*mac)), *n))
                .collect(),
        }
    }

    /// Graceful stop: no more holds, take in what is in flight, deliver what may be delivered,
    /// drop and count the rest, clear every flag.
    fn shutdown(&mut self) -> HoldReport {
        if let Err(err) = self.dp().set_hold_ifindex(0) {
            warn!(%err, "clearing the hold device in the config");
        }
        rcu_barrier();
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            if !self.receive() {
                self.wait_for_frames(Duration::from_millis(5));
            }
        }
        let keys: Vec<Key> = self.queues.keys().copied().collect();
        for key in keys {
            let _ = self.flush(key, false);
            if let Some(q) = self.queues.get_mut(&key) {
                let n = q.frames.len() as u64;
                q.frames.clear();
                q.bytes = 0;
                if n > 0 {
                    self.bump(hold_totals::DROPPED_SHUTDOWN, n);
                }
            }
        }
        self.held_bytes = 0;
        {
            let mut dp = self.dp();
            let macs: Vec<MacKey> = self.vms.keys().copied().collect();
            for mac in macs {
                let _ = epochs::clear_vm_draining(&mut *dp, &mac);
            }
            let groups: Vec<u32> = self.released_group.keys().copied().collect();
            for g in groups {
                let _ = epochs::clear_group_draining(&mut *dp, g);
            }
        }
        self.flush_totals();
        info!(
            dropped = self.totals[hold_totals::DROPPED_SHUTDOWN as usize],
            "buffer daemon stopped"
        );
        self.report()
    }
}

/// The mark a frame of `color` goes out with towards `receiver`: its wire color when the
/// receiver is on another host (the overlay carries it), none otherwise.
fn remote_mark(receiver: &VmEpoch, color: u32) -> u32 {
    if receiver.flags & FLAG_REMOTE != 0 {
        wire::encode(color)
    } else {
        0
    }
}

fn epoch_err(e: epochs::EpochError<DatapathError>) -> HoldError {
    match e {
        epochs::EpochError::Store(e) => HoldError::Datapath(e),
        other => HoldError::Xsk {
            device: String::new(),
            detail: other.to_string(),
        },
    }
}

/// Waits until every BPF program run that started before now has finished (an RCU grace
/// period: membarrier(MEMBARRIER_CMD_GLOBAL) calls synchronize_rcu).
fn rcu_barrier() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        // Not available (nohz_full): a grace period is well under this.
        thread::sleep(Duration::from_millis(50));
    }
}

/// An AF_PACKET socket that sends whole Ethernet frames out of `ifindex`.
fn packet_socket(ifindex: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: binding our socket to a sockaddr_ll of the size we pass. Protocol 0: it sends
    // only, and receives nothing.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of_val(&addr) as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::Fifo;

    #[test]
    fn fifo_keeps_order_across_chunks() {
        let mut f = Fifo::default();
        for i in 0..5000 {
            f.push_back(i);
        }
        assert_eq!(f.len(), 5000);
        for i in 0..3000 {
            assert_eq!(f.front(), Some(&i));
            assert_eq!(f.pop_front(), Some(i));
        }
        for i in 5000..6000 {
            f.push_back(i);
        }
        let rest: Vec<i32> = std::iter::from_fn(|| f.pop_front()).collect();
        assert_eq!(rest, (3000..6000).collect::<Vec<_>>());
        assert!(f.is_empty() && f.pop_front().is_none() && f.front().is_none());
        f.push_back(7);
        f.clear();
        assert_eq!(f.len(), 0);
    }
}
