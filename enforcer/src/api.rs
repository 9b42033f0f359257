//! The daemon's HTTP/JSON API (no gRPC). Loopback by default; a bearer token is required when
//! it listens anywhere else.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use enforcer_common::{
    FLAG_REMOTE, Outcome, REMOTE_SLOT_KEY, Type3Mode, VmEpoch, hold_kernel, names,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{
    coordinator::{
        CoordinatorError, EpochControl as _, GroupSpec, HvError, Hypervisor as _, Manifest,
        Outcome as SnapshotOutcome, RestoreReport, VmSpec,
    },
    datapath::{AttachMode, AttachedPort, Datapath, DatapathError, ifindex_of},
    epochs::{self, EpochError, EpochStore as _, GroupRecord, VmRecord},
    hold::{Buffer, Command, HoldReport},
    hosts::Hosts,
    mac::MacAddr,
    metrics,
    snapshots::Snapshots,
};

pub struct AppState {
    pub datapath: Arc<Mutex<Datapath>>,
    pub token: Option<String>,
    /// The buffer daemon, when it runs (mode `buffer` needs it to hold frames).
    pub buffer: std::sync::Mutex<Option<Buffer>>,
    /// Group snapshots over libvirt, when enabled.
    pub snapshots: std::sync::OnceLock<Arc<Snapshots>>,
    /// Views of VMs on other hosts raised from their frames' colors (see `learn.rs`).
    pub learned_applied: Arc<std::sync::atomic::AtomicU64>,
    /// Domains whose snapshot a coordinator began through this agent, with their epoch then.
    pub begun: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl AppState {
    /// Sends a command to the buffer daemon; false when none runs.
    pub fn to_buffer(&self, command: Command) -> bool {
        match &*self.buffer.lock().expect("buffer lock") {
            Some(buffer) => {
                buffer.send(command);
                true
            }
            None => false,
        }
    }

    pub fn buffer_running(&self) -> bool {
        self.buffer.lock().expect("buffer lock").is_some()
    }

    /// What the buffer holds. The buffer lock is only held to reach the buffer, not while it
    /// answers (that can take a while when its thread is busy; advances must not wait on it).
    pub fn hold_report(&self) -> Option<HoldReport> {
        let reporter = self
            .buffer
            .lock()
            .expect("buffer lock")
            .as_ref()
            .map(Buffer::reporter)?;
        reporter.report()
    }
}

pub type Shared = Arc<AppState>;

/// What the group and snapshot routes need. The daemon (`enforcer run`) serves them over its
/// own host; the coordinator of several hosts (`enforcer coordinator`) over the agents.
pub trait SnapshotService: Send + Sync + 'static {
    fn snapshots(&self) -> Result<Arc<Snapshots>, ApiError>;
    fn token(&self) -> Option<&str>;
}

impl SnapshotService for AppState {
    fn snapshots(&self) -> Result<Arc<Snapshots>, ApiError> {
        self.snapshots.get().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "snapshots are off: this daemon runs without libvirt (--no-libvirt)",
            )
        })
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// The state of `enforcer coordinator`: no datapath of its own, only agents.
pub struct CoordinatorState {
    pub snapshots: Arc<Snapshots>,
    pub hosts: Hosts,
    pub token: Option<String>,
}

