//! The one way an epoch changes, whoever changes it: the API (`PUT /v1/vms/{mac}/epoch`,
//! `advance`, `abort`), the snapshot transaction at a VM's stop, and colors learned from frames
//! of VMs on other hosts. The order is what keeps held frames from being released early
//! (invariants 1 and 4 in docs/design.md):
//!
//! 1. the buffer's copy of the VM first ([`Notice::Vm`]), so the colors it gives held frames
//!    are never below the datapath's;
//! 2. then the map, with the new epoch and the draining flag in one write, so newer frames to
//!    the VM queue behind the held ones;
//! 3. then the release ([`Notice::Advanced`], [`Notice::GroupAdvanced`]).
//!
//! A failed map write tells the buffer the VM's entry as it still is (for a view of a VM on
//! another host the buffer keeps the higher of the two: views only rise, and holding longer is
//! the safe side). Pure orchestration over an [`EpochStore`] and a [`BufferLink`]; may call the
//! datapath's epoch rules and the buffer's protocol only.

use enforcer_common::VmEpoch;
use tracing::info;

use super::protocol::Notice;
use crate::{
    datapath::epochs::{self, EpochError, EpochStore, VmRecord},
    model::MacAddr,
};

/// Where epoch notices go: the buffer thread's channel (the agent), or the buffer's own state
/// (the buffer thread, applying a color it learned).
pub trait BufferLink {
    /// Whether a buffer runs (without one nothing is held, so nothing drains).
    fn running(&self) -> bool;
    /// Hands the buffer a notice; false when no buffer runs.
    fn tell(&mut self, notice: Notice) -> bool;
}

/// What [`change_epoch`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    pub vm: VmRecord,
    /// False when the epoch was there already (or higher, with `raise_only`).
    pub changed: bool,
}

/// Moves a VM's epoch to `target`, or to the next one (`None`). A view of a VM on another host
/// never rises above what the coordinator announced that VM may reach
/// ([`EpochError::AboveCeiling`]), whoever asks: a frame's color or a raw change. Lower than the current epoch is
/// refused ([`EpochError::Backwards`]), unless `raise_only`, which leaves it as it is (how views
/// of VMs on other hosts are raised: they may have learned the epoch already).
pub fn change_epoch<S: EpochStore>(
    store: &mut S,
    buffer: &mut impl BufferLink,
    mac: MacAddr,
    target: Option<u32>,
    raise_only: bool,
) -> Result<Changed, EpochError<S::Error>> {
    let current: VmEpoch = store
        .vm(&mac.key())
        .map_err(EpochError::Store)?
        .ok_or(EpochError::UnknownVm(mac))?;
    let unchanged = || Changed {
        vm: VmRecord::new(mac.key(), current),
        changed: false,
    };
    if raise_only && target.is_some_and(|t| t <= current.epoch) {
        return Ok(unchanged());
    }
    let epoch = match target {
        Some(epoch) => epoch,
        None => current
            .epoch
            .checked_add(1)
            .ok_or(EpochError::Overflow { mac })?,
    };
    if epoch < current.epoch {
        return Err(EpochError::Backwards {
            mac,
            current: current.epoch,
            requested: epoch,
        });
    }
    // A view never goes past what the coordinator announced its VM may reach, whoever asks:
    // a frame's color, or a raw change through the API.
    if !current.may_carry(epoch) {
        return Err(EpochError::AboveCeiling {
            mac,
            color: epoch,
            ceiling: current.ceiling,
        });
    }
    let drain = buffer.tell(Notice::Vm {
        mac: mac.key(),
        vm: Some(VmEpoch { epoch, ..current }),
    });
    let change = match epochs::set_epoch(store, mac, epoch, drain) {
        Ok(change) => change,
        Err(err) => {
            buffer.tell(Notice::Vm {
                mac: mac.key(),
                vm: Some(current),
            });
            return Err(err);
        }
    };
    if change.changed {
        buffer.tell(Notice::Advanced {
            mac: mac.key(),
            epoch,
        });
        if change.group_min_rose {
            buffer.tell(Notice::GroupAdvanced {
                group: change.vm.group,
                min_epoch: change.group_min,
            });
        }
        info!(%mac, epoch, "epoch set");
    }
    Ok(Changed {
        vm: VmRecord::new(mac.key(), change.vm),
        changed: change.changed,
    })
}

