//! Restoring a committed group snapshot: every VM back paused, every VM registered in the
//! datapath at the snapshot's epoch, and only then every VM resumed, one right after another.
//! All or nothing: if one VM cannot be restored, the ones already restored are destroyed.

use std::time::Instant;

use tracing::info;

use super::{
    backends::{EpochControl, Hypervisor},
    coordinator::{Coordinator, CoordinatorError, GroupError},
    manifest::{RestoreReport, RestoredVm, SnapshotOutcome},
};
use crate::model::{IfName, SnapshotId, VmSpec};

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
        let mut restored: Vec<RestoredVm> = Vec::new();
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
        for rec in &m.vms {
            let vm = VmSpec {
                name: rec.name.clone(),
                mac: rec.mac,
            };
            let port = match self.hypervisor.restore_paused(&vm, &rec.images, bridge) {
                Ok(port) => port,
                Err(e) => {
                    undo(&restored);
                    return Err(e.into());
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
            if let Err(e) = self
                .epochs
                .register(&spec(r), m.group.id, &r.port, Some(m.epoch))
            {
                undo(&restored);
                return Err(CoordinatorError::epochs(&r.name, e));
            }
        }
        for i in 0..restored.len() {
            if let Err(e) = self.hypervisor.resume(&spec(&restored[i])) {
                undo(&restored);
                return Err(e.into());
            }
            restored[i].resumed_ms = ms();
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
