//! Groups that span several hypervisor hosts: the coordinator drives one agent per host (an
//! `enforcer run` daemon, which owns that host's datapath and its local libvirt) over the
//! HTTP API, with the bearer token.
//!
//! A VM of such a group is named `domain@host`. The coordinator reaches the domain through the
//! agent of `host`: QMP file-descriptor passing and the memory images are local to the host
//! that runs the VM, so libvirt is driven there and not over a remote libvirt URI.
//!
//! # Epochs across hosts: a view may lag, never lead (invariant 2)
//!
//! Every agent keeps an entry for every member of its groups: exact for its own VMs, a *view*
//! for the others (registered `remote`, on its overlay port). The rules:
//!
//! 1. **An advance goes to the owner first.** The coordinator advances a VM on the agent that
//!    runs it, in the pause window (invariant 3: that is the only datapath whose check needs
//!    the exact epoch, since frames from the VM carry their color to other hosts, and frames to
//!    it are checked against a view that can only be lower).
//! 2. **Views are raised only to values the owner already has**: after the owner's
//!    acknowledgement the coordinator sends `raise_only` updates to every other agent, in the
//!    background, retried until acknowledged; an agent keeps the maximum. A lost, late or
//!    reordered message leaves a view lower, never higher.
//! 3. **Views are also raised from frames**: a frame carries its sender's epoch when it was
//!    sent (VXLAN-GBP, `enforcer_common::wire`), which is at most the owner's value.
//! 4. **Epochs never go down across hosts.** An aborted snapshot moves every member *forward*
//!    to the snapshot's epoch instead of back (its images are discarded all the same). Going
//!    back would let a view raised by rule 3 lead the lowered epoch, so a later frame to that
//!    VM would pass as Type-1 while really Type-3.
//!
//! Restarts: an agent's maps are pinned, so a restarted agent keeps views that were true once
//! and still do not lead; updates it missed are retried by the coordinator until it answers. A
//! restarted coordinator finds its journal and aborts the unfinished snapshot by rule 4, on
//! every agent; until each has answered, the journal stays.
//!
//! A restore registers the restored VMs at the snapshot's epoch everywhere (owners and
//! views): the old instances are gone, so nothing of theirs can raise a view again.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::agent_epochs::{AgentEpochs, remote};
use crate::snapshot::DomainState;
use crate::{
    agent::PausedAdvanced,
    api::{
        ErrorCode,
        client::{Client, ClientError},
        tls::ClientTls,
    },
    datapath::epochs::VmRecord,
    hold::{HoldReport, RecordedFrame, Recording, Replayed},
    model::{GroupSpec, IfName, MacAddr, SnapshotId, VmSpec},
    snapshot::{
        CutMethod, EpochControl, EpochControlError, HvError, HvErrorKind, Hypervisor, Paused,
    },
};

/// One hypervisor host, as the coordinator's `--hosts` file lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostSpec {
    /// The name VMs are qualified with (`domain@name`).
    pub name: String,
    /// The agent's API, e.g. `http://192.168.56.11:7878` (or `unix:/path` on this host).
    pub agent: String,
    /// The agent's overlay port (the VXLAN-GBP device on its bridge), where frames of VMs on
    /// other hosts arrive.
    pub overlay: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// Reads and checks a hosts file: a JSON array of [`HostSpec`].
pub fn load(path: &Path) -> Result<Vec<HostSpec>, HostsError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostsError::Read {
        path: path.into(),
        source,
    })?;
    let invalid = |detail: String| HostsError::Invalid {
        path: path.into(),
        detail,
    };
    let hosts: Vec<HostSpec> = serde_json::from_str(&text).map_err(|e| {
        invalid(format!(
            "{e} (expected [{{\"name\":…,\"agent\":\"http://…\",\"overlay\":…}}, …])"
        ))
    })?;
    if hosts.is_empty() {
        return Err(invalid("no hosts".into()));
    }
    for h in &hosts {
        if h.name.is_empty() || h.name.contains('@') || h.name.contains('/') {
            return Err(invalid(format!(
                "host name {:?}: non-empty, no @ or /",
                h.name
            )));
        }
        if !h.agent.starts_with("http://")
            && !h.agent.starts_with("https://")
            && !h.agent.starts_with("unix:/")
        {
            return Err(invalid(format!(
                "{}: agent {:?} is neither a URL nor unix:/path (an agent on this host)",
                h.name, h.agent
            )));
        }
        if hosts.iter().filter(|o| o.name == h.name).count() > 1 {
            return Err(invalid(format!("host {} is listed twice", h.name)));
        }
    }
    Ok(hosts)
}

