//! The group snapshot transaction (GENI-VIOLIN's START_SNAPSHOT → VM_PAUSED → ADVANCE_EPOCH →
//! VM_UNPAUSE → REINJECT → COMMIT / ABORT), over a [`Hypervisor`] and an [`EpochControl`].
//!
//! Per VM, on its own thread: begin a live snapshot; wait until the hypervisor holds the VM
//! paused at its snapshot point; advance its epoch in the datapath; let the image complete;
//! resume. The VM cannot run between its snapshot point and the advance (invariant 3): the
//! hypervisor holds it (QEMU's `pause-before-switchover`) until `complete`, which is only called
//! after the advance. Re-injection of held frames follows each advance in the buffer daemon.
//!
//! All or nothing (invariant 5): if any VM fails or times out, every unfinished snapshot is
//! cancelled, every VM is left running, the group's epochs go back to where they were (which
//! also releases held frames), and the images are discarded. A journal on disk lets a restarted
//! coordinator abort a transaction it was in the middle of.
//!
//! The real hypervisor is [`crate::libvirt::Libvirt`] (libvirt + QMP passthrough);
//! [`fake::FakeHypervisor`] drives the state machine in the tier-0 tests. Restore brings every
//! VM of a committed snapshot back paused, registers all of them at the snapshot's epoch, and
//! only then resumes them.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{hold::HoldReport, mac::MacAddr};

/// A VM of a group: its hypervisor name and the MAC the datapath knows it by.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub mac: MacAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: String,
    /// The datapath's group id.
    pub id: u32,
    pub vms: Vec<VmSpec>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{vm}: {detail}")]
pub struct HvError {
    pub vm: String,
    pub detail: String,
}

/// What the coordinator needs from a hypervisor, per VM.
pub trait Hypervisor: Send + Sync {
    /// Starts a live snapshot of the VM's memory into `image_dir`. The VM keeps running until
    /// the final stop-and-copy, where it stops and **waits** (for [`Hypervisor::complete`]).
    fn begin(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError>;
    /// Blocks until the VM is stopped at its snapshot point.
    fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<Paused, HvError>;
    /// [`Hypervisor::wait_paused`], then the VM's epoch advanced right there, by whoever sees
    /// the stop first: an agent on the VM's own host does both in one call, so no network
    /// hop separates the stop from the advance. Returns when the advance was made (µs since
    /// the Unix epoch). `None`: not offered; the coordinator waits, then advances itself.
    fn advance_at_pause(
        &self,
        _vm: &VmSpec,
        _timeout: Duration,
    ) -> Option<Result<(Paused, u64), HvError>> {
        None
    }
    /// Lets the image complete; the VM stays paused. Returns the files written.
    fn complete(&self, vm: &VmSpec, timeout: Duration) -> Result<Vec<PathBuf>, HvError>;
    /// Runs the VM again.
    fn resume(&self, vm: &VmSpec) -> Result<(), HvError>;
    /// Abandons an unfinished snapshot of the VM and leaves the VM as it was before: running
    /// again if the snapshot stopped it (a VM paused by someone else stays paused).
    fn cancel(&self, vm: &VmSpec) -> Result<(), HvError>;
    /// A running VM's MAC and host-side port.
    fn nic(&self, vm: &str) -> Result<(MacAddr, String), HvError>;
    /// Brings a VM back from its images, paused; optionally onto another bridge. Returns its
    /// host-side port.
    fn restore_paused(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        bridge: Option<&str>,
    ) -> Result<String, HvError>;
    /// Stops a VM for good (undoing a partial restore).
    fn destroy(&self, vm: &VmSpec) -> Result<(), HvError>;
    /// Deletes the VM's images of the snapshot whose directory is `image_dir` (an aborted or
    /// deleted snapshot). Where the images live is the hypervisor's business: on the host
    /// that runs the VM.
    fn discard(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError>;
}

/// Hypervisors behind one type (one host's libvirt, or the agents of several hosts).
impl Hypervisor for Box<dyn Hypervisor> {
    fn begin(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
        (**self).begin(vm, image_dir)
    }
    fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<Paused, HvError> {
        (**self).wait_paused(vm, timeout)
    }
    fn advance_at_pause(
        &self,
        vm: &VmSpec,
        timeout: Duration,
    ) -> Option<Result<(Paused, u64), HvError>> {
        (**self).advance_at_pause(vm, timeout)
    }
    fn complete(&self, vm: &VmSpec, timeout: Duration) -> Result<Vec<PathBuf>, HvError> {
        (**self).complete(vm, timeout)
    }
    fn resume(&self, vm: &VmSpec) -> Result<(), HvError> {
        (**self).resume(vm)
    }
    fn cancel(&self, vm: &VmSpec) -> Result<(), HvError> {
        (**self).cancel(vm)
    }
    fn nic(&self, vm: &str) -> Result<(MacAddr, String), HvError> {
        (**self).nic(vm)
    }
    fn restore_paused(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        bridge: Option<&str>,
    ) -> Result<String, HvError> {
        (**self).restore_paused(vm, images, bridge)
    }
    fn destroy(&self, vm: &VmSpec) -> Result<(), HvError> {
        (**self).destroy(vm)
    }
    fn discard(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
        (**self).discard(vm, image_dir)
    }
}

/// When a VM stopped at its snapshot point.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Paused {
    /// The hypervisor's own timestamp of the stop, when it gives one (µs since the Unix epoch).
    pub hypervisor_unix_us: Option<u64>,
    /// When the coordinator learned of it.
    pub seen_unix_us: u64,
}

/// What the coordinator needs from the datapath.
pub trait EpochControl: Send + Sync {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, String>;
    fn advance(&self, vm: &VmSpec) -> Result<u32, String>;
    /// The buffer's report: `Ok(None)` when no buffer runs (nothing is ever held), `Err` when
    /// it does not answer.
    fn hold_report(&self) -> Result<Option<HoldReport>, String>;
    /// Frames held so far (a running total), when a buffer runs.
    fn held_total(&self) -> Option<u64> {
        Some(self.hold_report().ok()??.total("received"))
    }
    /// Frames each VM's last advance released (what was held for it), where known.
    fn held_at_advance(&self, group: &GroupSpec) -> HashMap<MacAddr, u64> {
        let Ok(Some(report)) = self.hold_report() else {
            return HashMap::new();
        };
        group
            .vms
            .iter()
            .filter_map(|v| Some((v.mac, report.released_at_advance_of(v.mac)?)))
            .collect()
    }
    /// Waits until nothing is held for the group's VMs any more (REINJECT done).
    fn wait_released(&self, group: &GroupSpec, timeout: Duration) -> Result<(), String> {
        let macs: Vec<MacAddr> = group.vms.iter().map(|v| v.mac).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let Some(report) = self.hold_report()? else {
                return Ok(());
            };
            let pending = report.pending(&macs, group.id);
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("still held or draining: {}", pending.join(", ")));
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
    /// Puts a VM on `port` in `group` at `epoch` (replacing what the datapath had for its MAC).
    /// Waits briefly for the port to be attached (a restored VM's tap is new).
    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, String>;
    /// Forgets a VM.
    fn unregister(&self, vm: &VmSpec) -> Result<(), String>;
    /// Registers again what a datapath has forgotten — an agent restarted on empty maps, or a
    /// host replaced — before a snapshot relies on it. `port_of` finds a VM's port where it
    /// runs. Returns what was registered again (for the log). One datapath keeps its
    /// registrations pinned and is never asked to forget them: nothing to do by default.
    fn restore_registrations(
        &self,
        _group: &GroupSpec,
        _port_of: &dyn Fn(&VmSpec) -> Result<String, String>,
    ) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
    /// Aborting a snapshot that started with the group at `epoch`: held frames are released
    /// and the group's members end at one epoch again. On one host they go back to `epoch`;
    /// across hosts they go forward to `epoch + 1` instead, because a view raised from a
    /// frame's color would lead a lowered epoch (see `hosts.rs`).
    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), String>;
}

