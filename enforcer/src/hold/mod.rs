//! The buffer: holds Type-3 frames and re-injects them, in order, right after their receiver
//! advances (mode `buffer`).
//!
//! Path of a held frame:
//! 1. The port program (tc or XDP) decides `Type3Held` (or `HeldForOrder`, see [`core`]),
//!    takes the frame's tickets in its CPU's `hold_seq` entry for the queue (the receiver's
//!    slot, or the group), puts a hold header in front (its color, tickets, and at tc its
//!    outer VLAN tag) and redirects it to the **hold device** ([`device`]): a veth pair
//!    `<name>` → `<name>p`, in no bridge, with the largest MTU.
//! 2. An AF_PACKET socket on `<name>p` ([`ring`]) takes it with its virtio-net header (GSO
//!    and checksum offload state) into a TPACKET_V3 ring.
//! 3. One thread ([`thread`]) reads the ring, copies the frame out, gives the block straight
//!    back, and hands it to the decisions ([`core`]): queued per receiver (unicast) or per
//!    group (broadcast/multicast), in arrival order, within a memory bound.
//! 4. Every epoch change goes through one path ([`advance`]): the buffer's copy of the VM
//!    first, then the map with the new epoch and the draining flag in one write, then the
//!    release, which re-injects the queue in order ([`inject`]: an AF_PACKET send on the
//!    receiver's port, with the frame's VLAN tag and virtio-net header back on).
//!
//! Accounting (invariant 4 in docs/design.md) is pinned in `hold_totals` ([`HoldTotal`]), so a
//! daemon that dies with frames held is accounted for by the next one (`lost_restart`).
//!
//! May call the datapath, the model and `sched`; never the snapshot transaction or the API.
//!
//! [`HoldTotal`]: enforcer_common::HoldTotal
pub mod advance;
mod buffer;
pub mod checksum;
mod config;
mod core;
mod device;
mod fence;
mod fifo;
mod inject;
pub mod learn;
pub mod protocol;
mod record;
pub mod report;
mod ring;
pub mod tap;
mod thread;

pub use buffer::{Buffer, Reporter};
pub use config::{HoldError, HoldOptions, LoopHook, LoopPoint};
pub use inject::{put_back, replay_into};
pub use protocol::{Command, Notice};
pub use record::{RecordedFrame, Recording, Replayed};
pub use report::{HoldReport, KernelLoss, QueueKey, QueueReport};
pub(crate) use thread::rcu_barrier;
