//! A hypervisor and a datapath in memory, with failures on demand, recording every step in one
//! global order: the tier-0 tests of the transaction (and of the API's snapshot routes).
//! Test builds only.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use super::{
    backends::{
        DomainState, EpochControl, EpochControlError, HvError, HvErrorKind, Hypervisor, Paused,
        unix_us,
    },
    manifest::CutMethod,
    store::discard_local,
};
use crate::{
    hold::HoldReport,
    model::{GroupSpec, IfName, MacAddr, VmSpec},
};

/// Where a VM's snapshot goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The VM is gone when the snapshot starts.
    Vanish,
    /// It never reaches its snapshot point (pre-copy), or cannot be stopped (instant).
    NeverPauses,
    /// Capturing it fails (instant).
    CaptureFails,
    /// Writing its image fails.
    ImageFails,
    /// Its image cannot be restored.
    RestoreFails,
    /// The code driving it panics as its snapshot begins.
    Panics,
    /// Something outside the snapshot moves its epoch back while its image is written (a raw
    /// abort, `bpftool`): the snapshot must not commit.
    EpochMovedBack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VmState {
    Running,
    Snapshotting,
    /// Stopped at its snapshot point, waiting for `complete`.
    HeldAtSnapshot,
    /// Suspended by an instant cut, waiting for `capture`. Only the process that stopped it
    /// knows why it is paused.
    Stopped,
    /// Image complete, still paused.
    Paused,
}

#[derive(Default)]
pub(crate) struct World {
    pub states: HashMap<String, VmState>,
    pub epochs: HashMap<MacAddr, u32>,
    /// (step, vm) in the order they happened: "begin", "stop", "paused", "advance",
    /// "capture", "complete", "resume", "cancel", "rollback".
    pub log: Vec<(String, String)>,
    pub failures: HashMap<String, Failure>,
    pub macs: HashMap<String, MacAddr>,
    /// Datapath registrations: MAC → (group, port).
    pub registered: HashMap<MacAddr, (u32, String)>,
    /// A VM that runs while its epoch lags its snapshot would break invariant 3.
    pub ran_unadvanced: Vec<String>,
    /// VMs advanced while stopped whose datapath keeps frames back until told they run
    /// again ([`EpochControl::runs_again`]), as the agent does (case R4).
    pub kept_back: std::collections::HashSet<String>,
    /// Each VM's snapshot in progress, by method.
    pub methods: HashMap<String, CutMethod>,
    /// VMs advanced since their snapshot began.
    pub advanced: std::collections::HashSet<String>,
    /// Fault injection: the process "killed" (SIGKILL) just before a given step.
    pub kill: Option<Kill>,
    /// The buffer's report, when one runs (none by default).
    pub hold: Option<HoldReport>,
    /// Fault injection: the buffer loses this many held frames (`lost_ring`) at each advance.
    pub lose_at_advance: u64,
    /// What the datapath records as channel state while a snapshot runs (`None`: it does not
    /// record), by receiver.
    pub in_flight: Option<std::collections::BTreeMap<MacAddr, crate::hold::Recording>>,
    /// Recordings running (between `record_begin` and `record_end`).
    pub recording: bool,
    /// Channel-state frames replayed, by VM.
    pub replayed: HashMap<String, Vec<crate::hold::RecordedFrame>>,
    /// Fault injection: held frames are still being re-injected at the deadline.
    pub unreleased: bool,
}

/// What survives a coordinator killed just before step `at` (counting every step from 1): the
/// hypervisor's and the datapath's state as it was (QEMU and the pinned maps outlive the
/// process; what only the process knew — which snapshot it began, which VMs it advanced — does
/// not), and a copy of its store at that moment. The live run goes on; the copy is what a
/// restarted coordinator finds.
pub(crate) struct Kill {
    pub at: usize,
    pub store: PathBuf,
    pub frozen: Option<(Box<World>, PathBuf)>,
}

impl World {
    /// What outlives the coordinator's process: the VMs and the pinned epochs and
    /// registrations, not what only the process knew (its snapshots begun, VMs advanced).
    pub(crate) fn survivors(&self) -> World {
        World {
            states: self.states.clone(),
            epochs: self.epochs.clone(),
            macs: self.macs.clone(),
            registered: self.registered.clone(),
            ..World::default()
        }
    }