impl SnapshotService for CoordinatorState {
    fn snapshots(&self) -> Result<Arc<Snapshots>, ApiError> {
        Ok(self.snapshots.clone())
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// A JSON error: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

#[derive(Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<DatapathError> for ApiError {
    fn from(err: DatapathError) -> Self {
        let status = match err {
            DatapathError::UnknownInterface(_) => StatusCode::BAD_REQUEST,
            DatapathError::NotAttached(_) | DatapathError::NoFreeSlot(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, err.to_string())
    }
}

impl From<EpochError<DatapathError>> for ApiError {
    fn from(err: EpochError<DatapathError>) -> Self {
        let status = match &err {
            EpochError::UnknownVm(_) => StatusCode::NOT_FOUND,
            EpochError::NotUnicast(_) | EpochError::BadGroup(_) => StatusCode::BAD_REQUEST,
            EpochError::AlreadyRegistered(_)
            | EpochError::PortNotAttached(_)
            | EpochError::PortTaken { .. }
            | EpochError::Backwards { .. }
            | EpochError::Overflow { .. } => StatusCode::CONFLICT,
            EpochError::NoFreeSlot => StatusCode::INSUFFICIENT_STORAGE,
            EpochError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, err.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

#[derive(Serialize, Deserialize, Debug)]
pub struct Health {
    pub status: String,
    pub attach_mode: AttachMode,
    pub pin_root: String,
    pub ports: usize,
    /// Views of VMs on other hosts raised from the colors their frames carried.
    #[serde(default)]
    pub learned_epochs: u64,
    /// Learned colors the program could not report (its ring was full).
    #[serde(default)]
    pub learn_lost: u64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct RegisterVm {
    pub mac: MacAddr,
    pub group: u32,
    /// Host-side interface of the VM (its tap/veth on the bridge).
    pub port: String,
    /// Starting epoch; default: the group's current epoch. Required for a remote VM.
    #[serde(default)]
    pub epoch: Option<u32>,
    /// The VM runs on another host: `port` is the overlay port (e.g. the VXLAN device on the
    /// bridge) its frames arrive on, and `epoch` the coordinator's value of its epoch.
    #[serde(default)]
    pub remote: bool,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SetEpoch {
    pub epoch: u32,
    /// Only raise: an epoch at or below the current one is not an error but a no-op (how
    /// views of VMs on other hosts are updated, since they may have learned it already).
    #[serde(default)]
    pub raise_only: bool,
}

/// `POST /v1/groups/{g}/abort`: every member above `epoch` goes back to it, and everything
/// held for the group is delivered.
#[derive(Serialize, Deserialize, Debug)]
pub struct Abort {
    pub epoch: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    Buffer,
    Drop,
    Monitor,
}

impl std::fmt::Display for ModeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModeName::Buffer => "buffer",
            ModeName::Drop => "drop",
            ModeName::Monitor => "monitor",
        })
    }
}

impl From<Type3Mode> for ModeName {
    fn from(mode: Type3Mode) -> Self {
        match mode {
            Type3Mode::Buffer => ModeName::Buffer,
            Type3Mode::Drop => ModeName::Drop,
            Type3Mode::Monitor => ModeName::Monitor,
        }
    }
}

impl From<ModeName> for Type3Mode {
    fn from(mode: ModeName) -> Self {
        match mode {
            ModeName::Buffer => Type3Mode::Buffer,
            ModeName::Drop => Type3Mode::Drop,
            ModeName::Monitor => Type3Mode::Monitor,
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Config {
    pub type3_mode: ModeName,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterJson {
    pub frames: u64,
    pub bytes: u64,
}

/// Counters of one port, by outcome name (`type1`, `type3_dropped`, ...).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PortStats {
    pub ifindex: u32,
    pub port: Option<String>,
    pub vm: Option<MacAddr>,
    /// The counters of one VM on another host (frames from it that arrived on the overlay).
    #[serde(default)]
    pub remote: bool,
    pub counters: BTreeMap<String, CounterJson>,
}

impl PortStats {
    pub fn frames(&self, outcome: Outcome) -> u64 {
        self.counters.get(outcome.name()).map_or(0, |c| c.frames)
    }
    pub fn total_frames(&self) -> u64 {
        self.counters.values().map(|c| c.frames).sum()
    }
}

pub fn router(state: Shared) -> Router {
    snapshot_routes(Router::new())
        .route("/v1/health", get(health))
        .route("/v1/vms", get(list_vms).post(register_vm))
        .route("/v1/vms/{mac}", get(get_vm).delete(unregister_vm))
        .route("/v1/vms/{mac}/epoch", put(set_epoch))
        .route("/v1/vms/{mac}/advance", post(advance))
        .route("/v1/groups", get(list_groups))
        .route("/v1/groups/{group}/abort", post(abort))
        .route("/v1/domains/{name}/nic", get(domain_nic))
        .route("/v1/domains/{name}/{op}", post(domain_op))
        .route("/v1/holds", get(holds))
        .route("/v1/ports", get(list_ports))
        .route("/v1/stats", get(stats))
        .route("/v1/config", get(get_config).put(set_config))
        .route("/metrics", get(prometheus))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_token::<AppState>,
        ))
        .with_state(state)
}

/// The API of `enforcer coordinator`: groups and snapshots over the agents of several hosts.
pub fn coordinator_router(state: Arc<CoordinatorState>) -> Router {
    snapshot_routes(Router::new())
        .route("/v1/health", get(coordinator_health))
        .route("/v1/groups", get(coordinator_groups))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_token::<CoordinatorState>,
        ))
        .with_state(state)
}

/// Group and snapshot routes, the same for one host and for several.
fn snapshot_routes<S: SnapshotService>(router: Router<Arc<S>>) -> Router<Arc<S>> {
    router
        .route("/v1/groups", post(define_group::<S>))
        .route(
            "/v1/groups/{group}",
            axum::routing::delete(remove_group::<S>),
        )
        .route("/v1/groups/{group}/snapshots", post(create_snapshot::<S>))
        .route("/v1/snapshots", get(list_snapshots::<S>))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot::<S>).delete(delete_snapshot::<S>),
        )
        .route("/v1/snapshots/{id}/restore", post(restore_snapshot::<S>))
}

