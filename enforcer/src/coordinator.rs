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
//! The real hypervisor (libvirt + QMP) is the next step; [`fake::FakeHypervisor`] drives the
//! state machine in the tests.

use std::{
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

use crate::mac::MacAddr;

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
    fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<(), HvError>;
    /// Lets the image complete; the VM stays paused. Returns the files written.
    fn complete(&self, vm: &VmSpec, timeout: Duration) -> Result<Vec<PathBuf>, HvError>;
    /// Runs the VM again.
    fn resume(&self, vm: &VmSpec) -> Result<(), HvError>;
    /// Abandons an unfinished snapshot of the VM and leaves the VM running.
    fn cancel(&self, vm: &VmSpec) -> Result<(), HvError>;
}

/// What the coordinator needs from the datapath.
pub trait EpochControl: Send + Sync {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, String>;
    fn advance(&self, vm: &VmSpec) -> Result<u32, String>;
    /// Aborting: every member of the group back to `epoch`; held frames released.
    fn roll_back(&self, group: u32, epoch: u32) -> Result<(), String>;
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
    pub paused_ms: Option<f64>,
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
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmRecord {
    pub name: String,
    pub mac: MacAddr,
    pub images: Vec<PathBuf>,
    pub timeline: Timeline,
    pub error: Option<String>,
}

impl VmRecord {
    /// A VM's record before any step of the transaction.
    fn pending(vm: &VmSpec) -> Self {
        Self {
            name: vm.name.clone(),
            mac: vm.mac,
            images: Vec::new(),
            timeline: Timeline::default(),
            error: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
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
    pub vms: Vec<VmRecord>,
}

/// The journal of a transaction in progress (`<store>/journal.json`).
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
    #[error(
        "the VMs of group {group} are not at one epoch ({detail}): finish or abort the last snapshot first"
    )]
    Inconsistent { group: String, detail: String },
    #[error("datapath: {0}")]
    Epochs(String),
}

