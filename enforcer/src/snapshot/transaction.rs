//! The group snapshot transaction (GENI-VIOLIN's START_SNAPSHOT → VM_PAUSED → ADVANCE_EPOCH →
//! VM_UNPAUSE → REINJECT → COMMIT / ABORT), by either [`CutMethod`]. Every VM's part runs on
//! its own thread.
//!
//! Instant (the default): every VM's snapshot is prepared; once all are ready a gate opens
//! and every thread stops its VM at once (the group's cut: one instant, up to the threads'
//! wake-up and the hypervisor's call); each advances its VM's epoch while it is stopped, then
//! captures it (disks frozen, device state saved, memory written afterwards as of the stop),
//! which runs it again; then waits for its image.
//!
//! Pre-copy: begin a live snapshot; wait until the hypervisor holds the VM paused at its
//! snapshot point (set by its own convergence); advance its epoch; let the image complete;
//! resume.
//!
//! Either way the VM cannot run between its snapshot point and the advance (invariant 3 in
//! docs/design.md): stopped by `stop` until `capture`, or held by QEMU's
//! `pause-before-switchover` until `complete`, both only called after the advance.
//! Re-injection of held frames follows each advance in the buffer.
//!
//! All or nothing (invariant 5): if any VM fails or times out, every unfinished snapshot is
//! cancelled, every VM is left running, the group's epochs go back to where they were (which
//! also releases held frames), and the images are discarded. A journal on disk lets a
//! restarted coordinator abort a transaction it was in the middle of.