async fn require_token<S: SnapshotService>(
    State(state): State<Arc<S>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = state.token() {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()));
        if !ok {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
                .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_mac(s: &str) -> Result<MacAddr, ApiError> {
    s.parse().map_err(|e: crate::mac::MacParseError| {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    })
}

async fn health(State(s): State<Shared>) -> ApiResult<Health> {
    let mut dp = s.datapath.lock().await;
    let learn_lost = dp.per_cpu_sum(names::HOLD_KERNEL, hold_kernel::LEARN_LOST)?;
    Ok(Json(Health {
        status: "ok".into(),
        attach_mode: dp.attach_mode(),
        pin_root: dp.pin_root().display().to_string(),
        ports: dp.attached_ports().len(),
        learned_epochs: s.learned_applied.load(std::sync::atomic::Ordering::Relaxed),
        learn_lost,
    }))
}

async fn list_vms(State(s): State<Shared>) -> ApiResult<Vec<VmRecord>> {
    Ok(Json(epochs::list_vms(&mut *s.datapath.lock().await)?))
}

async fn get_vm(State(s): State<Shared>, Path(mac): Path<String>) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    Ok(Json(epochs::get_vm(&mut *s.datapath.lock().await, mac)?))
}

async fn register_vm(
    State(s): State<Shared>,
    body: Result<Json<RegisterVm>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<VmRecord>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let ifindex = ifindex_of(&req.port)?;
    let mut dp = s.datapath.lock().await;
    if !dp.is_attached(ifindex) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "port {} is not a VM port of this daemon (not attached)",
                req.port
            ),
        ));
    }
    let vm = if req.remote {
        let epoch = req.epoch.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "a remote VM is registered with its epoch (the value its own host has)",
            )
        })?;
        epochs::register_remote(&mut *dp, req.mac, req.group, ifindex, epoch)?
    } else {
        epochs::register(&mut *dp, req.mac, req.group, ifindex, req.epoch)?
    };
    s.to_buffer(Command::Vm {
        mac: vm.mac.key(),
        vm: dp.vm(&vm.mac.key()).ok().flatten(),
    });
    tracing::info!(mac = %vm.mac, group = vm.group, epoch = vm.epoch, port = req.port, remote = vm.remote, "VM registered");
    Ok((StatusCode::CREATED, Json(vm)))
}

async fn unregister_vm(State(s): State<Shared>, Path(mac): Path<String>) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    let vm = epochs::unregister(&mut *s.datapath.lock().await, mac)?;
    s.to_buffer(Command::Vm {
        mac: mac.key(),
        vm: None,
    });
    tracing::info!(mac = %vm.mac, "VM unregistered");
    Ok(Json(vm))
}

async fn set_epoch(
    State(s): State<Shared>,
    Path(mac): Path<String>,
    body: Result<Json<SetEpoch>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(
        change_epoch(&s, mac, Some(req.epoch), req.raise_only).await?,
    ))
}

