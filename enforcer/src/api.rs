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
use enforcer_common::{Outcome, Type3Mode, VmEpoch};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{
    coordinator::{
        CoordinatorError, GroupSpec, Manifest, Outcome as SnapshotOutcome, RestoreReport,
    },
    datapath::{AttachMode, AttachedPort, Datapath, DatapathError, ifindex_of},
    epochs::{self, EpochError, EpochStore as _, GroupRecord, VmRecord},
    hold::{Buffer, Command, HoldReport},
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
}

#[derive(Serialize, Deserialize, Debug)]
pub struct RegisterVm {
    pub mac: MacAddr,
    pub group: u32,
    /// Host-side interface of the VM (its tap/veth on the bridge).
    pub port: String,
    /// Starting epoch; default: the group's current epoch.
    #[serde(default)]
    pub epoch: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SetEpoch {
    pub epoch: u32,
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
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/vms", get(list_vms).post(register_vm))
        .route("/v1/vms/{mac}", get(get_vm).delete(unregister_vm))
        .route("/v1/vms/{mac}/epoch", put(set_epoch))
        .route("/v1/vms/{mac}/advance", post(advance))
        .route("/v1/groups", get(list_groups).post(define_group))
        .route("/v1/groups/{group}", axum::routing::delete(remove_group))
        .route("/v1/groups/{group}/abort", post(abort))
        .route("/v1/groups/{group}/snapshots", post(create_snapshot))
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route("/v1/snapshots/{id}/restore", post(restore_snapshot))
        .route("/v1/holds", get(holds))
        .route("/v1/ports", get(list_ports))
        .route("/v1/stats", get(stats))
        .route("/v1/config", get(get_config).put(set_config))
        .route("/metrics", get(prometheus))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

async fn require_token(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
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
    let dp = s.datapath.lock().await;
    Ok(Json(Health {
        status: "ok".into(),
        attach_mode: dp.attach_mode(),
        pin_root: dp.pin_root().display().to_string(),
        ports: dp.attached_ports().len(),
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
    let vm = epochs::register(&mut *dp, req.mac, req.group, ifindex, req.epoch)?;
    s.to_buffer(Command::Vm {
        mac: vm.mac.key(),
        vm: dp.vm(&vm.mac.key()).ok().flatten(),
    });
    tracing::info!(mac = %vm.mac, group = vm.group, epoch = vm.epoch, port = req.port, "VM registered");
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
    Ok(Json(change_epoch(&s, mac, Some(req.epoch)).await?))
}

async fn advance(State(s): State<Shared>, Path(mac): Path<String>) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    Ok(Json(change_epoch(&s, mac, None).await?))
}

/// Moves a VM's epoch (to `target`, or the next one). With a buffer running: its copy of the
/// VM is updated first (so colors it assigns never lag the map), then the map gets the epoch
/// and the draining flag in one write, then the buffer is told to re-inject.
pub async fn change_epoch(
    s: &AppState,
    mac: MacAddr,
    target: Option<u32>,
) -> Result<VmRecord, ApiError> {
    let mut dp = s.datapath.lock().await;
    let current: VmEpoch = dp
        .vm(&mac.key())?
        .ok_or(EpochError::<DatapathError>::UnknownVm(mac))?;
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

fn snapshots(s: &AppState) -> Result<Arc<Snapshots>, ApiError> {
    s.snapshots.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "snapshots are off: this daemon runs without libvirt (--no-libvirt)",
        )
    })
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

async fn define_group(
    State(s): State<Shared>,
    body: Result<Json<DefineGroup>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<GroupSpec>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = snapshots(&s)?;
    let group = blocking(move || c.define_group(&req.name, req.id, &req.domains)).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

async fn remove_group(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<GroupSpec> {
    let c = snapshots(&s)?;
    Ok(Json(blocking(move || c.remove_group(&name)).await?))
}

/// Starts a snapshot and answers at once (202) with its live view; the work goes on in the
/// background (follow it with `GET /v1/snapshots/{id}`). Preparing and running happen in one
/// task, so a client that goes away cannot leave a prepared snapshot (and a busy group) behind.
async fn create_snapshot(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Manifest>), ApiError> {
    let c = snapshots(&s)?;
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

async fn list_snapshots(
    State(s): State<Shared>,
    axum::extract::Query(filter): axum::extract::Query<SnapshotFilter>,
) -> ApiResult<Vec<Manifest>> {
    let c = snapshots(&s)?;
    let mut all = blocking(move || c.list()).await?;
    if let Some(g) = filter.group {
        all.retain(|m| m.group.name == g);
    }
    Ok(Json(all))
}

async fn get_snapshot(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult<Manifest> {
    let c = snapshots(&s)?;
    Ok(Json(blocking(move || c.get(&id)).await?))
}

async fn delete_snapshot(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult<Manifest> {
    let c = snapshots(&s)?;
    Ok(Json(blocking(move || c.delete(&id)).await?))
}

async fn restore_snapshot(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Option<Json<Restore>>,
) -> ApiResult<RestoreReport> {
    let req = body.map(|Json(r)| r).unwrap_or_default();
    if let Some(bridge) = &req.bridge {
        let valid = !bridge.is_empty()
            && bridge.len() <= 15
            && bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("bridge {bridge:?}: an interface name (1-15 of [A-Za-z0-9_.-])"),
            ));
        }
    }
    let c = snapshots(&s)?;
    Ok(Json(
        blocking(move || c.restore(&id, req.bridge.as_deref())).await?,
    ))
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
    let vms = epochs::list_vms(dp)?;
    let stats = dp.port_stats()?;
    Ok(stats
        .into_iter()
        .map(|(ifindex, counters)| PortStats {
            ifindex,
            port: dp.port_name(ifindex).map(str::to_owned),
            vm: vms.iter().find(|vm| vm.ifindex == ifindex).map(|vm| vm.mac),
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
