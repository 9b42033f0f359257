//! The agent (`enforcer run`): this host's side of everything — its datapath, its buffer and,
//! with libvirt, its snapshot coordinator — as one synchronous service ([`service`], with
//! [`stats`] and the multi-host domain steps in [`domains`]), generic over the datapath it
//! drives ([`datapath`]). The snapshot transaction reaches it in process ([`local_epochs`]);
//! the HTTP routes translate to it; learned colors go through it ([`learn`]).
//!
//! May call the snapshot transaction, the buffer, the datapath, the model and `sched`; never the
//! HTTP layer.
pub mod channel;
pub mod datapath;
pub mod domains;
pub mod learn;
pub mod local_epochs;
mod recording;
pub mod recording_wire;
pub mod service;
pub mod stats;

pub use datapath::AgentDatapath;
pub use domains::{DomainCall, DomainError, DomainNic, DomainOp, DomainStateView, PausedAdvanced};
pub use local_epochs::{LocalEpochs, SnapshotOptions, SnapshotsError};
pub use service::{
    Abort, Agent, AgentError, Announce, Announced, Config, GroupView, Health, RawTarget,
    RegisterVm, SetEpoch,
};
pub use stats::{CounterJson, PortStats};
