//! The messages the buffer thread takes: epoch notices ([`Notice`]), which the one epoch-change
//! path ([`super::advance`]) sends around every map write, and the thread's own controls
//! ([`Command`]).

use std::sync::mpsc;

use enforcer_common::{MacKey, VmEpoch};

use super::{record::Recording, report::HoldReport};

/// What the buffer must know about an epoch change, in the order the change makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A VM's entry as the map is about to hold it (`None`: being removed). Sent **before** the
    /// map is written, so the colors the buffer gives held frames never lag the datapath's.
    Vm { mac: MacKey, vm: Option<VmEpoch> },
    /// The map now has the VM at `epoch`, flagged draining: re-inject what waited for it.
    Advanced { mac: MacKey, epoch: u32 },
    /// The group's minimum epoch in the map rose to `min_epoch`, the group flagged draining.
    GroupAdvanced { group: u32, min_epoch: u32 },
    /// The group's snapshot was aborted and the map now counts `aborts` for it: every held
    /// frame classified under a lower count is ordinary, delivered whatever its color.
    Release { group: u32, aborts: u32 },
    /// Keep the VM's queue whatever may be released from it, until [`Notice::Thaw`]: from
    /// just before its cut (the VM shut, its map entry flagged draining so every frame to it
    /// is held), and while the daemon takes what waits in the VM's own port queue and puts it
    /// back first.
    Freeze { mac: MacKey },
    /// Release the VM's queue again (what may go goes, in order), and drain it: its draining
    /// flag is cleared once what it held is out.
    Thaw { mac: MacKey },
}

/// Messages to the buffer thread.
pub enum Command {
    Notice(Notice),
    Report(mpsc::Sender<HoldReport>),
    /// Start recording the channel state of the receivers with these hold queues (their
    /// `receiver_queue`), before `enforcer_record` is attached to their ports.
    RecordArm {
        queues: Vec<u32>,
    },
    /// Hand over what was recorded for these hold queues, once every frame the programs had
    /// handed over for them has come (send it after `enforcer_record` was detached).
    RecordTake {
        queues: Vec<u32>,
        reply: mpsc::Sender<Vec<(u32, Recording)>>,
    },
    /// Stop. `graceful`: stop redirecting, take in what is in flight, drop (and count) what
    /// cannot be delivered, clear the flags. Otherwise vanish as a crashed daemon would.
    Stop {
        graceful: bool,
        done: mpsc::Sender<HoldReport>,
    },
}
