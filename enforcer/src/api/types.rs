//! The HTTP contract's own types: error bodies with a machine-readable [`ErrorCode`], and the
//! request bodies of the snapshot routes. Everything else the API sends and takes is the
//! product's own serializable types (the agent's, the snapshot manifest, the buffer's report).

use serde::{Deserialize, Serialize};

use crate::{model::IfName, snapshot::CutMethod};

/// What kind of error an answer is, for programs: the status says less, and the message is
/// for people. Clients act on this, never on the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed input: JSON, a MAC, a name, an id.
    BadRequest,
    Unauthorized,
    /// A unix socket's peer that is not root, the daemon's user or a member of its API group.
    Forbidden,
    NoSuchEndpoint,
    /// The path exists, not with this method.
    MethodNotAllowed,
    /// No such domain operation (`/v1/domains/{name}/{op}`).
    NoSuchOperation,
    UnknownVm,
    AlreadyRegistered,
    BadMac,
    UnknownInterface,
    PortNotAttached,
    PortTaken,
    NoFreeSlot,
    EpochBackwards,
    EpochOverflow,
    /// A color above what the coordinator announced a VM may reach (forged).
    AboveCeiling,
    BadGroup,
    UnknownGroup,
    GroupExists,
    Busy,
    InconsistentEpochs,
    UnknownSnapshot,
    NotRestorable,
    /// Restore images that are not the named VM's (see `HvErrorKind::NotItsImage`).
    NotItsImage,
    NoSuchDomain,
    DomainNotRunning,
    DomainRunning,
    /// Any other hypervisor failure (QEMU, libvirt, the images).
    Hypervisor,
    /// A `wait-paused` with `advance` for a domain whose snapshot was not begun here.
    NotBegun,
    /// A datapath's epochs could not be read or changed (this host's, or an agent's).
    Epochs,
    NoBuffer,
    SnapshotsOff,
    /// Something this side needs does not answer (the buffer, an agent).
    Unavailable,
    /// The pinned maps failed.
    Datapath,
    /// The snapshot store failed.
    Store,
    Internal,
    /// A code this client does not know (a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The status this code is always answered with, where there is one (the codes clients act
    /// on have one; a server that sends no code is understood by its status alone).
    pub const fn status(self) -> Option<axum::http::StatusCode> {
        use axum::http::StatusCode as S;
        Some(match self {
            ErrorCode::UnknownVm
            | ErrorCode::UnknownGroup
            | ErrorCode::UnknownSnapshot
            | ErrorCode::NoSuchDomain
            | ErrorCode::NoSuchEndpoint
            | ErrorCode::NoSuchOperation => S::NOT_FOUND,
            ErrorCode::NoBuffer | ErrorCode::PortNotAttached => S::CONFLICT,
            ErrorCode::UnknownInterface => S::BAD_REQUEST,
            ErrorCode::Unauthorized => S::UNAUTHORIZED,
            ErrorCode::Forbidden => S::FORBIDDEN,
            _ => return None,
        })
    }
}

/// Every error answer: `{"error": "...", "code": "..."}`.
#[derive(Serialize, Deserialize, Debug)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default = "unknown")]
    pub code: ErrorCode,
}

fn unknown() -> ErrorCode {
    ErrorCode::Unknown
}

/// `POST /v1/groups`: a group of running libvirt domains.
#[derive(Serialize, Deserialize, Debug)]
pub struct DefineGroup {
    pub name: String,
    /// Datapath group id; default the lowest unused.
    #[serde(default)]
    pub id: Option<u32>,
    pub domains: Vec<String>,
}

/// `POST /v1/snapshots/{id}/restore`.
/// `POST /v1/groups/{group}/snapshots` (the body is optional).
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct SnapshotBody {
    /// How to stop and capture the VMs (default: instant).
    #[serde(default)]
    pub method: CutMethod,
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct RestoreBody {
    /// Put the restored VMs on this bridge instead of their own.
    #[serde(default)]
    pub bridge: Option<IfName>,
    /// Leave out the frames in flight at the cut (the snapshot's channel state): the restored
    /// group then loses them, as without recording. For comparison and diagnosis.
    #[serde(default)]
    pub skip_channel_state: bool,
}

/// `GET /v1/snapshots?group=G`.
#[derive(Deserialize, Debug)]
pub struct SnapshotFilter {
    pub group: Option<String>,
}