/// Runs snapshot transactions and keeps their manifests under `store`.
pub struct Coordinator<H: Hypervisor, E: EpochControl> {
    pub hypervisor: Arc<H>,
    pub epochs: Arc<E>,
    pub store: PathBuf,
    pub timeouts: Timeouts,
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
        let c = Self {
            hypervisor: Arc::new(hypervisor),
            epochs: Arc::new(epochs),
            store: store.into(),
            timeouts,
        };
        c.recover()?;
        Ok(c)
    }

    fn journal_path(&self) -> PathBuf {
        self.store.join("journal.json")
    }

    fn recover(&self) -> Result<(), CoordinatorError> {
        let path = self.journal_path();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(());
        };
        let journal: Journal = match serde_json::from_str(&text) {
            Ok(j) => j,
            Err(err) => {
                warn!(%err, "unreadable snapshot journal; removing it");
                let _ = fs::remove_file(&path);
                return Ok(());
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
            vms,
        };
        self.abort(&journal, &mut manifest);
        self.write_manifest(&manifest)?;
        let _ = fs::remove_file(&path);
        Ok(())
    }

    /// Takes a group snapshot; returns its manifest (committed or aborted). `Err` only when it
    /// could not start (bad group, store unwritable).
    pub fn snapshot(&self, group: &GroupSpec) -> Result<Manifest, CoordinatorError> {
        if group.vms.is_empty() {
            return Err(CoordinatorError::EmptyGroup(group.name.clone()));
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
        write_atomically(&self.journal_path(), &journal)?;
        info!(id, vms = group.vms.len(), "group snapshot started");

        let t0 = Instant::now();
        let failed = Arc::new(AtomicBool::new(false));
        let records: Vec<Arc<Mutex<VmRecord>>> = group
            .vms
            .iter()
            .map(|vm| Arc::new(Mutex::new(VmRecord::pending(vm))))
            .collect();
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
                thread::spawn(move || {
                    snapshot_vm(&*hv, &*ep, &vm, &dir, &timeouts, t0, &failed, &record)
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
            epoch: epoch_before + 1,
            outcome: Outcome::Committed,
            reason: None,
            started_unix_ms: started.as_millis() as u64,
            vms,
        };
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
            self.abort(&journal, &mut manifest);
        }
        self.write_manifest(&manifest)?;
        let _ = fs::remove_file(self.journal_path());
        info!(id, outcome = ?manifest.outcome, "group snapshot finished");
        Ok(manifest)
    }

    /// Leaves every VM running, the group at its epoch before, and no images.
    fn abort(&self, journal: &Journal, manifest: &mut Manifest) {
        for vm in &journal.group.vms {
            // Cancel whatever is unfinished, then make sure the VM runs (either may say there
            // is nothing to do).
            let _ = self.hypervisor.cancel(vm);
            let _ = self.hypervisor.resume(vm);
        }
        if let Err(err) = self
            .epochs
            .roll_back(journal.group.id, journal.epoch_before)
        {
            warn!(%err, "rolling back the group's epochs");
            manifest.reason = Some(format!(
                "{}; rolling back epochs failed: {err}",
                manifest.reason.clone().unwrap_or_default()
            ));
        }
        let _ = fs::remove_dir_all(self.store.join(&journal.id));
        for vm in &mut manifest.vms {
            vm.images.clear();
        }
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<(), CoordinatorError> {
        let dir = self.store.join(&manifest.id);
        fs::create_dir_all(&dir).map_err(|source| CoordinatorError::Store {
            path: dir.clone(),
            source,
        })?;
        write_atomically(&dir.join("manifest.json"), manifest)
    }

    /// Manifests in the store, oldest first.
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
        out.sort_by_key(|m| (m.started_unix_ms, m.id.clone()));
        Ok(out)
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
    t0: Instant,
    failed: &AtomicBool,
    record: &Mutex<VmRecord>,
) {
    let ms = || t0.elapsed().as_secs_f64() * 1000.0;
    let fail = |detail: String| {
        record.lock().expect("record lock").error = Some(detail);
        failed.store(true, Ordering::SeqCst);
    };
    record.lock().expect("record lock").timeline.begin_ms = Some(ms());
    if let Err(e) = hv.begin(vm, dir) {
        return fail(format!("starting the snapshot: {e}"));
    }
    if let Err(e) = hv.wait_paused(vm, timeouts.pause) {
        return fail(format!("waiting for the snapshot point: {e}"));
    }
    record.lock().expect("record lock").timeline.paused_ms = Some(ms());
    if failed.load(Ordering::SeqCst) {
        // Another VM failed: this one must not move to the new epoch.
        return;
    }
    // The VM is held at its snapshot point: advance it before it can run again (invariant 3).
    if let Err(e) = ep.advance(vm) {
        return fail(format!("advancing the epoch: {e}"));
    }
    record.lock().expect("record lock").timeline.advanced_ms = Some(ms());
    match hv.complete(vm, timeouts.complete) {
        Ok(images) => {
            let mut r = record.lock().expect("record lock");
            r.images = images;
            r.timeline.image_complete_ms = Some(ms());
        }
        Err(e) => return fail(format!("completing the image: {e}")),
    }
    if let Err(e) = hv.resume(vm) {
        return fail(format!("resuming: {e}"));
    }
    record.lock().expect("record lock").timeline.resumed_ms = Some(ms());
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
    fs::rename(&tmp, path).map_err(err)
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
        /// A VM that runs while its epoch lags its snapshot would break invariant 3.
        pub ran_unadvanced: Vec<String>,
    }

    #[derive(Clone, Default)]
    pub struct FakeHypervisor {
        pub world: Arc<Mutex<World>>,
    }

    impl FakeHypervisor {
        pub fn new(vms: &[VmSpec]) -> Self {
            let fake = Self::default();
            {
                let mut w = fake.world.lock().expect("world");
                for vm in vms {
                    w.states.insert(vm.name.clone(), VmState::Running);
                    w.epochs.insert(vm.mac, 0);
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

        fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<(), HvError> {
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
            Ok(())
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
                Some(VmState::Snapshotting) | Some(VmState::HeldAtSnapshot) => {
                    w.states.insert(vm.name.clone(), VmState::Running);
                    Ok(())
                }
                Some(_) => Ok(()),
            }
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

        fn roll_back(&self, _group: u32, epoch: u32) -> Result<(), String> {
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
        let hv = FakeHypervisor::new(&g.vms);
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
        let log = hv.world.lock().unwrap().log.clone();
        log
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
}
