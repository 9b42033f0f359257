//! A traffic generator that is not the bottleneck: numbered UDP datagrams sent from a lab VM's
//! `eth0` through an AF_XDP socket (copy mode: a veth has no zero-copy), millions of frames a
//! second where one `send_to` thread makes about 200,000 (MACHINE-NOTES: AF_XDP TX about
//! 2 Mpps on one queue of a veth). The frames enter the host through the VM's port like any
//! other, so the port program, the bridge and the receiver's socket see ordinary UDP.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    num::NonZeroU32,
    ptr::NonNull,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use xdpilone::{DeviceQueue, IfInfo, RingTx, Socket, SocketConfig, Umem, UmemConfig, xdp::XdpDesc};

use crate::{netns::Lab, traffic::Message};

const FRAME_SIZE: u32 = 2048;
const FRAMES: u32 = 4096;
const RING: u32 = 2048;
/// Descriptors handed to the kernel per wake-up.
const BATCH: usize = 64;
/// Ethernet + IPv4 + UDP headers in front of the payload.
const HEADERS: usize = 14 + 20 + 8;
/// The largest UDP payload a 1500-byte MTU carries in one frame (a 1514-byte frame).
pub(crate) const MTU_PAYLOAD: usize = 1500 - 20 - 8;

/// Page-aligned anonymous memory for the UMEM, unmapped on drop.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Area {
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

    fn chunk(&mut self, addr: u64) -> &mut [u8] {
        let start = addr as usize;
        assert!(start + FRAME_SIZE as usize <= self.len, "outside the UMEM");
        // SAFETY: within the mapping (checked); a chunk is written only while the kernel does
        // not own it (before it is put on the TX ring, after it came back on the completion
        // ring).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), FRAME_SIZE as usize) }
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once, after the socket (declared before
        // it in `XdpSender`) is gone.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An AF_XDP socket on a lab VM's `eth0`, sending numbered datagrams to one peer.
pub(crate) struct XdpSender {
    tx: RingTx,
    cq: DeviceQueue,
    _umem: Umem,
    free: Vec<u64>,
    area: Area,
    /// The frame every datagram starts from (the [`Message`] at its payload's start rewritten
    /// per datagram).
    template: Vec<u8>,
    /// Who sends to whom: (destination MAC, source MAC, source IP, destination IP, UDP port).
    ends: Ends,
}

type Ends = ([u8; 6], [u8; 6], Ipv4Addr, Ipv4Addr, u16);

// SAFETY: the socket, its rings and its memory are made on one thread (in the VM's namespace),
// moved to the sending thread once, and used only there.
unsafe impl Send for XdpSender {}

impl XdpSender {
    /// In VM `from`'s namespace, to VM `to`'s address and UDP `port`: 58-byte frames (a bare
    /// [`Message`]) until [`XdpSender::set_payload`].
    pub(crate) fn open(lab: &Lab, from: usize, to: usize, port: u16) -> anyhow::Result<Self> {
        let ends = (
            lab.vms[to].mac.0,
            lab.vms[from].mac.0,
            lab.vms[from].ip,
            lab.vms[to].ip,
            port,
        );
        let mut sender = lab.in_vm(from, move || Self::bind(ends))??;
        sender.set_payload(Message::LEN)?;
        Ok(sender)
    }

    /// Sends `payload` bytes of UDP payload per datagram from now on (the socket stays: a
    /// queue takes one AF_XDP socket, and a closed one frees it only later).
    pub(crate) fn set_payload(&mut self, payload: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            (Message::LEN..=MTU_PAYLOAD).contains(&payload),
            "a payload of {payload} bytes: from {} to {MTU_PAYLOAD}",
            Message::LEN
        );
        let (dst, src, src_ip, dst_ip, port) = self.ends;
        self.template = udp_frame(dst, src, src_ip, dst_ip, port, payload);
        Ok(())
    }

    /// Bytes of each frame sent (Ethernet header included).
    pub(crate) fn frame_len(&self) -> usize {
        self.template.len()
    }

    fn bind(ends: Ends) -> anyhow::Result<Self> {
        let area = Area::new((FRAMES * FRAME_SIZE) as usize)?;
        let config = UmemConfig {
            fill_size: RING,
            complete_size: RING,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.len);
        // SAFETY: `area` is page aligned (mmap), `len` bytes long, and outlives the socket
        // (same struct, dropped after it).
        let umem = unsafe { Umem::new(config, slice) }.map_err(|e| anyhow!("UMEM: {e}"))?;
        let mut iface = IfInfo::invalid();
        iface
            .from_name(&CString::new("eth0")?)
            .map_err(|e| anyhow!("eth0: {e}"))?;
        iface.set_queue(0);
        let sock = Socket::with_shared(&iface, &umem).map_err(|e| anyhow!("socket: {e}"))?;
        let cq = umem
            .fq_cq(&sock)
            .map_err(|e| anyhow!("fill/completion rings: {e}"))?;
        const XDP_COPY: u16 = 1 << 1;
        let rxtx = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: None,
                    tx_size: NonZeroU32::new(RING),
                    bind_flags: XDP_COPY,
                },
            )
            .map_err(|e| anyhow!("tx ring: {e}"))?;
        let tx = rxtx
            .map_tx()
            .map_err(|e| anyhow!("mapping the tx ring: {e}"))?;
        umem.bind(&rxtx).map_err(|e| anyhow!("bind: {e}"))?;
        Ok(Self {
            tx,
            cq,
            _umem: umem,
            free: (0..FRAMES).map(|i| u64::from(i * FRAME_SIZE)).collect(),
            area,
            template: Vec::new(),
            ends,
        })
    }

    /// Sends numbered datagrams (`seq` from 0, `color` in each) as fast as the socket takes
    /// them, for `seconds`; returns how many were sent and how long it took.
    pub(crate) fn blast(&mut self, color: u32, seconds: f64) -> (u64, f64) {
        self.blast_paced(color, seconds, Pace::FULL)
    }

    /// As [`XdpSender::blast`], at most `pace.per_second` datagrams a second and
    /// `pace.most` in all. Returns (datagrams sent, seconds).
    pub(crate) fn blast_paced(&mut self, color: u32, seconds: f64, pace: Pace) -> (u64, f64) {
        let start = Instant::now();
        let window = Duration::from_secs_f64(seconds);
        let mut seq = 0u32;
        let mut descs = Vec::with_capacity(BATCH);
        while start.elapsed() < window && u64::from(seq) < pace.most {
            self.reclaim();
            if !pace.may_send(u64::from(seq), start) {
                continue;
            }
            descs.clear();
            while descs.len() < BATCH && u64::from(seq) < pace.most {
                let Some(addr) = self.free.pop() else { break };
                let frame = self.area.chunk(addr);
                let len = self.template.len();
                frame[..len].copy_from_slice(&self.template);
                let m = Message {
                    from: 0,
                    to: 1,
                    seq,
                    color,
                };
                frame[HEADERS..HEADERS + Message::LEN].copy_from_slice(&m.encode());
                descs.push(XdpDesc {
                    addr,
                    len: len as u32,
                    options: 0,
                });
                seq += 1;
            }
            let mut writer = self.tx.transmit(descs.len() as u32);
            let n = writer.insert(descs.iter().copied()) as usize;
            writer.commit();
            drop(writer);
            // Not taken (the ring is full): their chunks are free again, their numbers unused.
            for d in &descs[n..] {
                self.free.push(d.addr);
            }
            seq -= (descs.len() - n) as u32;
            self.tx.wake();
        }
        // Let the kernel send what is on the ring.
        let drain = Instant::now();
        while self.tx.pending() > 0 && drain.elapsed() < Duration::from_secs(1) {
            self.tx.wake();
            self.reclaim();
        }
        (u64::from(seq), start.elapsed().as_secs_f64())
    }

    /// Takes back the chunks the kernel has sent.
    fn reclaim(&mut self) {
        let mut done = self.cq.complete(RING);
        while let Some(addr) = done.read() {
            self.free.push(addr);
        }
        done.release();
    }
}

