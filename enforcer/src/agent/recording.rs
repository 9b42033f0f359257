//! The state of one VM's channel-state recording while its group's snapshot runs (what
//! `channel.rs` keeps per VM on the agent), and the agent's totals of channel state replayed.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::hold::{RecordedFrame, Replayed, tap::TapQueue};

/// One VM's recording under way.
pub(crate) struct RecordingVm {
    /// `enforcer_record` on its port, while this lives.
    pub(crate) _link: Box<dyn Send>,
    pub(crate) slot: u32,
    pub(crate) ifindex: u32,
    /// Its tap's queues (QEMU's descriptors); `Err`: why they cannot be read.
    pub(crate) tap: Result<Arc<TapQueue>, String>,
    /// Shut before its cut and not thawed yet: its map entry flagged draining (every frame
    /// to it held), its buffer queue frozen.
    pub(crate) shut: bool,
    /// Its cut has begun (its epoch advanced while recorded): what is recorded is channel
    /// state, which a second begin must not throw away.
    pub(crate) cut: bool,
    /// When its recording began.
    pub(crate) begun: std::time::Instant,
    /// Frames its QEMU may keep that no snapshot saves, one per queue of its tap: its tap
    /// still had frames waiting when it stopped, or it was stopped without being shut first
    /// (pre-copy: QEMU stops it by itself).
    pub(crate) qemu_may_keep: u64,
    /// Taken from its tap's queue at its cut: before anything the program recorded.
    pub(crate) at_cut: Vec<RecordedFrame>,
    /// What went wrong at its cut, if anything (the recording is then incomplete).
    pub(crate) problem: Option<String>,
}

/// Running totals of [`Replayed`], frames (in memory: they restart with the daemon).
#[derive(Debug, Default)]
pub(crate) struct ReplayCounters {
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl ReplayCounters {
    pub(crate) fn totals(&self) -> Replayed {
        Replayed {
            sent: self.sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(&self, r: Replayed) {
        self.sent.fetch_add(r.sent, Ordering::Relaxed);
        self.dropped.fetch_add(r.dropped, Ordering::Relaxed);
    }
}