/// `domain@host` → (`domain`, `host`).
pub fn split_name(vm: &str) -> Option<(&str, &str)> {
    vm.rsplit_once('@')
        .filter(|(d, h)| !d.is_empty() && !h.is_empty())
}

mod channel;

struct Host {
    spec: HostSpec,
    agent: AgentEpochs,
}

struct Inner {
    hosts: Vec<Host>,
    rt: Handle,
    /// How long a view update is retried before it is given up (logged; the view then lags
    /// until the next update, which only holds frames longer).
    propagate_for: Duration,
    /// Time from the owner's acknowledgement to each other agent's, per update (ms).
    propagation_ms: Mutex<Vec<f64>>,
    /// View updates still being sent (retried).
    in_flight: std::sync::atomic::AtomicUsize,
    /// Per VM: a registration generation, and its view updates still being sent. A new
    /// registration (a restore, a group defined again) withdraws older updates: one landing
    /// after it could raise a view above the VM's new, lower epoch.
    registrations: Mutex<HashMap<MacAddr, (u64, usize)>>,
}

/// The coordinator's [`EpochControl`] and [`Hypervisor`] over several agents. Cheap to clone.
#[derive(Clone)]
pub struct Hosts(Arc<Inner>);

/// The agent does not have the VM (any more).
fn not_found(e: &ClientError) -> bool {
    e.is(ErrorCode::UnknownVm)
}

/// A view of `vm` on `host` could not be registered.
fn view_failed(vm: &VmSpec, host: &Host) -> impl FnOnce(ClientError) -> EpochControlError {
    let (vm, host) = (vm.name.clone(), host.spec.name.clone());
    move |e| EpochControlError::View {
        vm,
        host,
        source: Box::new(remote(e)),
    }
}

/// The kind of a hypervisor failure an agent reported, from its error code.
fn hv_kind(code: ErrorCode) -> HvErrorKind {
    match code {
        ErrorCode::NoSuchDomain => HvErrorKind::NoSuchDomain,
        ErrorCode::DomainNotRunning => HvErrorKind::NotRunning,
        ErrorCode::DomainRunning => HvErrorKind::Running,
        ErrorCode::NotItsImage => HvErrorKind::NotItsImage,
        _ => HvErrorKind::Failed,
    }
}

/// How long a call that is safe to repeat is retried while its agent cannot be reached (an
/// agent restarts on the same address, and its pinned maps survive).
const RECONNECT_FOR: Duration = Duration::from_secs(30);

