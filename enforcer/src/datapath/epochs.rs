//! The VM registry and the epoch rules, over an [`EpochStore`] (the pinned maps, or plain
//! tables in tests): epochs only move forward, a VM is registered once on one port, and each
//! group's minimum epoch (used for broadcast) is rewritten after its members so it may lag the
//! truth but never lead it (invariant 2 in docs/design.md). Pure rules: no I/O but the store's.
//! May call the model only.

use std::collections::BTreeMap;

use enforcer_common::{
    FLAG_DRAINING, FLAG_REMOTE, GroupState, MAX_GROUPS, MacKey, PortVm, VmEpoch,
};
use serde::{Deserialize, Serialize};

pub use super::store::EpochStore;
use crate::model::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum EpochError<E: std::error::Error + 'static> {
    #[error("no VM registered with MAC {0}")]
    UnknownVm(MacAddr),
    #[error("a VM with MAC {0} is already registered")]
    AlreadyRegistered(MacAddr),
    #[error("{0} is not a unicast address; a VM is registered under its own unicast MAC")]
    NotUnicast(MacAddr),
    #[error("port {0} is not attached (no counter slot)")]
    PortNotAttached(u32),
    #[error("no counter slot left for another VM")]
    NoFreeSlot,
    #[error("port {port} already carries VM {mac}")]
    PortTaken { port: u32, mac: MacAddr },
    #[error("epoch of {mac} cannot go backwards from {current} to {requested}")]
    Backwards {
        mac: MacAddr,
        current: u32,
        requested: u32,
    },
    #[error("group {0} is out of range: group ids go from 0 to {max}", max = MAX_GROUPS - 1)]
    BadGroup(u32),
    #[error("epoch of {mac} is already at the maximum")]
    Overflow { mac: MacAddr },
    #[error("no group {0}")]
    UnknownGroup(u32),
    #[error(
        "the view of {mac} cannot rise to {color}: above what the coordinator announced it may reach ({ceiling})"
    )]
    AboveCeiling {
        mac: MacAddr,
        color: u32,
        ceiling: u32,
    },
    #[error(transparent)]
    Store(E),
}

/// A registered VM as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    pub mac: MacAddr,
    pub group: u32,
    /// For a VM on another host: this host's view of its epoch (it may lag, never lead).
    pub epoch: u32,
    pub ifindex: u32,
    /// The VM runs on another host; `ifindex` is the overlay port its frames arrive on.
    #[serde(default)]
    pub remote: bool,
}

impl VmRecord {
    pub fn new(mac: MacKey, vm: VmEpoch) -> Self {
        Self {
            mac: mac.into(),
            group: vm.group,
            epoch: vm.epoch,
            ifindex: vm.ifindex,
            remote: vm.is_remote(),
        }
    }
}

/// A group as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupRecord {
    pub group: u32,
    pub members: u32,
    pub min_epoch: u32,
    pub max_epoch: u32,
}

pub fn list_vms<S: EpochStore>(store: &mut S) -> Result<Vec<VmRecord>, EpochError<S::Error>> {
    let mut vms: Vec<VmRecord> = store
        .vms()
        .map_err(EpochError::Store)?
        .into_iter()
        .map(|(m, v)| VmRecord::new(m, v))
        .collect();
    vms.sort_by_key(|vm| (vm.group, vm.mac));
    Ok(vms)
}

pub fn list_groups<S: EpochStore>(store: &mut S) -> Result<Vec<GroupRecord>, EpochError<S::Error>> {
    let mut groups: BTreeMap<u32, GroupRecord> = BTreeMap::new();
    for (_, vm) in store.vms().map_err(EpochError::Store)? {
        let g = groups.entry(vm.group).or_insert(GroupRecord {
            group: vm.group,
            members: 0,
            min_epoch: u32::MAX,
            max_epoch: 0,
        });
        g.members += 1;
        g.min_epoch = g.min_epoch.min(vm.epoch);
        g.max_epoch = g.max_epoch.max(vm.epoch);
    }
    Ok(groups.into_values().collect())
}

/// The VM registered under `mac`, or `UnknownVm`.
fn require_vm<S: EpochStore>(store: &mut S, mac: MacAddr) -> Result<VmEpoch, EpochError<S::Error>> {
    store
        .vm(&mac.key())
        .map_err(EpochError::Store)?
        .ok_or(EpochError::UnknownVm(mac))
}