/// Epoch control behind one type; every method forwards, the provided ones too (a
/// multi-host implementation overrides none of them, but may).
impl EpochControl for Box<dyn EpochControl> {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, String> {
        (**self).epoch(vm)
    }
    fn advance(&self, vm: &VmSpec) -> Result<u32, String> {
        (**self).advance(vm)
    }
    fn hold_report(&self) -> Result<Option<HoldReport>, String> {
        (**self).hold_report()
    }
    fn held_total(&self) -> Option<u64> {
        (**self).held_total()
    }
    fn held_at_advance(&self, group: &GroupSpec) -> HashMap<MacAddr, u64> {
        (**self).held_at_advance(group)
    }
    fn wait_released(&self, group: &GroupSpec, timeout: Duration) -> Result<(), String> {
        (**self).wait_released(group, timeout)
    }
    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, String> {
        (**self).register(vm, group, port, epoch)
    }
    fn unregister(&self, vm: &VmSpec) -> Result<(), String> {
        (**self).unregister(vm)
    }
    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), String> {
        (**self).abort_epochs(group, epoch)
    }
    fn restore_registrations(
        &self,
        group: &GroupSpec,
        port_of: &dyn Fn(&VmSpec) -> Result<String, String>,
    ) -> Result<Vec<String>, String> {
        (**self).restore_registrations(group, port_of)
    }
}

#[derive(Clone, Debug)]
pub struct Timeouts {
    /// From `begin` to the VM stopped at its snapshot point.
    pub pause: Duration,
    /// From the advance to the image complete.
    pub complete: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            pause: Duration::from_secs(120),
            complete: Duration::from_secs(60),
        }
    }
}

/// Milliseconds since the transaction started, per step of one VM.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    pub begin_ms: Option<f64>,
    /// The snapshot point: the hypervisor's timestamp of the stop when it has one.
    pub paused_ms: Option<f64>,
    /// When the coordinator learned of the stop.
    pub pause_seen_ms: Option<f64>,
    pub advanced_ms: Option<f64>,
    pub image_complete_ms: Option<f64>,
    pub resumed_ms: Option<f64>,
}

impl Timeline {
    /// Time the VM did not run: from its snapshot point to its resume.
    pub fn downtime_ms(&self) -> Option<f64> {
        Some(self.resumed_ms? - self.paused_ms?)
    }

    /// From the snapshot point to the datapath knowing the new epoch.
    pub fn pause_to_advance_ms(&self) -> Option<f64> {
        Some(self.advanced_ms? - self.paused_ms?)
    }

    /// The coordinator's own part: from learning of the stop to the map updated.
    pub fn seen_to_advance_ms(&self) -> Option<f64> {
        Some(self.advanced_ms? - self.pause_seen_ms?)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmRecord {
    pub name: String,
    pub mac: MacAddr,
    pub images: Vec<PathBuf>,
    /// The last step reached: pending, snapshotting, paused, advanced, image-complete, resumed.
    pub step: String,
    pub timeline: Timeline,
    /// Frames held for this VM until it advanced (then re-injected).
    #[serde(default)]
    pub held_frames: Option<u64>,
    pub error: Option<String>,
}

impl VmRecord {
    /// A VM's record before any step of the transaction.
    fn pending(vm: &VmSpec) -> Self {
        Self {
            name: vm.name.clone(),
            mac: vm.mac,
            images: Vec::new(),
            step: "pending".into(),
            timeline: Timeline::default(),
            held_frames: None,
            error: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Still in progress (only in live views).
    Running,
    Committed,
    Aborted,
}

/// What is kept with a snapshot (`<store>/<id>/manifest.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub id: String,
    pub group: GroupSpec,
    /// The epoch the snapshot moved the group to (committed), or tried to (aborted).
    pub epoch: u32,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub started_unix_ms: u64,
    /// Type-3 frames the buffer held while the snapshot ran (all released by its end).
    #[serde(default)]
    pub held_frames: Option<u64>,
    /// When everything held for the group had been re-injected (ms from the start; REINJECT).
    #[serde(default)]
    pub released_ms: Option<f64>,
    pub vms: Vec<VmRecord>,
}

/// The journal of a transaction in progress (`<store>/journals/<id>.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Journal {
    id: String,
    group: GroupSpec,
    /// Each member's epoch before the snapshot: where an abort goes back to.
    epoch_before: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("snapshot store {path}: {source}")]
    Store { path: PathBuf, source: io::Error },
    #[error("group {0} has no VMs")]
    EmptyGroup(String),
    #[error("no group {0}")]
    UnknownGroup(String),
    #[error("group {0} already exists")]
    GroupExists(String),
    #[error("bad group: {0}")]
    BadGroup(String),
    #[error("group {group} is busy with {id}")]
    Busy { group: String, id: String },
    #[error("no snapshot {0}")]
    UnknownSnapshot(String),
    #[error("snapshot {id} was {outcome:?}: only committed snapshots can be restored")]
    NotRestorable { id: String, outcome: Outcome },
    #[error(
        "the VMs of group {group} are not at one epoch ({detail}): finish or abort the last snapshot first"
    )]
    Inconsistent { group: String, detail: String },
    #[error("datapath: {0}")]
    Epochs(String),
    #[error("{0}")]
    Hypervisor(HvError),
}

/// A snapshot being taken: visible to readers while it runs.
struct Live {
    id: String,
    group: GroupSpec,
    epoch: u32,
    started_unix_ms: u64,
    records: Vec<Arc<Mutex<VmRecord>>>,
}

impl Live {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: self.id.clone(),
            group: self.group.clone(),
            epoch: self.epoch,
            outcome: Outcome::Running,
            reason: None,
            started_unix_ms: self.started_unix_ms,
            held_frames: None,
            released_ms: None,
            vms: self
                .records
                .iter()
                .map(|r| r.lock().expect("record lock").clone())
                .collect(),
        }
    }
}

/// A snapshot that passed its checks and holds its group: [`Coordinator::run`] takes it.
pub struct Prepared {
    pub id: String,
    journal: Journal,
    started: Duration,
}

/// One VM brought back by [`Coordinator::restore`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RestoredVm {
    pub name: String,
    pub mac: MacAddr,
    pub port: String,
    pub restored_ms: f64,
    pub resumed_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    pub snapshot: String,
    pub group: String,
    pub epoch: u32,
    pub vms: Vec<RestoredVm>,
    /// From the first VM resumed to the last.
    pub resume_spread_ms: f64,
}

/// Runs snapshot transactions and keeps their manifests under `store`, plus the named groups
/// (`groups.json`).
pub struct Coordinator<H: Hypervisor, E: EpochControl> {
    pub hypervisor: Arc<H>,
    pub epochs: Arc<E>,
    pub store: PathBuf,
    pub timeouts: Timeouts,
    /// Group name → what keeps it busy (a snapshot id, or "restore").
    busy: Mutex<HashMap<String, String>>,
    live: Mutex<HashMap<String, Live>>,
    groups: Mutex<Vec<GroupSpec>>,
}

