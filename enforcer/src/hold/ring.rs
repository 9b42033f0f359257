//! The socket the buffer reads held frames from: AF_PACKET on the socket side of the hold
//! device, bound to [`HOLD_ETHER_TYPE`] (so it takes exactly the frames the port programs
//! redirected), with a virtio-net header in front of each frame (`PACKET_VNET_HDR`) and a
//! TPACKET_V3 ring of blocks shared with the kernel.
//!
//! Why AF_PACKET and not AF_XDP (what the buffer used before): the virtio-net header carries a
//! frame's offload state — a GSO super-frame's segment size and type, a checksum the sender
//! left to offload (`NEEDS_CSUM`, the inner one of encapsulated traffic included) — so a held
//! frame is re-injected exactly as the bridge would have forwarded it, 64 KiB super-frames and
//! 9000-byte jumbo frames included. AF_XDP sees only bytes in one page (a 4 KiB chunk): GSO
//! frames and jumbo frames could not be held at all, and partial checksums had to be finished
//! by hand (cases F1, F2 and F4 of the datapath review). The kernel's own documentation of the
//! ring: Documentation/networking/packet_mmap.rst.
//!
//! Nearly all of the buffer's `unsafe` for receiving lives here.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    ptr::NonNull,
};

use enforcer_common::HOLD_ETHER_TYPE;

use super::config::HoldError;

/// `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h): flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, in host byte order (AF_PACKET's, on little-endian hosts).
pub(crate) const VNET_LEN: usize = 10;

/// A frame's virtio-net header, as the socket gave it and as the re-injection socket takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VnetHeader(pub(crate) [u8; VNET_LEN]);

impl VnetHeader {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is left to do.
    const NEEDS_CSUM: u8 = 1;
    /// `VIRTIO_NET_HDR_F_DATA_VALID`: a receive-side flag; meaningless (and refused by some
    /// kernels) on transmit.
    const DATA_VALID: u8 = 2;

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_ne_bytes([self.0[at], self.0[at + 1]])
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_ne_bytes());
    }

    /// The header for the frame once `removed` bytes in front of its Ethernet header are gone
    /// and `inserted` bytes (a VLAN tag) put in after its addresses: the offsets that count
    /// from the start of the frame move with it.
    pub(crate) fn moved(mut self, removed: usize, inserted: usize) -> Self {
        let shift = |v: u16| (v as usize + inserted).saturating_sub(removed) as u16;
        self.0[0] &= !Self::DATA_VALID;
        let gso = self.0[1] != 0;
        if gso || self.0[0] & Self::NEEDS_CSUM != 0 {
            let hdr_len = shift(self.u16_at(2));
            self.set_u16(2, hdr_len);
        }
        if self.0[0] & Self::NEEDS_CSUM != 0 {
            let start = shift(self.u16_at(6));
            self.set_u16(6, start);
        }
        self
    }
}

/// Size of one block of the ring: the largest frame it can take (a 64 KiB GSO super-frame and
/// its headers fit many times over).
const BLOCK_SIZE: usize = 1 << 20;
/// Blocks in the ring (32 MiB, allocated by the kernel up front): about 250,000 small frames,
/// or 480 64 KiB super-frames, absorbed while the buffer thread is descheduled.
const BLOCKS: usize = 32;
/// A block the kernel has begun filling is handed over after at most this long (ms), so a
/// held frame waits at most that in a half-empty block.
const RETIRE_MS: u32 = 1;

/// `struct tpacket_block_desc` with its `tpacket_hdr_v1` (include/uapi/linux/if_packet.h).
#[repr(C)]
struct BlockDesc {
    version: u32,
    offset_to_priv: u32,
    block_status: u32,
    num_pkts: u32,
    offset_to_first_pkt: u32,
    blk_len: u32,
    seq_num: u64,
    ts_first: [u32; 2],
    ts_last: [u32; 2],
}
const _: () = assert!(size_of::<BlockDesc>() == 48);

/// `struct tpacket3_hdr` (include/uapi/linux/if_packet.h).
#[repr(C)]
struct Tpacket3Hdr {
    tp_next_offset: u32,
    tp_sec: u32,
    tp_nsec: u32,
    tp_snaplen: u32,
    tp_len: u32,
    tp_status: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_rxhash: u32,
    tp_vlan_tci: u32,
    tp_vlan_tpid: u16,
    tp_padding_v1: u16,
    tp_padding: [u8; 8],
}
const _: () = assert!(size_of::<Tpacket3Hdr>() == 48);

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TPACKET_V3: libc::c_int = 2;

/// One frame read from the ring.
pub(crate) struct Received {
    pub(crate) vnet: VnetHeader,
    /// The hold header, then the frame.
    pub(crate) data: Vec<u8>,
}

/// The hold device's receiving socket and its ring.
pub(crate) struct PacketRing {
    fd: OwnedFd,
    ring: NonNull<u8>,
    /// The block to read next.
    next: usize,
    /// Frames the kernel dropped at this socket (the ring full), summed: the kernel's count
    /// restarts at every read.
    dropped: u64,
}

// SAFETY: the socket and its mapping are created on the starting thread, moved into the buffer
// thread once, and used only there; nothing else keeps a pointer into them.
unsafe impl Send for PacketRing {}

