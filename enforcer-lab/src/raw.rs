//! Whole Ethernet frames in and out of a lab VM's `eth0`: an AF_PACKET socket that sends any
//! bytes (tagged frames included: this kernel has no 802.1Q module to make VLAN devices) and
//! reads every frame back as it was on the wire. The kernel takes the outer VLAN tag of a
//! received frame out of its bytes into metadata; the socket asks for that metadata
//! (`PACKET_AUXDATA`) and puts the tag back, as libpcap does.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

/// `struct tpacket_auxdata` (include/uapi/linux/if_packet.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AuxData {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

pub struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    /// Bound to `eth0` of the current network namespace, taking every protocol.
    pub fn on_eth0() -> io::Result<Self> {
        Self::on("eth0")
    }

    /// Bound to `device` of the current network namespace, taking every protocol.
    pub fn on(device: &str) -> io::Result<Self> {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2), checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value that outlives the call.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let name = std::ffi::CString::new(device)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: binding our socket to a sockaddr_ll of the size we pass.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Sends one whole frame out of the device.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sending from a live buffer of the length we pass.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Every frame that arrives within `window` and passes `keep`, as it was on the wire (its
    /// outer VLAN tag back in its bytes). Frames this socket sent itself are left out.
    pub fn receive(&self, window: Duration, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return frames;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            if ready <= 0 {
                continue;
            }
            let mut cmsg = [0u64; 16];
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = size_of_val(&cmsg);
            // SAFETY: the header points at live buffers of the sizes it states.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let mut aux = AuxData::default();
            // SAFETY: walking the control messages the kernel wrote into `cmsg`, within
            // `msg_controllen`; the auxdata one is copied out unaligned.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA
                    {
                        aux = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<AuxData>());
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            let bytes = &buf[..n as usize];
            let mut frame = Vec::with_capacity(bytes.len() + 4);
            if aux.tp_status & TP_STATUS_VLAN_VALID != 0 && bytes.len() >= 12 {
                let tpid = if aux.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                    aux.tp_vlan_tpid
                } else {
                    0x8100
                };
                frame.extend_from_slice(&bytes[..12]);
                frame.extend_from_slice(&tpid.to_be_bytes());
                frame.extend_from_slice(&aux.tp_vlan_tci.to_be_bytes());
                frame.extend_from_slice(&bytes[12..]);
            } else {
                frame.extend_from_slice(bytes);
            }
            if keep(&frame) {
                frames.push(frame);
            }
        }
    }
}
