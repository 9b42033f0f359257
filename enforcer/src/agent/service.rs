//! The agent's service: everything `enforcer run` does for its callers, in process, with
//! typed errors — registering VMs, changing epochs (through the one path, [`advance`]),
//! aborting, reporting groups, holds, ports, counters and the Type-3 mode. The HTTP routes
//! translate to these calls; the snapshot transaction reaches them through
//! [`super::local_epochs`]; learned colors through [`super::learn`]. Synchronous: each call
//! takes the datapath's lock for a few map operations.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, OnceLock, atomic::AtomicU64},
};

use enforcer_common::Type3Mode;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::datapath::AgentDatapath;
use crate::{
    datapath::{
        AttachMode, AttachedPort, Datapath, DatapathError,
        epochs::{self, EpochError, GroupRecord, VmRecord},
    },
    hold::{
        Buffer, HoldReport, Notice,
        advance::{self, BufferLink},
    },
    model::{IfName, MacAddr},
    snapshot::Snapshots,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Epochs(#[from] EpochError<DatapathError>),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("port {0} is not a VM port of this daemon (not attached)")]
    PortNotAttached(String),
    #[error("a remote VM is registered with its epoch (the value its own host has)")]
    RemoteNeedsEpoch,
    #[error("no buffer daemon runs (started with --no-buffer)")]
    NoBuffer,
    #[error("the buffer does not answer")]
    BufferSilent,
    #[error("snapshots are off: this daemon runs without libvirt (--no-libvirt)")]
    SnapshotsOff,
    #[error("snapshots are not ready yet: {0}")]
    SnapshotsNotReady(String),
    #[error("group {group} is busy with {by}: only that work may change its VMs and epochs now")]
    GroupBusy { group: String, by: String },
    #[error("{mac} is not registered on port {port}")]
    NotOnPort { mac: MacAddr, port: String },
    #[error(
        "{mac}'s channel state is being recorded and its cut has begun: end that recording \
         first (one left for 10 minutes is taken for abandoned)"
    )]
    RecordingUnderWay { mac: MacAddr },
}

/// What a raw change (`/v1/vms…`, `/v1/groups/{id}/abort`) touches, for
/// [`Agent::refuse_if_claimed`].
#[derive(Clone, Copy, Debug)]
pub enum RawTarget {
    Vm(MacAddr),
    /// A datapath group id.
    Group(u32),
}

/// `GET /v1/health`.
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

/// `POST /v1/vms`: a VM to register.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RegisterVm {
    pub mac: MacAddr,
    pub group: u32,
    /// Host-side interface of the VM (its tap/veth on the bridge).
    pub port: IfName,
    /// Starting epoch; default: the group's current epoch. Required for a remote VM.
    #[serde(default)]
    pub epoch: Option<u32>,
    /// The VM runs on another host: `port` is the overlay port (e.g. the VXLAN device on the
    /// bridge) its frames arrive on, and `epoch` the coordinator's value of its epoch.
    #[serde(default)]
    pub remote: bool,
}

/// `PUT /v1/vms/{mac}/epoch`.
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

/// `POST /v1/groups/{g}/announce`: the group's members may now reach `epoch` (the
/// coordinator is taking the snapshot to it); answered with [`Announced`].
#[derive(Serialize, Deserialize, Debug)]
pub struct Announce {
    pub epoch: u32,
}

/// What an announcement changed: the views of the group's VMs on other hosts that may now
/// carry the announced epoch.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Announced {
    pub views: usize,
}