    /// Records a step, killing the process there if it is the chosen one.
    fn record(&mut self, what: &str, vm: &str) {
        self.log.push((what.into(), vm.into()));
        let step = self.log.len();
        let Some(kill) = self.kill.as_ref() else {
            return;
        };
        if kill.at != step || kill.frozen.is_some() {
            return;
        }
        let survivors = self.survivors();
        let copy = kill.store.with_extension("killed");
        let _ = fs::remove_dir_all(&copy);
        copy_tree(&kill.store, &copy).expect("copying the store at the kill");
        if let Some(kill) = self.kill.as_mut() {
            kill.frozen = Some((Box::new(survivors), copy));
        }
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            // A file being replaced right now may be gone: as a crash would find it.
            let _ = fs::copy(entry.path(), &target);
        }
    }
    Ok(())
}

#[derive(Clone, Default)]
pub(crate) struct FakeHypervisor {
    pub world: Arc<Mutex<World>>,
    /// Advance each VM where it runs, at its stop, as an agent does
    /// ([`Hypervisor::advance_at_pause`]).
    pub advances_at_pause: bool,
}

impl FakeHypervisor {
    pub(crate) fn new(vms: &[VmSpec]) -> Self {
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

    pub(crate) fn fail(&self, vm: &str, failure: Failure) {
        self.world
            .lock()
            .expect("world")
            .failures
            .insert(vm.into(), failure);
    }

    fn step(&self, vm: &VmSpec, what: &str) -> std::sync::MutexGuard<'_, World> {
        let mut w = self.world.lock().expect("world");
        w.record(what, &vm.name);
        w
    }

    /// A fake that finds `world` as a killed coordinator left it.
    pub(crate) fn from_world(world: World) -> Self {
        Self {
            world: Arc::new(Mutex::new(world)),
            advances_at_pause: false,
        }
    }

    /// Kills the coordinator using this fake just before step `at` (see [`Kill`]), copying
    /// `store` as it is then.
    pub(crate) fn kill_at(&self, at: usize, store: &Path) {
        self.world.lock().expect("world").kill = Some(Kill {
            at,
            store: store.to_owned(),
            frozen: None,
        });
    }

    /// What the kill left, once the live run is over; `None` when the run had fewer steps.
    pub(crate) fn killed(&self) -> Option<(World, PathBuf)> {
        let (world, store) = self
            .world
            .lock()
            .expect("world")
            .kill
            .as_mut()?
            .frozen
            .take()?;
        Some((*world, store))
    }

    /// An agent's advance where the VM runs.
    fn agent_advance(&self, vm: &VmSpec) -> Result<(), HvError> {
        let mut w = self.step(vm, "agent-advance");
        let e = w
            .epochs
            .get_mut(&vm.mac)
            .ok_or_else(|| hv_err(vm, "unknown VM"))?;
        *e += 1;
        w.advanced.insert(vm.name.clone());
        Ok(())
    }