use std::{
    collections::BTreeMap,
    fs,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tracing::{info, warn};

use super::{
    backends::{
        EpochControl, EpochControlError, HvError, HvErrorKind, Hypervisor, Paused, unix_us,
    },
    channel::{self, ChannelState},
    coordinator::{Coordinator, CoordinatorError, Timeouts},
    manifest::{CutMethod, Live, Manifest, SnapshotOutcome, SnapshotVm, Step},
    private::{private_dir, remove_durably},
    store::{Journal, write_atomically},
};
use crate::{
    model::{GroupSpec, SnapshotId, VmSpec},
    sched::Realtime,
};

/// A snapshot that passed its checks and holds its group: [`Coordinator::run`] takes it.
pub struct Prepared {
    pub id: SnapshotId,
    journal: Journal,
    started: Duration,
}

impl<H: Hypervisor + ?Sized + 'static, E: EpochControl + ?Sized + 'static> Coordinator<H, E> {
    /// Takes a group snapshot; returns its manifest (committed or aborted). `Err` only when it
    /// could not start (bad group, busy group, store unwritable).
    pub fn snapshot(
        &self,
        group: &GroupSpec,
        method: CutMethod,
    ) -> Result<Manifest, CoordinatorError> {
        let prepared = self.prepare(group, method)?;
        self.run(prepared)
    }

    /// Checks a snapshot can start, claims the group and writes the journal. Fast: the API
    /// answers with the id, then [`Coordinator::run`] does the work.
    pub fn prepare(
        &self,
        group: &GroupSpec,
        method: CutMethod,
    ) -> Result<Prepared, CoordinatorError> {
        if group.vms.is_empty() {
            return Err(CoordinatorError::EmptyGroup(group.name.clone()));
        }
        let claim = self.claim(&group.name, "a snapshot")?;
        let prepared = self.prepare_claimed(group, method)?;
        self.relabel_claim(&group.name, prepared.id.as_str());
        claim.keep();
        Ok(prepared)
    }

    fn prepare_claimed(
        &self,
        group: &GroupSpec,
        method: CutMethod,
    ) -> Result<Prepared, CoordinatorError> {
        let port_of = |vm: &VmSpec| -> Result<String, HvError> {
            let (mac, port) = self.hypervisor.nic(&vm.name)?;
            if mac != vm.mac {
                return Err(HvError::new(
                    &vm.name,
                    HvErrorKind::Failed,
                    format!("its NIC is {mac} now, the group says {}", vm.mac),
                ));
            }
            Ok(port)
        };
        self.finish_leftovers(group)?;
        let again = self.epochs.restore_registrations(group, &port_of)?;
        if !again.is_empty() {
            warn!(
                group = %group.name,
                again = again.join(", "),
                "registered again where a datapath had forgotten them"
            );
        }
        let mut epochs = Vec::with_capacity(group.vms.len());
        for vm in &group.vms {
            epochs.push(
                self.epochs
                    .epoch(vm)
                    .map_err(|e| CoordinatorError::epochs(&vm.name, e))?,
            );
        }
        if epochs.iter().any(|e| *e != epochs[0]) {
            return Err(CoordinatorError::Inconsistent {
                group: group.name.clone(),
                epochs,
            });
        }
        let epoch_before = epochs[0];
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = SnapshotId::new(&group.name, started.as_millis(), epoch_before + 1);
        let journal = Journal {
            id: id.clone(),
            group: group.clone(),
            epoch_before,
            method,
            cut_started: false,
        };
        let journals = self.store.join("journals");
        private_dir(&journals).map_err(|source| CoordinatorError::Store {
            path: journals,
            source,
        })?;
        let dir = self.store.join(&id);
        private_dir(&dir).map_err(|source| CoordinatorError::Store {
            path: dir.clone(),
            source,
        })?;
        if let Err(err) = write_atomically(&self.journal_path(&id), &journal) {
            // Nothing started: no empty snapshot directory left behind either.
            let _ = fs::remove_dir(&dir);
            return Err(err);
        }
        let records = group
            .vms
            .iter()
            .map(|vm| Arc::new(Mutex::new(SnapshotVm::pending(vm))))
            .collect();
        self.live.lock().expect("live lock").insert(
            id.clone(),
            Live {
                id: id.clone(),
                group: group.clone(),
                epoch: epoch_before + 1,
                method,
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
        let _claim = self.resume_claim(&group.name);
        let records: Vec<Arc<Mutex<SnapshotVm>>> = self
            .live
            .lock()
            .expect("live lock")
            .get(&id)
            .map(|l| l.records.clone())
            .expect("prepared snapshot is live");
        let dir = self.store.join(&id);
        info!(%id, vms = group.vms.len(), "group snapshot started");

        let held_before = self.epochs.held_total();
        let lost_before = self.epochs.hold_losses();
        let t0 = Instant::now();
        let t0_unix_us = unix_us();
        let failed = Arc::new(AtomicBool::new(false));
        let method = journal.method;
        // Views of the members on other hosts accept colors up to the new epoch from now on.
        // After the journal: a failure from here on aborts, and an abort across hosts moves
        // the members forward to that epoch, so the announcement never outlives the truth.
        let announced = self
            .epochs
            .announce(&group, journal.epoch_before + 1)
            .map_err(|e| format!("announcing epoch {}: {e}", journal.epoch_before + 1));
        if announced.is_err() {
            failed.store(true, Ordering::SeqCst);
        }
        // The channel state (invariant 7) is recorded from each member's cut on. A datapath
        // that cannot record does not stop the snapshot: its manifest says so.
        let recording = match announced {
            Ok(()) => self.epochs.record_begin(&group).map_err(|e| e.to_string()),
            Err(_) => Err("the snapshot did not start".to_owned()),
        };
        if let Err(why) = &recording {
            warn!(%id, %why, "the channel state is not recorded");
        }
        let gate = Arc::new(Gate::new(group.vms.len()));
        let threads: Vec<_> = group
            .vms
            .iter()
            .zip(&records)
            .filter(|_| announced.is_ok())
            .map(|(vm, record)| {
                let part = VmPart {
                    vm: vm.clone(),
                    dir: dir.clone(),
                    timeouts: self.timeouts.clone(),
                    clock: Clock { t0, t0_unix_us },
                    failed: failed.clone(),
                    record: record.clone(),
                    gate: gate.clone(),
                    recording: recording.is_ok(),
                };
                let (hv, ep) = (self.hypervisor.clone(), self.epochs.clone());
                thread::spawn(move || match method {
                    CutMethod::Instant => part.instant(&*hv, &*ep),
                    CutMethod::PreCopy => part.pre_copy(&*hv, &*ep),
                })
            })
            .collect();
        let mut journal = journal;
        if method == CutMethod::Instant && announced.is_ok() {
            // The cut: once every VM is ready, all stop at once (or none does). The journal
            // says so first, durably: a coordinator that dies with VMs stopped leaves them
            // paused, and the next one must know it was the cut that stopped them.
            gate.wait_ready();
            let mut go = !failed.load(Ordering::SeqCst);
            if go {
                journal.cut_started = true;
                if let Err(err) = write_atomically(&self.journal_path(&id), &journal) {
                    warn!(%id, %err, "recording the cut in the journal; not cutting");
                    failed.store(true, Ordering::SeqCst);
                    go = false;
                }
            }
            gate.open(go);
        }
        for t in threads {
            if t.join().is_err() {
                failed.store(true, Ordering::SeqCst);
            }
        }
        let vms: Vec<SnapshotVm> = records
            .iter()
            .map(|r| r.lock().expect("record lock").clone())
            .collect();
        let mut manifest = Manifest {
            id: id.clone(),
            group: group.clone(),
            epoch: journal.epoch_before + 1,
            outcome: SnapshotOutcome::Committed,
            reason: None,
            method,
            started_unix_ms: started.as_millis() as u64,
            stop_spread_ms: Manifest::stop_spread(&vms),
            held_frames: None,
            released_ms: None,
            held_lost: BTreeMap::new(),
            channel_state: None,
            vms,
        };
        if !failed.load(Ordering::SeqCst) {
            // Every member must be at the new epoch now: anything else moved one during the
            // snapshot (a raw change, a tool on the maps), and its image may not match its peers'.
            let target = journal.epoch_before + 1;
            for (vm, record) in group.vms.iter().zip(&mut manifest.vms) {
                let off = match self.epochs.epoch(vm) {
                    Ok(epoch) if epoch == target => None,
                    Ok(epoch) => Some(format!(
                        "its epoch is {epoch}, not {target}: something else changed it during the snapshot"
                    )),
                    Err(err) => Some(format!("reading its epoch back: {err}")),
                };
                if let Some(off) = off {
                    record.error = Some(format!("{}: {off}", vm.name));
                    failed.store(true, Ordering::SeqCst);
                }
            }
        }
        if !failed.load(Ordering::SeqCst) {
            // REINJECT: every member advanced; the buffer delivers what it held for them. The
            // images are consistent either way, so a slow release is recorded, not aborted.
            match self.epochs.wait_released(&group, self.timeouts.complete) {
                Ok(()) => manifest.released_ms = Some(t0.elapsed().as_secs_f64() * 1000.0),
                Err(err) => warn!(%id, %err, "held frames not all re-injected yet"),
            }
            let held = self.epochs.held_at_advance(&group);
            for vm in &mut manifest.vms {
                vm.held_frames = held.get(&vm.mac).copied();
            }
        }
        // Every member is past its cut (or the snapshot failed): the recording ends, and a
        // committed snapshot keeps it beside its images.
        let released = manifest.released_ms.is_some();
        let recorded = recording.and_then(|()| {
            self.epochs
                .record_end(&group)
                .map_err(|e| format!("taking the recording: {e}"))
        });
        // Frames still held at the deadline may cross the cut after the recording ended.
        let recorded = recorded.and_then(|r| match released {
            true => Ok(r),
            false => Err("held frames were still being re-injected when it ended".to_owned()),
        });
        if !failed.load(Ordering::SeqCst) {
            let state = recorded.and_then(|recordings| {
                channel::save(&dir, &group, &recordings)
                    .map_err(|e| format!("writing it beside the images: {e}"))
            });
            manifest.channel_state = Some(state.unwrap_or_else(|why| {
                warn!(%id, %why, "the channel state is not kept with the snapshot");
                ChannelState::not_recorded(why)
            }));
        }
        let mut clean = true;
        if failed.load(Ordering::SeqCst) {
            let reasons: Vec<String> = manifest
                .vms
                .iter()
                .filter_map(|v| v.error.clone())
                .collect();
            manifest.outcome = SnapshotOutcome::Aborted;
            manifest.reason = Some(if let Err(e) = &announced {
                e.clone()
            } else if reasons.is_empty() {
                "a VM's snapshot thread failed".into()
            } else {
                reasons.join("; ")
            });
            clean = self.abort(&journal, &mut manifest);
        }
        if let (Some(before), Some(after)) = (held_before, self.epochs.held_total()) {
            manifest.held_frames = Some(after.saturating_sub(before));
        }
        if let (Some(before), Some(after)) = (lost_before, self.epochs.hold_losses()) {
            manifest.held_lost = after
                .into_iter()
                .map(|(reason, n)| {
                    let was = before.get(&reason).copied().unwrap_or(0);
                    (reason, n.saturating_sub(was))
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            if !manifest.held_lost.is_empty() {
                warn!(%id, lost = ?manifest.held_lost, "held frames were lost while the snapshot ran");
                // Frames held for a receiver around its cut may have been in flight: the
                // recording cannot say it has them all.
                if let Some(c) = manifest.channel_state.as_mut().filter(|c| c.recorded) {
                    c.reason = Some(
                        "held frames were lost while the snapshot ran (see held_lost): some may \
                         have been in flight"
                            .into(),
                    );
                }
            }
        }
        let written = self.write_manifest(&manifest);
        match (&written, clean) {
            // Only once the outcome is on disk: without a manifest the journal is all the
            // next start has to go by (it aborts and discards what is left).
            (Ok(()), true) => {
                if let Err(err) = remove_durably(&self.journal_path(&id)) {
                    warn!(%id, %err, "removing the snapshot's journal");
                }
            }
            (Err(err), _) => warn!(
                %id,
                %err,
                "the manifest could not be written; the journal stays and the next start aborts the snapshot"
            ),
            (Ok(()), false) => warn!(
                %id,
                "the abort did not fully go through; its journal stays for the next start"
            ),
        }
        self.live.lock().expect("live lock").remove(&id);
        written?;
        info!(%id, outcome = %manifest.outcome, "group snapshot finished");
        Ok(manifest)
    }

    /// Leaves every VM as it was before (running, unless someone else had paused it), the
    /// group at its epoch before, and no images. False when a step failed.
    pub(crate) fn abort(&self, journal: &Journal, manifest: &mut Manifest) -> bool {
        let mut clean = true;
        for vm in &journal.group.vms {
            // Cancels whatever is unfinished and runs again every VM the snapshot stopped; a VM
            // that was paused before the snapshot stays paused.
            if let Err(err) = self.hypervisor.cancel(vm) {
                warn!(vm = vm.name, %err, "cancelling the snapshot");
                // A VM that is gone has nothing left to clean up.
                clean &= err.kind == HvErrorKind::NoSuchDomain;
            }
            // After an instant cut began every VM was running before it (`begin` checks), so a
            // VM paused now was stopped by the cut, even if whoever stopped it is gone (a
            // restarted coordinator or agent has no record of it): run it again.
            if journal.cut_started
                && let Err(err) = self.hypervisor.resume(vm)
                && err.kind != HvErrorKind::NoSuchDomain
            {
                warn!(vm = vm.name, %err, "running again a VM the cut stopped");
                clean = false;
            }
            self.epochs.runs_again(vm);
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

/// Where the instant method's threads wait for each other: each arrives once its VM is ready
/// (or failed); the transaction opens the gate for all at once when every VM is ready, or
/// sends them all home when one failed.
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    waiting_for: usize,
    /// `Some(true)`: stop now; `Some(false)`: the snapshot is off.
    open: Option<bool>,
}

impl Gate {
    fn new(vms: usize) -> Self {
        Self {
            state: Mutex::new(GateState {
                waiting_for: vms,
                open: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// One VM is ready (or failed); waits for the gate. True: stop the VM now.
    fn arrive(&self) -> bool {
        let mut s = self.state.lock().expect("gate lock");
        s.waiting_for = s.waiting_for.saturating_sub(1);
        self.changed.notify_all();
        loop {
            if let Some(open) = s.open {
                return open;
            }
            s = self.changed.wait(s).expect("gate lock");
        }
    }

    /// One VM will not arrive (its thread is unwinding): counted as arrived, and failed.
    fn leave(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.waiting_for = s.waiting_for.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Waits until every VM arrived (ready or failed).
    fn wait_ready(&self) {
        let mut s = self.state.lock().expect("gate lock");
        while s.waiting_for > 0 {
            s = self.changed.wait(s).expect("gate lock");
        }
    }

    /// Sends every waiting thread on: to stop its VM (`go`), or home.
    fn open(&self, go: bool) {
        self.state.lock().expect("gate lock").open = Some(go);
        self.changed.notify_all();
    }
}

/// A thread's place at the [`Gate`]: taken by [`Arrival::arrive`], or given up when dropped
/// unused (a panic), which fails the snapshot instead of leaving the others waiting.
struct Arrival<'a> {
    gate: &'a Gate,
    failed: &'a AtomicBool,
    arrived: bool,
}

impl Arrival<'_> {
    fn arrive(mut self) -> bool {
        self.arrived = true;
        self.gate.arrive()
    }
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if !self.arrived {
            self.failed.store(true, Ordering::SeqCst);
            self.gate.leave();
        }
    }
}

/// One VM's part of the transaction, on its own thread. Stops early when another VM has
/// failed.
struct VmPart {
    vm: VmSpec,
    dir: std::path::PathBuf,
    timeouts: Timeouts,
    clock: Clock,
    failed: Arc<AtomicBool>,
    record: Arc<Mutex<SnapshotVm>>,
    gate: Arc<Gate>,
    /// The group's channel state is being recorded: the VM is shut before its cut.
    recording: bool,
}

impl VmPart {
    fn update(&self, f: impl FnOnce(&mut SnapshotVm)) {
        f(&mut self.record.lock().expect("record lock"))
    }

    fn fail(&self, detail: String) {
        self.record.lock().expect("record lock").error = Some(detail);
        self.failed.store(true, Ordering::SeqCst);
    }

    fn begin<H: Hypervisor + ?Sized>(&self, hv: &H, method: CutMethod) -> Result<(), ()> {
        let begin_ms = self.clock.now_ms();
        self.update(|r| {
            r.timeline.begin_ms = Some(begin_ms);
            r.step = Step::Snapshotting;
        });
        hv.begin(&self.vm, &self.dir, method)
            .map_err(|e| self.fail(format!("starting the snapshot: {e}")))
    }

    fn record_paused(&self, paused: &Paused) {
        let (seen_ms, paused_ms) = (
            self.clock.unix_ms(paused.seen_unix_us),
            self.clock
                .unix_ms(paused.hypervisor_unix_us.unwrap_or(paused.seen_unix_us)),
        );
        self.update(|r| {
            r.timeline.pause_seen_ms = Some(seen_ms);
            r.timeline.paused_ms = Some(paused_ms.min(seen_ms));
            r.step = Step::Paused;
        });
    }

    /// Records the stop and the advance made at it; a failed advance abandons the VM's
    /// snapshot.
    fn record_stop<H: Hypervisor + ?Sized>(
        &self,
        hv: &H,
        paused: &Paused,
        advanced_ms: Result<f64, EpochControlError>,
    ) -> Result<(), ()> {
        self.record_paused(paused);
        match advanced_ms {
            Ok(ms) => {
                self.update(|r| {
                    r.timeline.advanced_ms = Some(ms);
                    r.step = Step::Advanced;
                });
                Ok(())
            }
            Err(e) => {
                self.abandon(hv, format!("advancing the epoch: {e}"));
                Err(())
            }
        }
    }

    /// Gives up this VM's snapshot (leaving the VM as it was) and fails the transaction.
    fn abandon<H: Hypervisor + ?Sized>(&self, hv: &H, detail: String) {
        let _ = hv.cancel(&self.vm);
        self.fail(detail);
    }

    fn record_resumed(&self, ms: f64) {
        self.update(|r| {
            r.timeline.resumed_ms = Some(ms);
            r.step = Step::Resumed;
        });
    }

    fn complete<H: Hypervisor + ?Sized>(&self, hv: &H) -> Result<(), ()> {
        let images = hv
            .complete(&self.vm, self.timeouts.complete)
            .map_err(|e| self.fail(format!("completing the image: {e}")))?;
        let ms = self.clock.now_ms();
        self.update(|r| {
            r.images = images;
            r.timeline.image_complete_ms = Some(ms);
            if r.step < Step::ImageComplete {
                r.step = Step::ImageComplete;
            }
        });
        Ok(())
    }

    /// Instant: ready → (gate) → stop → advance → capture (runs again) → image complete.
    fn instant<H: Hypervisor + ?Sized, E: EpochControl + ?Sized>(&self, hv: &H, ep: &E) {
        let vm = &self.vm;
        // Arrives at the gate even if this thread panics on the way (the others wait for it).
        let arrival = Arrival {
            gate: &self.gate,
            failed: &self.failed,
            arrived: false,
        };
        if self.begin(hv, CutMethod::Instant).is_err() {
            arrival.arrive();
            return;
        }
        // Last before the gate: from here to its cut, frames to it wait in the buffer, not in
        // its tap, where QEMU would keep one past the stop (invariant 7). Not fatal: the
        // recording counts what it may miss.
        if self.recording
            && !self.failed.load(Ordering::SeqCst)
            && let Err(e) = ep.shut_before_cut(vm)
        {
            warn!(vm = %vm.name, %e, "not shut before its cut");
        }
        // From the gate to the advance this thread is on the critical path: it must wake and
        // call at once, not behind the busy QEMU threads of the VMs.
        let realtime = Realtime::enter("a snapshot thread");
        if !arrival.arrive() {
            let _ = hv.cancel(vm);
            return;
        }
        let (paused, advanced) = match hv.stop_and_advance(vm) {
            Some(Ok((paused, at))) => (paused, Ok(self.clock.unix_ms(at))),
            Some(Err(e)) => return self.abandon(hv, format!("stopping it: {e}")),
            None => match hv.stop(vm) {
                // Stopped: advance before it can run again (invariant 3).
                Ok(paused) => (paused, ep.advance(vm).map(|_| self.clock.now_ms())),
                Err(e) => return self.abandon(hv, format!("stopping it: {e}")),
            },
        };
        if self.record_stop(hv, &paused, advanced).is_err() {
            return;
        }
        // The VM runs again (or, cancelled, runs as before): what was kept back from it while
        // it was stopped goes on. On the ways out before, the abort that follows a failure
        // runs it again and says so.
        match hv.capture(vm) {
            Ok(at) => {
                ep.runs_again(vm);
                self.record_resumed(self.clock.unix_ms(at));
            }
            Err(e) => {
                self.abandon(hv, format!("capturing it: {e}"));
                ep.runs_again(vm);
                return;
            }
        }
        drop(realtime);
        let _ = self.complete(hv);
    }

    /// Pre-copy: begin → wait for the stop → advance → image complete → resume.
    fn pre_copy<H: Hypervisor + ?Sized, E: EpochControl + ?Sized>(&self, hv: &H, ep: &E) {
        let vm = &self.vm;
        // From the VM's stop to its advance this thread is on the critical path: it must not
        // wait behind the busy QEMU threads of the other VMs.
        let realtime = Realtime::enter("a snapshot thread");
        if self.begin(hv, CutMethod::PreCopy).is_err() {
            return;
        }
        let (paused, advanced) = match hv.advance_at_pause(vm, self.timeouts.pause) {
            // Waited for and advanced where the VM runs. If another VM failed meanwhile, the
            // abort moves this one's group forward to it (across hosts epochs never go back).
            Some(Ok((paused, at))) => (paused, Ok(self.clock.unix_ms(at))),
            Some(Err(e)) => return self.fail(format!("waiting for the snapshot point: {e}")),
            None => {
                let paused = match hv.wait_paused(vm, self.timeouts.pause) {
                    Ok(p) => p,
                    Err(e) => return self.fail(format!("waiting for the snapshot point: {e}")),
                };
                if self.failed.load(Ordering::SeqCst) {
                    // Another VM failed: this one must not move to the new epoch, and need
                    // not wait for the others to run again.
                    let _ = hv.cancel(vm);
                    return;
                }
                // The VM is held at its snapshot point: advance it before it can run again
                // (invariant 3).
                (paused, ep.advance(vm).map(|_| self.clock.now_ms()))
            }
        };
        // The critical part is over; copying images and disks must not hog a CPU at
        // real-time priority.
        drop(realtime);
        if self.record_stop(hv, &paused, advanced).is_err() {
            return;
        }
        if self.complete(hv).is_err() {
            return;
        }
        // Runs again: what was kept back from it while it was stopped goes on. A failure
        // before leaves that to the abort that follows, once it runs the VM again.
        if let Err(e) = hv.resume(vm) {
            return self.fail(format!("resuming: {e}"));
        }
        ep.runs_again(vm);
        self.record_resumed(self.clock.now_ms());
    }
}