pub fn get_vm<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
) -> Result<VmRecord, EpochError<S::Error>> {
    let vm = require_vm(store, mac)?;
    Ok(VmRecord::new(mac.key(), vm))
}

/// What any new registration must satisfy: a unicast MAC not registered yet, a group in
/// range, and a port no VM of this host claims.
fn check_new<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
    group: u32,
    ifindex: u32,
) -> Result<(), EpochError<S::Error>> {
    if !mac.is_unicast() {
        return Err(EpochError::NotUnicast(mac));
    }
    if group >= MAX_GROUPS {
        return Err(EpochError::BadGroup(group));
    }
    if store.vm(&mac.key()).map_err(EpochError::Store)?.is_some() {
        return Err(EpochError::AlreadyRegistered(mac));
    }
    if let Some(port) = store.port(ifindex).map_err(EpochError::Store)? {
        return Err(EpochError::PortTaken {
            port: ifindex,
            mac: port.mac.into(),
        });
    }
    Ok(())
}

/// Registers a VM on the port `ifindex`. Without an explicit epoch it joins at the group's
/// highest epoch (the snapshot the group is at), so its peers' frames are not Type-3 to it.
pub fn register<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
    group: u32,
    ifindex: u32,
    epoch: Option<u32>,
) -> Result<VmRecord, EpochError<S::Error>> {
    check_new(store, mac, group, ifindex)?;
    let epoch = match epoch {
        Some(epoch) => epoch,
        None => list_groups(store)?
            .iter()
            .find(|g| g.group == group)
            .map_or(0, |g| g.max_epoch),
    };
    let slot = store
        .port_slot(ifindex)
        .map_err(EpochError::Store)?
        .ok_or(EpochError::PortNotAttached(ifindex))?;
    let vm = VmEpoch {
        epoch,
        group,
        ifindex,
        slot,
        flags: 0,
        ceiling: 0,
    };
    // Port first: from the moment the VM's MAC is known, its port already claims it.
    store
        .put_port(
            ifindex,
            PortVm {
                mac: mac.key(),
                group,
                _pad: 0,
            },
        )
        .map_err(EpochError::Store)?;
    store.put_vm(mac.key(), vm).map_err(EpochError::Store)?;
    refresh_group(store, group, false)?;
    Ok(VmRecord::new(mac.key(), vm))
}

/// Registers this host's view of a VM that runs on another host, whose frames arrive on the
/// overlay port `ifindex` (shared by all remote VMs, so it is not claimed). The epoch is the
/// coordinator's: a value the VM's own host already has, so the view does not lead.
pub fn register_remote<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
    group: u32,
    ifindex: u32,
    epoch: u32,
) -> Result<VmRecord, EpochError<S::Error>> {
    check_new(store, mac, group, ifindex)?;
    if store
        .port_slot(ifindex)
        .map_err(EpochError::Store)?
        .is_none()
    {
        return Err(EpochError::PortNotAttached(ifindex));
    }
    let slot = store
        .alloc_remote_slot()
        .map_err(EpochError::Store)?
        .ok_or(EpochError::NoFreeSlot)?;
    let vm = VmEpoch {
        epoch,
        group,
        ifindex,
        slot,
        flags: FLAG_REMOTE,
        ceiling: epoch,
    };
    store.put_vm(mac.key(), vm).map_err(EpochError::Store)?;
    refresh_group(store, group, false)?;
    Ok(VmRecord::new(mac.key(), vm))
}

/// The coordinator announces that `group`'s members may now reach `epoch` (it is taking the
/// snapshot to it): every view of a member on another host may carry colors up to it
/// ([`VmEpoch::ceiling`], raised only). Frames of those VMs with a higher wire color are
/// forged and dropped by the datapath. Returns how many views were raised.
pub fn announce<S: EpochStore>(
    store: &mut S,
    group: u32,
    epoch: u32,
) -> Result<usize, EpochError<S::Error>> {
    if group >= MAX_GROUPS {
        return Err(EpochError::BadGroup(group));
    }
    let mut raised = 0;
    for (mac, mut vm) in store.vms().map_err(EpochError::Store)? {
        if vm.group != group || !vm.is_remote() || vm.ceiling >= epoch {
            continue;
        }
        vm.ceiling = epoch;
        store.put_vm(mac, vm).map_err(EpochError::Store)?;
        raised += 1;
    }
    Ok(raised)
}