/// How fast and how much a blast may send.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    /// Datagrams a second at most (`None`: as fast as it can).
    pub(crate) per_second: Option<f64>,
    /// Datagrams in all at most.
    pub(crate) most: u64,
}

impl Pace {
    pub(crate) const FULL: Self = Self {
        per_second: None,
        most: u64::MAX,
    };

    /// Whether the datagram after `sent` is due, `start` being the blast's start. When it is
    /// not, waits a little first (sleeping when it is far off), so that a paced sender leaves
    /// the CPU to the path it measures.
    pub(crate) fn may_send(&self, sent: u64, start: Instant) -> bool {
        let Some(rate) = self.per_second else {
            return true;
        };
        let due = Duration::from_secs_f64(sent as f64 / rate);
        match due.checked_sub(start.elapsed()) {
            None => true,
            Some(wait) => {
                if wait > Duration::from_micros(50) {
                    std::thread::sleep(wait);
                } else {
                    std::hint::spin_loop();
                }
                false
            }
        }
    }
}

/// An Ethernet/IPv4/UDP frame from `src` to `dst`, UDP checksum 0 (none, as IPv4 allows), its
/// `payload` bytes zeros, a [`Message`] at their start to be filled in.
fn udp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    port: u16,
    payload: usize,
) -> Vec<u8> {
    let mut f = vec![0u8; HEADERS + payload];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + payload) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&dst_ip.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&port.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_a_valid_ipv4_udp_frame() {
        for payload in [Message::LEN, MTU_PAYLOAD] {
            let f = udp_frame(
                [2; 6],
                [4; 6],
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(10, 0, 0, 2),
                9,
                payload,
            );
            let sum: u32 = f[14..34]
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            let folded = (sum & 0xffff) + (sum >> 16);
            assert_eq!(folded, 0xffff, "the IPv4 header checksum verifies");
            assert_eq!(
                u16::from_be_bytes([f[16], f[17]]) as usize,
                20 + 8 + payload
            );
            assert_eq!(u16::from_be_bytes([f[38], f[39]]) as usize, 8 + payload);
            assert_eq!(f.len(), 42 + payload);
        }
        assert_eq!(42 + MTU_PAYLOAD, 1514);
    }
}