/// `GET`/`PUT /v1/config`.
#[derive(Serialize, Deserialize, Debug)]
pub struct Config {
    pub type3_mode: Type3Mode,
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

/// The agent: this host's datapath, its buffer, and (with libvirt) its snapshot coordinator.
pub struct Agent<D: AgentDatapath = Datapath> {
    datapath: Arc<Mutex<D>>,
    /// The buffer, when it runs (mode `buffer` needs it to hold frames).
    buffer: Mutex<Option<Buffer>>,
    /// Group snapshots over libvirt, when enabled.
    snapshots: OnceLock<Arc<Snapshots>>,
    /// Why snapshots are not ready yet, while the daemon retries opening them (libvirt
    /// unreachable at start).
    snapshots_pending: Mutex<Option<String>>,
    /// Views of VMs on other hosts raised from their frames' colors (see `hold::learn`).
    learned_applied: Arc<AtomicU64>,
    /// Domains whose snapshot a coordinator began through this agent, with their epoch then.
    pub(crate) begun: Mutex<HashMap<String, u32>>,
    /// The channel-state recordings under way, by VM (see `channel.rs`).
    pub(crate) recording: Mutex<HashMap<MacAddr, super::recording::RecordingVm>>,
    /// Channel state replayed into restored VMs here since the daemon started (`channel.rs`;
    /// `/metrics`).
    pub(crate) replayed: super::recording::ReplayCounters,
    /// VMs advanced while stopped whose buffer queue stays frozen until they run again
    /// (`channel.rs`: `advance_stopped`, `runs_again`).
    pub(crate) stopped: Mutex<std::collections::HashSet<MacAddr>>,
}

impl<D: AgentDatapath> Agent<D> {
    /// A handle on the buffer thread that does not keep the buffer locked while it answers.
    pub(crate) fn buffer_handle(&self) -> Result<crate::hold::Reporter, AgentError> {
        self.buffer
            .lock()
            .expect("buffer lock")
            .as_ref()
            .map(Buffer::reporter)
            .ok_or(AgentError::NoBuffer)
    }
}

impl<D: AgentDatapath> Agent<D> {
    /// Tells the buffer thread a notice, in order with the epoch changes' own.
    pub(crate) fn tell_buffer(&self, notice: Notice) -> bool {
        ToBuffer(&self.buffer).tell(notice)
    }
}

/// Epoch notices to the buffer thread's channel.
struct ToBuffer<'a>(&'a Mutex<Option<Buffer>>);

impl BufferLink for ToBuffer<'_> {
    fn running(&self) -> bool {
        self.0.lock().expect("buffer lock").is_some()
    }

    fn tell(&mut self, notice: Notice) -> bool {
        match &*self.0.lock().expect("buffer lock") {
            Some(buffer) => {
                buffer.tell(notice);
                true
            }
            None => false,
        }
    }
}

impl<D: AgentDatapath> Agent<D> {
    pub fn new(
        datapath: Arc<Mutex<D>>,
        buffer: Option<Buffer>,
        learned_applied: Arc<AtomicU64>,
    ) -> Self {
        Self {
            datapath,
            buffer: Mutex::new(buffer),
            snapshots: OnceLock::new(),
            snapshots_pending: Mutex::new(None),
            learned_applied,
            begun: Mutex::new(HashMap::new()),
            recording: Mutex::new(HashMap::new()),
            replayed: Default::default(),
            stopped: Mutex::new(Default::default()),
        }
    }