async fn advance(State(s): State<Shared>, Path(mac): Path<String>) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    Ok(Json(change_epoch(&s, mac, None, false).await?))
}

/// Moves a VM's epoch (to `target`, or the next one). With a buffer running: its copy of the
/// VM is updated first (so colors it assigns never lag the map), then the map gets the epoch
/// and the draining flag in one write, then the buffer is told to re-inject. With
/// `raise_only`, a target at or below the current epoch leaves it as it is.
pub async fn change_epoch(
    s: &AppState,
    mac: MacAddr,
    target: Option<u32>,
    raise_only: bool,
) -> Result<VmRecord, ApiError> {
    let mut dp = s.datapath.lock().await;
    let current: VmEpoch = dp
        .vm(&mac.key())?
        .ok_or(EpochError::<DatapathError>::UnknownVm(mac))?;
    if raise_only && target.is_some_and(|t| t <= current.epoch) {
        return Ok(VmRecord::new(mac.key(), current));
    }
    let epoch = match target {
        Some(epoch) => epoch,
        None => current
            .epoch
            .checked_add(1)
            .ok_or(EpochError::<DatapathError>::Overflow { mac })?,
    };
    if epoch < current.epoch {
        return Err(EpochError::<DatapathError>::Backwards {
            mac,
            current: current.epoch,
            requested: epoch,
        }
        .into());
    }
    let drain = s.to_buffer(Command::Vm {
        mac: mac.key(),
        vm: Some(VmEpoch { epoch, ..current }),
    });
    let change = match epochs::set_epoch(&mut *dp, mac, epoch, drain) {
        Ok(change) => change,
        Err(err) => {
            s.to_buffer(Command::Vm {
                mac: mac.key(),
                vm: Some(current),
            });
            return Err(err.into());
        }
    };
    if change.changed {
        s.to_buffer(Command::Advanced {
            mac: mac.key(),
            epoch,
        });
        if change.group_min_rose {
            s.to_buffer(Command::GroupAdvanced {
                group: change.vm.group,
                min_epoch: change.group_min,
            });
        }
        tracing::info!(%mac, epoch, "epoch set");
    }
    Ok(VmRecord::new(mac.key(), change.vm))
}

async fn abort(
    State(s): State<Shared>,
    Path(group): Path<u32>,
    body: Result<Json<Abort>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Vec<VmRecord>> {
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(roll_back_group(&s, group, req.epoch).await?))
}

/// Every member of `group` above `epoch` goes back to it, and everything held for the group
/// is delivered (an aborted snapshot).
pub async fn roll_back_group(
    s: &AppState,
    group: u32,
    epoch: u32,
) -> Result<Vec<VmRecord>, ApiError> {
    let mut dp = s.datapath.lock().await;
    if !epochs::list_groups(&mut *dp)?
        .iter()
        .any(|g| g.group == group)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no group {group}"),
        ));
    }
    let drain = s.buffer_running();
    for (mac, vm) in dp.vms()? {
        if vm.group == group && vm.epoch > epoch {
            s.to_buffer(Command::Vm {
                mac,
                vm: Some(VmEpoch { epoch, ..vm }),
            });
        }
    }
    let changed = epochs::roll_back(&mut *dp, group, epoch, drain)?;
    s.to_buffer(Command::Release { group });
    tracing::info!(
        group,
        epoch,
        rolled_back = changed.len(),
        "snapshot aborted"
    );
    Ok(changed
        .into_iter()
        .map(|(mac, vm)| VmRecord::new(mac.key(), vm))
        .collect())
}

/// The buffer's report, waited for off the async workers.
async fn hold_report_async(s: &Shared) -> Option<HoldReport> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || s.hold_report())
        .await
        .ok()
        .flatten()
}

async fn holds(State(s): State<Shared>) -> ApiResult<HoldReport> {
    hold_report_async(&s).await.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no buffer daemon runs (started with --no-buffer)",
        )
    })
}

/// A datapath group, with its name and domains when it was defined over libvirt.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct GroupView {
    #[serde(flatten)]
    pub record: GroupRecord,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub domains: Vec<String>,
}

