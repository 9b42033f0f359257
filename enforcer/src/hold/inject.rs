//! Re-injection: held frames go back into the host at the port they first came in on, so the
//! bridge forwards them as it would have (its forwarding database, isolated ports, VLAN
//! filtering, link-local groups, nft bridge rules, the host and the ports outside the group:
//! cases R2 and R3 of the datapath review). The buffer sends them out of the socket side of
//! the hold device with an AF_PACKET socket, in order, batched with `sendmmsg`, each with the
//! virtio-net header it was held with (`PACKET_VNET_HDR`: a GSO super-frame leaves as one, a
//! checksum left to offload stays to do), and `SO_MARK` naming the port's slot and the color
//! ([`enforcer_common::inject_mark`]); `enforcer_inject`, on the hold device's ingress,
//! redirects the frame into that port's ingress ([`enforcer_common::REINJECT_MARK`]). A frame
//! to a VM on another host carries its color in the mark, which VXLAN-GBP puts on the wire.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::Duration,
};

use tracing::warn;

use super::{
    core::Outgoing,
    ring::{VNET_LEN, setsockopt},
};

/// The sending socket on the socket side of the hold device, made on first use, and the
/// `SO_MARK` it has now.
pub(crate) struct Injector {
    ifindex: u32,
    socket: Option<OwnedFd>,
    set: Option<u32>,
}

impl Injector {
    /// Sending out of `ifindex`: the socket side of the hold device.
    pub(crate) fn new(ifindex: u32) -> Self {
        Self {
            ifindex,
            socket: None,
            set: None,
        }
    }

    fn socket(&mut self) -> Option<libc::c_int> {
        if let Some(fd) = &self.socket {
            return Some(fd.as_raw_fd());
        }
        match packet_socket(self.ifindex) {
            Ok(fd) => {
                let raw = fd.as_raw_fd();
                self.socket = Some(fd);
                self.set = None;
                Some(raw)
            }
            Err(err) => {
                warn!(ifindex = self.ifindex, %err, "re-injection socket");
                None
            }
        }
    }

    /// Re-injects frames into the ingress of the port with counter slot `slot`, with `mark`
    /// (its low 16 bits; `tc`: the tc port program runs there), in order, with as few system calls as it can (`sendmmsg`); waits out
    /// a full queue rather than lose a frame. Returns how many were sent.
    pub(crate) fn send(
        &mut self,
        slot: u32,
        mark: u32,
        tc: bool,
        frames: &[Outgoing<'_>],
    ) -> usize {
        let Some(fd) = self.socket() else {
            return 0;
        };
        let mark = enforcer_common::inject_mark(slot, mark, tc);
        if self.set != Some(mark) {
            if let Err(err) =
                setsockopt(fd, libc::SOL_SOCKET, libc::SO_MARK, &(mark as libc::c_int))
            {
                warn!(slot, %err, "naming the port to re-inject at");
                self.set = None;
                return 0;
            }
            self.set = Some(mark);
        }
        match send_frames(fd, frames) {
            Ok(sent) => sent,
            Err((sent, err)) => {
                warn!(slot, %err, "re-injecting held frames");
                self.socket = None;
                sent
            }
        }
    }
}

/// Sends `frames` out of a bound AF_PACKET socket with `PACKET_VNET_HDR`, in order, with as
/// few system calls as it can (`sendmmsg`); waits out a full queue rather than lose a frame.
/// Returns how many were sent, or that many and the error that stopped it.
fn send_frames(fd: libc::c_int, frames: &[Outgoing<'_>]) -> Result<usize, (usize, std::io::Error)> {
    let mut iovecs: Vec<[libc::iovec; 2]> = frames
        .iter()
        .map(|f| {
            [
                libc::iovec {
                    iov_base: f.vnet.0.as_ptr() as *mut libc::c_void,
                    iov_len: VNET_LEN,
                },
                libc::iovec {
                    iov_base: f.data.as_ptr() as *mut libc::c_void,
                    iov_len: f.data.len(),
                },
            ]
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty message.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov.as_mut_ptr();
            m.msg_hdr.msg_iovlen = 2;
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
            _ => return Err((sent, err)),
        }
    }
    Ok(sent)
}

/// Replays recorded channel state ([`super::record`]) into a restored VM: `frames` go out of
/// its port `ifindex` toward the VM, in order, each with the virtio-net header it was
/// recorded with, into the queue the VM reads once it runs. Returns how many the port took
/// (a tap whose queue overflows drops the rest itself: see its `tx_dropped`); on an error,
/// how many it took before.
pub fn replay_into(
    ifindex: u32,
    frames: &[super::RecordedFrame],
) -> Result<usize, (usize, std::io::Error)> {
    send_out_of(ifindex, 0, frames)
}

/// Puts frames taken from a VM's tap queue back, out of its port toward it, in order, marked
/// [`enforcer_common::RECORD_COPY_MARK`] so `enforcer_record` does not record them again.
pub fn put_back(
    ifindex: u32,
    frames: &[super::RecordedFrame],
) -> Result<usize, (usize, std::io::Error)> {
    send_out_of(ifindex, enforcer_common::RECORD_COPY_MARK, frames)
}

fn send_out_of(
    ifindex: u32,
    mark: u32,
    frames: &[super::RecordedFrame],
) -> Result<usize, (usize, std::io::Error)> {
    let fd = packet_socket(ifindex).map_err(|e| (0, e))?;
    if mark != 0 {
        let mark = mark as libc::c_int;
        setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, &mark).map_err(|e| (0, e))?;
    }
    let vnets: Vec<super::ring::VnetHeader> = frames
        .iter()
        .map(|f| super::ring::VnetHeader(f.vnet))
        .collect();
    let out: Vec<Outgoing<'_>> = frames
        .iter()
        .zip(&vnets)
        .map(|(f, vnet)| Outgoing {
            vnet,
            data: &f.data,
        })
        .collect();
    send_frames(fd.as_raw_fd(), &out)
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
    setsockopt(
        fd.as_raw_fd(),
        libc::SOL_PACKET,
        libc::PACKET_VNET_HDR,
        &1 as &libc::c_int,
    )?;
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