impl<H: Hypervisor + 'static, E: EpochControl + 'static> Coordinator<H, E> {
    /// Opens the store; a transaction a previous coordinator left unfinished is aborted first
    /// (its VMs resumed, epochs rolled back, images discarded) and recorded as aborted.
    pub fn open(
        hypervisor: H,
        epochs: E,
        store: &Path,
        timeouts: Timeouts,
    ) -> Result<Self, CoordinatorError> {
        fs::create_dir_all(store).map_err(|source| CoordinatorError::Store {
            path: store.into(),
            source,
        })?;
        let groups = match fs::read_to_string(store.join("groups.json")) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| CoordinatorError::Store {
                path: store.join("groups.json"),
                source: io::Error::other(e),
            })?,
            Err(_) => Vec::new(),
        };
        let c = Self {
            hypervisor: Arc::new(hypervisor),
            epochs: Arc::new(epochs),
            store: store.into(),
            timeouts,
            busy: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            groups: Mutex::new(groups),
        };
        c.recover()?;
        Ok(c)
    }

    pub fn hypervisor(&self) -> &H {
        &self.hypervisor
    }

    pub fn epochs(&self) -> &E {
        &self.epochs
    }

    /// Where snapshots (images, manifests), the journals and the groups live.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// One journal per snapshot in progress: groups snapshot independently.
    fn journal_path(&self, id: &str) -> PathBuf {
        self.store.join("journals").join(format!("{id}.json"))
    }

    /// Aborts every snapshot a previous coordinator left unfinished. A journal stays until its
    /// abort went through, so a failed clean-up is tried again at the next start.
    fn recover(&self) -> Result<(), CoordinatorError> {
        let mut paths: Vec<PathBuf> = fs::read_dir(self.store.join("journals"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        // The single journal of earlier versions.
        paths.push(self.store.join("journal.json"));
        for path in paths {
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let journal: Journal = match serde_json::from_str(&text) {
                Ok(j) => j,
                Err(err) => {
                    warn!(%err, path = %path.display(), "unreadable snapshot journal; removing it");
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            warn!(
                id = journal.id,
                group = journal.group.name,
                "aborting a snapshot left unfinished by a previous coordinator"
            );
            let reason = "the coordinator stopped during the snapshot".to_owned();
            let vms = journal.group.vms.iter().map(VmRecord::pending).collect();
            let mut manifest = Manifest {
                id: journal.id.clone(),
                group: journal.group.clone(),
                epoch: journal.epoch_before + 1,
                outcome: Outcome::Aborted,
                reason: Some(reason),
                started_unix_ms: 0,
                held_frames: None,
                released_ms: None,
                vms,
            };
            let clean = self.abort(&journal, &mut manifest);
            self.write_manifest(&manifest)?;
            if clean {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }

    // ---- groups ----

    pub fn groups(&self) -> Vec<GroupSpec> {
        self.groups.lock().expect("groups lock").clone()
    }

    pub fn group(&self, name: &str) -> Result<GroupSpec, CoordinatorError> {
        self.groups()
            .into_iter()
            .find(|g| g.name == name)
            .ok_or_else(|| CoordinatorError::UnknownGroup(name.into()))
    }

    fn save_groups(&self, groups: &[GroupSpec]) -> Result<(), CoordinatorError> {
        write_atomically(&self.store.join("groups.json"), &groups)
    }

    /// Defines a group of running VMs (by hypervisor name) and registers each in the datapath
    /// with the group id, at the group's current epoch. `id`: the datapath group id; default
    /// the lowest unused.
    pub fn define_group(
        &self,
        name: &str,
        id: Option<u32>,
        domains: &[String],
    ) -> Result<GroupSpec, CoordinatorError> {
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(CoordinatorError::BadGroup(format!(
                "name {name:?}: 1-64 of [A-Za-z0-9_-]"
            )));
        }
        if domains.is_empty() {
            return Err(CoordinatorError::EmptyGroup(name.into()));
        }
        let mut unique = domains.to_vec();
        unique.sort();
        unique.dedup();
        if unique.len() != domains.len() {
            return Err(CoordinatorError::BadGroup(
                "a domain is listed twice".into(),
            ));
        }
        // The name is claimed while the slow part (libvirt, waiting for ports) runs without
        // the groups lock; the checks are made again before the group is added.
        self.hold(name, "its definition")?;
        let _release = Release(self, name.to_owned());
        let check = |groups: &[GroupSpec], id: Option<u32>| -> Result<u32, CoordinatorError> {
            if groups.iter().any(|g| g.name == name) {
                return Err(CoordinatorError::GroupExists(name.into()));
            }
            for g in groups {
                if let Some(d) = g.vms.iter().find(|v| domains.contains(&v.name)) {
                    return Err(CoordinatorError::BadGroup(format!(
                        "domain {} already belongs to group {}",
                        d.name, g.name
                    )));
                }
            }
            match id {
                Some(id) if groups.iter().any(|g| g.id == id) => Err(CoordinatorError::BadGroup(
                    format!("group id {id} is taken"),
                )),
                Some(id) => Ok(id),
                None => Ok((1..)
                    .find(|i| !groups.iter().any(|g| g.id == *i))
                    .expect("a free id")),
            }
        };
        let id = check(&self.groups(), id)?;
        let mut vms = Vec::new();
        let mut ports = Vec::new();
        for d in domains {
            let (mac, port) = self
                .hypervisor
                .nic(d)
                .map_err(CoordinatorError::Hypervisor)?;
            vms.push(VmSpec {
                name: d.clone(),
                mac,
            });
            ports.push(port);
        }
        let mut registered: Vec<&VmSpec> = Vec::new();
        let undo = |registered: &[&VmSpec]| {
            for done in registered {
                let _ = self.epochs.unregister(done);
            }
        };
        for (vm, port) in vms.iter().zip(&ports) {
            if let Err(e) = self.epochs.register(vm, id, port, None) {
                undo(&registered);
                return Err(CoordinatorError::Epochs(format!("{}: {e}", vm.name)));
            }
            registered.push(vm);
        }
        let mut groups = self.groups.lock().expect("groups lock");
        if let Err(e) = check(&groups, Some(id)) {
            undo(&registered);
            return Err(e);
        }
        let group = GroupSpec {
            name: name.into(),
            id,
            vms,
        };
        groups.push(group.clone());
        self.save_groups(&groups)?;
        info!(group = name, id, vms = domains.len(), "group defined");
        Ok(group)
    }

    /// Forgets a group (its VMs leave the datapath; its snapshots stay).
    pub fn remove_group(&self, name: &str) -> Result<GroupSpec, CoordinatorError> {
        self.hold(name, "removal")?;
        let _release = Release(self, name.to_owned());
        let mut groups = self.groups.lock().expect("groups lock");
        let at = groups
            .iter()
            .position(|g| g.name == name)
            .ok_or_else(|| CoordinatorError::UnknownGroup(name.into()))?;
        let group = groups.remove(at);
        for vm in &group.vms {
            let _ = self.epochs.unregister(vm);
        }
        self.save_groups(&groups)?;
        Ok(group)
    }

    /// Marks a group busy; `Busy` when it already is.
    fn hold(&self, group: &str, what: &str) -> Result<(), CoordinatorError> {
        let mut busy = self.busy.lock().expect("busy lock");
        if let Some(id) = busy.get(group) {
            return Err(CoordinatorError::Busy {
                group: group.into(),
                id: id.clone(),
            });
        }
        busy.insert(group.into(), what.into());
        Ok(())
    }

    // ---- snapshots ----

    /// Takes a group snapshot; returns its manifest (committed or aborted). `Err` only when it
    /// could not start (bad group, busy group, store unwritable).
    pub fn snapshot(&self, group: &GroupSpec) -> Result<Manifest, CoordinatorError> {
        let prepared = self.prepare(group)?;
        self.run(prepared)
    }

    /// Checks a snapshot can start, claims the group and writes the journal. Fast: the API
    /// answers with the id, then [`Coordinator::run`] does the work.
    pub fn prepare(&self, group: &GroupSpec) -> Result<Prepared, CoordinatorError> {
        if group.vms.is_empty() {
            return Err(CoordinatorError::EmptyGroup(group.name.clone()));
        }
        self.hold(&group.name, "a snapshot")?;
        match self.prepare_held(group) {
            Ok(p) => {
                self.busy
                    .lock()
                    .expect("busy lock")
                    .insert(group.name.clone(), p.id.clone());
                Ok(p)
            }
            Err(e) => {
                self.busy.lock().expect("busy lock").remove(&group.name);
                Err(e)
            }
        }
    }

    fn prepare_held(&self, group: &GroupSpec) -> Result<Prepared, CoordinatorError> {
        let port_of = |vm: &VmSpec| -> Result<String, String> {
            let (mac, port) = self.hypervisor.nic(&vm.name).map_err(|e| e.to_string())?;
            if mac != vm.mac {
                return Err(format!(
                    "{}: its NIC is {mac} now, the group says {}",
                    vm.name, vm.mac
                ));
            }
            Ok(port)
        };
        let again = self
            .epochs
            .restore_registrations(group, &port_of)
            .map_err(CoordinatorError::Epochs)?;
        if !again.is_empty() {
            warn!(
                group = group.name,
                again = again.join(", "),
                "registered again where a datapath had forgotten them"
            );
        }
        let epochs: Vec<u32> = group
            .vms
            .iter()
            .map(|vm| self.epochs.epoch(vm))
            .collect::<Result<_, _>>()
            .map_err(CoordinatorError::Epochs)?;
        if epochs.iter().any(|e| *e != epochs[0]) {
            return Err(CoordinatorError::Inconsistent {
                group: group.name.clone(),
                detail: format!("{epochs:?}"),
            });
        }
        let epoch_before = epochs[0];
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = format!(
            "{}-{}-e{}",
            group.name,
            started.as_millis(),
            epoch_before + 1
        );
        let journal = Journal {
            id: id.clone(),
            group: group.clone(),
            epoch_before,
        };
        let dir = self.store.join(&id);
        fs::create_dir_all(&dir).map_err(|source| CoordinatorError::Store {
            path: dir.clone(),
            source,
        })?;
        let journals = self.store.join("journals");
        fs::create_dir_all(&journals).map_err(|source| CoordinatorError::Store {
            path: journals,
            source,
        })?;
        write_atomically(&self.journal_path(&id), &journal)?;
        let records = group
            .vms
            .iter()
            .map(|vm| Arc::new(Mutex::new(VmRecord::pending(vm))))
            .collect();
        self.live.lock().expect("live lock").insert(
            id.clone(),
            Live {
                id: id.clone(),
                group: group.clone(),
                epoch: epoch_before + 1,
                started_unix_ms: started.as_millis() as u64,
                records,
            },
        );
        Ok(Prepared {
            id,
            journal,
            started,
        })
    }

    /// Runs a prepared snapshot to commit or abort.
    pub fn run(&self, prepared: Prepared) -> Result<Manifest, CoordinatorError> {
        let Prepared {
            id,
            journal,
            started,
        } = prepared;
        let group = journal.group.clone();
        let _release = Release(self, group.name.clone());
        let records: Vec<Arc<Mutex<VmRecord>>> = self
            .live
            .lock()
            .expect("live lock")
            .get(&id)
            .map(|l| l.records.clone())
            .expect("prepared snapshot is live");
        let dir = self.store.join(&id);
        info!(id, vms = group.vms.len(), "group snapshot started");

        let held_before = self.epochs.held_total();
        let t0 = Instant::now();
        let t0_unix_us = unix_us();
        let failed = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = group
            .vms
            .iter()
            .zip(&records)
            .map(|(vm, record)| {
                let (hv, ep, failed, record) = (
                    self.hypervisor.clone(),
                    self.epochs.clone(),
                    failed.clone(),
                    record.clone(),
                );
                let (vm, dir, timeouts) = (vm.clone(), dir.clone(), self.timeouts.clone());
                let clock = Clock { t0, t0_unix_us };
                thread::spawn(move || {
                    snapshot_vm(&*hv, &*ep, &vm, &dir, &timeouts, clock, &failed, &record)
                })
            })
            .collect();
        for t in threads {
            if t.join().is_err() {
                failed.store(true, Ordering::SeqCst);
            }
        }
        let vms: Vec<VmRecord> = records
            .iter()
            .map(|r| r.lock().expect("record lock").clone())
            .collect();
        let mut manifest = Manifest {
            id: id.clone(),
            group: group.clone(),
            epoch: journal.epoch_before + 1,
            outcome: Outcome::Committed,
            reason: None,
            started_unix_ms: started.as_millis() as u64,
            held_frames: None,
            released_ms: None,
            vms,
        };
        if !failed.load(Ordering::SeqCst) {
            // REINJECT: every member advanced; the buffer delivers what it held for them. The
            // images are consistent either way, so a slow release is recorded, not aborted.
            match self.epochs.wait_released(&group, self.timeouts.complete) {
                Ok(()) => manifest.released_ms = Some(t0.elapsed().as_secs_f64() * 1000.0),
                Err(err) => warn!(id, %err, "held frames not all re-injected yet"),
            }
            let held = self.epochs.held_at_advance(&group);
            for vm in &mut manifest.vms {
                vm.held_frames = held.get(&vm.mac).copied();
            }
        }
        let mut clean = true;
        if failed.load(Ordering::SeqCst) {
            let reasons: Vec<String> = manifest
                .vms
                .iter()
                .filter_map(|v| v.error.clone())
                .collect();
            manifest.outcome = Outcome::Aborted;
            manifest.reason = Some(if reasons.is_empty() {
                "a VM's snapshot thread failed".into()
            } else {
                reasons.join("; ")
            });
            clean = self.abort(&journal, &mut manifest);
        }
        if let (Some(before), Some(after)) = (held_before, self.epochs.held_total()) {
            manifest.held_frames = Some(after.saturating_sub(before));
        }
        let written = self.write_manifest(&manifest);
        if clean {
            let _ = fs::remove_file(self.journal_path(&id));
        } else {
            warn!(
                id,
                "the abort did not fully go through; its journal stays for the next start"
            );
        }
        self.live.lock().expect("live lock").remove(&id);
        written?;
        info!(id, outcome = ?manifest.outcome, "group snapshot finished");
        Ok(manifest)
    }

    /// Leaves every VM as it was before (running, unless someone else had paused it), the
    /// group at its epoch before, and no images. False when a step failed.
    fn abort(&self, journal: &Journal, manifest: &mut Manifest) -> bool {
        let mut clean = true;
        for vm in &journal.group.vms {
            // Cancels whatever is unfinished and runs again every VM the snapshot stopped; a VM
            // that was paused before the snapshot stays paused.
            if let Err(err) = self.hypervisor.cancel(vm) {
                warn!(vm = vm.name, %err, "cancelling the snapshot");
                // A VM that is gone has nothing left to clean up.
                clean &= err.detail.starts_with("no such domain");
            }
        }
        if let Err(err) = self
            .epochs
            .abort_epochs(&journal.group, journal.epoch_before)
        {
            clean = false;
            warn!(%err, "rolling back the group's epochs");
            manifest.reason = Some(format!(
                "{}; rolling back epochs failed: {err}",
                manifest.reason.clone().unwrap_or_default()
            ));
        }
        let dir = self.store.join(&journal.id);
        for vm in &journal.group.vms {
            if let Err(err) = self.hypervisor.discard(vm, &dir) {
                warn!(vm = vm.name, %err, "discarding the aborted snapshot's images");
            }
        }
        let _ = fs::remove_dir_all(&dir);
        for vm in &mut manifest.vms {
            vm.images.clear();
        }
        clean
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<(), CoordinatorError> {
        let dir = self.store.join(&manifest.id);
        fs::create_dir_all(&dir).map_err(|source| CoordinatorError::Store {
            path: dir.clone(),
            source,
        })?;
        write_atomically(&dir.join("manifest.json"), manifest)
    }

    /// Manifests in the store and snapshots in progress, oldest first.
    pub fn list(&self) -> Result<Vec<Manifest>, CoordinatorError> {
        let entries = fs::read_dir(&self.store).map_err(|source| CoordinatorError::Store {
            path: self.store.clone(),
            source,
        })?;
        let mut out: Vec<Manifest> = entries
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("manifest.json")).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        out.extend(
            self.live
                .lock()
                .expect("live lock")
                .values()
                .map(Live::manifest),
        );
        out.sort_by_key(|m| (m.started_unix_ms, m.id.clone()));
        Ok(out)
    }

    /// One snapshot: live while it runs, then its manifest.
    pub fn get(&self, id: &str) -> Result<Manifest, CoordinatorError> {
        if let Some(live) = self.live.lock().expect("live lock").get(id) {
            return Ok(live.manifest());
        }
        if id.contains('/') || id.starts_with('.') {
            return Err(CoordinatorError::UnknownSnapshot(id.into()));
        }
        let text = fs::read_to_string(self.store.join(id).join("manifest.json"))
            .map_err(|_| CoordinatorError::UnknownSnapshot(id.into()))?;
        serde_json::from_str(&text).map_err(|e| CoordinatorError::Store {
            path: self.store.join(id),
            source: io::Error::other(e),
        })
    }

    /// Deletes a finished snapshot (manifest and images).
    pub fn delete(&self, id: &str) -> Result<Manifest, CoordinatorError> {
        let m = self.get(id)?;
        if m.outcome == Outcome::Running {
            return Err(CoordinatorError::Busy {
                group: m.group.name,
                id: id.into(),
            });
        }
        let dir = self.store.join(id);
        for vm in &m.group.vms {
            self.hypervisor
                .discard(vm, &dir)
                .map_err(CoordinatorError::Hypervisor)?;
        }
        fs::remove_dir_all(&dir).map_err(|source| CoordinatorError::Store { path: dir, source })?;
        Ok(m)
    }

    /// Restores every VM of a committed snapshot together: all restored paused, registered in
    /// the datapath at the snapshot's epoch, then resumed one right after another. All or
    /// nothing: if one VM cannot be restored, the ones already restored are destroyed.
    pub fn restore(
        &self,
        id: &str,
        bridge: Option<&str>,
    ) -> Result<RestoreReport, CoordinatorError> {
        let m = self.get(id)?;
        if m.outcome != Outcome::Committed {
            return Err(CoordinatorError::NotRestorable {
                id: id.into(),
                outcome: m.outcome,
            });
        }
        self.hold(&m.group.name, &format!("restoring {id}"))?;
        let _release = Release(self, m.group.name.clone());
        if let Some(other) = self
            .groups()
            .into_iter()
            .find(|g| g.id == m.group.id && g.name != m.group.name)
        {
            return Err(CoordinatorError::BadGroup(format!(
                "datapath group id {} now belongs to group {}",
                m.group.id, other.name
            )));
        }
        let t0 = Instant::now();
        let ms = || t0.elapsed().as_secs_f64() * 1000.0;
        let mut restored: Vec<RestoredVm> = Vec::new();
        // Nothing restored stays: no domain, and no registration pointing at its dead port.
        let undo = |restored: &[RestoredVm]| {
            for r in restored {
                let vm = VmSpec {
                    name: r.name.clone(),
                    mac: r.mac,
                };
                let _ = self.hypervisor.destroy(&vm);
                let _ = self.epochs.unregister(&vm);
            }
        };
        for rec in &m.vms {
            let vm = VmSpec {
                name: rec.name.clone(),
                mac: rec.mac,
            };
            let port = match self.hypervisor.restore_paused(&vm, &rec.images, bridge) {
                Ok(port) => port,
                Err(e) => {
                    undo(&restored);
                    return Err(CoordinatorError::Hypervisor(e));
                }
            };
            restored.push(RestoredVm {
                name: vm.name.clone(),
                mac: vm.mac,
                port,
                restored_ms: ms(),
                resumed_ms: 0.0,
            });
        }
        // Every VM at the snapshot's epoch before any of them runs.
        for r in &restored {
            let vm = VmSpec {
                name: r.name.clone(),
                mac: r.mac,
            };
            if let Err(e) = self
                .epochs
                .register(&vm, m.group.id, &r.port, Some(m.epoch))
            {
                undo(&restored);
                return Err(CoordinatorError::Epochs(format!("{}: {e}", r.name)));
            }
        }
        for r in &mut restored {
            let vm = VmSpec {
                name: r.name.clone(),
                mac: r.mac,
            };
            if let Err(e) = self.hypervisor.resume(&vm) {
                undo(&restored);
                return Err(CoordinatorError::Hypervisor(e));
            }
            r.resumed_ms = ms();
        }
        let first = restored
            .iter()
            .map(|r| r.resumed_ms)
            .fold(f64::MAX, f64::min);
        let last = restored.iter().map(|r| r.resumed_ms).fold(0.0, f64::max);
        info!(id, vms = restored.len(), "group restored");
        Ok(RestoreReport {
            snapshot: id.into(),
            group: m.group.name.clone(),
            epoch: m.epoch,
            vms: restored,
            resume_spread_ms: last - first,
        })
    }
}

/// One line of a snapshot's progress: each VM's last step (`vm1 advanced | vm2 paused`).
pub fn render_progress(m: &Manifest) -> String {
    let steps: Vec<String> = m
        .vms
        .iter()
        .map(|v| format!("{} {}", v.name, v.step))
        .collect();
    steps.join(" | ")
}

/// A manifest for people: outcome, then one line per VM with its timeline (ms from the start).
pub fn render_manifest(m: &Manifest) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "snapshot {}: {:?}, group {} (id {}) at epoch {}{}{}",
        m.id,
        m.outcome,
        m.group.name,
        m.group.id,
        m.epoch,
        m.held_frames
            .map(|h| format!(", {h} frames held"))
            .unwrap_or_default(),
        m.released_ms
            .map(|r| format!(", all re-injected at {r:.1} ms"))
            .unwrap_or_default()
    );
    if let Some(reason) = &m.reason {
        let _ = writeln!(out, "  reason: {reason}");
    }
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let _ = writeln!(
        out,
        "  {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>13} {:>12} {:>6}",
        "VM",
        "begin",
        "paused",
        "advanced",
        "image",
        "resumed",
        "downtime",
        "pause→advance",
        "seen→advance",
        "held"
    );
    for v in &m.vms {
        let t = &v.timeline;
        let _ = writeln!(
            out,
            "  {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>13} {:>12} {:>6}{}",
            v.name,
            f(t.begin_ms),
            f(t.paused_ms),
            f(t.advanced_ms),
            f(t.image_complete_ms),
            f(t.resumed_ms),
            f(t.downtime_ms()),
            t.pause_to_advance_ms()
                .map_or("-".into(), |v| format!("{:.3}", v)),
            t.seen_to_advance_ms()
                .map_or("-".into(), |v| format!("{:.3}", v)),
            v.held_frames.map_or("-".into(), |h| h.to_string()),
            v.error
                .as_ref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
    out
}

/// Frees a group claimed by [`Coordinator::hold`] when dropped.
struct Release<'a, H: Hypervisor, E: EpochControl>(&'a Coordinator<H, E>, String);

impl<H: Hypervisor, E: EpochControl> Drop for Release<'_, H, E> {
    fn drop(&mut self) {
        self.0.busy.lock().expect("busy lock").remove(&self.1);
    }
}

pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// The transaction's time origin, on both clocks (the hypervisor reports wall-clock times).
#[derive(Clone, Copy)]
struct Clock {
    t0: Instant,
    t0_unix_us: u64,
}

impl Clock {
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }

    fn unix_ms(&self, unix_us: u64) -> f64 {
        (unix_us as f64 - self.t0_unix_us as f64) / 1000.0
    }
}

/// One VM's part of the transaction. Stops early when another VM has failed.
#[allow(clippy::too_many_arguments)]
fn snapshot_vm<H: Hypervisor + ?Sized, E: EpochControl + ?Sized>(
    hv: &H,
    ep: &E,
    vm: &VmSpec,
    dir: &Path,
    timeouts: &Timeouts,
    clock: Clock,
    failed: &AtomicBool,
    record: &Mutex<VmRecord>,
) {
    // From the VM's stop to its advance this thread is on the critical path: it must not wait
    // behind the busy QEMU threads of the other VMs.
    crate::hold::make_this_thread_realtime("a snapshot thread");
    let update = |f: &dyn Fn(&mut VmRecord)| f(&mut record.lock().expect("record lock"));
    let fail = |detail: String| {
        record.lock().expect("record lock").error = Some(detail);
        failed.store(true, Ordering::SeqCst);
    };
    let begin_ms = clock.now_ms();
    update(&|r| {
        r.timeline.begin_ms = Some(begin_ms);
        r.step = "snapshotting".into();
    });
    if let Err(e) = hv.begin(vm, dir) {
        return fail(format!("starting the snapshot: {e}"));
    }
    let (paused, advanced) = match hv.advance_at_pause(vm, timeouts.pause) {
        // Waited for and advanced where the VM runs. If another VM failed meanwhile, the
        // abort moves this one's group forward to it (across hosts epochs never go back).
        Some(Ok((paused, advanced_unix_us))) => (paused, Ok(clock.unix_ms(advanced_unix_us))),
        Some(Err(e)) => return fail(format!("waiting for the snapshot point: {e}")),
        None => {
            let paused = match hv.wait_paused(vm, timeouts.pause) {
                Ok(p) => p,
                Err(e) => return fail(format!("waiting for the snapshot point: {e}")),
            };
            if failed.load(Ordering::SeqCst) {
                // Another VM failed: this one must not move to the new epoch, and need not
                // wait for the others to run again.
                let _ = hv.cancel(vm);
                return;
            }
            // The VM is held at its snapshot point: advance it before it can run again
            // (invariant 3).
            let advanced = ep.advance(vm).map(|_| clock.now_ms());
            (paused, advanced)
        }
    };
    // The critical part is over; copying images and disks must not hog a CPU at real-time
    // priority.
    crate::hold::leave_realtime("a snapshot thread");
    let (seen_ms, paused_ms) = (
        clock.unix_ms(paused.seen_unix_us),
        clock.unix_ms(paused.hypervisor_unix_us.unwrap_or(paused.seen_unix_us)),
    );
    update(&|r| {
        r.timeline.pause_seen_ms = Some(seen_ms);
        r.timeline.paused_ms = Some(paused_ms.min(seen_ms));
        r.step = "paused".into();
    });
    match advanced {
        Ok(advanced_ms) => update(&|r| {
            r.timeline.advanced_ms = Some(advanced_ms);
            r.step = "advanced".into();
        }),
        Err(e) => {
            let _ = hv.cancel(vm);
            return fail(format!("advancing the epoch: {e}"));
        }
    }
    match hv.complete(vm, timeouts.complete) {
        Ok(images) => {
            let ms = clock.now_ms();
            update(&|r| {
                r.images = images.clone();
                r.timeline.image_complete_ms = Some(ms);
                r.step = "image-complete".into();
            });
        }
        Err(e) => return fail(format!("completing the image: {e}")),
    }
    if let Err(e) = hv.resume(vm) {
        return fail(format!("resuming: {e}"));
    }
    let ms = clock.now_ms();
    update(&|r| {
        r.timeline.resumed_ms = Some(ms);
        r.step = "resumed".into();
    });
}

/// Deletes the files of one VM (`<name>.*`) in a snapshot directory on this host.
pub fn discard_local(vm: &str, image_dir: &Path) -> Result<(), String> {
    let prefix = format!("{vm}.");
    let Ok(entries) = fs::read_dir(image_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            fs::remove_file(entry.path())
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn write_atomically<T: Serialize>(path: &Path, value: &T) -> Result<(), CoordinatorError> {
    let err = |source: io::Error| CoordinatorError::Store {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| err(io::Error::other(e)))?;
    fs::write(&tmp, text).map_err(err)?;
    let file = fs::File::open(&tmp).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// A hypervisor and a datapath in memory, with failures on demand, recording every step in one
/// global order: the tier-0 tests of the transaction.
pub mod fake {
    use std::collections::HashMap;

    use super::*;

    /// Where a VM's snapshot goes wrong.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Failure {
        /// The VM is gone when the snapshot starts.
        Vanish,
        /// It never reaches its snapshot point.
        NeverPauses,
        /// Writing its image fails.
        ImageFails,
        /// Its image cannot be restored.
        RestoreFails,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum VmState {
        Running,
        Snapshotting,
        /// Stopped at its snapshot point, waiting for `complete`.
        HeldAtSnapshot,
        /// Image complete, still paused.
        Paused,
    }

    #[derive(Default)]
    pub struct World {
        pub states: HashMap<String, VmState>,
        pub epochs: HashMap<MacAddr, u32>,
        /// (step, vm) in the order they happened: "begin", "paused", "advance", "complete",
        /// "resume", "cancel", "rollback".
        pub log: Vec<(String, String)>,
        pub failures: HashMap<String, Failure>,
        pub macs: HashMap<String, MacAddr>,
        /// Datapath registrations: MAC → (group, port).
        pub registered: HashMap<MacAddr, (u32, String)>,
        /// A VM that runs while its epoch lags its snapshot would break invariant 3.
        pub ran_unadvanced: Vec<String>,
    }

    #[derive(Clone, Default)]
    pub struct FakeHypervisor {
        pub world: Arc<Mutex<World>>,
        /// Advance each VM where it runs, at its stop, as an agent does
        /// ([`Hypervisor::advance_at_pause`]).
        pub advances_at_pause: bool,
    }

    impl FakeHypervisor {
        pub fn new(vms: &[VmSpec]) -> Self {
            let fake = Self::default();
            {
                let mut w = fake.world.lock().expect("world");
                for vm in vms {
                    w.states.insert(vm.name.clone(), VmState::Running);
                    w.epochs.insert(vm.mac, 0);
                    w.macs.insert(vm.name.clone(), vm.mac);
                }
            }
            fake
        }

        pub fn fail(&self, vm: &str, failure: Failure) {
            self.world
                .lock()
                .expect("world")
                .failures
                .insert(vm.into(), failure);
        }

        fn step(&self, vm: &VmSpec, what: &str) -> std::sync::MutexGuard<'_, World> {
            let mut w = self.world.lock().expect("world");
            w.log.push((what.into(), vm.name.clone()));
            w
        }

        pub fn epochs(&self) -> FakeEpochs {
            FakeEpochs {
                world: self.world.clone(),
                snapshot_epoch: Arc::new(Mutex::new(HashMap::new())),
            }
        }
    }

    fn hv_err(vm: &VmSpec, detail: &str) -> HvError {
        HvError {
            vm: vm.name.clone(),
            detail: detail.into(),
        }
    }

    impl Hypervisor for FakeHypervisor {
        fn begin(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
            let mut w = self.step(vm, "begin");
            if w.failures.get(&vm.name) == Some(&Failure::Vanish) {
                w.states.remove(&vm.name);
                return Err(hv_err(vm, "no such domain"));
            }
            w.states.insert(vm.name.clone(), VmState::Snapshotting);
            fs::create_dir_all(image_dir).map_err(|e| hv_err(vm, &e.to_string()))
        }

        fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<Paused, HvError> {
            if self.world.lock().expect("world").failures.get(&vm.name)
                == Some(&Failure::NeverPauses)
            {
                thread::sleep(timeout);
                return Err(hv_err(vm, "timed out"));
            }
            // Stagger the VMs a little, as memory sizes do.
            thread::sleep(Duration::from_millis(u64::from(vm.mac.0[5] % 7) * 3));
            let mut w = self.step(vm, "paused");
            w.states.insert(vm.name.clone(), VmState::HeldAtSnapshot);
            Ok(Paused {
                hypervisor_unix_us: None,
                seen_unix_us: unix_us(),
            })
        }

        fn advance_at_pause(
            &self,
            vm: &VmSpec,
            timeout: Duration,
        ) -> Option<Result<(Paused, u64), HvError>> {
            if !self.advances_at_pause {
                return None;
            }
            Some(self.wait_paused(vm, timeout).and_then(|paused| {
                let mut w = self.step(vm, "agent-advance");
                let e = w
                    .epochs
                    .get_mut(&vm.mac)
                    .ok_or_else(|| hv_err(vm, "unknown VM"))?;
                *e += 1;
                Ok((paused, unix_us()))
            }))
        }

        fn complete(&self, vm: &VmSpec, _timeout: Duration) -> Result<Vec<PathBuf>, HvError> {
            let mut w = self.step(vm, "complete");
            if w.failures.get(&vm.name) == Some(&Failure::ImageFails) {
                return Err(hv_err(vm, "writing the image: no space left on device"));
            }
            w.states.insert(vm.name.clone(), VmState::Paused);
            Ok(vec![PathBuf::from(format!("{}.mem", vm.name))])
        }

        fn resume(&self, vm: &VmSpec) -> Result<(), HvError> {
            let mut w = self.step(vm, "resume");
            match w.states.get(&vm.name).copied() {
                None => Err(hv_err(vm, "no such domain")),
                Some(VmState::Running) | Some(VmState::Snapshotting) => Ok(()),
                Some(_) => {
                    w.states.insert(vm.name.clone(), VmState::Running);
                    Ok(())
                }
            }
        }

        fn cancel(&self, vm: &VmSpec) -> Result<(), HvError> {
            let mut w = self.step(vm, "cancel");
            match w.states.get(&vm.name).copied() {
                None => Err(hv_err(vm, "no such domain")),
                Some(VmState::Snapshotting)
                | Some(VmState::HeldAtSnapshot)
                | Some(VmState::Paused) => {
                    w.states.insert(vm.name.clone(), VmState::Running);
                    Ok(())
                }
                Some(VmState::Running) => Ok(()),
            }
        }

        fn nic(&self, vm: &str) -> Result<(MacAddr, String), HvError> {
            let w = self.world.lock().expect("world");
            if !w.states.contains_key(vm) {
                return Err(HvError {
                    vm: vm.into(),
                    detail: "no such domain".into(),
                });
            }
            let mac = w.macs.get(vm).copied().ok_or_else(|| HvError {
                vm: vm.into(),
                detail: "no NIC".into(),
            })?;
            Ok((mac, format!("tap-{vm}")))
        }

        fn restore_paused(
            &self,
            vm: &VmSpec,
            images: &[PathBuf],
            _bridge: Option<&str>,
        ) -> Result<String, HvError> {
            let mut w = self.step(vm, "restore");
            if images.is_empty() {
                return Err(hv_err(vm, "no image"));
            }
            if w.failures.get(&vm.name) == Some(&Failure::RestoreFails) {
                return Err(hv_err(vm, "the image is unreadable"));
            }
            w.states.insert(vm.name.clone(), VmState::Paused);
            Ok(format!("tap-{}", vm.name))
        }

        fn destroy(&self, vm: &VmSpec) -> Result<(), HvError> {
            let mut w = self.step(vm, "destroy");
            w.states.remove(&vm.name);
            Ok(())
        }

        fn discard(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
            let _w = self.step(vm, "discard");
            discard_local(&vm.name, image_dir).map_err(|e| hv_err(vm, &e))
        }
    }

    #[derive(Clone)]
    pub struct FakeEpochs {
        world: Arc<Mutex<World>>,
        snapshot_epoch: Arc<Mutex<HashMap<MacAddr, u32>>>,
    }

    impl EpochControl for FakeEpochs {
        fn epoch(&self, vm: &VmSpec) -> Result<u32, String> {
            self.world
                .lock()
                .expect("world")
                .epochs
                .get(&vm.mac)
                .copied()
                .ok_or_else(|| "unknown VM".into())
        }

        fn hold_report(&self) -> Result<Option<HoldReport>, String> {
            Ok(None)
        }

        fn wait_released(&self, _group: &GroupSpec, _timeout: Duration) -> Result<(), String> {
            self.world
                .lock()
                .expect("world")
                .log
                .push(("released".into(), String::new()));
            Ok(())
        }

        fn advance(&self, vm: &VmSpec) -> Result<u32, String> {
            let mut w = self.world.lock().expect("world");
            w.log.push(("advance".into(), vm.name.clone()));
            if w.states.get(&vm.name) != Some(&VmState::HeldAtSnapshot) {
                // Advancing a VM that is not held at its snapshot point is a coordinator bug.
                w.ran_unadvanced.push(vm.name.clone());
            }
            let e = w.epochs.get_mut(&vm.mac).ok_or("unknown VM")?;
            *e += 1;
            self.snapshot_epoch
                .lock()
                .expect("epochs")
                .insert(vm.mac, *e);
            Ok(*e)
        }

        fn register(
            &self,
            vm: &VmSpec,
            group: u32,
            port: &str,
            epoch: Option<u32>,
        ) -> Result<u32, String> {
            let mut w = self.world.lock().expect("world");
            w.log.push(("register".into(), vm.name.clone()));
            let epoch = epoch.unwrap_or(0);
            w.epochs.insert(vm.mac, epoch);
            w.registered.insert(vm.mac, (group, port.into()));
            Ok(epoch)
        }

        fn unregister(&self, vm: &VmSpec) -> Result<(), String> {
            let mut w = self.world.lock().expect("world");
            w.registered.remove(&vm.mac);
            Ok(())
        }

        fn abort_epochs(&self, _group: &GroupSpec, epoch: u32) -> Result<(), String> {
            let mut w = self.world.lock().expect("world");
            w.log.push(("rollback".into(), String::new()));
            for e in w.epochs.values_mut() {
                *e = (*e).min(epoch);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        fake::{Failure, FakeHypervisor, VmState},
        *,
    };

    fn group(n: u8) -> GroupSpec {
        GroupSpec {
            name: "g".into(),
            id: 1,
            vms: (1..=n)
                .map(|i| VmSpec {
                    name: format!("vm{i}"),
                    mac: MacAddr([2, 0, 0, 0, 0, i]),
                })
                .collect(),
        }
    }

    fn coordinator(
        g: &GroupSpec,
        store: &Path,
    ) -> (
        Coordinator<FakeHypervisor, fake::FakeEpochs>,
        FakeHypervisor,
    ) {
        open_on(FakeHypervisor::new(&g.vms), store)
    }

    /// A coordinator over this fake, with short timeouts.
    fn open_on(
        hv: FakeHypervisor,
        store: &Path,
    ) -> (
        Coordinator<FakeHypervisor, fake::FakeEpochs>,
        FakeHypervisor,
    ) {
        let timeouts = Timeouts {
            pause: Duration::from_millis(200),
            complete: Duration::from_millis(200),
        };
        let c = Coordinator::open(hv.clone(), hv.epochs(), store, timeouts).unwrap();
        (c, hv)
    }

    fn store() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "enforcer-coord-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = fs::remove_dir_all(&p);
        p
    }

    /// Index of a step in the log.
    fn at(log: &[(String, String)], what: &str, vm: &str) -> Option<usize> {
        log.iter().position(|(w, v)| w == what && v == vm)
    }

    #[test]
    fn commit_advances_each_vm_while_it_is_held_then_resumes_it() {
        let g = group(4);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        let m = c.snapshot(&g).unwrap();
        assert_eq!(m.outcome, Outcome::Committed, "{m:?}");
        assert_eq!(m.epoch, 1);
        let w = hv.world.lock().unwrap();
        assert!(w.ran_unadvanced.is_empty());
        for vm in &g.vms {
            let (p, a, c, r) = (
                at(&w.log, "paused", &vm.name).unwrap(),
                at(&w.log, "advance", &vm.name).unwrap(),
                at(&w.log, "complete", &vm.name).unwrap(),
                at(&w.log, "resume", &vm.name).unwrap(),
            );
            assert!(
                p < a && a < c && c < r,
                "{}: paused {p} advance {a} complete {c} resume {r}",
                vm.name
            );
            assert_eq!(w.states[&vm.name], VmState::Running);
            assert_eq!(w.epochs[&vm.mac], 1);
        }
        let released = w.log.iter().position(|(s, _)| s == "released").unwrap();
        assert!(
            g.vms
                .iter()
                .all(|vm| at(&w.log, "resume", &vm.name).unwrap() < released),
            "REINJECT after every VM_UNPAUSE: {:?}",
            w.log
        );
        assert!(m.released_ms.is_some());
        for r in &m.vms {
            let t = &r.timeline;
            assert!(t.downtime_ms().unwrap() >= t.pause_to_advance_ms().unwrap());
            assert_eq!(r.images.len(), 1);
        }
        // Kept on disk, listed, and the journal is gone.
        let listed = c.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (&listed[0].id, listed[0].outcome, listed[0].vms.len()),
            (&m.id, Outcome::Committed, 4)
        );
        assert!(!dir.join("journal.json").exists());
        assert_eq!(fs::read_dir(dir.join("journals")).unwrap().count(), 0);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_vm_advanced_where_it_runs_is_advanced_once_before_it_completes() {
        let g = group(3);
        let dir = store();
        let mut hv = FakeHypervisor::new(&g.vms);
        hv.advances_at_pause = true;
        let (c, hv) = open_on(hv, &dir);
        let m = c.snapshot(&g).unwrap();
        assert_eq!(m.outcome, Outcome::Committed, "{m:?}");
        let w = hv.world.lock().unwrap();
        for vm in &g.vms {
            let (p, a, done) = (
                at(&w.log, "paused", &vm.name).unwrap(),
                at(&w.log, "agent-advance", &vm.name).unwrap(),
                at(&w.log, "complete", &vm.name).unwrap(),
            );
            assert!(p < a && a < done, "{}: {:?}", vm.name, w.log);
            assert_eq!(at(&w.log, "advance", &vm.name), None, "advanced twice");
            assert_eq!(w.epochs[&vm.mac], 1);
        }
        for r in &m.vms {
            assert!(r.timeline.advanced_ms.is_some() && r.timeline.pause_to_advance_ms().is_some());
        }
        drop(w);
        let _ = fs::remove_dir_all(dir);
    }

    fn assert_aborted_cleanly(
        c: &Coordinator<FakeHypervisor, fake::FakeEpochs>,
        hv: &FakeHypervisor,
        m: &Manifest,
        g: &GroupSpec,
        expect: &str,
    ) {
        assert_eq!(m.outcome, Outcome::Aborted);
        assert!(
            m.reason.as_deref().unwrap_or("").contains(expect),
            "{:?}",
            m.reason
        );
        let w = hv.world.lock().unwrap();
        for vm in &g.vms {
            if let Some(state) = w.states.get(&vm.name) {
                assert_eq!(*state, VmState::Running, "{} left {state:?}", vm.name);
            }
            assert_eq!(w.epochs[&vm.mac], 0, "{} epoch rolled back", vm.name);
        }
        assert!(
            m.vms.iter().all(|v| v.images.is_empty()),
            "images discarded"
        );
        let kept: Vec<String> = fs::read_dir(c.store.join(&m.id))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            kept,
            vec!["manifest.json".to_owned()],
            "only the manifest of the aborted snapshot remains"
        );
        assert!(!c.store.join("journal.json").exists());
        assert_eq!(
            fs::read_dir(c.store.join("journals")).map_or(0, |d| d.count()),
            0,
            "no journal left"
        );
    }

    /// Runs a snapshot of `n` VMs where `vm` fails with `failure`; checks the abort was clean.
    fn aborts_when(n: u8, vm: &str, failure: Failure, reason: &str) -> Vec<(String, String)> {
        let g = group(n);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        hv.fail(vm, failure);
        let m = c.snapshot(&g).unwrap();
        assert_aborted_cleanly(&c, &hv, &m, &g, reason);
        let _ = fs::remove_dir_all(dir);
        hv.world.lock().unwrap().log.clone()
    }

    #[test]
    fn a_vanished_vm_aborts_the_whole_group() {
        aborts_when(3, "vm2", Failure::Vanish, "no such domain");
    }

    #[test]
    fn an_image_write_failure_after_the_advance_rolls_the_epoch_back() {
        let log = aborts_when(3, "vm3", Failure::ImageFails, "no space left");
        let rollback = log
            .iter()
            .position(|(w, _)| w == "rollback")
            .expect("epochs rolled back");
        let advanced = log
            .iter()
            .position(|(w, v)| w == "advance" && v == "vm3")
            .expect("vm3 advanced");
        assert!(
            advanced < rollback,
            "the advance came first, then its roll-back: {log:?}"
        );
    }

    #[test]
    fn a_vm_that_never_pauses_times_out_and_aborts() {
        let log = aborts_when(2, "vm1", Failure::NeverPauses, "timed out");
        assert!(
            !log.iter().any(|(w, v)| w == "advance" && v == "vm1"),
            "vm1 never advanced"
        );
    }

    #[test]
    fn a_restarted_coordinator_aborts_the_unfinished_snapshot() {
        let g = group(2);
        let dir = store();
        fs::create_dir_all(&dir).unwrap();
        // A coordinator died mid-snapshot: its journal is there, one VM held, one advanced.
        let journal = Journal {
            id: "g-1-e1".into(),
            group: g.clone(),
            epoch_before: 0,
        };
        write_atomically(&dir.join("journal.json"), &journal).unwrap();
        let hv = FakeHypervisor::new(&g.vms);
        {
            let mut w = hv.world.lock().unwrap();
            w.states.insert("vm1".into(), VmState::HeldAtSnapshot);
            w.states.insert("vm2".into(), VmState::Paused);
            *w.epochs.get_mut(&g.vms[1].mac).unwrap() = 1;
        }
        let timeouts = Timeouts::default();
        let c = Coordinator::open(hv.clone(), hv.epochs(), &dir, timeouts).unwrap();
        let list = c.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_aborted_cleanly(&c, &hv, &list[0], &g, "coordinator stopped");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn refuses_groups_that_cannot_start() {
        let g = group(2);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        *hv.world
            .lock()
            .unwrap()
            .epochs
            .get_mut(&g.vms[0].mac)
            .unwrap() = 3;
        assert!(matches!(
            c.snapshot(&g),
            Err(CoordinatorError::Inconsistent { .. })
        ));
        let empty = GroupSpec { vms: vec![], ..g };
        assert!(matches!(
            c.snapshot(&empty),
            Err(CoordinatorError::EmptyGroup(_))
        ));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn restore_registers_every_vm_at_the_snapshot_epoch_before_any_resumes() {
        let g = group(3);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        let m = c.snapshot(&g).unwrap();
        hv.world.lock().unwrap().log.clear();
        let r = c.restore(&m.id, None).unwrap();
        assert_eq!((r.epoch, r.vms.len()), (1, 3));
        let w = hv.world.lock().unwrap();
        let last_register = g
            .vms
            .iter()
            .map(|vm| at(&w.log, "register", &vm.name).unwrap())
            .max()
            .unwrap();
        for vm in &g.vms {
            let restored = at(&w.log, "restore", &vm.name).unwrap();
            let resumed = at(&w.log, "resume", &vm.name).unwrap();
            assert!(
                restored < last_register && last_register < resumed,
                "{:?}",
                w.log
            );
            assert_eq!(w.epochs[&vm.mac], 1);
            assert_eq!(w.registered[&vm.mac], (1, format!("tap-{}", vm.name)));
            assert_eq!(w.states[&vm.name], VmState::Running);
        }
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_failed_restore_destroys_what_it_restored_and_runs_nothing() {
        let g = group(3);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        let m = c.snapshot(&g).unwrap();
        hv.fail("vm3", Failure::RestoreFails);
        hv.world.lock().unwrap().log.clear();
        let err = c.restore(&m.id, None).unwrap_err();
        assert!(err.to_string().contains("unreadable"), "{err}");
        let w = hv.world.lock().unwrap();
        assert!(
            w.log.iter().all(|(step, _)| step != "resume"),
            "{:?}",
            w.log
        );
        for vm in ["vm1", "vm2"] {
            assert!(
                at(&w.log, "destroy", vm).is_some(),
                "{vm} destroyed: {:?}",
                w.log
            );
        }
        drop(w);
        // An unknown snapshot is not found.
        assert!(matches!(
            c.restore("nope", None),
            Err(CoordinatorError::UnknownSnapshot(_))
        ));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn an_aborted_snapshot_is_not_restorable() {
        let g = group(2);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        hv.fail("vm2", Failure::ImageFails);
        let m = c.snapshot(&g).unwrap();
        assert_eq!(m.outcome, Outcome::Aborted);
        hv.world.lock().unwrap().log.clear();
        assert!(matches!(
            c.restore(&m.id, None),
            Err(CoordinatorError::NotRestorable { .. })
        ));
        assert!(
            hv.world.lock().unwrap().log.is_empty(),
            "nothing was touched"
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_busy_group_refuses_a_second_snapshot_until_the_first_ends() {
        let g = group(2);
        let dir = store();
        let (c, _hv) = coordinator(&g, &dir);
        let first = c.prepare(&g).unwrap();
        let live = c.get(&first.id).unwrap();
        assert_eq!(live.outcome, Outcome::Running);
        assert!(matches!(c.prepare(&g), Err(CoordinatorError::Busy { .. })));
        assert!(matches!(
            c.delete(&first.id),
            Err(CoordinatorError::Busy { .. })
        ));
        let m = c.run(first).unwrap();
        assert_eq!(m.outcome, Outcome::Committed);
        let second = c.prepare(&g).unwrap();
        assert!(second.id != m.id);
        c.run(second).unwrap();
        assert_eq!(c.list().unwrap().len(), 2);
        c.delete(&m.id).unwrap();
        assert_eq!(c.list().unwrap().len(), 1);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn groups_are_checked_registered_and_kept_on_disk() {
        let g = group(2);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        let names = vec!["vm1".to_owned(), "vm2".to_owned()];
        for (name, domains, expect) in [
            ("bad name!", names.clone(), "name"),
            ("g", vec!["vm1".into(), "vm1".into()], "twice"),
            ("g", vec![], "no VMs"),
            ("g", vec!["ghost".into()], "no such domain"),
        ] {
            let err = c.define_group(name, None, &domains).unwrap_err();
            assert!(
                err.to_string().contains(expect),
                "{name} {domains:?}: {err}"
            );
        }
        let defined = c.define_group("web", None, &names).unwrap();
        assert_eq!(defined.id, 1);
        assert_eq!(hv.world.lock().unwrap().registered.len(), 2);
        assert!(matches!(
            c.define_group("web", None, &names),
            Err(CoordinatorError::GroupExists(_))
        ));
        assert!(
            c.define_group("other", None, &names[..1]).is_err(),
            "vm1 is taken"
        );
        // A new coordinator on the same store knows the group.
        drop(c);
        let c = Coordinator::open(hv.clone(), hv.epochs(), &dir, Timeouts::default()).unwrap();
        assert_eq!(c.group("web").unwrap(), defined);
        c.remove_group("web").unwrap();
        assert!(hv.world.lock().unwrap().registered.is_empty());
        assert!(matches!(
            c.group("web"),
            Err(CoordinatorError::UnknownGroup(_))
        ));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn every_groups_unfinished_snapshot_is_recovered() {
        let (a, mut b) = (group(2), group(2));
        b.name = "h".into();
        b.id = 2;
        for (i, vm) in b.vms.iter_mut().enumerate() {
            vm.name = format!("other{i}");
            vm.mac = MacAddr([2, 0, 0, 0, 1, i as u8]);
        }
        let dir = store();
        fs::create_dir_all(dir.join("journals")).unwrap();
        for g in [&a, &b] {
            let id = format!("{}-1-e1", g.name);
            let journal = Journal {
                id: id.clone(),
                group: g.clone(),
                epoch_before: 0,
            };
            write_atomically(&dir.join("journals").join(format!("{id}.json")), &journal).unwrap();
        }
        let hv = FakeHypervisor::new(&[a.vms.clone(), b.vms.clone()].concat());
        {
            let mut w = hv.world.lock().unwrap();
            w.states.insert("vm1".into(), VmState::HeldAtSnapshot);
            w.states.insert("other1".into(), VmState::HeldAtSnapshot);
        }
        let c = Coordinator::open(hv.clone(), hv.epochs(), &dir, Timeouts::default()).unwrap();
        let list = c.list().unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.iter().all(|m| m.outcome == Outcome::Aborted));
        let w = hv.world.lock().unwrap();
        assert!(
            w.states.values().all(|s| *s == VmState::Running),
            "{:?}",
            w.states
        );
        drop(w);
        assert_eq!(fs::read_dir(dir.join("journals")).unwrap().count(), 0);
        let _ = fs::remove_dir_all(dir);
    }
}
