//! The HTTP/JSON edge (no gRPC): routers that translate requests into calls on the agent
//! ([`crate::agent`]) and the snapshot coordinator ([`crate::snapshot`]), and their errors into
//! statuses with machine-readable codes ([`error`], [`types`]). Handlers are grouped by
//! resource ([`vms`], [`snapshots`], [`domains`], [`recordings`], [`host`]); [`metrics`] renders Prometheus
//! text; [`client`] is the other end, used by the CLI, the coordinator of several hosts and
//! the lab; [`serve`] listens (a unix socket checked by peer credentials, or TCP with a token)
//! and serves a router within its limits. Nothing here decides anything.
//!
//! May call the agent, the snapshot coordinator, the buffer's report, the datapath's records and
//! errors, and the model.

pub mod client;
pub mod domains;
pub mod endpoint;
pub mod error;
mod extract;
pub mod host;
pub mod metrics;
pub mod pki;
pub mod recordings;
pub mod router;
pub mod serve;
pub mod snapshots;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod types;
pub mod vms;

pub use endpoint::{BadEndpoint, DEFAULT_COORDINATOR_SOCKET, DEFAULT_SOCKET, Endpoint};
pub use error::{ApiError, ApiResult, blocking};
pub use router::{finish, router};
pub use snapshots::SnapshotService;
pub use types::{ErrorBody, ErrorCode};
