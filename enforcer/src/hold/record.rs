//! The channel state the buffer records while a group snapshot runs (invariant 7 in
//! docs/design.md), with no I/O of its own: `enforcer_record`, attached to the egress of the
//! members' ports for the snapshot, hands over a copy of every frame delivered to a member
//! after its cut that its sender sent before its own ([`HOLD_RECORD`]); this keeps them per
//! receiver, in the order they came, until the snapshot takes them.
//!
//! A recording is **armed** for a receiver's hold queue when the snapshot begins, and
//! **taken** when it ends: after the programs are detached, an RCU grace period has passed
//! (no program run still records), and every frame the CPUs had handed over for the queue by
//! then has come or is known lost (the same fence a drain waits for). Frames lost on the way
//! (a gap in the queue's tickets while armed) are counted against it: the queue also carries
//! held frames, so that count is an upper bound, never a silent gap.
//!
//! [`HOLD_RECORD`]: enforcer_common::HOLD_RECORD

use std::collections::HashMap;

use enforcer_common::HoldTotal;

use super::{
    fence::{Fence, FenceWait},
    ring::VNET_LEN,
};

/// One recorded frame: its virtio-net header (its offload state: a GSO super-frame is kept
/// whole, a checksum left to offload stays to do) and its bytes, VLAN tag in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedFrame {
    pub vnet: [u8; VNET_LEN],
    pub data: Vec<u8>,
}

/// What was recorded for one receiver while its group's snapshot ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recording {
    /// The frames, in the order they were delivered to the receiver.
    pub frames: Vec<RecordedFrame>,
    pub bytes: u64,
    /// Frames not kept: the buffer's memory bound was reached.
    pub dropped_bound: u64,
    /// Frames handed over for the receiver's queue that never came while it recorded (its
    /// socket's ring was full, or the kernel could not copy a frame): recorded frames among
    /// them at most this many.
    pub lost_at_most: u64,
    /// What else kept it from being complete (its tap's queue unreadable at the cut).
    pub problem: Option<String>,
}

/// What a replay put in front of a restored VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replayed {
    /// Frames its port took, in order.
    pub sent: u64,
    /// Frames its port dropped meanwhile (its queue toward the VM overflowed): the port's own
    /// `tx_dropped` count, which also counts anything else it dropped then.
    pub dropped: u64,
}

/// A take the thread is waiting on.
#[derive(Debug)]
struct Take {
    id: u64,
    queues: Vec<u32>,
    wait: FenceWait,
}

/// The recordings by hold queue, and the takes under way.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    armed: HashMap<u32, Recording>,
    takes: Vec<Take>,
}

impl Recorder {
    /// Starts recording for these hold queues, afresh: what an earlier snapshot left armed
    /// (one that failed before it took its recording) is dropped, never kept with this one.
    pub(crate) fn arm(&mut self, queues: &[u32]) {
        for q in queues {
            self.armed.insert(*q, Recording::default());
        }
    }

    /// Keeps a copy `enforcer_record` handed over (already delivered) if the recordings stay
    /// within `room` bytes; returns its fate: `recorded`, or dropped (`dropped_bound`; a late
    /// copy, for a receiver no longer armed: `dropped_unknown`).
    pub(crate) fn record(&mut self, queue: u32, frame: RecordedFrame, room: usize) -> HoldTotal {
        let total = self.bytes();
        let Some(r) = self.armed.get_mut(&queue) else {
            return HoldTotal::DroppedUnknown;
        };
        if total as usize + frame.data.len() > room {
            r.dropped_bound += 1;
            return HoldTotal::DroppedBound;
        }
        r.bytes += frame.data.len() as u64;
        r.frames.push(frame);
        HoldTotal::Recorded
    }

    /// `lost` frames handed over for `queue` never came.
    pub(crate) fn lost(&mut self, queue: u32, lost: u64) {
        if let Some(r) = self.armed.get_mut(&queue) {
            r.lost_at_most += lost;
        }
    }

    /// Bytes the armed recordings keep (counted against the buffer's memory bound).
    pub(crate) fn bytes(&self) -> u64 {
        self.armed.values().map(|r| r.bytes).sum()
    }

    /// Asks for the recordings of `queues`: [`Recorder::progress`] hands them out under `id`
    /// once every frame handed over for them before the request has come.
    pub(crate) fn take(&mut self, id: u64, queues: Vec<u32>) {
        self.takes.push(Take {
            id,
            queues,
            wait: FenceWait::Start,
        });
    }

    /// Moves the takes on; returns those complete, with their recordings (an unarmed queue
    /// gives an empty one). Frames still missing are the audit's to find lost, which moves
    /// the tickets on.
    /// `next(queue, cpu)`: the next ticket the buffer expects from that CPU for that queue.
    pub(crate) fn progress(
        &mut self,
        fence: &mut impl Fence,
        next: impl Fn(u32, u32) -> u64,
    ) -> Vec<(u64, Vec<(u32, Recording)>)> {
        let mut done = Vec::new();
        for mut take in std::mem::take(&mut self.takes) {
            if !take.wait.passed(fence, &take.queues, &next) {
                self.takes.push(take);
                continue;
            }
            let recordings = take
                .queues
                .iter()
                .map(|q| (*q, self.armed.remove(q).unwrap_or_default()))
                .collect();
            done.push((take.id, recordings));
        }
        done
    }
}