async fn list_groups(State(s): State<Shared>) -> ApiResult<Vec<GroupView>> {
    let records = epochs::list_groups(&mut *s.datapath.lock().await)?;
    let named = s.snapshots.get().map(|c| c.groups()).unwrap_or_default();
    Ok(Json(
        records
            .into_iter()
            .map(|record| {
                let spec = named.iter().find(|g| g.id == record.group);
                GroupView {
                    name: spec.map(|g| g.name.clone()),
                    domains: spec
                        .map(|g| g.vms.iter().map(|v| v.name.clone()).collect())
                        .unwrap_or_default(),
                    record,
                }
            })
            .collect(),
    ))
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
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Restore {
    /// Put the restored VMs on this bridge instead of their own.
    #[serde(default)]
    pub bridge: Option<String>,
}

impl From<CoordinatorError> for ApiError {
    fn from(err: CoordinatorError) -> Self {
        let status = match &err {
            CoordinatorError::UnknownGroup(_) | CoordinatorError::UnknownSnapshot(_) => {
                StatusCode::NOT_FOUND
            }
            CoordinatorError::EmptyGroup(_) | CoordinatorError::BadGroup(_) => {
                StatusCode::BAD_REQUEST
            }
            CoordinatorError::Hypervisor(e) if e.detail.starts_with("no such domain") => {
                StatusCode::NOT_FOUND
            }
            CoordinatorError::Busy { .. }
            | CoordinatorError::GroupExists(_)
            | CoordinatorError::Inconsistent { .. }
            | CoordinatorError::NotRestorable { .. }
            | CoordinatorError::Hypervisor(_)
            | CoordinatorError::Epochs(_) => StatusCode::CONFLICT,
            CoordinatorError::Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, err.to_string())
    }
}

/// Runs blocking coordinator work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoordinatorError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

async fn define_group<S: SnapshotService>(
    State(s): State<Arc<S>>,
    body: Result<Json<DefineGroup>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<GroupSpec>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = s.snapshots()?;
    let group = blocking(move || c.define_group(&req.name, req.id, &req.domains)).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

async fn remove_group<S: SnapshotService>(
    State(s): State<Arc<S>>,
    Path(name): Path<String>,
) -> ApiResult<GroupSpec> {
    let c = s.snapshots()?;
    Ok(Json(blocking(move || c.remove_group(&name)).await?))
}

/// Starts a snapshot and answers at once (202) with its live view; the work goes on in the
/// background (follow it with `GET /v1/snapshots/{id}`). Preparing and running happen in one
/// task, so a client that goes away cannot leave a prepared snapshot (and a busy group) behind.
async fn create_snapshot<S: SnapshotService>(
    State(s): State<Arc<S>>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Manifest>), ApiError> {
    let c = s.snapshots()?;
    let (started, view) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let prepared = c.group(&name).and_then(|group| c.prepare(&group));
        match prepared {
            Ok(prepared) => {
                let _ = started.send(c.get(&prepared.id));
                if let Err(err) = c.run(prepared) {
                    tracing::error!(%err, "group snapshot");
                }
            }
            Err(err) => {
                let _ = started.send(Err(err));
            }
        }
    });
    let view = view
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "snapshot task ended"))??;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

#[derive(Deserialize, Debug)]
pub struct SnapshotFilter {
    pub group: Option<String>,
}

async fn list_snapshots<S: SnapshotService>(
    State(s): State<Arc<S>>,
    axum::extract::Query(filter): axum::extract::Query<SnapshotFilter>,
) -> ApiResult<Vec<Manifest>> {
    let c = s.snapshots()?;
    let mut all = blocking(move || c.list()).await?;
    if let Some(g) = filter.group {
        all.retain(|m| m.group.name == g);
    }
    Ok(Json(all))
}

async fn get_snapshot<S: SnapshotService>(
    State(s): State<Arc<S>>,
    Path(id): Path<String>,
) -> ApiResult<Manifest> {
    let c = s.snapshots()?;
    Ok(Json(blocking(move || c.get(&id)).await?))
}