/// Sets socket option `name` at `level` to `value`.
pub(crate) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: `value` is a live `T` of the size we pass.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl PacketRing {
    /// Binds to the socket side of the hold device (`ifindex`).
    pub(crate) fn bind(device: &str, ifindex: u32) -> Result<Self, HoldError> {
        let err = |what: &str, e: std::io::Error| HoldError::Socket {
            device: device.into(),
            detail: format!("{what}: {e}"),
        };
        let protocol = HOLD_ETHER_TYPE.to_be();
        // Protocol 0: the socket takes nothing until `bind` names the device and the protocol.
        // Created with the protocol, it would take held frames of every hold device on the
        // host (another daemon's too) into its ring until the bind.
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err("socket", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            &1 as &libc::c_int,
        )
        .map_err(|e| err("PACKET_VNET_HDR", e))?;
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V3)
            .map_err(|e| err("PACKET_VERSION", e))?;
        let frame_size: u32 = 2048;
        let req = [
            BLOCK_SIZE as u32,
            BLOCKS as u32,
            frame_size,
            (BLOCK_SIZE * BLOCKS) as u32 / frame_size,
            RETIRE_MS,
            0,
            0,
        ];
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)
            .map_err(|e| err("PACKET_RX_RING", e))?;
        // SAFETY: maps the ring the kernel just allocated for this socket, of exactly its size;
        // checked for failure.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BLOCK_SIZE * BLOCKS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(err("mapping the ring", std::io::Error::last_os_error()));
        }
        let ring = NonNull::new(ring.cast()).expect("mmap returned a non-null pointer");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        let ring_guard = Self {
            fd,
            ring,
            next: 0,
            dropped: 0,
        };
        // SAFETY: binding our socket to a sockaddr_ll of the size we pass.
        let r = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(err("bind", std::io::Error::last_os_error()));
        }
        Ok(ring_guard)
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn block(&self, i: usize) -> *mut BlockDesc {
        // SAFETY: `i < BLOCKS`, so the block lies within the mapping.
        unsafe { self.ring.as_ptr().add(i * BLOCK_SIZE).cast() }
    }

    /// Reads the frames of up to `max_blocks` blocks the kernel has handed over, copied out,
    /// and gives the blocks straight back. Frames the kernel cut short (longer than a block)
    /// come back in `truncated`.
    pub(crate) fn receive(&mut self, max_blocks: usize, truncated: &mut u64) -> Vec<Received> {
        let mut frames = Vec::new();
        for _ in 0..max_blocks {
            let block = self.block(self.next);
            // SAFETY: `block` points at a block descriptor in the mapping; the kernel writes
            // `block_status` last, so it is read (volatile, then fenced) before anything else.
            let status = unsafe { (&raw const (*block).block_status).read_volatile() };
            if status & TP_STATUS_USER == 0 {
                break;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            // SAFETY: the block is ours until its status is set back to TP_STATUS_KERNEL; the
            // kernel laid out `num_pkts` packets from `offset_to_first_pkt`, each within the
            // block, linked by `tp_next_offset`.
            unsafe {
                let base = block.cast::<u8>();
                let count = (*block).num_pkts;
                let mut at = (*block).offset_to_first_pkt as usize;
                for _ in 0..count {
                    let hdr = base.add(at).cast::<Tpacket3Hdr>();
                    let (mac, snap, len) = (
                        (*hdr).tp_mac as usize,
                        (*hdr).tp_snaplen as usize,
                        (*hdr).tp_len as usize,
                    );
                    if at + mac + snap <= BLOCK_SIZE && mac >= VNET_LEN {
                        if snap < len {
                            *truncated += 1;
                        } else {
                            let mut vnet = [0u8; VNET_LEN];
                            let v = base.add(at + mac - VNET_LEN);
                            std::ptr::copy_nonoverlapping(v, vnet.as_mut_ptr(), VNET_LEN);
                            let data = std::slice::from_raw_parts(base.add(at + mac), snap);
                            frames.push(Received {
                                vnet: VnetHeader(vnet),
                                data: data.to_vec(),
                            });
                        }
                    }
                    let step = (*hdr).tp_next_offset as usize;
                    if step == 0 {
                        break;
                    }
                    at += step;
                }
                std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
                (&raw mut (*block).block_status).write_volatile(TP_STATUS_KERNEL);
            }
            self.next = (self.next + 1) % BLOCKS;
        }
        frames
    }

    /// Frames the kernel dropped at this socket so far (its ring was full).
    pub(crate) fn dropped(&mut self) -> u64 {
        let mut stats = [0u32; 3];
        let mut len = size_of_val(&stats) as libc::socklen_t;
        // SAFETY: getsockopt into a buffer of the size we pass (struct tpacket_stats_v3).
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                stats.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            self.dropped += u64::from(stats[1]);
        }
        self.dropped
    }
}

impl Drop for PacketRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `bind`, unmapped once; the socket closes after.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), BLOCK_SIZE * BLOCKS) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_move_with_the_frame() {
        // NEEDS_CSUM | DATA_VALID, GSO TCPv4, hdr_len 54+56, gso_size 1448, csum at 34+56 / 16.
        let mut v = VnetHeader::default();
        v.0[0] = VnetHeader::NEEDS_CSUM | VnetHeader::DATA_VALID;
        v.0[1] = 1;
        v.set_u16(2, 54 + 56);
        v.set_u16(4, 1448);
        v.set_u16(6, 34 + 56);
        v.set_u16(8, 16);
        // The hold header (56 bytes) goes, a VLAN tag (4) comes.
        let m = v.moved(56, 4);
        assert_eq!(m.0[0], VnetHeader::NEEDS_CSUM, "receive-only flag cleared");
        assert_eq!(
            (m.u16_at(2), m.u16_at(4), m.u16_at(6), m.u16_at(8)),
            (58, 1448, 38, 16)
        );
        // Without offload state nothing moves.
        assert_eq!(VnetHeader::default().moved(56, 4), VnetHeader::default());
    }
}