pub fn unregister<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
) -> Result<VmRecord, EpochError<S::Error>> {
    let vm = require_vm(store, mac)?;
    store.remove_vm(&mac.key()).map_err(EpochError::Store)?;
    if vm.is_remote() {
        store.free_remote_slot(vm.slot).map_err(EpochError::Store)?;
    } else {
        store.remove_port(vm.ifindex).map_err(EpochError::Store)?;
    }
    refresh_group(store, vm.group, false)?;
    Ok(VmRecord::new(mac.key(), vm))
}

/// What an epoch change did, for the buffer daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochChange {
    pub vm: VmEpoch,
    pub changed: bool,
    /// The group's minimum epoch after the change, and whether it rose.
    pub group_min: u32,
    pub group_min_rose: bool,
}

/// Sets a VM's epoch. Equal is a no-op; lower is refused (an epoch never moves backwards).
/// With `drain`, the VM (and its group, if its minimum rises) is flagged draining in the same
/// map write, so frames to it queue behind the held ones until the buffer daemon clears it.
pub fn set_epoch<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
    epoch: u32,
    drain: bool,
) -> Result<EpochChange, EpochError<S::Error>> {
    let vm = require_vm(store, mac)?;
    if epoch < vm.epoch {
        return Err(EpochError::Backwards {
            mac,
            current: vm.epoch,
            requested: epoch,
        });
    }
    write_epoch(store, mac, vm, epoch, drain)
}

fn write_epoch<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
    mut vm: VmEpoch,
    epoch: u32,
    drain: bool,
) -> Result<EpochChange, EpochError<S::Error>> {
    let before = store
        .group(vm.group)
        .map_err(EpochError::Store)?
        .map_or(0, |g| g.min_epoch);
    if epoch == vm.epoch {
        return Ok(EpochChange {
            vm,
            changed: false,
            group_min: before,
            group_min_rose: false,
        });
    }
    vm.epoch = epoch;
    if drain {
        vm.flags |= FLAG_DRAINING;
    }
    store.put_vm(mac.key(), vm).map_err(EpochError::Store)?;
    // After the member: the group minimum is never ahead of any member.
    let after = refresh_group(store, vm.group, drain)?;
    Ok(EpochChange {
        vm,
        changed: true,
        group_min: after,
        group_min_rose: after > before,
    })
}

/// Moves a VM to the next epoch.
pub fn advance<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
    drain: bool,
) -> Result<EpochChange, EpochError<S::Error>> {
    let current = get_vm(store, mac)?.epoch;
    let next = current.checked_add(1).ok_or(EpochError::Overflow { mac })?;
    set_epoch(store, mac, next, drain)
}

/// Aborting a snapshot: every member of `group` above `epoch` goes back to it (the only way an
/// epoch moves backwards). With `drain` every member and the group are flagged draining, so
/// frames sent from now on queue behind the held ones being released. Returns the members
/// whose epoch changed.
pub fn roll_back<S: EpochStore>(
    store: &mut S,
    group: u32,
    epoch: u32,
    drain: bool,
) -> Result<Vec<(MacAddr, VmEpoch)>, EpochError<S::Error>> {
    let mut changed = Vec::new();
    for (mac, mut vm) in store.vms().map_err(EpochError::Store)? {
        if vm.group != group {
            continue;
        }
        // A view of a VM on another host is left where it is: only that VM's own host moves
        // it, and across hosts epochs only go forward (see multihost/hosts.rs). It still drains.
        let rolled = !vm.is_remote() && vm.epoch > epoch;
        if rolled {
            vm.epoch = epoch;
        }
        if drain {
            vm.flags |= FLAG_DRAINING;
        }
        if rolled || drain {
            store.put_vm(mac, vm).map_err(EpochError::Store)?;
        }
        if rolled {
            changed.push((mac.into(), vm));
        }
    }
    refresh_group(store, group, false)?;
    // Counted after the epochs went back (see `GroupState::aborts`): held frames classified
    // before carry the older count and are ordinary now.
    if let Some(mut g) = store.group(group).map_err(EpochError::Store)? {
        if drain {
            g.flags |= FLAG_DRAINING;
        }
        g.aborts = g.aborts.wrapping_add(1);
        store.put_group(group, g).map_err(EpochError::Store)?;
    }
    Ok(changed)
}

