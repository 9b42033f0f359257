//! Group snapshots as transactions: the coordinator ([`coordinator`]) runs each snapshot
//! ([`transaction`]) and restore ([`restore`]) over a [`Hypervisor`] and an [`EpochControl`]
//! ([`backends`]), keeps named groups ([`groups`]) and the store ([`store`], [`manifest`],
//! its files private: [`private`]; room for a snapshot's images: [`room`]).
//! [`libvirt`] is the real hypervisor of one host; the agents of several hosts implement the
//! same traits over HTTP (`multihost`). Synchronous: every VM's part runs on its own thread.
//!
//! May call the model, `sched` and the buffer's report type; never the API, the agent or the
//! datapath directly (the datapath is behind [`EpochControl`]).
pub mod backends;
pub mod channel;
pub mod coordinator;
#[cfg(test)]
pub(crate) mod fake;
pub mod groups;
pub mod libvirt;
pub mod manifest;
pub(crate) mod private;
pub mod restore;
pub mod room;
pub mod store;
#[cfg(test)]
mod tests;
pub mod transaction;

pub use backends::{
    DomainState, EpochControl, EpochControlError, HvError, HvErrorKind, Hypervisor, Paused, unix_us,
};
pub use coordinator::{Coordinator, CoordinatorError, GroupError, Timeouts};
pub use manifest::{
    CutMethod, Manifest, RestoreReport, RestoredVm, SnapshotOutcome, SnapshotVm, Step, Timeline,
};
pub use transaction::Prepared;

/// The coordinator behind the API: over this host's libvirt and datapath (`enforcer run`), or
/// over the agents of several hosts (`enforcer coordinator`).
pub type Snapshots = Coordinator<dyn Hypervisor, dyn EpochControl>;
