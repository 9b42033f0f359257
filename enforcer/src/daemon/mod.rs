//! The two roles the binary runs, wired and served: the agent of one host (`enforcer run`,
//! [`agent`]) and the coordinator of several hosts (`enforcer coordinator`, [`coordinator`]),
//! served by [`crate::api::serve`] (the token rule, listening, limits, signals), and the
//! agent's lock on its pin root ([`lock`]).
//!
//! May call everything below it: the API, the agent, the multi-host coordinator, the
//! snapshot transaction, the buffer and the datapath.
pub mod agent;
pub mod coordinator;
pub mod lock;

pub use crate::api::serve::ServeError;
pub use agent::{DaemonConfig, DaemonError, Running, start};
pub use coordinator::{
    CoordinatorConfig, CoordinatorRoleError, RunningCoordinator, start_coordinator,
};