/// Flags a VM draining without changing its epoch: every Type-1/2 frame to it is held for
/// order from now on (a VM shut just before its cut, `agent::channel`), until the buffer
/// daemon clears it after draining the VM's queue.
pub fn flag_vm_draining<S: EpochStore>(
    store: &mut S,
    mac: MacAddr,
) -> Result<(), EpochError<S::Error>> {
    let mut vm = require_vm(store, mac)?;
    if !vm.is_draining() {
        vm.flags |= FLAG_DRAINING;
        store.put_vm(mac.key(), vm).map_err(EpochError::Store)?;
    }
    Ok(())
}

/// Clears the draining flag of a VM (the buffer daemon re-injected everything held for it).
pub fn clear_vm_draining<S: EpochStore>(
    store: &mut S,
    mac: &MacKey,
) -> Result<(), EpochError<S::Error>> {
    if let Some(mut vm) = store.vm(mac).map_err(EpochError::Store)?
        && vm.is_draining()
    {
        vm.flags &= !FLAG_DRAINING;
        store.put_vm(*mac, vm).map_err(EpochError::Store)?;
    }
    Ok(())
}

/// Clears the draining flag of a group.
pub fn clear_group_draining<S: EpochStore>(
    store: &mut S,
    group: u32,
) -> Result<(), EpochError<S::Error>> {
    if let Some(mut g) = store.group(group).map_err(EpochError::Store)?
        && g.is_draining()
    {
        g.flags &= !FLAG_DRAINING;
        store.put_group(group, g).map_err(EpochError::Store)?;
    }
    Ok(())
}

