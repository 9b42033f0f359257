//! Colors learned from frames of VMs on other hosts (invariant 2 across hosts): the `learned`
//! ring the overlay port's program reports them in.
//!
//! The program on the overlay port reads a frame's color from VXLAN-GBP. When it is above this
//! host's view of the sender, the program reports it in the `learned` ring before it passes or
//! redirects the frame. The view can then rise at once instead of waiting for the
//! coordinator's message; it never leads, because the color is the sender's epoch when it sent.
//!
//! One consumer reads the ring: the buffer thread when a buffer runs (a held frame's own color
//! rides in its hold header; the ring only raises views), otherwise a small thread of the agent
//! (`agent::learn`).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, RawFd},
    sync::{Arc, atomic::AtomicU64},
};

use aya::maps::{MapData, RingBuf};
use enforcer_common::{LearnedEpoch, MacKey};

pub struct LearnedRing {
    ring: RingBuf<MapData>,
    /// Views raised from the ring so far (shown in `/v1/health`).
    pub applied: Arc<AtomicU64>,
}

impl LearnedRing {
    pub fn new(ring: RingBuf<MapData>, applied: Arc<AtomicU64>) -> Self {
        Self { ring, applied }
    }

    /// Everything reported since the last call: the highest color per VM.
    pub fn drain(&mut self) -> BTreeMap<MacKey, u32> {
        let mut learned = BTreeMap::new();
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<LearnedEpoch>() {
                continue;
            }
            // SAFETY: the item holds at least one LearnedEpoch (checked above), a plain-data
            // type for which every bit pattern is valid; read_unaligned copies it out.
            let entry: LearnedEpoch =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<LearnedEpoch>()) };
            let best = learned.entry(entry.mac).or_insert(entry.epoch);
            *best = (*best).max(entry.epoch);
        }
        learned
    }

    pub fn raw_fd(&self) -> RawFd {
        self.ring.as_fd().as_raw_fd()
    }
}