async fn delete_snapshot<S: SnapshotService>(
    State(s): State<Arc<S>>,
    Path(id): Path<String>,
) -> ApiResult<Manifest> {
    let c = s.snapshots()?;
    Ok(Json(blocking(move || c.delete(&id)).await?))
}

async fn restore_snapshot<S: SnapshotService>(
    State(s): State<Arc<S>>,
    Path(id): Path<String>,
    body: Option<Json<Restore>>,
) -> ApiResult<RestoreReport> {
    let req = body.map(|Json(r)| r).unwrap_or_default();
    if let Some(bridge) = &req.bridge {
        check_bridge(bridge)?;
    }
    let c = s.snapshots()?;
    Ok(Json(
        blocking(move || c.restore(&id, req.bridge.as_deref())).await?,
    ))
}

/// `POST /v1/domains/{name}/{op}`: one step of a snapshot or restore of a domain on this
/// agent's host, for a coordinator of several hosts (see `hosts.rs`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DomainCall {
    pub mac: MacAddr,
    /// The snapshot's id (`begin`, `discard`): its images live under this agent's store.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// `wait-paused`, `complete`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `wait-paused`: then advance the VM's epoch here at once (this agent owns it), so no
    /// network hop separates the stop from the advance.
    #[serde(default)]
    pub advance: bool,
    /// `restore`: the images `complete` returned.
    #[serde(default)]
    pub images: Vec<std::path::PathBuf>,
    /// `restore`: onto this bridge instead of the domain's own.
    #[serde(default)]
    pub bridge: Option<String>,
}

impl Default for DomainCall {
    fn default() -> Self {
        Self {
            mac: MacAddr([0; 6]),
            snapshot: None,
            timeout_ms: None,
            advance: false,
            images: Vec::new(),
            bridge: None,
        }
    }
}

/// `wait-paused` with `advance`: when the VM stopped, and its advance.
#[derive(Serialize, Deserialize, Debug)]
pub struct PausedAdvanced {
    pub paused: crate::coordinator::Paused,
    /// When the map had the new epoch (µs since the Unix epoch, the agent's clock).
    pub advanced_unix_us: u64,
    pub epoch: u32,
}

/// A domain's NIC: its MAC and host-side port.
#[derive(Serialize, Deserialize, Debug)]
pub struct DomainNicJson {
    pub mac: MacAddr,
    pub port: String,
}

impl From<HvError> for ApiError {
    fn from(err: HvError) -> Self {
        let status = if err.detail.starts_with("no such domain") {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::CONFLICT
        };
        // The detail alone: the coordinator names the VM itself.
        Self::new(status, err.detail)
    }
}

fn check_bridge(bridge: &str) -> Result<(), ApiError> {
    let valid = !bridge.is_empty()
        && bridge.len() <= 15
        && bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bridge {bridge:?}: an interface name (1-15 of [A-Za-z0-9_.-])"),
        ))
    }
}

async fn domain_nic(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<DomainNicJson> {
    let c = s.snapshots()?;
    let (mac, port) = tokio::task::spawn_blocking(move || c.hypervisor().nic(&name))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(DomainNicJson { mac, port }))
}

