//! The buffer's counter families, each one list like [`crate::Outcome`]: the index of every
//! counter in its pinned array, its stable name (the API's, `/metrics`'; with the `serde`
//! feature also its JSON name), compiled into the kernel programs and userspace alike, so no
//! name or index is kept by hand anywhere else.

/// Frames the hold path lost in the kernel, by reason: the indexes of the per-CPU
/// `hold_kernel` array, which the programs bump.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum HoldKernel {
    /// A learned epoch could not be reported: the `learned` ring was full (the view is then
    /// raised by the coordinator's message instead, later; a held frame keeps its own color).
    LearnLost = 0,
    /// A frame to hold got no room for its hold header in front (the kernel refused to grow
    /// it): not held (Type-3 dropped as `type3_unbuffered`, a frame held for order delivered).
    NoHeadroom = 1,
    /// A frame on the hold device's ingress that names no port to re-enter (no
    /// `inject_mark`, or a slot with no port any more). Dropped.
    InjectRefused = 2,
}

impl HoldKernel {
    pub const ALL: [HoldKernel; 2] = [HoldKernel::LearnLost, HoldKernel::NoHeadroom];
    /// Entries of the pinned `hold_kernel` array (the layout earlier versions pinned).
    pub const ENTRIES: u32 = 3;

    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            HoldKernel::LearnLost => "learn_lost",
            HoldKernel::NoHeadroom => "no_headroom",
            HoldKernel::InjectRefused => "inject_refused",
        }
    }
}

/// What the buffer daemon did with the frames it was handed: the indexes of the `hold_totals`
/// array, written by userspace and pinned so the accounting survives a daemon restart
/// (invariant 4 in docs/design.md: every frame delivered, or counted with a reason).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum HoldTotal {
    /// Frames read from the hold device's socket (or, for the ones lost on the way, counted
    /// when they were found missing).
    Received = 0,
    /// Re-injected after their receiver advanced (or the snapshot was aborted).
    Reinjected = 1,
    /// Dropped because the memory bound was reached (newest dropped).
    DroppedBound = 2,
    /// Dropped at a graceful shutdown: their receiver had not advanced.
    DroppedShutdown = 3,
    /// Lost to a daemon that died without a graceful shutdown (found by the next daemon).
    LostRestart = 4,
    /// Handed to the hold path (given a ticket) but never read within the ring deadline of being
    /// found missing: lost on the way (the socket's ring was full).
    LostRing = 5,
    /// Destination no longer registered when the frame was read: dropped.
    DroppedUnknown = 6,
    /// The re-injection send failed (the receiver's port vanished): dropped.
    InjectFailed = 7,
    /// Recorded as channel state (copies of frames already delivered: see `HOLD_RECORD`),
    /// kept for the snapshot that runs. Index 8 is the retired `order_races`.
    Recorded = 9,
}

impl HoldTotal {
    pub const ALL: [HoldTotal; 9] = [
        HoldTotal::Received,
        HoldTotal::Reinjected,
        HoldTotal::DroppedBound,
        HoldTotal::DroppedShutdown,
        HoldTotal::LostRestart,
        HoldTotal::LostRing,
        HoldTotal::DroppedUnknown,
        HoldTotal::InjectFailed,
        HoldTotal::Recorded,
    ];
    /// Entries of the pinned `hold_totals` array: spares beyond [`HoldTotal::ALL`], the layout
    /// every earlier version pinned (a restarted daemon adopts it, so it stays). Index 8 counted
    /// `order_races` until order was kept by construction: it is never written again.
    pub const ENTRIES: u32 = 10;

    /// What became of a received frame: every frame read ends in exactly one of these.
    pub const FATES: [HoldTotal; 8] = [
        HoldTotal::Reinjected,
        HoldTotal::DroppedBound,
        HoldTotal::DroppedShutdown,
        HoldTotal::LostRestart,
        HoldTotal::LostRing,
        HoldTotal::DroppedUnknown,
        HoldTotal::InjectFailed,
        HoldTotal::Recorded,
    ];

    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            HoldTotal::Received => "received",
            HoldTotal::Reinjected => "reinjected",
            HoldTotal::DroppedBound => "dropped_bound",
            HoldTotal::DroppedShutdown => "dropped_shutdown",
            HoldTotal::LostRestart => "lost_restart",
            HoldTotal::LostRing => "lost_ring",
            HoldTotal::DroppedUnknown => "dropped_unknown",
            HoldTotal::InjectFailed => "inject_failed",
            HoldTotal::Recorded => "recorded",
        }
    }
}

const _: () = assert!(HoldTotal::ALL.len() as u32 <= HoldTotal::ENTRIES);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_index_and_name() {
        for (i, t) in HoldTotal::ALL.iter().enumerate() {
            // Index 8 is retired (`order_races`): never given again.
            assert_eq!(t.index() as usize, if i < 8 { i } else { i + 1 }, "{t:?}");
            assert!(HoldTotal::ALL[..i].iter().all(|o| o.name() != t.name()));
        }
        for (i, k) in HoldKernel::ALL.iter().enumerate() {
            assert_eq!(k.index() as usize, i, "{k:?}");
        }
        // Every total but the intake is a fate.
        assert!(!HoldTotal::FATES.contains(&HoldTotal::Received));
        assert_eq!(HoldTotal::FATES.len(), HoldTotal::ALL.len() - 1);
    }
}