async fn retry_unreachable<T>(
    mut f: impl AsyncFnMut() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let deadline = Instant::now() + RECONNECT_FOR;
    loop {
        match f().await {
            Err(ClientError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

impl Hosts {
    pub fn new(specs: Vec<HostSpec>, token: Option<String>, rt: Handle) -> Self {
        Self::with_tls(specs, token, None, rt)
    }

    /// [`Hosts::new`], reaching `https://` agents with `tls` (see `api::tls`).
    pub fn with_tls(
        specs: Vec<HostSpec>,
        token: Option<String>,
        tls: Option<&ClientTls>,
        rt: Handle,
    ) -> Self {
        let hosts = specs
            .into_iter()
            .map(|spec| Host {
                agent: AgentEpochs {
                    client: Client::with_tls(spec.agent.clone(), token.clone(), tls),
                    rt: rt.clone(),
                },
                spec,
            })
            .collect();
        Self(Arc::new(Inner {
            hosts,
            rt,
            propagate_for: Duration::from_secs(120),
            propagation_ms: Mutex::new(Vec::new()),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            registrations: Mutex::new(HashMap::new()),
        }))
    }

    pub fn specs(&self) -> Vec<HostSpec> {
        self.0.hosts.iter().map(|h| h.spec.clone()).collect()
    }

    /// The agent's client of a host, by name.
    pub fn client(&self, host: &str) -> Option<&Client> {
        self.0
            .hosts
            .iter()
            .find(|h| h.spec.name == host)
            .map(|h| &h.agent.client)
    }

    /// View updates not acknowledged yet (still retried).
    pub fn updates_in_flight(&self) -> usize {
        self.0.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes the propagation times recorded so far (ms from the owner's acknowledgement to
    /// another agent's), for the benchmark.
    pub fn take_propagation_ms(&self) -> Vec<f64> {
        std::mem::take(&mut *self.0.propagation_ms.lock().expect("propagation lock"))
    }

    fn host(&self, name: &str) -> Result<&Host, EpochControlError> {
        self.0
            .hosts
            .iter()
            .find(|h| h.spec.name == name)
            .ok_or_else(|| EpochControlError::NoHost(format!("no host {name:?} in the hosts file")))
    }

    /// The VM's owner and the VM as its owner knows it (the domain name alone).
    fn owner(&self, vm: &VmSpec) -> Result<(&Host, VmSpec), EpochControlError> {
        let (domain, host) = split_name(&vm.name).ok_or_else(|| {
            EpochControlError::NoHost(format!(
                "{}: a VM of a multi-host group is named domain@host",
                vm.name
            ))
        })?;
        Ok((
            self.host(host)?,
            VmSpec {
                name: domain.to_owned(),
                mac: vm.mac,
            },
        ))
    }

    fn others<'a>(&'a self, owner: &'a Host) -> impl Iterator<Item = &'a Host> + 'a {
        self.0
            .hosts
            .iter()
            .filter(move |h| h.spec.name != owner.spec.name)
    }

    /// Raises every other agent's view of `mac` to `epoch`, in the background, retrying each
    /// until it answers (or the VM is gone from it).
    fn propagate(&self, owner: &Host, mac: MacAddr, epoch: u32) {
        let acked = Instant::now();
        for host in self.others(owner) {
            let client = host.agent.client.clone();
            let name = host.spec.name.clone();
            let inner = self.0.clone();
            inner
                .in_flight
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let generation = {
                let mut regs = inner.registrations.lock().expect("registrations lock");
                let entry = regs.entry(mac).or_default();
                entry.1 += 1;
                entry.0
            };
            self.0.rt.spawn(async move {
                let _done = InFlight(&inner.in_flight, &inner.registrations, mac);
                let deadline = acked + inner.propagate_for;
                let mut wait = Duration::from_millis(10);
                loop {
                    let current = inner
                        .registrations
                        .lock()
                        .expect("registrations lock")
                        .get(&mac)
                        .map(|r| r.0);
                    if current != Some(generation) {
                        // Withdrawn by a newer registration of the VM.
                        return;
                    }
                    match client.raise_epoch(mac, epoch).await {
                        Ok(_) => {
                            let ms = acked.elapsed().as_secs_f64() * 1000.0;
                            inner.propagation_ms.lock().expect("propagation lock").push(ms);
                            return;
                        }
                        Err(e) if not_found(&e) => return,
                        Err(e) if Instant::now() > deadline => {
                            warn!(host = name, %mac, epoch, err = %e, "gave up raising a view; it lags until the next update");
                            return;
                        }
                        Err(_) => {
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            });
        }
    }

    /// Withdraws the view updates of `mac` still being sent, and waits (a few seconds at most:
    /// each attempt is bounded) until none is on its way any more.
    fn withdraw_updates(&self, mac: MacAddr) {
        let in_flight = || {
            self.0
                .registrations
                .lock()
                .expect("registrations lock")
                .get(&mac)
                .map_or(0, |r| r.1)
        };
        self.0
            .registrations
            .lock()
            .expect("registrations lock")
            .entry(mac)
            .or_default()
            .0 += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_flight() > 0 {
            if Instant::now() > deadline {
                warn!(%mac, "a withdrawn view update is still on its way");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Raises every other agent's view now and waits for them (used by abort, which must
    /// leave every host level).
    fn raise_everywhere(
        &self,
        owner: &Host,
        mac: MacAddr,
        epoch: u32,
    ) -> Result<(), EpochControlError> {
        self.on_agents(self.others(owner), async |c| {
            c.raise_epoch(mac, epoch).await
        })
    }

    /// `call` on the agent of each of `hosts`, each retried while it cannot be reached; an
    /// agent that does not have the VM (404) is no failure. Failures are collected per host.
    fn on_agents<'a, T>(
        &self,
        hosts: impl Iterator<Item = &'a Host>,
        call: impl AsyncFn(&Client) -> Result<T, ClientError>,
    ) -> Result<(), EpochControlError> {
        let mut failed = Vec::new();
        for host in hosts {
            let client = &host.agent.client;
            match self
                .0
                .rt
                .block_on(retry_unreachable(async || call(client).await))
            {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => failed.push((host.spec.name.clone(), remote(e))),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(EpochControlError::Hosts(failed))
        }
    }

    /// One domain operation on the VM's agent. `repeatable`: safe to send again, so it is
    /// retried while the agent cannot be reached (restarting).
    fn call<T>(
        &self,
        vm: &VmSpec,
        repeatable: bool,
        mut f: impl AsyncFnMut(&Client, &VmSpec) -> Result<T, ClientError>,
    ) -> Result<T, HvError> {
        let (owner, local) = self
            .owner(vm)
            .map_err(|e| HvError::failed(&vm.name, e.to_string()))?;
        let client = &owner.agent.client;
        let mut once = async || f(client, &local).await;
        let result = if repeatable {
            self.0.rt.block_on(retry_unreachable(once))
        } else {
            self.0.rt.block_on(once())
        };
        result.map_err(|e| match e {
            // The agent's hypervisor error, as the agent saw it, of the kind its code says.
            ClientError::Api { code, message, .. } => {
                HvError::new(&vm.name, hv_kind(code), message)
            }
            other => HvError::failed(&vm.name, other.to_string()),
        })
    }
}

impl EpochControl for Hosts {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        let (owner, local) = self.owner(vm)?;
        owner.agent.epoch(&local)
    }

    fn advance(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        let (owner, local) = self.owner(vm)?;
        let epoch = owner.agent.advance(&local)?;
        self.propagate(owner, vm.mac, epoch);
        Ok(epoch)
    }

    /// Every agent's report in one: queues side by side, counts added up.
    fn hold_report(&self) -> Result<Option<HoldReport>, EpochControlError> {
        let mut merged: Option<HoldReport> = None;
        for host in &self.0.hosts {
            let report = host
                .agent
                .hold_report()
                .map_err(|e| EpochControlError::Hosts(vec![(host.spec.name.clone(), e)]))?;
            if let Some(report) = report {
                merged.get_or_insert_with(HoldReport::default).merge(report);
            }
        }
        Ok(merged)
    }

    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, EpochControlError> {
        let (owner, local) = self.owner(vm)?;
        self.withdraw_updates(vm.mac);
        let epoch = owner.agent.register(&local, group, port, epoch)?;
        for host in self.others(owner) {
            let client = &host.agent.client;
            self.0
                .rt
                .block_on(async {
                    match client.unregister_vm(vm.mac).await {
                        Ok(_) => {}
                        Err(e) if not_found(&e) => {}
                        Err(e) => return Err(e),
                    }
                    client
                        .register_remote_vm(vm.mac, group, &host.spec.overlay, epoch)
                        .await
                })
                .map_err(view_failed(vm, host))?;
        }
        Ok(epoch)
    }

    fn unregister(&self, vm: &VmSpec) -> Result<(), EpochControlError> {
        self.withdraw_updates(vm.mac);
        self.on_agents(self.0.hosts.iter(), async |c| c.unregister_vm(vm.mac).await)
    }

    /// Per host, what its agent has; then for each member: registered again on its owner (at
    /// the group's epoch, as its peers' owners have it) if the owner lost it, and as a view
    /// (at the owner's epoch) wherever a view is missing. An owner that still has the VM is
    /// never touched: its value is the truth, and views must not lead it.
    fn restore_registrations(
        &self,
        group: &GroupSpec,
        port_of: &dyn Fn(&VmSpec) -> Result<String, HvError>,
    ) -> Result<Vec<String>, EpochControlError> {
        let mut known: Vec<Vec<VmRecord>> = Vec::new();
        // Each agent's overlay port now (None: not attached there).
        let mut overlays: Vec<Option<u32>> = Vec::new();
        for host in &self.0.hosts {
            let client = &host.agent.client;
            let (vms, ports) = self
                .0
                .rt
                .block_on(retry_unreachable(async || {
                    Ok((client.vms().await?, client.ports().await?))
                }))
                .map_err(|e| EpochControlError::Hosts(vec![(host.spec.name.clone(), remote(e))]))?;
            known.push(vms);
            overlays.push(
                ports
                    .iter()
                    .find(|p| p.name == host.spec.overlay)
                    .map(|p| p.ifindex),
            );
        }
        let index = |host: &Host| {
            self.0
                .hosts
                .iter()
                .position(|h| h.spec.name == host.spec.name)
                .expect("a listed host")
        };
        // The group's epoch: the highest any member's own agent has.
        let mut group_epoch = None;
        for vm in &group.vms {
            let (owner, _) = self.owner(vm)?;
            if let Some(r) = known[index(owner)]
                .iter()
                .find(|r| r.mac == vm.mac && !r.remote)
            {
                group_epoch = Some(group_epoch.unwrap_or(0).max(r.epoch));
            }
        }
        let mut again = Vec::new();
        for vm in &group.vms {
            let (owner, local) = self.owner(vm)?;
            let owner_epoch = match known[index(owner)]
                .iter()
                .find(|r| r.mac == vm.mac && !r.remote)
            {
                Some(r) => r.epoch,
                None => {
                    // Not below any view of it still around: views never lead.
                    let views = known
                        .iter()
                        .flatten()
                        .filter(|r| r.mac == vm.mac && r.remote)
                        .map(|r| r.epoch)
                        .max();
                    let epoch = match (group_epoch, views) {
                        (Some(g), Some(v)) => Some(g.max(v)),
                        (g, v) => g.or(v),
                    };
                    let port = port_of(vm)?;
                    let epoch = owner.agent.register(&local, group.id, &port, epoch)?;
                    again.push(format!("{} on {}", vm.name, owner.spec.name));
                    epoch
                }
            };
            for host in self.others(owner) {
                let view = known[index(host)].iter().find(|r| r.mac == vm.mac);
                // A view on an overlay port that was created again (a new ifindex) is as good
                // as none: frames from the VM no longer arrive where the view says.
                let stale = view.is_some_and(|r| Some(r.ifindex) != overlays[index(host)]);
                if view.is_some() && !stale {
                    continue;
                }
                let client = &host.agent.client;
                self.0
                    .rt
                    .block_on(async {
                        if stale {
                            client.unregister_vm(vm.mac).await?;
                        }
                        client
                            .register_remote_vm(vm.mac, group.id, &host.spec.overlay, owner_epoch)
                            .await
                    })
                    .map_err(view_failed(vm, host))?;
                again.push(format!("{} (view on {})", vm.name, host.spec.name));
            }
        }
        Ok(again)
    }

    /// On every agent, before any owner advances (rule 3's bound): a frame's color is at most
    /// the epoch the coordinator announced, so a forged one cannot raise a view further.
    fn announce(&self, group: &GroupSpec, epoch: u32) -> Result<(), EpochControlError> {
        self.on_agents(self.0.hosts.iter(), async |c| {
            c.announce(group.id, epoch).await
        })
    }

    /// Forward, never back (rule 4 above): every member still at `epoch` is advanced on its
    /// owner, then every view is raised to `epoch + 1` before this returns. Advancing releases
    /// what was held for it, as an abort must.
    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), EpochControlError> {
        let target = epoch + 1;
        // The views may carry the target before they are raised to it (an agent may have
        // missed the snapshot's own announcement, or the snapshot may have failed before it).
        // An agent that does not answer fails the abort (its journal stays), but the others
        // still move forward now.
        let mut failed = Vec::new();
        if let Err(EpochControlError::Hosts(hosts)) = self.announce(group, target) {
            failed.extend(hosts);
        }
        for vm in &group.vms {
            let (owner, _) = self.owner(vm)?;
            let client = &owner.agent.client;
            // On its owner first; a member its owner no longer has is a failure (the abort
            // is tried again from the journal), not something to skip.
            let raised = self.0.rt.block_on(retry_unreachable(async || {
                client.raise_epoch(vm.mac, target).await
            }));
            if let Err(e) = raised {
                failed.push((format!("{} on {}", vm.name, owner.spec.name), remote(e)));
                continue;
            }
            if let Err(e) = self.raise_everywhere(owner, vm.mac, target) {
                failed.push((vm.name.clone(), e));
            }
        }
        info!(
            group = %group.name,
            epoch = target,
            "aborted snapshot: members moved forward"
        );
        if failed.is_empty() {
            Ok(())
        } else {
            Err(EpochControlError::Hosts(failed))
        }
    }

    /// On each host that runs members: its agent records theirs (see [`channel`]).
    fn record_begin(&self, group: &GroupSpec) -> Result<(), EpochControlError> {
        self.begin_recordings(group)
    }

    fn shut_before_cut(&self, vm: &VmSpec) -> Result<bool, EpochControlError> {
        let (owner, local) = self.owner(vm)?;
        owner.agent.shut_before_cut(&local)
    }

    fn record_end(
        &self,
        group: &GroupSpec,
    ) -> Result<BTreeMap<MacAddr, Recording>, EpochControlError> {
        self.take_recordings(group)
    }

    fn replay(
        &self,
        vm: &VmSpec,
        port: &str,
        frames: &[RecordedFrame],
    ) -> Result<Replayed, EpochControlError> {
        let (owner, local) = self.owner(vm)?;
        owner.agent.replay(&local, port, frames)
    }
}

/// Counts a view update as done however its task ends.
struct InFlight<'a>(
    &'a std::sync::atomic::AtomicUsize,
    &'a Mutex<HashMap<MacAddr, (u64, usize)>>,
    MacAddr,
);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(entry) = self.1.lock().expect("registrations lock").get_mut(&self.2) {
            entry.1 -= 1;
        }
    }
}

impl Hosts {
    /// The VM's own agent advanced it at its stop: the other agents' views follow (rule 2).
    fn owner_advanced(&self, vm: &VmSpec, d: PausedAdvanced) -> Result<(Paused, u64), HvError> {
        let (owner, _) = self
            .owner(vm)
            .map_err(|e| HvError::failed(&vm.name, e.to_string()))?;
        self.propagate(owner, vm.mac, d.epoch);
        Ok((d.paused, d.advanced_unix_us))
    }
}

impl Hypervisor for Hosts {
    fn begin(&self, vm: &VmSpec, image_dir: &Path, method: CutMethod) -> Result<(), HvError> {
        let id = snapshot_id(vm, image_dir)?;
        self.call(vm, false, async |c, local| {
            c.domain_begin(local, &id, method).await
        })
    }

    fn stop(&self, vm: &VmSpec) -> Result<Paused, HvError> {
        self.call(vm, false, async |c, local| c.domain_stop(local).await)
    }

    /// The VM's agent stops it and advances it itself, in its own process (as
    /// [`Hypervisor::advance_at_pause`]); then the other agents' views are raised.
    fn stop_and_advance(&self, vm: &VmSpec) -> Option<Result<(Paused, u64), HvError>> {
        let done = self.call(vm, false, async |c, local| {
            c.domain_stop_and_advance(local).await
        });
        Some(done.and_then(|d| self.owner_advanced(vm, d)))
    }

    fn capture(&self, vm: &VmSpec) -> Result<u64, HvError> {
        self.call(vm, false, async |c, local| c.domain_capture(local).await)
    }

    fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<Paused, HvError> {
        self.call(vm, false, async |c, local| {
            c.domain_wait_paused(local, timeout).await
        })
    }

    /// The VM's agent waits for the stop and advances the VM itself, in its own process: the
    /// stop → advance step is a map write there, as on one host. Then the other agents' views
    /// are raised (rule 2).
    fn advance_at_pause(
        &self,
        vm: &VmSpec,
        timeout: Duration,
    ) -> Option<Result<(Paused, u64), HvError>> {
        let done = self.call(vm, false, async |c, local| {
            c.domain_advance_at_pause(local, timeout).await
        });
        Some(done.and_then(|d| self.owner_advanced(vm, d)))
    }

    fn complete(&self, vm: &VmSpec, timeout: Duration) -> Result<Vec<PathBuf>, HvError> {
        self.call(vm, false, async |c, local| {
            c.domain_complete(local, timeout).await
        })
    }

    fn resume(&self, vm: &VmSpec) -> Result<(), HvError> {
        self.call(vm, true, async |c, local| c.domain_resume(local).await)
    }

    fn cancel(&self, vm: &VmSpec) -> Result<(), HvError> {
        self.call(vm, true, async |c, local| c.domain_cancel(local).await)
    }

    fn nic(&self, vm: &str) -> Result<(MacAddr, String), HvError> {
        let spec = VmSpec {
            name: vm.to_owned(),
            mac: MacAddr([0; 6]),
        };
        self.call(&spec, true, async |c, local| {
            c.domain_nic(&local.name).await
        })
    }

    fn state(&self, vm: &str) -> Result<DomainState, HvError> {
        let spec = VmSpec {
            name: vm.to_owned(),
            mac: MacAddr([0; 6]),
        };
        self.call(&spec, true, async |c, local| {
            c.domain_state(&local.name).await
        })
    }

    fn restore_paused(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        bridge: Option<&IfName>,
    ) -> Result<String, HvError> {
        self.call(vm, false, async |c, local| {
            c.domain_restore(local, images, bridge).await
        })
    }

    fn destroy(&self, vm: &VmSpec) -> Result<(), HvError> {
        self.call(vm, true, async |c, local| c.domain_destroy(local).await)
    }

    fn discard(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
        let id = snapshot_id(vm, image_dir)?;
        self.call(vm, true, async |c, local| {
            c.domain_discard(local, &id).await
        })
    }
}

/// The snapshot's id: the name of the coordinator's directory for it. Each agent keeps the
/// images of its VMs under its own store, in a directory of that name.
fn snapshot_id(vm: &VmSpec, image_dir: &Path) -> Result<SnapshotId, HvError> {
    image_dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            HvError::failed(
                &vm.name,
                format!("no snapshot id in {}", image_dir.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hosts_files_are_checked() {
        assert_eq!(split_name("web1@hv1"), Some(("web1", "hv1")));
        assert_eq!(split_name("web1"), None);
        assert_eq!(split_name("@hv1"), None);
        let dir = std::env::temp_dir().join(format!("enforcer-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts.json");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        write(r#"[{"name":"hv1","agent":"http://10.0.0.1:7878","overlay":"enfvx0"}]"#);
        assert_eq!(load(&path).unwrap()[0].overlay, "enfvx0");
        for bad in [
            "[]",
            "{}",
            r#"[{"name":"hv1","agent":"10.0.0.1:7878","overlay":"x"}]"#,
            r#"[{"name":"a@b","agent":"http://x","overlay":"x"}]"#,
            r#"[{"name":"hv1","agent":"http://x","overlay":"x"},{"name":"hv1","agent":"http://y","overlay":"x"}]"#,
        ] {
            write(bad);
            assert!(load(&path).is_err(), "{bad} was accepted");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
