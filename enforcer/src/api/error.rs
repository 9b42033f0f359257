//! Errors as HTTP answers: every error type of the layers below maps here, once, to a status
//! and an [`ErrorCode`], by its kind (never by its text).

use axum::{
    Json,
    extract::rejection::JsonRejection,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::types::{ErrorBody, ErrorCode};
use crate::{
    agent::{AgentError, DomainError},
    datapath::{DatapathError, epochs::EpochError},
    model::NameError,
    snapshot::{CoordinatorError, HvError, HvErrorKind},
};

/// What a handler returns.
pub type ApiResult<T> = Result<Json<T>, ApiError>;

/// A JSON error: `{"error": "...", "code": "..."}` with a 4xx/5xx status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }

    fn of(status: StatusCode, code: ErrorCode, err: impl std::fmt::Display) -> Self {
        Self::new(status, code, err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
                code: self.code,
            }),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self::bad_request(e.body_text())
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        Self::bad_request(e.to_string())
    }
}

/// Status and code of each error kind of the layers below, by reference (an outer error may
/// keep its own message).
fn datapath_kind(err: &DatapathError) -> (StatusCode, ErrorCode) {
    use {ErrorCode as C, StatusCode as S};
    match err {
        DatapathError::UnknownInterface(_) => (S::BAD_REQUEST, C::UnknownInterface),
        DatapathError::NotAttached(_) => (S::CONFLICT, C::PortNotAttached),
        DatapathError::NoFreeSlot(_) => (S::CONFLICT, C::NoFreeSlot),
        _ => (S::INTERNAL_SERVER_ERROR, C::Datapath),
    }
}

fn epoch_kind(err: &EpochError<DatapathError>) -> (StatusCode, ErrorCode) {
    use {ErrorCode as C, StatusCode as S};
    match err {
        EpochError::UnknownVm(_) => (S::NOT_FOUND, C::UnknownVm),
        EpochError::UnknownGroup(_) => (S::NOT_FOUND, C::UnknownGroup),
        EpochError::NotUnicast(_) => (S::BAD_REQUEST, C::BadMac),
        EpochError::BadGroup(_) => (S::BAD_REQUEST, C::BadGroup),
        EpochError::AlreadyRegistered(_) => (S::CONFLICT, C::AlreadyRegistered),
        EpochError::PortNotAttached(_) => (S::CONFLICT, C::PortNotAttached),
        EpochError::PortTaken { .. } => (S::CONFLICT, C::PortTaken),
        EpochError::Backwards { .. } => (S::CONFLICT, C::EpochBackwards),
        EpochError::Overflow { .. } => (S::CONFLICT, C::EpochOverflow),
        EpochError::AboveCeiling { .. } => (S::CONFLICT, C::AboveCeiling),
        EpochError::NoFreeSlot => (S::INSUFFICIENT_STORAGE, C::NoFreeSlot),
        EpochError::Store(e) => datapath_kind(e),
    }
}

fn agent_kind(err: &AgentError) -> (StatusCode, ErrorCode) {
    use {ErrorCode as C, StatusCode as S};
    match err {
        AgentError::Epochs(e) => epoch_kind(e),
        AgentError::Datapath(e) => datapath_kind(e),
        AgentError::PortNotAttached(_) => (S::CONFLICT, C::PortNotAttached),
        AgentError::RemoteNeedsEpoch => (S::BAD_REQUEST, C::BadRequest),
        AgentError::NoBuffer => (S::CONFLICT, C::NoBuffer),
        AgentError::BufferSilent => (S::SERVICE_UNAVAILABLE, C::Unavailable),
        AgentError::SnapshotsOff => (S::SERVICE_UNAVAILABLE, C::SnapshotsOff),
        AgentError::SnapshotsNotReady(_) => (S::SERVICE_UNAVAILABLE, C::Unavailable),
        AgentError::GroupBusy { .. } => (S::CONFLICT, C::Busy),
        AgentError::NotOnPort { .. } => (S::CONFLICT, C::PortTaken),
        AgentError::RecordingUnderWay { .. } => (S::CONFLICT, C::Busy),
    }
}

