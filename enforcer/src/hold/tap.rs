//! The frames waiting in a VM's tap queue (channel state, invariant 7 in docs/design.md).
//!
//! A frame the bridge delivered to a VM's tap waits in the tap's queue until QEMU reads it
//! into the guest. Once the VM is stopped QEMU reads one frame more into a queue of its own
//! (which no snapshot saves: `agent::channel` shuts the VM before its stop so that none
//! comes), then reads nothing until the VM runs. So at a VM's cut that queue holds frames in
//! neither image: delivered after the cut (from senders still running, until the VM's epoch
//! advances ms later), or before it and not read yet. The
//! daemon takes them with QEMU's own descriptors of the tap (`pidfd_getfd(2)`, found through
//! `/proc/<pid>/fdinfo`, where a tun file names its interface as `iff:`), and puts them back
//! out of the port, in the same order, for the running VM.

use std::{
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::record::RecordedFrame;

/// `TUNGETIFF`: the tun file's flags.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNGETVNETHDRSZ`: the virtio-net header's size in front of each frame read.
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const IFF_VNET_HDR: libc::c_int = 0x4000;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: receive-side only; never sent.
const DATA_VALID: u8 = 2;

/// The queues of one tap, through the descriptors of the process that reads it.
#[derive(Debug)]
pub struct TapQueue {
    /// One per queue (a multi-queue tap has several), with its virtio-net header size.
    files: Vec<(OwnedFd, usize)>,
}

impl TapQueue {
    /// The queues of tap `port`, taken from whichever process holds them open (QEMU). Empty
    /// when none does (a veth port, or a tap nobody reads).
    pub fn of(port: &str) -> io::Result<Self> {
        let want = format!("iff:\t{port}\n");
        let mut files = Vec::new();
        for proc in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = proc
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(fds) = fs::read_dir(proc.path().join("fdinfo")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Some(n) = fd.file_name().to_str().and_then(|f| f.parse::<i32>().ok()) else {
                    continue;
                };
                let info = fs::read_to_string(fd.path()).unwrap_or_default();
                if !info.contains(&want) {
                    continue;
                }
                let file = steal(pid, n)?;
                // The same queue held twice (QEMU's and a copy of it: ours from an earlier
                // look, or libvirt's) is one queue.
                if files.iter().any(|(f, _)| same_file(f, &file)) {
                    continue;
                }
                let vnet = vnet_size(&file)?;
                files.push((file, vnet));
            }
        }
        Ok(Self { files })
    }

    /// Whether any process holds the tap open.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// How many queues the tap has (QEMU reads each on its own).
    pub fn queues(&self) -> usize {
        self.files.len()
    }

    /// Whether a frame waits in any of the queues now (nothing is read).
    pub fn has_waiting(&self) -> bool {
        self.files.iter().any(|(file, _)| readable(file))
    }

    /// Takes every frame waiting in the queues now, each queue in its order (never blocks:
    /// a queue with nothing to read is left at once). On an error, also the frames taken
    /// before it: they must go back all the same.
    pub fn take(&self) -> (Vec<RecordedFrame>, Option<io::Error>) {
        let mut frames = Vec::new();
        let error = self.take_into(&mut frames).err();
        (frames, error)
    }

    fn take_into(&self, frames: &mut Vec<RecordedFrame>) -> io::Result<()> {
        let mut buf = vec![0u8; 65_536 + 64];
        for (file, vnet) in &self.files {
            while readable(file) {
                // SAFETY: reading into our buffer, within its length.
                let n = unsafe { libc::read(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        break;
                    }
                    return Err(e);
                }
                let n = n as usize;
                if n < *vnet + 14 {
                    continue;
                }
                let mut header = [0u8; 10];
                let take = (*vnet).min(10);
                header[..take].copy_from_slice(&buf[..take]);
                header[0] &= !DATA_VALID;
                frames.push(RecordedFrame {
                    vnet: header,
                    data: buf[*vnet..n].to_vec(),
                });
            }
        }
        Ok(())
    }
}

/// Whether a frame waits in the tun file's queue (`poll(2)` without waiting).
fn readable(file: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & libc::POLLIN != 0
}

/// Whether two of our descriptors are the same open file (`kcmp(2)`, `KCMP_FILE`): one tun
/// queue, whoever holds it. A kernel without `kcmp` says no (each is counted).
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    const KCMP_FILE: libc::c_int = 0;
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: a plain system call comparing two descriptors of ours; nothing is written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a.as_raw_fd(),
            b.as_raw_fd(),
        )
    };
    if r < 0 {
        static SAID: std::sync::Once = std::sync::Once::new();
        let e = io::Error::last_os_error();
        SAID.call_once(|| tracing::warn!(%e, "kcmp: a tap queue held twice counts twice"));
    }
    r == 0
}

/// Descriptor `fd` of process `pid`, duplicated into this one (`pidfd_getfd(2)`).
fn steal(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; the result is checked and owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `pidfd` is a fresh descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: a plain system call on our pidfd; the result is checked and owned below.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `got` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

/// The size of the virtio-net header the tun file puts in front of each frame (0: none).
fn vnet_size(file: &OwnedFd) -> io::Result<usize> {
    let mut flags: libc::c_int = 0;
    // SAFETY: TUNGETIFF writes an ifreq whose flags we read; a zeroed ifreq outlives the call.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let iff = unsafe { req.ifr_ifru.ifru_flags } as libc::c_int;
    if iff & IFF_VNET_HDR == 0 {
        return Ok(0);
    }
    // SAFETY: TUNGETVNETHDRSZ writes one int, which outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETVNETHDRSZ as _, &mut flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags.max(0) as usize)
}