    pub(crate) fn epochs(&self) -> FakeEpochs {
        FakeEpochs {
            world: self.world.clone(),
            snapshot_epoch: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn hv_err(vm: &VmSpec, detail: &str) -> HvError {
    HvError::failed(&vm.name, detail)
}

fn gone(vm: &str) -> HvError {
    HvError::new(vm, HvErrorKind::NoSuchDomain, "no such domain")
}

impl Hypervisor for FakeHypervisor {
    fn begin(&self, vm: &VmSpec, image_dir: &Path, method: CutMethod) -> Result<(), HvError> {
        // Some VMs take longer to get ready than others.
        thread::sleep(Duration::from_millis(u64::from(vm.mac.0[5] % 5) * 2));
        let mut w = self.step(vm, "begin");
        if w.failures.get(&vm.name) == Some(&Failure::Vanish) {
            w.states.remove(&vm.name);
            return Err(gone(&vm.name));
        }
        if w.failures.get(&vm.name) == Some(&Failure::Panics) {
            drop(w);
            panic!("{}: a bug while beginning its snapshot", vm.name);
        }
        w.states.insert(vm.name.clone(), VmState::Snapshotting);
        w.methods.insert(vm.name.clone(), method);
        w.advanced.remove(&vm.name);
        fs::create_dir_all(image_dir).map_err(|e| hv_err(vm, &e.to_string()))
    }

    fn stop(&self, vm: &VmSpec) -> Result<Paused, HvError> {
        let mut w = self.step(vm, "stop");
        if w.methods.get(&vm.name) != Some(&CutMethod::Instant) {
            return Err(hv_err(vm, "no instant snapshot begun"));
        }
        if w.failures.get(&vm.name) == Some(&Failure::NeverPauses) {
            return Err(hv_err(vm, "it does not stop"));
        }
        w.states.insert(vm.name.clone(), VmState::Stopped);
        Ok(Paused {
            hypervisor_unix_us: None,
            seen_unix_us: unix_us(),
        })
    }

    fn stop_and_advance(&self, vm: &VmSpec) -> Option<Result<(Paused, u64), HvError>> {
        if !self.advances_at_pause {
            return None;
        }
        Some(self.stop(vm).and_then(|paused| {
            self.agent_advance(vm)?;
            Ok((paused, unix_us()))
        }))
    }

    fn capture(&self, vm: &VmSpec) -> Result<u64, HvError> {
        let mut w = self.step(vm, "capture");
        if w.states.get(&vm.name) != Some(&VmState::Stopped) {
            return Err(hv_err(vm, "not stopped"));
        }
        if w.failures.get(&vm.name) == Some(&Failure::CaptureFails) {
            return Err(hv_err(vm, "freezing its disks: no space left on device"));
        }
        // It runs again now: it must have been advanced while stopped.
        if !w.advanced.contains(&vm.name) {
            w.ran_unadvanced.push(vm.name.clone());
        }
        w.states.insert(vm.name.clone(), VmState::Running);
        Ok(unix_us())
    }

    fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<Paused, HvError> {
        if self.world.lock().expect("world").failures.get(&vm.name) == Some(&Failure::NeverPauses) {
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
            self.agent_advance(vm)?;
            Ok((paused, unix_us()))
        }))
    }

    fn complete(&self, vm: &VmSpec, _timeout: Duration) -> Result<Vec<PathBuf>, HvError> {
        let mut w = self.step(vm, "complete");
        if w.failures.get(&vm.name) == Some(&Failure::ImageFails) {
            return Err(hv_err(vm, "writing the image: no space left on device"));
        }
        if w.failures.get(&vm.name) == Some(&Failure::EpochMovedBack)
            && let Some(epoch) = w.epochs.get_mut(&vm.mac)
        {
            *epoch = epoch.saturating_sub(1);
        }
        if w.methods.remove(&vm.name) == Some(CutMethod::PreCopy) {
            w.states.insert(vm.name.clone(), VmState::Paused);
        }
        Ok(vec![PathBuf::from(format!("{}.mem", vm.name))])
    }

    fn resume(&self, vm: &VmSpec) -> Result<(), HvError> {
        let mut w = self.step(vm, "resume");
        match w.states.get(&vm.name).copied() {
            None => Err(gone(&vm.name)),
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
            None => Err(gone(&vm.name)),
            Some(VmState::Snapshotting) | Some(VmState::HeldAtSnapshot) | Some(VmState::Paused) => {
                w.states.insert(vm.name.clone(), VmState::Running);
                Ok(())
            }
            // Paused by a cut this process began, or by someone (or a dead process) it does
            // not know of: then it stays paused.
            Some(VmState::Stopped) => {
                if w.methods.remove(&vm.name) == Some(CutMethod::Instant) {
                    w.states.insert(vm.name.clone(), VmState::Running);
                }
                Ok(())
            }
            Some(VmState::Running) => Ok(()),
        }
    }

    fn nic(&self, vm: &str) -> Result<(MacAddr, String), HvError> {
        let w = self.world.lock().expect("world");
        if !w.states.contains_key(vm) {
            return Err(gone(vm));
        }
        let mac = w
            .macs
            .get(vm)
            .copied()
            .ok_or_else(|| HvError::failed(vm, "no NIC"))?;
        Ok((mac, format!("tap-{vm}")))
    }

    fn state(&self, vm: &str) -> Result<DomainState, HvError> {
        let w = self.world.lock().expect("world");
        Ok(match w.states.get(vm) {
            None => DomainState::Absent,
            Some(VmState::Running | VmState::Snapshotting) => DomainState::Running,
            Some(_) => DomainState::Paused,
        })
    }

    fn restore_paused(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        _bridge: Option<&IfName>,
    ) -> Result<String, HvError> {
        let mut w = self.step(vm, "restore");
        if w.states.contains_key(&vm.name) {
            return Err(HvError::new(
                &vm.name,
                HvErrorKind::Running,
                "a domain of that name is running",
            ));
        }
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
        discard_local(&vm.name, image_dir).map_err(|e| hv_err(vm, &e.to_string()))
    }
}

fn not_registered(vm: &VmSpec) -> EpochControlError {
    EpochControlError::NotRegistered {
        vm: vm.name.clone(),
        mac: vm.mac,
    }
}

#[derive(Clone)]
pub(crate) struct FakeEpochs {
    world: Arc<Mutex<World>>,
    snapshot_epoch: Arc<Mutex<HashMap<MacAddr, u32>>>,
}

impl EpochControl for FakeEpochs {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        self.world
            .lock()
            .expect("world")
            .epochs
            .get(&vm.mac)
            .copied()
            .ok_or_else(|| not_registered(vm))
    }

