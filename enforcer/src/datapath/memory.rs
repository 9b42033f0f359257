//! Plain in-memory tables in place of the pinned maps, for the tier-0 tests of everything above
//! them (the epoch rules, the agent's service and its HTTP routes).

use std::collections::BTreeMap;

use enforcer_common::{GroupState, MacKey, PortVm, VmEpoch};

use super::store::EpochStore;

/// Plain in-memory tables, for tests of everything above the maps.
#[derive(Default, Debug)]
pub(crate) struct MemoryStore {
    pub vms: BTreeMap<MacKey, VmEpoch>,
    pub ports: BTreeMap<u32, PortVm>,
    pub groups: BTreeMap<u32, GroupState>,
    pub slots: BTreeMap<u32, u32>,
}

impl MemoryStore {
    /// A store where the ports with these ifindexes are attached (slot = position + 1).
    pub(crate) fn with_ports(ports: &[u32]) -> Self {
        let slots = ports
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i as u32 + 1))
            .collect();
        Self {
            slots,
            ..Self::default()
        }
    }
}

impl EpochStore for MemoryStore {
    type Error = std::convert::Infallible;
    fn vm(&mut self, mac: &MacKey) -> Result<Option<VmEpoch>, Self::Error> {
        Ok(self.vms.get(mac).copied())
    }
    fn vms(&mut self) -> Result<Vec<(MacKey, VmEpoch)>, Self::Error> {
        Ok(self.vms.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_vm(&mut self, mac: MacKey, vm: VmEpoch) -> Result<(), Self::Error> {
        self.vms.insert(mac, vm);
        Ok(())
    }
    fn remove_vm(&mut self, mac: &MacKey) -> Result<(), Self::Error> {
        self.vms.remove(mac);
        Ok(())
    }
    fn port(&mut self, ifindex: u32) -> Result<Option<PortVm>, Self::Error> {
        Ok(self.ports.get(&ifindex).copied())
    }
    fn port_slot(&mut self, ifindex: u32) -> Result<Option<u32>, Self::Error> {
        Ok(self.slots.get(&ifindex).copied())
    }
    fn put_port(&mut self, ifindex: u32, port: PortVm) -> Result<(), Self::Error> {
        self.ports.insert(ifindex, port);
        Ok(())
    }
    fn remove_port(&mut self, ifindex: u32) -> Result<(), Self::Error> {
        self.ports.remove(&ifindex);
        Ok(())
    }
    fn group(&mut self, group: u32) -> Result<Option<GroupState>, Self::Error> {
        Ok(self.groups.get(&group).copied())
    }
    fn put_group(&mut self, group: u32, state: GroupState) -> Result<(), Self::Error> {
        self.groups.insert(group, state);
        Ok(())
    }
    fn remove_group(&mut self, group: u32) -> Result<(), Self::Error> {
        self.groups.remove(&group);
        Ok(())
    }
    fn alloc_remote_slot(&mut self) -> Result<Option<u32>, Self::Error> {
        let slot = (1..enforcer_common::MAX_PORTS).find(|s| !self.slots.values().any(|u| u == s));
        if let Some(slot) = slot {
            self.slots
                .insert(enforcer_common::REMOTE_SLOT_KEY | slot, slot);
        }
        Ok(slot)
    }
    fn free_remote_slot(&mut self, slot: u32) -> Result<(), Self::Error> {
        self.slots
            .remove(&(enforcer_common::REMOTE_SLOT_KEY | slot));
        Ok(())
    }
}
