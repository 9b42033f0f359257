//! Groups that span several hypervisor hosts: the coordinator's side. [`hosts::Hosts`] is the
//! [`Hypervisor`](crate::snapshot::Hypervisor) and [`EpochControl`](crate::snapshot::EpochControl)
//! of the snapshot transaction over one agent per host (over HTTP, [`agent_epochs`]), with the
//! rules that keep every host's view of a VM's epoch from ever leading it; [`api`] adds the
//! coordinator's own routes.
//!
//! May call the API's client and routes, the agent's wire types, the snapshot transaction, the
//! buffer's report, the datapath's records and the model.
pub mod agent_epochs;
pub mod api;
pub mod hosts;

pub use agent_epochs::AgentEpochs;
pub use api::{CoordinatorHealth, CoordinatorState, HostHealth};
pub use hosts::{HostSpec, Hosts, HostsError, load, split_name};
