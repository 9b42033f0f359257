//! The group snapshot transaction (GENI-VIOLIN's START_SNAPSHOT → VM_PAUSED → ADVANCE_EPOCH →
//! VM_UNPAUSE → REINJECT → COMMIT / ABORT).
//!
//! Per VM, on its own thread: begin a live snapshot; wait until the hypervisor holds the VM
//! paused at its snapshot point; advance its epoch in the datapath; let the image complete;
//! resume. The VM cannot run between its snapshot point and the advance (invariant 3 in
//! docs/design.md): the hypervisor holds it (QEMU's `pause-before-switchover`) until
//! `complete`, which is only called after the advance. Re-injection of held frames follows
//! each advance in the buffer.
//!
//! All or nothing (invariant 5): if any VM fails or times out, every unfinished snapshot is
//! cancelled, every VM is left running, the group's epochs go back to where they were (which
//! also releases held frames), and the images are discarded. A journal on disk lets a
//! restarted coordinator abort a transaction it was in the middle of.

use std::{
    fs,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tracing::{info, warn};

use super::{
    backends::{EpochControl, HvError, HvErrorKind, Hypervisor, unix_us},
    coordinator::{Coordinator, CoordinatorError, Timeouts},
    manifest::{Live, Manifest, SnapshotOutcome, SnapshotVm, Step},
    store::{Journal, write_atomically},
};
use crate::{
    model::{GroupSpec, SnapshotId, VmSpec},
    sched::{leave_realtime, make_this_thread_realtime},
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
        let claim = self.claim(&group.name, "a snapshot")?;
        let prepared = self.prepare_claimed(group)?;
        self.relabel_claim(&group.name, prepared.id.as_str());
        claim.keep();
        Ok(prepared)
    }

    fn prepare_claimed(&self, group: &GroupSpec) -> Result<Prepared, CoordinatorError> {
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
            .map(|vm| Arc::new(Mutex::new(SnapshotVm::pending(vm))))
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
                Err(err) => warn!(%id, %err, "held frames not all re-injected yet"),
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
            manifest.outcome = SnapshotOutcome::Aborted;
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
                %id,
                "the abort did not fully go through; its journal stays for the next start"
            );
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
    record: &Mutex<SnapshotVm>,
) {
    // From the VM's stop to its advance this thread is on the critical path: it must not wait
    // behind the busy QEMU threads of the other VMs.
    make_this_thread_realtime("a snapshot thread");
    let update = |f: &dyn Fn(&mut SnapshotVm)| f(&mut record.lock().expect("record lock"));
    let fail = |detail: String| {
        record.lock().expect("record lock").error = Some(detail);
        failed.store(true, Ordering::SeqCst);
    };
    let begin_ms = clock.now_ms();
    update(&|r| {
        r.timeline.begin_ms = Some(begin_ms);
        r.step = Step::Snapshotting;
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
    leave_realtime("a snapshot thread");
    let (seen_ms, paused_ms) = (
        clock.unix_ms(paused.seen_unix_us),
        clock.unix_ms(paused.hypervisor_unix_us.unwrap_or(paused.seen_unix_us)),
    );
    update(&|r| {
        r.timeline.pause_seen_ms = Some(seen_ms);
        r.timeline.paused_ms = Some(paused_ms.min(seen_ms));
        r.step = Step::Paused;
    });
    match advanced {
        Ok(advanced_ms) => update(&|r| {
            r.timeline.advanced_ms = Some(advanced_ms);
            r.step = Step::Advanced;
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
                r.step = Step::ImageComplete;
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
        r.step = Step::Resumed;
    });
}
