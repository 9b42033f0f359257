//! Named groups: defining one over running domains (each VM registered in the datapath under
//! the group's id, all or none), finding one, removing one. Kept in `groups.json`.

use tracing::info;

use super::{
    backends::{EpochControl, Hypervisor},
    coordinator::{Coordinator, CoordinatorError, GroupError},
    store::write_atomically,
};
use crate::model::{GroupName, GroupSpec, VmSpec};

impl<H: Hypervisor + ?Sized + 'static, E: EpochControl + ?Sized + 'static> Coordinator<H, E> {
    pub fn groups(&self) -> Vec<GroupSpec> {
        self.groups.lock().expect("groups lock").clone()
    }

    pub fn group(&self, name: &GroupName) -> Result<GroupSpec, CoordinatorError> {
        self.groups()
            .into_iter()
            .find(|g| g.name == *name)
            .ok_or_else(|| CoordinatorError::UnknownGroup(name.clone()))
    }

    fn save_groups(&self, groups: &[GroupSpec]) -> Result<(), CoordinatorError> {
        write_atomically(&self.store.join("groups.json"), &groups)
    }

    /// Defines a group of running VMs (by hypervisor name) and registers each in the datapath
    /// with the group id, at the group's current epoch. `id`: the datapath group id; default
    /// the lowest unused.
    pub fn define_group(
        &self,
        name: &GroupName,
        id: Option<u32>,
        domains: &[String],
    ) -> Result<GroupSpec, CoordinatorError> {
        if domains.is_empty() {
            return Err(CoordinatorError::EmptyGroup(name.clone()));
        }
        let mut unique = domains.to_vec();
        unique.sort();
        unique.dedup();
        if unique.len() != domains.len() {
            return Err(GroupError::ListedTwice.into());
        }
        if let Some(id) = id.filter(|id| *id >= enforcer_common::MAX_GROUPS) {
            return Err(GroupError::IdOutOfRange(id).into());
        }
        // The name is claimed while the slow part (libvirt, waiting for ports) runs without
        // the groups lock; the checks are made again before the group is added.
        let _claim = self.claim(name, "its definition")?;
        let check = |groups: &[GroupSpec], id: Option<u32>| -> Result<u32, CoordinatorError> {
            if groups.iter().any(|g| g.name == *name) {
                return Err(CoordinatorError::GroupExists(name.clone()));
            }
            for g in groups {
                if let Some(d) = g.vms.iter().find(|v| domains.contains(&v.name)) {
                    return Err(GroupError::DomainTaken {
                        domain: d.name.clone(),
                        group: g.name.clone(),
                    }
                    .into());
                }
            }
            match id {
                Some(id) if groups.iter().any(|g| g.id == id) => {
                    Err(GroupError::IdTaken(id).into())
                }
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
            let (mac, port) = self.hypervisor.nic(d)?;
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
                return Err(CoordinatorError::epochs(&vm.name, e));
            }
            registered.push(vm);
        }
        let mut groups = self.groups.lock().expect("groups lock");
        if let Err(e) = check(&groups, Some(id)) {
            undo(&registered);
            return Err(e);
        }
        let group = GroupSpec {
            name: name.clone(),
            id,
            vms,
        };
        groups.push(group.clone());
        self.save_groups(&groups)?;
        info!(group = %name, id, vms = domains.len(), "group defined");
        Ok(group)
    }

    /// Forgets a group (its VMs leave the datapath; its snapshots stay).
    pub fn remove_group(&self, name: &GroupName) -> Result<GroupSpec, CoordinatorError> {
        let _claim = self.claim(name, "removal")?;
        let mut groups = self.groups.lock().expect("groups lock");
        let at = groups
            .iter()
            .position(|g| g.name == *name)
            .ok_or_else(|| CoordinatorError::UnknownGroup(name.clone()))?;
        let group = groups.remove(at);
        for vm in &group.vms {
            let _ = self.epochs.unregister(vm);
        }
        self.save_groups(&groups)?;
        Ok(group)
    }
}
