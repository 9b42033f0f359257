//! The AF_XDP socket the hold program feeds (copy mode: zero-copy does not exist on veth), and
//! its UMEM. Nearly all of the buffer's `unsafe` lives here.

use std::{ffi::CString, num::NonZeroU32, ptr::NonNull};

use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig};

use super::config::HoldError;

pub(crate) const FRAME_SIZE: u32 = 4096;
/// 8192 chunks of 4 KiB (32 MiB, touched only as used): the fill and RX rings of 4096 each can
/// both be full, which absorbs about 20 ms of line-rate small frames while the buffer thread is
/// descheduled on a busy host.
pub(crate) const UMEM_FRAMES: u32 = 8192;
pub(crate) const RING_SIZE: u32 = 4096;

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
    pub(crate) fn frame(&self, addr: u64, len: u32) -> &[u8] {
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

pub(crate) struct XskSocket {
    pub(crate) rx: RingRx,
    fill: DeviceQueue,
    _umem: Umem,
    free: Vec<u64>,
    area: UmemArea,
}

// SAFETY: the socket, its rings and its memory are created on the starting thread, moved into
// the buffer thread once, and used only there; nothing else keeps a pointer into them.
unsafe impl Send for XskSocket {}

impl XskSocket {
    pub(crate) fn bind(device: &str) -> Result<Self, HoldError> {
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
    pub(crate) fn refill(&mut self) {
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
    pub(crate) fn kernel_drops(&self) -> (u64, u64, u64) {
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

impl XskSocket {
    /// Reads up to `max` frames off the RX ring, copied out, and hands their chunks straight
    /// back to the kernel (so the fill ring never starves).
    pub(crate) fn receive(&mut self, max: u32) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        if self.rx.available() == 0 {
            return frames;
        }
        {
            let (rx, area, free) = (&mut self.rx, &self.area, &mut self.free);
            let mut reader = rx.receive(max);
            while let Some(desc) = reader.read() {
                frames.push(area.frame(desc.addr, desc.len).to_vec());
                free.push(desc.addr & !u64::from(FRAME_SIZE - 1));
            }
            reader.release();
        }
        self.refill();
        frames
    }
}