async fn domain_op(
    State(s): State<Shared>,
    Path((name, op)): Path<(String, String)>,
    body: Result<Json<DomainCall>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(call) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = s.snapshots()?;
    let snapshot = call.snapshot.clone();
    let snapshot_dir = move |c: &Snapshots| -> Result<std::path::PathBuf, ApiError> {
        match snapshot.as_deref() {
            Some(id) if !id.is_empty() && !id.contains('/') && !id.starts_with('.') => {
                Ok(c.store().join(id))
            }
            other => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("snapshot id {other:?}: a name, no / and not starting with ."),
            )),
        }
    };
    if let Some(bridge) = &call.bridge {
        check_bridge(bridge)?;
    }
    let vm = VmSpec {
        name,
        mac: call.mac,
    };
    // At most an hour: a step waits that long at the very most, and no deadline overflows.
    let timeout =
        std::time::Duration::from_millis(call.timeout_ms.unwrap_or(60_000).min(3_600_000));
    let done = || serde_json::json!({});
    let rt = tokio::runtime::Handle::current();
    let work = move || -> Result<serde_json::Value, ApiError> {
        let hv = c.hypervisor();
        Ok(match op.as_str() {
            "begin" => {
                let dir = snapshot_dir(&c)?;
                std::fs::create_dir_all(&dir).map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{}: {e}", dir.display()),
                    )
                })?;
                // The epoch the VM starts its snapshot at: `wait-paused` with `advance` moves it
                // to the next one and no further, even if that wait outlives an abort that
                // already moved it there.
                let epoch = c
                    .epochs()
                    .epoch(&vm)
                    .map_err(|e| ApiError::new(StatusCode::CONFLICT, format!("its epoch: {e}")))?;
                hv.begin(&vm, &dir)?;
                s.begun
                    .lock()
                    .expect("begun lock")
                    .insert(vm.name.clone(), epoch);
                done()
            }
            "wait-paused" if call.advance => {
                let target = s
                    .begun
                    .lock()
                    .expect("begun lock")
                    .remove(&vm.name)
                    .map(|e| e + 1)
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::CONFLICT,
                            "no snapshot of this domain was begun through this agent",
                        )
                    })?;
                let waited = {
                    // The stop → advance window is on the critical path (see `snapshot_vm`).
                    let _realtime = crate::hold::Realtime::enter("an agent's snapshot step");
                    hv.wait_paused(&vm, timeout).map(|p| {
                        let advanced = rt.block_on(change_epoch(&s, vm.mac, Some(target), true));
                        (p, advanced, crate::coordinator::unix_us())
                    })
                };
                let (paused, advanced, advanced_unix_us) = waited?;
                let epoch = advanced
                    .map_err(|e| {
                        ApiError::new(e.status, format!("advancing the epoch: {}", e.message))
                    })?
                    .epoch;
                serde_json::json!(PausedAdvanced {
                    paused,
                    advanced_unix_us,
                    epoch,
                })
            }
            "wait-paused" => serde_json::json!(hv.wait_paused(&vm, timeout)?),
            "complete" => serde_json::json!(hv.complete(&vm, timeout)?),
            "resume" => hv.resume(&vm).map(|()| done())?,
            "cancel" => hv.cancel(&vm).map(|()| done())?,
            "destroy" => hv.destroy(&vm).map(|()| done())?,
            "discard" => {
                let dir = snapshot_dir(&c)?;
                hv.discard(&vm, &dir)?;
                // The last VM's images gone: the directory goes too.
                let _ = std::fs::remove_dir(&dir);
                done()
            }
            "restore" => {
                let store = c
                    .store()
                    .canonicalize()
                    .unwrap_or_else(|_| c.store().into());
                if let Some(outside) = call
                    .images
                    .iter()
                    .find(|p| !p.canonicalize().is_ok_and(|p| p.starts_with(&store)))
                {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "{} is not an image in this agent's store",
                            outside.display()
                        ),
                    ));
                }
                let port = hv.restore_paused(&vm, &call.images, call.bridge.as_deref())?;
                serde_json::json!(DomainNicJson { mac: vm.mac, port })
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no domain operation {other:?} (begin, wait-paused, complete, resume, cancel, destroy, discard, restore)"
                    ),
                ));
            }
        })
    };
    let value = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(value))
}