/// Aborting a snapshot on this host: every local member of `group` above `epoch` goes back to
/// it, and everything held for the group is delivered. [`EpochError::UnknownGroup`] when the
/// group has no member here.
pub fn roll_back<S: EpochStore>(
    store: &mut S,
    buffer: &mut impl BufferLink,
    group: u32,
    epoch: u32,
) -> Result<Vec<VmRecord>, EpochError<S::Error>> {
    if !epochs::list_groups(store)?.iter().any(|g| g.group == group) {
        return Err(EpochError::UnknownGroup(group));
    }
    let drain = buffer.running();
    for (mac, vm) in store.vms().map_err(EpochError::Store)? {
        if vm.group == group && vm.epoch > epoch {
            buffer.tell(Notice::Vm {
                mac,
                vm: Some(VmEpoch { epoch, ..vm }),
            });
        }
    }
    let changed = epochs::roll_back(store, group, epoch, drain)?;
    let aborts = store
        .group(group)
        .map_err(EpochError::Store)?
        .map_or(0, |g| g.aborts);
    buffer.tell(Notice::Release { group, aborts });
    info!(
        group,
        epoch,
        rolled_back = changed.len(),
        "snapshot aborted"
    );
    Ok(changed
        .into_iter()
        .map(|(mac, vm)| VmRecord::new(mac.key(), vm))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::memory::MemoryStore;

    /// A buffer that records what it was told, in order.
    #[derive(Default)]
    struct Recorder {
        running: bool,
        told: Vec<Notice>,
    }

    impl BufferLink for Recorder {
        fn running(&self) -> bool {
            self.running
        }
        fn tell(&mut self, notice: Notice) -> bool {
            self.told.push(notice);
            self.running
        }
    }

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn the_buffer_hears_the_new_copy_before_the_map_and_the_release_after() {
        let mut s = MemoryStore::with_ports(&[11, 12]);
        epochs::register(&mut s, mac(1), 7, 11, Some(0)).unwrap();
        epochs::register(&mut s, mac(2), 7, 12, Some(0)).unwrap();
        let mut b = Recorder {
            running: true,
            ..Recorder::default()
        };
        let c = change_epoch(&mut s, &mut b, mac(1), None, false).unwrap();
        assert_eq!((c.vm.epoch, c.changed), (1, true));
        assert!(matches!(
            b.told[..],
            [
                Notice::Vm {
                    vm: Some(VmEpoch { epoch: 1, .. }),
                    ..
                },
                Notice::Advanced { epoch: 1, .. }
            ]
        ));
        assert!(
            s.vms[&mac(1).key()].is_draining(),
            "flagged in the same write"
        );
        // The second member moves the group's minimum: the group is released too.
        b.told.clear();
        change_epoch(&mut s, &mut b, mac(2), Some(1), false).unwrap();
        assert!(matches!(
            b.told[..],
            [
                Notice::Vm { .. },
                Notice::Advanced { .. },
                Notice::GroupAdvanced {
                    group: 7,
                    min_epoch: 1
                }
            ]
        ));
    }

    #[test]
    fn refusals_take_the_copy_back_and_raise_only_changes_nothing() {
        let mut s = MemoryStore::with_ports(&[11]);
        epochs::register(&mut s, mac(1), 7, 11, Some(3)).unwrap();
        let mut b = Recorder {
            running: true,
            ..Recorder::default()
        };
        assert!(matches!(
            change_epoch(&mut s, &mut b, mac(1), Some(2), false),
            Err(EpochError::Backwards {
                current: 3,
                requested: 2,
                ..
            })
        ));
        assert!(b.told.is_empty(), "refused before the buffer heard of it");
        let c = change_epoch(&mut s, &mut b, mac(1), Some(2), true).unwrap();
        assert_eq!((c.vm.epoch, c.changed), (3, false));
        assert!(b.told.is_empty());
        assert!(matches!(
            change_epoch(&mut s, &mut b, mac(9), None, false),
            Err(EpochError::UnknownVm(_))
        ));
        // Without a buffer nothing drains.
        let mut none = Recorder::default();
        change_epoch(&mut s, &mut none, mac(1), None, false).unwrap();
        assert!(!s.vms[&mac(1).key()].is_draining());
    }

    #[test]
    fn an_abort_goes_back_and_releases_the_group() {
        let mut s = MemoryStore::with_ports(&[11, 12]);
        epochs::register(&mut s, mac(1), 7, 11, Some(1)).unwrap();
        epochs::register(&mut s, mac(2), 7, 12, Some(0)).unwrap();
        let mut b = Recorder {
            running: true,
            ..Recorder::default()
        };
        let back = roll_back(&mut s, &mut b, 7, 0).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(s.vms[&mac(1).key()].epoch, 0);
        assert_eq!(
            b.told.last(),
            Some(&Notice::Release {
                group: 7,
                aborts: 1
            })
        );
        assert!(matches!(
            roll_back(&mut s, &mut b, 8, 0),
            Err(EpochError::UnknownGroup(8))
        ));
    }
}