/// A hypervisor failure's status and code, by its kind.
fn hypervisor(kind: HvErrorKind) -> (StatusCode, ErrorCode) {
    match kind {
        HvErrorKind::NoSuchDomain => (StatusCode::NOT_FOUND, ErrorCode::NoSuchDomain),
        HvErrorKind::NotRunning => (StatusCode::CONFLICT, ErrorCode::DomainNotRunning),
        HvErrorKind::Running => (StatusCode::CONFLICT, ErrorCode::DomainRunning),
        HvErrorKind::NotItsImage => (StatusCode::BAD_REQUEST, ErrorCode::NotItsImage),
        HvErrorKind::Failed => (StatusCode::CONFLICT, ErrorCode::Hypervisor),
    }
}

impl From<DatapathError> for ApiError {
    fn from(err: DatapathError) -> Self {
        let (status, code) = datapath_kind(&err);
        Self::of(status, code, err)
    }
}

impl From<EpochError<DatapathError>> for ApiError {
    fn from(err: EpochError<DatapathError>) -> Self {
        let (status, code) = epoch_kind(&err);
        Self::of(status, code, err)
    }
}

impl From<AgentError> for ApiError {
    fn from(err: AgentError) -> Self {
        let (status, code) = agent_kind(&err);
        Self::of(status, code, err)
    }
}

impl From<HvError> for ApiError {
    fn from(err: HvError) -> Self {
        let (status, code) = hypervisor(err.kind);
        // The detail alone: the coordinator names the VM itself.
        Self::new(status, code, err.detail)
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(err: CoordinatorError) -> Self {
        use {ErrorCode as C, StatusCode as S};
        let (status, code) = match &err {
            CoordinatorError::UnknownGroup(_) => (S::NOT_FOUND, C::UnknownGroup),
            CoordinatorError::UnknownSnapshot(_) => (S::NOT_FOUND, C::UnknownSnapshot),
            CoordinatorError::EmptyGroup(_) | CoordinatorError::BadGroup(_) => {
                (S::BAD_REQUEST, C::BadGroup)
            }
            CoordinatorError::Hypervisor(e) => hypervisor(e.kind),
            CoordinatorError::Busy { .. } => (S::CONFLICT, C::Busy),
            CoordinatorError::GroupExists(_) => (S::CONFLICT, C::GroupExists),
            CoordinatorError::Inconsistent { .. } => (S::CONFLICT, C::InconsistentEpochs),
            CoordinatorError::NotRestorable { .. } => (S::CONFLICT, C::NotRestorable),
            CoordinatorError::Epochs { .. } => (S::CONFLICT, C::Epochs),
            CoordinatorError::Store { .. } => (S::INTERNAL_SERVER_ERROR, C::Store),
        };
        Self::of(status, code, err)
    }
}

impl From<DomainError> for ApiError {
    fn from(err: DomainError) -> Self {
        use {ErrorCode as C, StatusCode as S};
        let (status, code) = match &err {
            DomainError::NoSuchOp(_) => (S::NOT_FOUND, C::NoSuchOperation),
            DomainError::Hypervisor(e) => return e.clone().into(),
            DomainError::Agent(e) => agent_kind(e),
            DomainError::NoSnapshotId(_) | DomainError::NotInStore(_) => {
                (S::BAD_REQUEST, C::BadRequest)
            }
            DomainError::NotBegun => (S::CONFLICT, C::NotBegun),
            DomainError::Epoch(_) => (S::CONFLICT, C::Epochs),
            DomainError::Advance(e) => agent_kind(e),
            DomainError::Io { .. } => (S::INTERNAL_SERVER_ERROR, C::Internal),
        };
        Self::of(status, code, err)
    }
}

/// Runs blocking work (the coordinator, the hypervisor, waiting for the buffer) off the async
/// workers.
pub async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(Into::into)
}
