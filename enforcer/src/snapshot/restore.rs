//! Restoring a committed group snapshot: every VM back paused (all in parallel), every VM
//! registered in the datapath at the snapshot's epoch, and only then every VM resumed at once
//! (one thread each, released together). All or nothing: if one VM cannot be restored, the
//! ones restored are destroyed.
//!
//! Nothing changes before every VM is checked absent or shut off. A journal
//! (`<store>/restores/<id>.json`) lives from then until the restore ended, saying whether the
//! resumes began: a coordinator that died meanwhile left VMs restored and paused, and the next
//! one finishes what it can — before the resumes, the restored VMs are destroyed (all or
//! nothing: back to none running, as before the restore); once they began, every VM still
//! paused is resumed (all were registered at the snapshot's epoch first).

use std::{fs, path::PathBuf, sync::Barrier, thread, time::Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::hold::Replayed;

use super::{
    backends::{DomainState, EpochControl, HvError, HvErrorKind, Hypervisor},
    channel,
    coordinator::{Coordinator, CoordinatorError, GroupError},
    manifest::{RestoreReport, RestoredVm, SnapshotOutcome},
    private::{private_dir, remove_durably},
    store::write_atomically,
};

/// A restore in progress (`<store>/restores/<id>.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct RestoreJournal {
    pub(crate) id: SnapshotId,
    pub(crate) vms: Vec<VmSpec>,
    /// Every VM was restored and registered, and the resumes began.
    pub(crate) resuming: bool,
}
use crate::{
    model::{IfName, SnapshotId, VmSpec},
    sched::Realtime,
};

impl<H: Hypervisor + ?Sized + 'static, E: EpochControl + ?Sized + 'static> Coordinator<H, E> {
    /// Restores every VM of a committed snapshot together, optionally onto `bridge`, its
    /// channel state replayed.
    pub fn restore(
        &self,
        id: &SnapshotId,
        bridge: Option<&IfName>,
    ) -> Result<RestoreReport, CoordinatorError> {
        self.restore_with(id, bridge, true)
    }

    /// [`Coordinator::restore`]; `replay`: false leaves the channel state out (the restored
    /// group loses the frames in flight at the cut, as without recording).
    pub fn restore_with(
        &self,
        id: &SnapshotId,
        bridge: Option<&IfName>,
        replay: bool,
    ) -> Result<RestoreReport, CoordinatorError> {
        let m = self.get(id)?;
        if m.outcome != SnapshotOutcome::Committed {
            return Err(CoordinatorError::NotRestorable {
                id: id.clone(),
                outcome: m.outcome,
            });
        }
        let _claim = self.claim(&m.group.name, &format!("restoring {id}"))?;
        if let Some(other) = self
            .groups()
            .into_iter()
            .find(|g| g.id == m.group.id && g.name != m.group.name)
        {
            return Err(GroupError::IdNowBelongsTo {
                id: m.group.id,
                group: other.name,
            }
            .into());
        }
        // Before anything changes: no VM of the group may be there (running, or paused).
        for rec in &m.vms {
            let state = self.hypervisor.state(&rec.name)?;
            if !matches!(state, DomainState::Absent | DomainState::ShutOff) {
                return Err(HvError::new(
                    &rec.name,
                    HvErrorKind::Running,
                    format!(
                        "a domain of that name is there ({state:?}): destroy it before restoring"
                    ),
                )
                .into());
            }
        }
        let mut journal = RestoreJournal {
            id: id.clone(),
            vms: m
                .vms
                .iter()
                .map(|r| VmSpec {
                    name: r.name.clone(),
                    mac: r.mac,
                })
                .collect(),
            resuming: false,
        };
        let journal_path = self.restore_journal_path(id)?;
        write_atomically(&journal_path, &journal)?;
        let undo_failed = std::cell::Cell::new(false);
        let result = self.restore_journaled(
            &m,
            bridge,
            replay,
            &mut journal,
            &journal_path,
            &undo_failed,
        );
        if result.is_err() && undo_failed.get() {
            // Something restored could not be destroyed: the next start tries again.
            warn!(%id, "undoing the failed restore did not go through; its journal stays");
        } else if let Err(err) = remove_durably(&journal_path) {
            warn!(%id, %err, "removing the restore's journal");
        }
        result
    }