    fn hold_report(&self) -> Result<Option<HoldReport>, EpochControlError> {
        Ok(self.world.lock().expect("world").hold.clone())
    }

    fn wait_released(
        &self,
        _group: &GroupSpec,
        _timeout: Duration,
    ) -> Result<(), EpochControlError> {
        let mut w = self.world.lock().expect("world");
        w.record("released", "");
        match w.unreleased {
            true => Err(EpochControlError::NotReleased(Vec::new())),
            false => Ok(()),
        }
    }

    fn advance(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        let mut w = self.world.lock().expect("world");
        w.record("advance", &vm.name);
        w.kept_back.insert(vm.name.clone());
        if !matches!(
            w.states.get(&vm.name),
            Some(VmState::HeldAtSnapshot | VmState::Stopped)
        ) {
            // Advancing a VM that is not held at its snapshot point is a coordinator bug.
            w.ran_unadvanced.push(vm.name.clone());
        }
        w.advanced.insert(vm.name.clone());
        let lose = w.lose_at_advance;
        if let Some(hold) = w.hold.as_mut() {
            *hold
                .totals
                .entry(enforcer_common::HoldTotal::LostRing)
                .or_default() += lose;
        }
        let e = w
            .epochs
            .get_mut(&vm.mac)
            .ok_or_else(|| not_registered(vm))?;
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
    ) -> Result<u32, EpochControlError> {
        let mut w = self.world.lock().expect("world");
        w.record("register", &vm.name);
        let epoch = epoch.unwrap_or(0);
        w.epochs.insert(vm.mac, epoch);
        w.registered.insert(vm.mac, (group, port.into()));
        Ok(epoch)
    }

    fn unregister(&self, vm: &VmSpec) -> Result<(), EpochControlError> {
        let mut w = self.world.lock().expect("world");
        w.registered.remove(&vm.mac);
        Ok(())
    }

    fn abort_epochs(&self, _group: &GroupSpec, epoch: u32) -> Result<(), EpochControlError> {
        let mut w = self.world.lock().expect("world");
        w.record("rollback", "");
        for e in w.epochs.values_mut() {
            *e = (*e).min(epoch);
        }
        Ok(())
    }

    fn record_begin(&self, _group: &GroupSpec) -> Result<(), EpochControlError> {
        let mut w = self.world.lock().expect("world");
        if w.in_flight.is_none() {
            return Err(EpochControlError::Unsupported("no recording here".into()));
        }
        w.recording = true;
        Ok(())
    }

    fn runs_again(&self, vm: &VmSpec) {
        let mut w = self.world.lock().expect("world");
        w.record("runs_again", &vm.name);
        w.kept_back.remove(&vm.name);
    }

    fn shut_before_cut(&self, vm: &VmSpec) -> Result<bool, EpochControlError> {
        let mut w = self.world.lock().expect("world");
        w.record("shut", &vm.name);
        Ok(true)
    }

    fn record_end(
        &self,
        _group: &GroupSpec,
    ) -> Result<std::collections::BTreeMap<MacAddr, crate::hold::Recording>, EpochControlError>
    {
        let mut w = self.world.lock().expect("world");
        w.recording = false;
        w.in_flight
            .clone()
            .ok_or_else(|| EpochControlError::Unsupported("no recording here".into()))
    }

    fn replay(
        &self,
        vm: &VmSpec,
        _port: &str,
        frames: &[crate::hold::RecordedFrame],
    ) -> Result<crate::hold::Replayed, EpochControlError> {
        let mut w = self.world.lock().expect("world");
        w.record("replay", &vm.name);
        w.replayed.insert(vm.name.clone(), frames.to_vec());
        Ok(crate::hold::Replayed {
            sent: frames.len() as u64,
            dropped: 0,
        })
    }
}