/// `GET /v1/health` of the coordinator: every agent, reachable or not.
#[derive(Serialize, Deserialize, Debug)]
pub struct CoordinatorHealth {
    pub status: String,
    pub hosts: Vec<HostHealth>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct HostHealth {
    pub name: String,
    pub agent: String,
    pub reachable: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub learned_epochs: u64,
}

async fn coordinator_health(State(s): State<Arc<CoordinatorState>>) -> Json<CoordinatorHealth> {
    let mut hosts = Vec::new();
    for spec in s.hosts.specs() {
        let client = s.hosts.client(&spec.name).expect("a listed host");
        let (reachable, error, learned_epochs) = match client.health().await {
            Ok(h) => (true, None, h.learned_epochs),
            Err(e) => (false, Some(e.to_string()), 0),
        };
        hosts.push(HostHealth {
            name: spec.name,
            agent: spec.agent,
            reachable,
            error,
            learned_epochs,
        });
    }
    let status = if hosts.iter().all(|h| h.reachable) {
        "ok"
    } else {
        "degraded"
    };
    Json(CoordinatorHealth {
        status: status.into(),
        hosts,
    })
}

/// The coordinator's groups, with their members' epochs as their own hosts have them.
async fn coordinator_groups(State(s): State<Arc<CoordinatorState>>) -> ApiResult<Vec<GroupView>> {
    let c = s.snapshots.clone();
    let views = tokio::task::spawn_blocking(move || {
        c.groups()
            .into_iter()
            .map(|g| {
                let epochs: Vec<u32> = g
                    .vms
                    .iter()
                    .filter_map(|vm| c.epochs().epoch(vm).ok())
                    .collect();
                GroupView {
                    record: GroupRecord {
                        group: g.id,
                        members: g.vms.len() as u32,
                        min_epoch: epochs.iter().copied().min().unwrap_or(0),
                        max_epoch: epochs.iter().copied().max().unwrap_or(0),
                    },
                    name: Some(g.name.clone()),
                    domains: g.vms.iter().map(|v| v.name.clone()).collect(),
                }
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(views))
}

/// Whether a snapshot is finished (for clients that wait).
pub fn finished(m: &Manifest) -> bool {
    m.outcome != SnapshotOutcome::Running
}

async fn list_ports(State(s): State<Shared>) -> ApiResult<Vec<AttachedPort>> {
    Ok(Json(s.datapath.lock().await.attached_ports()))
}

/// Counters of every port that has any, with the port's name and VM when known.
pub fn collect_stats(dp: &mut Datapath) -> Result<Vec<PortStats>, ApiError> {
    let vms = dp.vms()?;
    let stats = dp.port_stats()?;
    Ok(stats
        .into_iter()
        .map(|(key, counters)| {
            // A VM on another host has a slot of its own on the shared overlay port.
            let (ifindex, vm) = if key & REMOTE_SLOT_KEY != 0 {
                let slot = key & !REMOTE_SLOT_KEY;
                let vm = vms
                    .iter()
                    .find(|(_, vm)| vm.flags & FLAG_REMOTE != 0 && vm.slot == slot);
                (vm.map_or(0, |(_, vm)| vm.ifindex), vm)
            } else {
                let vm = vms
                    .iter()
                    .find(|(_, vm)| vm.flags & FLAG_REMOTE == 0 && vm.ifindex == key);
                (key, vm)
            };
            PortStats {
                ifindex,
                port: dp.port_name(ifindex).map(str::to_owned),
                vm: vm.map(|(mac, _)| MacAddr::from(*mac)),
                remote: vm.is_some_and(|(_, vm)| vm.flags & FLAG_REMOTE != 0),
                counters: Outcome::ALL
                    .iter()
                    .map(|o| {
                        let c = counters.counter(*o);
                        (
                            o.name().to_owned(),
                            CounterJson {
                                frames: c.frames,
                                bytes: c.bytes,
                            },
                        )
                    })
                    .collect(),
            }
        })
        .collect())
}

async fn stats(State(s): State<Shared>) -> ApiResult<Vec<PortStats>> {
    Ok(Json(collect_stats(&mut *s.datapath.lock().await)?))
}

async fn get_config(State(s): State<Shared>) -> ApiResult<Config> {
    let mode = s.datapath.lock().await.type3_mode()?;
    Ok(Json(Config {
        type3_mode: mode.into(),
    }))
}

async fn set_config(
    State(s): State<Shared>,
    body: Result<Json<Config>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Config> {
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    s.datapath
        .lock()
        .await
        .set_type3_mode(req.type3_mode.into())?;
    Ok(Json(req))
}

async fn prometheus(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let mut dp = s.datapath.lock().await;
    let ports = collect_stats(&mut dp)?;
    let vms = epochs::list_vms(&mut *dp)?;
    drop(dp);
    let holds = hold_report_async(&s).await;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "text/plain; version=0.0.4".parse().expect("static header"),
    );
    Ok((headers, metrics::render(&ports, &vms, holds.as_ref())))
}

/// Whether an address may serve the API without a token.
pub fn is_local(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