    fn restore_journal_path(&self, id: &SnapshotId) -> Result<PathBuf, CoordinatorError> {
        let dir = self.store.join("restores");
        private_dir(&dir).map_err(|source| CoordinatorError::Store {
            path: dir.clone(),
            source,
        })?;
        Ok(dir.join(format!("{id}.json")))
    }

    fn restore_journaled(
        &self,
        m: &super::manifest::Manifest,
        bridge: Option<&IfName>,
        replay: bool,
        journal: &mut RestoreJournal,
        journal_path: &std::path::Path,
        undo_failed: &std::cell::Cell<bool>,
    ) -> Result<RestoreReport, CoordinatorError> {
        let id = &m.id;
        let t0 = Instant::now();
        let ms = || t0.elapsed().as_secs_f64() * 1000.0;
        let spec = |r: &RestoredVm| VmSpec {
            name: r.name.clone(),
            mac: r.mac,
        };
        // Nothing restored stays: no domain, and no registration pointing at its dead port.
        let undo = |restored: &[RestoredVm]| {
            for r in restored {
                if let Err(e) = self.hypervisor.destroy(&spec(r))
                    && e.kind != HvErrorKind::NoSuchDomain
                {
                    warn!(vm = r.name, %e, "destroying a VM of a failed restore");
                    undo_failed.set(true);
                }
                let _ = self.epochs.unregister(&spec(r));
            }
        };
        // Every VM brought back paused, in parallel: the slowest image sets the time.
        let results = each_in_parallel(
            &m.vms,
            |rec| &rec.name,
            |rec| {
                let vm = VmSpec {
                    name: rec.name.clone(),
                    mac: rec.mac,
                };
                let port = self.hypervisor.restore_paused(&vm, &rec.images, bridge)?;
                Ok(RestoredVm {
                    name: vm.name,
                    mac: vm.mac,
                    port,
                    restored_ms: ms(),
                    resumed_ms: 0.0,
                    replayed: None,
                    replay_error: None,
                })
            },
        );
        let mut restored: Vec<RestoredVm> = Vec::new();
        let mut failed = None;
        for r in results {
            match r {
                Ok(r) => restored.push(r),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            undo(&restored);
            return Err(e.into());
        }
        // Every VM at the snapshot's epoch before any of them runs.
        for r in &restored {
            if let Err(e) = self
                .epochs
                .register(&spec(r), m.group.id, &r.port, Some(m.epoch))
            {
                undo(&restored);
                return Err(CoordinatorError::epochs(&r.name, e));
            }
        }
        // The frames in flight at the cut (invariant 7), in front of each receiver before any
        // VM runs, so no restored sender's new frame can overtake them.
        if replay && m.channel_state.as_ref().is_some_and(|c| c.recorded) {
            let dir = self.store.join(id);
            for r in &mut restored {
                let replayed = channel::load(&dir, &r.name)
                    .map_err(|e| format!("reading {}: {e}", channel::path(&dir, &r.name).display()))
                    .and_then(|frames| {
                        if frames.is_empty() {
                            return Ok(Replayed::default());
                        }
                        self.epochs
                            .replay(&spec(r), &r.port, &frames)
                            .map_err(|e| e.to_string())
                    });
                match replayed {
                    Ok(Replayed { sent, dropped }) => {
                        r.replayed = Some(sent);
                        if dropped > 0 {
                            r.replay_error =
                                Some(format!("its port dropped {dropped} frames meanwhile"));
                        }
                    }
                    Err(why) => {
                        warn!(vm = r.name, %why, "channel state not replayed");
                        r.replay_error = Some(why);
                    }
                }
            }
        }
        // From here on a VM may run: a coordinator that dies now leaves the rest to resume.
        journal.resuming = true;
        if let Err(e) = write_atomically(journal_path, &*journal) {
            undo(&restored);
            return Err(e);
        }
        // All resumed at once: each VM's thread waits for the others, then calls.
        let start = Barrier::new(restored.len());
        let resumed = each_in_parallel(
            &restored,
            |r| &r.name,
            |r| {
                let _realtime = Realtime::enter("a restore thread");
                start.wait();
                self.hypervisor.resume(&spec(r)).map(|()| ms())
            },
        );
        for (r, at) in restored.iter_mut().zip(resumed) {
            match at {
                Ok(at) => r.resumed_ms = at,
                Err(e) => {
                    // Back to undoing: a coordinator that dies from here destroys, not resumes.
                    journal.resuming = false;
                    if write_atomically(journal_path, &*journal).is_err() {
                        undo_failed.set(true);
                    }
                    undo(&restored);
                    return Err(e.into());
                }
            }
        }
        let first = restored
            .iter()
            .map(|r| r.resumed_ms)
            .fold(f64::MAX, f64::min);
        let last = restored.iter().map(|r| r.resumed_ms).fold(0.0, f64::max);
        info!(%id, vms = restored.len(), "group restored");
        Ok(RestoreReport {
            snapshot: id.clone(),
            group: m.group.name.clone(),
            epoch: m.epoch,
            vms: restored,
            resume_spread_ms: last - first,
        })
    }
}

impl<H: Hypervisor + ?Sized + 'static, E: EpochControl + ?Sized + 'static> Coordinator<H, E> {
    /// Finishes the restores a previous coordinator left (see the module's header). A journal
    /// stays while a VM of it cannot be looked at or handled, for the next start.
    pub(crate) fn recover_restores(&self) {
        let Ok(entries) = fs::read_dir(self.store.join("restores")) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            let journal: RestoreJournal = match fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                Some(j) => j,
                None => {
                    warn!(path = %path.display(), "unreadable restore journal; removing it");
                    let _ = remove_durably(&path);
                    continue;
                }
            };
            warn!(
                id = %journal.id,
                resuming = journal.resuming,
                "finishing a restore left unfinished by a previous coordinator"
            );
            let mut clean = true;
            for vm in &journal.vms {
                let done = match self.hypervisor.state(&vm.name) {
                    Ok(DomainState::Paused) if journal.resuming => self.hypervisor.resume(vm),
                    // Before the resumes (or undoing them): whatever of the group is there was
                    // restored by it (the restore began with none there).
                    Ok(DomainState::Paused | DomainState::Running) if !journal.resuming => {
                        self.hypervisor.destroy(vm).and_then(|()| {
                            self.epochs
                                .unregister(vm)
                                .map_err(|e| HvError::failed(&vm.name, e.to_string()))
                        })
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(err) = done {
                    warn!(vm = vm.name, %err, "finishing an unfinished restore");
                    clean = false;
                }
            }
            if clean && let Err(err) = remove_durably(&path) {
                warn!(%err, path = %path.display(), "removing a finished restore's journal");
            }
        }
    }
}

/// `step` for every VM of `vms` at once, a thread each; a thread that panics is that VM's
/// failure. Results in the order of `vms`.
fn each_in_parallel<V: Sync, R: Send>(
    vms: &[V],
    name: impl Fn(&V) -> &str,
    step: impl Fn(&V) -> Result<R, HvError> + Sync,
) -> Vec<Result<R, HvError>> {
    thread::scope(|scope| {
        let step = &step;
        let threads: Vec<_> = vms.iter().map(|v| scope.spawn(move || step(v))).collect();
        threads
            .into_iter()
            .zip(vms)
            .map(|(t, v)| {
                t.join()
                    .unwrap_or_else(|_| Err(HvError::failed(name(v), "its thread panicked")))
            })
            .collect()
    })
}
