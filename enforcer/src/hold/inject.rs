//! Re-injection: held frames go out of their receiver's port through an AF_PACKET socket per
//! port (straight to the VM, past the bridge), in order, batched with `sendmmsg`, each with the
//! virtio-net header it was held with (`PACKET_VNET_HDR`): a GSO super-frame leaves as one and
//! is segmented where the bridge's copy would have been, a checksum left to offload is left to
//! the same place. A frame to a VM on another host carries its color in `SO_MARK`, which
//! VXLAN-GBP puts on the wire.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::Duration,
};

use tracing::warn;

use super::{core::Outgoing, ring::VNET_LEN};

/// One sending socket per port, made on first use, and the mark each has now.
#[derive(Default)]
pub(crate) struct Injector {
    sockets: HashMap<u32, OwnedFd>,
    /// The `SO_MARK` each socket has now (frames to other hosts carry their color in it, see
    /// `enforcer_common::wire`).
    marks: HashMap<u32, u32>,
}

impl Injector {
    fn socket(&mut self, ifindex: u32) -> Option<libc::c_int> {
        if let Some(fd) = self.sockets.get(&ifindex) {
            return Some(fd.as_raw_fd());
        }
        match packet_socket(ifindex) {
            Ok(fd) => {
                let raw = fd.as_raw_fd();
                self.sockets.insert(ifindex, fd);
                self.marks.remove(&ifindex);
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
    pub(crate) fn send(&mut self, ifindex: u32, mark: u32, frames: &[Outgoing<'_>]) -> usize {
        let Some(fd) = self.socket(ifindex) else {
            return 0;
        };
        if self.marks.get(&ifindex).copied().unwrap_or(0) != mark {
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
            self.marks.insert(ifindex, mark);
        }
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
                _ => {
                    warn!(ifindex, %err, "re-injecting held frames");
                    self.sockets.remove(&ifindex);
                    break;
                }
            }
        }
        sent
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
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
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
