//! HTTP client of the API (an agent's or a coordinator's), used by the CLI, the coordinator of
//! several hosts, the lab and the tests. Errors carry the server's [`ErrorCode`].

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use enforcer_common::Type3Mode;
use reqwest::{Method, StatusCode};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    endpoint::unix_path,
    types::{DefineGroup, ErrorBody, ErrorCode, SnapshotBody},
};
use crate::{agent::DomainStateView, snapshot::DomainState};
use crate::{
    agent::{
        Abort, Announce, Announced, Config, DomainCall, DomainNic, DomainOp, GroupView, Health,
        PausedAdvanced, PortStats, SetEpoch,
        recording_wire::{RecordBegin, RecordTake, Replay, Shut, WireFrames, WireRecordings},
    },
    datapath::{AttachedPort, epochs::VmRecord},
    hold::{HoldReport, RecordedFrame, Recording, Replayed},
    model::{GroupSpec, IfName, MacAddr, VmSpec},
    snapshot::{CutMethod, Manifest, Paused, RestoreReport},
};

/// One path segment, percent-encoded (RFC 3986 §2.1): a name with `#`, `?`, `/`, `%` or a
/// space (libvirt allows them in domain names) reaches its route as itself (case S22 of the
/// security review).
fn seg(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The agent's unix socket ([`super::endpoint::DEFAULT_SOCKET`]).
pub const DEFAULT_API: &str = "unix:/run/enforcer/enforcer.sock";

/// How long one API call may take, unless it says otherwise (restores and image writes of
/// large VMs are the slow ones).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Added to a step's own timeout for the HTTP call that waits for it.
const STEP_MARGIN: Duration = Duration::from_secs(30);

fn decode<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ClientError> {
    serde_json::from_value(value).map_err(|e| ClientError::Api {
        status: StatusCode::BAD_GATEWAY,
        code: ErrorCode::Unknown,
        message: format!("unexpected answer: {e}"),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the enforcer API at {address} ({path}): {detail}")]
    Connect {
        /// The API's address as given (its socket, or its URL).
        address: String,
        path: String,
        /// What failed, with a hint when the cause is a common one.
        detail: String,
    },
    #[error("{status}: {message}")]
    Api {
        status: StatusCode,
        code: ErrorCode,
        message: String,
    },
    #[error("bad response from {url}: {source}")]
    Decode { url: String, source: reqwest::Error },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's code for the error, when it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the server answered `code` — or, a server that sends no codes (an older agent),
    /// the status that code comes with.
    pub fn is(&self, code: ErrorCode) -> bool {
        match self {
            ClientError::Api {
                code: ErrorCode::Unknown,
                status,
                ..
            } => code.status() == Some(*status),
            ClientError::Api { code: c, .. } => *c == code,
            _ => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    /// The address as given (a socket or a URL), for [`Client::base`].
    given: String,
    /// What request URLs start with (`http://localhost` over a unix socket).
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `address`: a unix socket (`unix:/path` or `/path`) or a base URL
    /// (`http://host:port`).
    pub fn new(address: impl Into<String>, token: Option<String>) -> Self {
        Self::with_tls(address, token, None)
    }

    /// [`Client::new`] over TLS where the address is `https://…`: the server's certificate
    /// must be signed by the CA of `tls`, and `tls`'s certificate is presented (mutual TLS,
    /// see [`super::tls`]). Without `tls`, an `https://` address trusts no certificate at all.
    pub fn with_tls(
        address: impl Into<String>,
        token: Option<String>,
        tls: Option<&super::tls::ClientTls>,
    ) -> Self {
        let given = address.into().trim_end_matches('/').to_owned();
        // Bounded waits: a peer that stops answering (a partition without a reset) fails the
        // call instead of blocking its caller for ever. Long steps set their own bound.
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(DEFAULT_TIMEOUT)
            // Below the server's idle cut-off (`api::serve::HEADER_READ_TIMEOUT`), so a
            // pooled connection is not reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(5));
        let builder = match tls {
            Some(tls) => builder.use_preconfigured_tls((*tls.0).clone()),
            // No CA of ours: nothing is trusted (no built-in roots are compiled in).
            None => builder,
        };
        let (builder, base) = match unix_path(&given) {
            Some(path) => (
                builder.unix_socket(PathBuf::from(path)),
                "http://localhost".to_owned(),
            ),
            None => (builder, given.clone()),
        };
        let http = builder.build().expect("an HTTP client with timeouts");
        Self {
            given,
            base,
            token,
            http,
        }
    }

    /// A request that reached no server: the system's own reason (the innermost cause), and
    /// what usually explains it.
    fn unreachable(&self, path: &str, error: &reqwest::Error) -> ClientError {
        let mut cause: &dyn std::error::Error = error;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        let kind = std::iter::successors(Some(error as &dyn std::error::Error), |e| e.source())
            .find_map(|e| e.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        let hint = match kind {
            Some(std::io::ErrorKind::PermissionDenied) => {
                " (only root and members of the daemon's --api-group may use its socket)"
            }
            Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                " (is the daemon running? `enforcer run` serves /run/enforcer/enforcer.sock)"
            }
            _ => "",
        };
        ClientError::Connect {
            address: self.given.clone(),
            path: path.to_owned(),
            detail: format!("{cause}{hint}"),
        }
    }

    /// The API's address, as given to [`Client::new`].
    pub fn address(&self) -> &str {
        &self.given
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        self.call_within(method, path, body, DEFAULT_TIMEOUT).await
    }

    async fn call_within<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| self.unreachable(path, &source))?;
        let status = resp.status();
        if !status.is_success() {
            let (code, message) = match resp.json::<ErrorBody>().await {
                Ok(body) => (body.code, body.error),
                Err(_) => (
                    ErrorCode::Unknown,
                    status.canonical_reason().unwrap_or("error").to_owned(),
                ),
            };
            return Err(ClientError::Api {
                status,
                code,
                message,
            });
        }
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/v1/health").await
    }

    pub async fn vms(&self) -> Result<Vec<VmRecord>, ClientError> {
        self.get("/v1/vms").await
    }

    pub async fn vm(&self, mac: MacAddr) -> Result<VmRecord, ClientError> {
        self.get(&format!("/v1/vms/{mac}")).await
    }

    pub async fn register_vm(
        &self,
        mac: MacAddr,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<VmRecord, ClientError> {
        self.register(mac, group, port, epoch, false).await
    }

    /// `POST /v1/vms` (the body of [`RegisterVm`](crate::agent::RegisterVm)). Names are sent as given: the server
    /// checks them and says why it refuses one.
    async fn register(
        &self,
        mac: MacAddr,
        group: u32,
        port: &str,
        epoch: Option<u32>,
        remote: bool,
    ) -> Result<VmRecord, ClientError> {
        let body = serde_json::json!({
            "mac": mac, "group": group, "port": port, "epoch": epoch, "remote": remote,
        });
        self.call(Method::POST, "/v1/vms", Some(&body)).await
    }

    /// Registers this agent's view of a VM that runs on another host, on its overlay port.
    pub async fn register_remote_vm(
        &self,
        mac: MacAddr,
        group: u32,
        overlay: &str,
        epoch: u32,
    ) -> Result<VmRecord, ClientError> {
        self.register(mac, group, overlay, Some(epoch), true).await
    }

    /// Raises a VM's epoch to `epoch` unless it is there already (views of remote VMs).
    /// (A map write on the agent: bounded by a short timeout, so a retry loop notices a
    /// withdrawn update quickly.)
    pub async fn raise_epoch(&self, mac: MacAddr, epoch: u32) -> Result<VmRecord, ClientError> {
        self.call_within(
            Method::PUT,
            &format!("/v1/vms/{mac}/epoch"),
            Some(&SetEpoch {
                epoch,
                raise_only: true,
            }),
            Duration::from_secs(5),
        )
        .await
    }

    pub async fn unregister_vm(&self, mac: MacAddr) -> Result<VmRecord, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/vms/{mac}"), None)
            .await
    }

    pub async fn set_epoch(&self, mac: MacAddr, epoch: u32) -> Result<VmRecord, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/vms/{mac}/epoch"),
            Some(&SetEpoch {
                epoch,
                raise_only: false,
            }),
        )
        .await
    }

    pub async fn advance(&self, mac: MacAddr) -> Result<VmRecord, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/v1/vms/{mac}/advance"), None)
            .await
    }

    pub async fn define_group(
        &self,
        name: &str,
        id: Option<u32>,
        domains: &[String],
    ) -> Result<GroupSpec, ClientError> {
        let body = DefineGroup {
            name: name.into(),
            id,
            domains: domains.to_vec(),
        };
        self.call(Method::POST, "/v1/groups", Some(&body)).await
    }

    pub async fn remove_group(&self, name: &str) -> Result<GroupSpec, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/groups/{}", seg(name)), None)
            .await
    }

    /// Starts a group snapshot; returns its live view (follow it with [`Client::snapshot`]).
    pub async fn create_snapshot(
        &self,
        group: &str,
        method: CutMethod,
    ) -> Result<Manifest, ClientError> {
        let body = SnapshotBody { method };
        self.call(
            Method::POST,
            &format!("/v1/groups/{}/snapshots", seg(group)),
            Some(&body),
        )
        .await
    }

    pub async fn snapshots(&self, group: Option<&str>) -> Result<Vec<Manifest>, ClientError> {
        let path = match group {
            Some(g) => format!("/v1/snapshots?group={}", seg(g)),
            None => "/v1/snapshots".into(),
        };
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn snapshot(&self, id: &str) -> Result<Manifest, ClientError> {
        self.call::<(), _>(Method::GET, &format!("/v1/snapshots/{}", seg(id)), None)
            .await
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<Manifest, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/snapshots/{}", seg(id)), None)
            .await
    }

    pub async fn restore(
        &self,
        id: &str,
        bridge: Option<&str>,
    ) -> Result<RestoreReport, ClientError> {
        self.restore_with(id, bridge, true).await
    }

    /// [`Client::restore`]; `replay`: false leaves the snapshot's channel state out.
    pub async fn restore_with(
        &self,
        id: &str,
        bridge: Option<&str>,
        replay: bool,
    ) -> Result<RestoreReport, ClientError> {
        // A bridge the server cannot take is sent as it is, for the server to refuse.
        let body = serde_json::json!({ "bridge": bridge, "skip_channel_state": !replay });
        self.call(
            Method::POST,
            &format!("/v1/snapshots/{}/restore", seg(id)),
            Some(&body),
        )
        .await
    }

    /// Follows a snapshot until it finishes, calling `progress` whenever a VM moves a step.
    pub async fn wait_snapshot(
        &self,
        id: &str,
        mut progress: impl FnMut(&Manifest),
    ) -> Result<Manifest, ClientError> {
        let mut last = Vec::new();
        loop {
            let m = self.snapshot(id).await?;
            let steps: Vec<_> = m.vms.iter().map(|v| v.step).collect();
            if steps != last || m.finished() {
                progress(&m);
                last = steps;
            }
            if m.finished() {
                return Ok(m);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn groups(&self) -> Result<Vec<GroupView>, ClientError> {
        self.get("/v1/groups").await
    }

    pub async fn holds(&self) -> Result<HoldReport, ClientError> {
        self.get("/v1/holds").await
    }

    pub async fn abort(&self, group: u32, epoch: u32) -> Result<Vec<VmRecord>, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/groups/{group}/abort"),
            Some(&Abort { epoch }),
        )
        .await
    }

    /// `POST /v1/groups/{group}/announce`: the group's members may reach `epoch`.
    pub async fn announce(&self, group: u32, epoch: u32) -> Result<Announced, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/groups/{group}/announce"),
            Some(&Announce { epoch }),
        )
        .await
    }

    /// Starts recording these VMs' channel state on this agent (those of its host).
    pub async fn record_begin(&self, vms: &[MacAddr]) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(
                Method::POST,
                "/v1/recordings",
                Some(&RecordBegin { vms: vms.to_vec() }),
            )
            .await?;
        Ok(())
    }

    /// Stops recording these VMs and takes what was recorded, by receiver; the buffer may take
    /// `timeout` to hand it over.
    pub async fn record_take(
        &self,
        vms: &[MacAddr],
        timeout: Duration,
    ) -> Result<BTreeMap<MacAddr, Recording>, ClientError> {
        let wire: WireRecordings = self
            .call_within(
                Method::POST,
                "/v1/recordings/take",
                Some(&RecordTake {
                    vms: vms.to_vec(),
                    timeout_ms: Some(timeout.as_millis() as u64),
                }),
                timeout + STEP_MARGIN,
            )
            .await?;
        wire.into_iter()
            .map(|(mac, r)| {
                let r = r.into_recording().map_err(|e| ClientError::Api {
                    status: StatusCode::BAD_GATEWAY,
                    code: ErrorCode::Unknown,
                    message: format!("the recording of {mac}: {e}"),
                })?;
                Ok((mac, r))
            })
            .collect()
    }

    /// Shuts a VM just before its cut; whether its tap was empty.
    pub async fn shut(&self, mac: MacAddr) -> Result<bool, ClientError> {
        // Every other member waits at the gate meanwhile, shut: not for long.
        let shut: Shut = self
            .call_within::<(), _>(
                Method::POST,
                &format!("/v1/vms/{mac}/shut"),
                None,
                Duration::from_secs(10),
            )
            .await?;
        Ok(shut.tap_empty)
    }

    /// Replays recorded frames into the VM `mac` restored on `port` (not running yet).
    pub async fn replay(
        &self,
        mac: MacAddr,
        port: &str,
        frames: &[RecordedFrame],
    ) -> Result<Replayed, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/vms/{mac}/replay"),
            Some(&Replay {
                port: port.to_owned(),
                frames: WireFrames::encode(frames),
            }),
        )
        .await
    }

    pub async fn ports(&self) -> Result<Vec<AttachedPort>, ClientError> {
        self.get("/v1/ports").await
    }

    pub async fn stats(&self) -> Result<Vec<PortStats>, ClientError> {
        self.get("/v1/stats").await
    }

    pub async fn config(&self) -> Result<Config, ClientError> {
        self.get("/v1/config").await
    }

    pub async fn set_mode(&self, mode: Type3Mode) -> Result<Config, ClientError> {
        self.call(
            Method::PUT,
            "/v1/config",
            Some(&Config { type3_mode: mode }),
        )
        .await
    }

    // ---- an agent's domains, for a coordinator of several hosts (see `multihost`) ----

    async fn domain(
        &self,
        vm: &VmSpec,
        op: DomainOp,
        call: DomainCall,
    ) -> Result<serde_json::Value, ClientError> {
        let call = DomainCall {
            mac: vm.mac,
            ..call
        };
        // A step that waits (for the stop, for the image) is bounded by its own timeout.
        let timeout = call.timeout_ms.map_or(DEFAULT_TIMEOUT, |ms| {
            (Duration::from_millis(ms) + STEP_MARGIN).max(Duration::from_secs(60))
        });
        self.call_within(
            Method::POST,
            &format!("/v1/domains/{}/{op}", seg(&vm.name)),
            Some(&call),
            timeout,
        )
        .await
    }

    /// `GET /v1/domains/{name}/state`.
    pub async fn domain_state(&self, name: &str) -> Result<DomainState, ClientError> {
        let view: DomainStateView = self
            .get(&format!("/v1/domains/{}/state", seg(name)))
            .await?;
        Ok(view.state)
    }

    pub async fn domain_nic(&self, name: &str) -> Result<(MacAddr, String), ClientError> {
        let nic: DomainNic = self.get(&format!("/v1/domains/{}/nic", seg(name))).await?;
        Ok((nic.mac, nic.port))
    }

    pub async fn domain_begin(
        &self,
        vm: &VmSpec,
        snapshot: &crate::model::SnapshotId,
        method: CutMethod,
    ) -> Result<(), ClientError> {
        let call = DomainCall {
            snapshot: Some(snapshot.clone()),
            method,
            ..DomainCall::new(vm.mac)
        };
        self.domain(vm, DomainOp::Begin, call).await.map(|_| ())
    }

    /// Stops the VM (an instant snapshot's cut) and has the agent advance it there at once.
    pub async fn domain_stop_and_advance(
        &self,
        vm: &VmSpec,
    ) -> Result<PausedAdvanced, ClientError> {
        let call = DomainCall {
            advance: true,
            ..DomainCall::new(vm.mac)
        };
        decode(self.domain(vm, DomainOp::Stop, call).await?)
    }

    pub async fn domain_stop(&self, vm: &VmSpec) -> Result<Paused, ClientError> {
        decode(
            self.domain(vm, DomainOp::Stop, DomainCall::new(vm.mac))
                .await?,
        )
    }

    /// An instant snapshot's capture; returns when the VM runs again (µs since the Unix
    /// epoch).
    pub async fn domain_capture(&self, vm: &VmSpec) -> Result<u64, ClientError> {
        decode(
            self.domain(vm, DomainOp::Capture, DomainCall::new(vm.mac))
                .await?,
        )
    }

    pub async fn domain_wait_paused(
        &self,
        vm: &VmSpec,
        timeout: Duration,
    ) -> Result<Paused, ClientError> {
        let call = DomainCall {
            timeout_ms: Some(timeout.as_millis() as u64),
            ..DomainCall::new(vm.mac)
        };
        decode(self.domain(vm, DomainOp::WaitPaused, call).await?)
    }

    /// Waits for the stop and has the agent advance the VM there at once.
    pub async fn domain_advance_at_pause(
        &self,
        vm: &VmSpec,
        timeout: Duration,
    ) -> Result<PausedAdvanced, ClientError> {
        let call = DomainCall {
            timeout_ms: Some(timeout.as_millis() as u64),
            advance: true,
            ..DomainCall::new(vm.mac)
        };
        decode(self.domain(vm, DomainOp::WaitPaused, call).await?)
    }

    pub async fn domain_complete(
        &self,
        vm: &VmSpec,
        timeout: Duration,
    ) -> Result<Vec<PathBuf>, ClientError> {
        let call = DomainCall {
            timeout_ms: Some(timeout.as_millis() as u64),
            ..DomainCall::new(vm.mac)
        };
        decode(self.domain(vm, DomainOp::Complete, call).await?)
    }

    pub async fn domain_resume(&self, vm: &VmSpec) -> Result<(), ClientError> {
        self.domain(vm, DomainOp::Resume, DomainCall::new(vm.mac))
            .await
            .map(|_| ())
    }

    pub async fn domain_cancel(&self, vm: &VmSpec) -> Result<(), ClientError> {
        self.domain(vm, DomainOp::Cancel, DomainCall::new(vm.mac))
            .await
            .map(|_| ())
    }

    pub async fn domain_destroy(&self, vm: &VmSpec) -> Result<(), ClientError> {
        self.domain(vm, DomainOp::Destroy, DomainCall::new(vm.mac))
            .await
            .map(|_| ())
    }

    pub async fn domain_discard(
        &self,
        vm: &VmSpec,
        snapshot: &crate::model::SnapshotId,
    ) -> Result<(), ClientError> {
        let call = DomainCall {
            snapshot: Some(snapshot.clone()),
            ..DomainCall::new(vm.mac)
        };
        self.domain(vm, DomainOp::Discard, call).await.map(|_| ())
    }

    pub async fn domain_restore(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        bridge: Option<&IfName>,
    ) -> Result<String, ClientError> {
        let call = DomainCall {
            images: images.to_vec(),
            bridge: bridge.cloned(),
            ..DomainCall::new(vm.mac)
        };
        let nic: DomainNic = decode(self.domain(vm, DomainOp::Restore, call).await?)?;
        Ok(nic.port)
    }

    /// `GET /metrics`, as text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let mut req = self.http.get(&url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| self.unreachable("/metrics", &source))?;
        if !resp.status().is_success() {
            return Err(ClientError::Api {
                status: resp.status(),
                code: ErrorCode::Unknown,
                message: "metrics".into(),
            });
        }
        resp.text()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }
}