    /// The datapath, locked.
    pub(crate) fn datapath(&self) -> MutexGuard<'_, D> {
        crate::sync::lock(&self.datapath)
    }

    /// Enables group snapshots (once).
    pub fn set_snapshots(&self, snapshots: Arc<Snapshots>) {
        let _ = self.snapshots.set(snapshots);
    }

    /// The snapshot coordinator, or [`AgentError::SnapshotsOff`] (or `SnapshotsNotReady`
    /// while the daemon still tries to open it).
    pub fn snapshots(&self) -> Result<Arc<Snapshots>, AgentError> {
        if let Some(s) = self.snapshots.get() {
            return Ok(s.clone());
        }
        match self.snapshots_pending.lock().expect("pending lock").clone() {
            Some(why) => Err(AgentError::SnapshotsNotReady(why)),
            None => Err(AgentError::SnapshotsOff),
        }
    }

    /// Snapshots are not ready yet, for this reason (the daemon retries).
    pub fn set_snapshots_pending(&self, why: Option<String>) {
        *self.snapshots_pending.lock().expect("pending lock") = why;
    }

    /// Takes the buffer out (to stop it).
    pub fn take_buffer(&self) -> Option<Buffer> {
        self.buffer.lock().expect("buffer lock").take()
    }

    pub fn buffer_running(&self) -> bool {
        self.buffer.lock().expect("buffer lock").is_some()
    }

    /// What the buffer holds; `None` when none runs or it does not answer. The buffer lock is
    /// only held to reach the buffer, not while it answers (that can take a while when its
    /// thread is busy; advances must not wait on it).
    pub fn hold_report(&self) -> Option<HoldReport> {
        let reporter = self
            .buffer
            .lock()
            .expect("buffer lock")
            .as_ref()
            .map(Buffer::reporter)?;
        reporter.report()
    }

    /// [`Agent::hold_report`], or why there is none.
    pub fn holds(&self) -> Result<HoldReport, AgentError> {
        if !self.buffer_running() {
            return Err(AgentError::NoBuffer);
        }
        self.hold_report().ok_or(AgentError::BufferSilent)
    }

    pub fn health(&self) -> Result<Health, AgentError> {
        let mut dp = self.datapath();
        Ok(Health {
            status: "ok".into(),
            attach_mode: dp.attach_mode(),
            pin_root: dp.pin_root().display().to_string(),
            ports: dp.attached_ports().len(),
            learned_epochs: self
                .learned_applied
                .load(std::sync::atomic::Ordering::Relaxed),
            learn_lost: dp.learn_lost()?,
        })
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>, AgentError> {
        Ok(epochs::list_vms(&mut *self.datapath())?)
    }

    pub fn vm(&self, mac: MacAddr) -> Result<VmRecord, AgentError> {
        Ok(epochs::get_vm(&mut *self.datapath(), mac)?)
    }

    /// Whether `port` names an interface this daemon has attached to.
    pub fn port_attached(&self, port: &str) -> bool {
        let dp = self.datapath();
        dp.ifindex(port).is_ok_and(|i| dp.is_attached(i))
    }

    /// Refuses a raw change — an epoch moved, a VM registered or removed, an abort — to a VM or
    /// datapath group of a named group that a snapshot, restore or definition holds now: in
    /// the middle of a snapshot it would make the committed images inconsistent (case S10 of
    /// the security review). Only that work changes them meanwhile; it does not come here.
    pub fn refuse_if_claimed(&self, targets: &[RawTarget]) -> Result<(), AgentError> {
        let Some(snapshots) = self.snapshots.get() else {
            return Ok(());
        };
        for g in snapshots.groups() {
            let touched = targets.iter().any(|t| match *t {
                RawTarget::Vm(mac) => g.vms.iter().any(|v| v.mac == mac),
                RawTarget::Group(id) => g.id == id,
            });
            if touched && let Some(by) = snapshots.busy_with(&g.name) {
                return Err(AgentError::GroupBusy {
                    group: g.name.to_string(),
                    by,
                });
            }
        }
        Ok(())
    }

    /// Registers a VM (on one of this host's ports), or this host's view of a VM on another
    /// host (`remote`, on the overlay port).
    pub fn register(&self, req: &RegisterVm) -> Result<VmRecord, AgentError> {
        let mut dp = self.datapath();
        let ifindex = dp.ifindex(&req.port)?;
        if !dp.is_attached(ifindex) {
            return Err(AgentError::PortNotAttached(req.port.to_string()));
        }
        let vm = if req.remote {
            let epoch = req.epoch.ok_or(AgentError::RemoteNeedsEpoch)?;
            epochs::register_remote(&mut *dp, req.mac, req.group, ifindex, epoch)?
        } else {
            epochs::register(&mut *dp, req.mac, req.group, ifindex, req.epoch)?
        };
        ToBuffer(&self.buffer).tell(Notice::Vm {
            mac: vm.mac.key(),
            vm: dp.vm(&vm.mac.key()).ok().flatten(),
        });
        info!(mac = %vm.mac, group = vm.group, epoch = vm.epoch, port = %req.port, remote = vm.remote, "VM registered");
        Ok(vm)
    }

    pub fn unregister(&self, mac: MacAddr) -> Result<VmRecord, AgentError> {
        let vm = epochs::unregister(&mut *self.datapath(), mac)?;
        ToBuffer(&self.buffer).tell(Notice::Vm {
            mac: mac.key(),
            vm: None,
        });
        // Its queue (frozen or not) goes with it: nothing is kept back for it any more.
        self.stopped.lock().expect("stopped lock").remove(&mac);
        info!(mac = %vm.mac, "VM unregistered");
        Ok(vm)
    }

    /// Moves a VM's epoch (to `target`, or the next one) through the one epoch-change path
    /// ([`advance::change_epoch`]); with `raise_only`, a target at or below the current epoch
    /// leaves it as it is.
    pub fn change_epoch(
        &self,
        mac: MacAddr,
        target: Option<u32>,
        raise_only: bool,
    ) -> Result<VmRecord, AgentError> {
        let changed = self.change_epoch_reporting(mac, target, raise_only)?;
        if changed.changed {
            // Not by its cut (that is `advance_at_cut`): a VM shut for it is shut no more, and
            // one held for while stopped (an abort moves it) has its frames go on.
            self.end_shut(mac);
            self.runs_again(mac);
        }
        Ok(changed.vm)
    }

    /// [`Agent::change_epoch`], saying whether anything changed.
    pub(crate) fn change_epoch_reporting(
        &self,
        mac: MacAddr,
        target: Option<u32>,
        raise_only: bool,
    ) -> Result<advance::Changed, AgentError> {
        let mut dp = self.datapath();
        Ok(advance::change_epoch(
            &mut *dp,
            &mut ToBuffer(&self.buffer),
            mac,
            target,
            raise_only,
        )?)
    }

    /// The coordinator announces that `group`'s members may reach `epoch` (see
    /// [`epochs::announce`]); returns how many views on this host may now carry it.
    pub fn announce(&self, group: u32, epoch: u32) -> Result<usize, AgentError> {
        let raised = epochs::announce(&mut *self.datapath(), group, epoch)?;
        info!(
            group,
            epoch,
            views = raised,
            "coordinator announced an epoch"
        );
        Ok(raised)
    }

    /// Aborts a snapshot on this host: members above `epoch` go back to it, and everything
    /// held for the group is delivered.
    pub fn abort(&self, group: u32, epoch: u32) -> Result<Vec<VmRecord>, AgentError> {
        let rolled = {
            let mut dp = self.datapath();
            advance::roll_back(&mut *dp, &mut ToBuffer(&self.buffer), group, epoch)?
        };
        // The release delivered what was frozen for its members: none is kept back now.
        for vm in &rolled {
            self.runs_again(vm.mac);
        }
        Ok(rolled)
    }

    /// The datapath's groups, with the names and domains of groups defined over libvirt.
    pub fn groups(&self) -> Result<Vec<GroupView>, AgentError> {
        let records = epochs::list_groups(&mut *self.datapath())?;
        let named = self.snapshots.get().map(|c| c.groups()).unwrap_or_default();
        Ok(records
            .into_iter()
            .map(|record| {
                let spec = named.iter().find(|g| g.id == record.group);
                GroupView {
                    name: spec.map(|g| g.name.to_string()),
                    domains: spec
                        .map(|g| g.vms.iter().map(|v| v.name.clone()).collect())
                        .unwrap_or_default(),
                    record,
                }
            })
            .collect())
    }

    pub fn ports(&self) -> Vec<AttachedPort> {
        self.datapath().attached_ports()
    }

    pub fn mode(&self) -> Result<Type3Mode, AgentError> {
        Ok(self.datapath().type3_mode()?)
    }

    pub fn set_mode(&self, mode: Type3Mode) -> Result<(), AgentError> {
        Ok(self.datapath().set_type3_mode(mode)?)
    }

    /// Where this agent keeps the images of snapshot `id` (under its store).
    pub(crate) fn image_dir(&self, id: &crate::model::SnapshotId) -> Result<PathBuf, AgentError> {
        Ok(self.snapshots()?.store().join(id))
    }
}
