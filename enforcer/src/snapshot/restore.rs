//! Restoring a committed group snapshot: every VM back paused (all in parallel), every VM
//! registered in the datapath at the snapshot's epoch, and only then every VM resumed at once
//! (one thread each, released together). All or nothing: if one VM cannot be restored, the
//! ones restored are destroyed.

use std::{sync::Barrier, thread, time::Instant};

use tracing::info;

use super::{
    backends::{EpochControl, HvError, Hypervisor},
    coordinator::{Coordinator, CoordinatorError, GroupError},
    manifest::{RestoreReport, RestoredVm, SnapshotOutcome},
};
use crate::{
    model::{IfName, SnapshotId, VmSpec},
    sched::Realtime,
};

impl<H: Hypervisor + ?Sized + 'static, E: EpochControl + ?Sized + 'static> Coordinator<H, E> {
    /// Restores every VM of a committed snapshot together, optionally onto `bridge`.
    pub fn restore(
        &self,
        id: &SnapshotId,
        bridge: Option<&IfName>,
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
        let t0 = Instant::now();
        let ms = || t0.elapsed().as_secs_f64() * 1000.0;
        let spec = |r: &RestoredVm| VmSpec {
            name: r.name.clone(),
            mac: r.mac,
        };
        // Nothing restored stays: no domain, and no registration pointing at its dead port.
        let undo = |restored: &[RestoredVm]| {
            for r in restored {
                let _ = self.hypervisor.destroy(&spec(r));
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