/// Rewrites a group's entry from its members; keeps its draining flag, and sets it when
/// `drain` and the minimum moved. Returns the new minimum.
fn refresh_group<S: EpochStore>(
    store: &mut S,
    group: u32,
    drain: bool,
) -> Result<u32, EpochError<S::Error>> {
    let old = store.group(group).map_err(EpochError::Store)?;
    match list_groups(store)?.into_iter().find(|g| g.group == group) {
        Some(g) => {
            let mut flags = old.map_or(0, |o| o.flags);
            if drain && old.is_some_and(|o| o.min_epoch != g.min_epoch) {
                flags |= FLAG_DRAINING;
            }
            let state = GroupState {
                min_epoch: g.min_epoch,
                members: g.members,
                flags,
                aborts: old.map_or(0, |o| o.aborts),
            };
            store.put_group(group, state).map_err(EpochError::Store)?;
            Ok(g.min_epoch)
        }
        None => {
            store.remove_group(group).map_err(EpochError::Store)?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::memory::MemoryStore;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn epochs_only_move_forward() {
        let mut s = MemoryStore::with_ports(&[11]);
        register(&mut s, mac(1), 7, 11, None).unwrap();
        assert_eq!(advance(&mut s, mac(1), false).unwrap().vm.epoch, 1);
        assert!(
            !set_epoch(&mut s, mac(1), 1, false).unwrap().changed,
            "equal is a no-op"
        );
        let err = set_epoch(&mut s, mac(1), 0, false).unwrap_err();
        assert!(
            matches!(
                err,
                EpochError::Backwards {
                    current: 1,
                    requested: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            s.vms[&mac(1).key()].epoch,
            1,
            "a refused update changes nothing"
        );
        set_epoch(&mut s, mac(1), u32::MAX, false).unwrap();
        assert!(matches!(
            advance(&mut s, mac(1), false),
            Err(EpochError::Overflow { .. })
        ));
    }

    #[test]
    fn group_minimum_tracks_the_slowest_member() {
        let mut s = MemoryStore::with_ports(&[11, 12, 13, 99]);
        for n in 1..=3 {
            register(&mut s, mac(n), 7, 10 + n as u32, Some(0)).unwrap();
        }
        register(&mut s, mac(9), 8, 99, Some(0)).unwrap();
        assert_eq!(
            s.groups[&7],
            GroupState {
                min_epoch: 0,
                members: 3,
                flags: 0,
                aborts: 0
            }
        );
        advance(&mut s, mac(1), false).unwrap();
        assert!(!advance(&mut s, mac(3), false).unwrap().group_min_rose);
        assert_eq!(s.groups[&7].min_epoch, 0, "mac(2) is still at 0");
        let change = advance(&mut s, mac(2), false).unwrap();
        assert!(change.group_min_rose && change.group_min == 1);
        assert_eq!(s.groups[&7].min_epoch, 1);
        assert_eq!(s.groups[&8].min_epoch, 0, "other groups are untouched");
        unregister(&mut s, mac(9)).unwrap();
        assert!(!s.groups.contains_key(&8), "an empty group is removed");
        assert!(!s.ports.contains_key(&99));
    }

    #[test]
    fn a_vm_shut_before_its_cut_is_flagged_draining_at_its_epoch() {
        let mut s = MemoryStore::with_ports(&[11, 12]);
        register(&mut s, mac(1), 7, 11, Some(3)).unwrap();
        register(&mut s, mac(2), 7, 12, Some(3)).unwrap();
        flag_vm_draining(&mut s, mac(1)).unwrap();
        assert_eq!(s.vms[&mac(1).key()].flags, FLAG_DRAINING);
        assert_eq!(s.vms[&mac(1).key()].epoch, 3, "the epoch stays");
        assert_eq!(s.vms[&mac(2).key()].flags, 0, "only that VM");
        assert_eq!(s.groups[&7].flags, 0, "nor its group");
        // Its advance keeps the flag; the buffer clears it once drained.
        advance(&mut s, mac(1), true).unwrap();
        assert_eq!(s.vms[&mac(1).key()].flags, FLAG_DRAINING);
        assert!(matches!(
            flag_vm_draining(&mut s, mac(5)),
            Err(EpochError::UnknownVm(_))
        ));
    }

    #[test]
    fn draining_flags_are_set_with_the_epoch_and_cleared_alone() {
        let mut s = MemoryStore::with_ports(&[11, 12]);
        register(&mut s, mac(1), 7, 11, Some(0)).unwrap();
        register(&mut s, mac(2), 7, 12, Some(0)).unwrap();
        advance(&mut s, mac(1), true).unwrap();
        assert_eq!(s.vms[&mac(1).key()].flags, FLAG_DRAINING);
        assert_eq!(s.groups[&7].flags, 0, "the minimum did not move");
        advance(&mut s, mac(2), true).unwrap();
        assert_eq!(s.groups[&7].flags, FLAG_DRAINING, "the minimum moved");
        clear_vm_draining(&mut s, &mac(1).key()).unwrap();
        assert_eq!(s.vms[&mac(1).key()].flags, 0);
        assert_eq!(
            s.vms[&mac(1).key()].epoch,
            1,
            "clearing the flag keeps the epoch"
        );
        // A later refresh keeps the group's flag until it is cleared.
        advance(&mut s, mac(1), false).unwrap();
        assert_eq!(s.groups[&7].flags, FLAG_DRAINING);
        clear_group_draining(&mut s, 7).unwrap();
        assert_eq!(s.groups[&7].flags, 0);
        // Abort: back to 1 for everyone above it.
        let changed = roll_back(&mut s, 7, 1, true).unwrap();
        assert_eq!(changed.len(), 1);
        assert_eq!(s.vms[&mac(1).key()].epoch, 1);
        assert_eq!(s.vms[&mac(1).key()].flags, FLAG_DRAINING);
    }

    #[test]
    fn registration_rules() {
        let mut s = MemoryStore::with_ports(&[11, 12, 13]);
        assert!(matches!(
            register(&mut s, mac(1), 7, 50, None),
            Err(EpochError::PortNotAttached(50))
        ));
        let vm = register(&mut s, mac(1), 7, 11, Some(4)).unwrap();
        assert_eq!(
            s.vms[&vm.mac.key()].slot,
            1,
            "the VM carries its port's counter slot"
        );
        assert!(matches!(
            register(&mut s, mac(1), 7, 12, None),
            Err(EpochError::AlreadyRegistered(_))
        ));
        assert!(matches!(
            register(&mut s, mac(2), 7, 11, None),
            Err(EpochError::PortTaken { port: 11, .. })
        ));
        let bcast = MacAddr([0xff; 6]);
        assert!(matches!(
            register(&mut s, bcast, 7, 12, None),
            Err(EpochError::NotUnicast(_))
        ));
        // A new member joins at the group's current epoch, not 0.
        assert_eq!(register(&mut s, mac(2), 7, 12, None).unwrap().epoch, 4);
        assert_eq!(register(&mut s, mac(3), 9, 13, None).unwrap().epoch, 0);
        assert!(matches!(
            set_epoch(&mut s, mac(50), 1, false),
            Err(EpochError::UnknownVm(_))
        ));
        assert!(matches!(
            register(&mut s, mac(4), MAX_GROUPS, 13, None),
            Err(EpochError::BadGroup(_))
        ));
        assert!(matches!(
            unregister(&mut s, mac(50)),
            Err(EpochError::UnknownVm(_))
        ));
    }
}
