//! What the agent needs of its host's datapath, as a trait: the epoch tables ([`EpochStore`])
//! plus the attached ports, their counters and the Type-3 mode. The kernel [`Datapath`]
//! implements it; the tier-0 tests of the agent and of its HTTP routes use plain tables.

use std::{collections::BTreeMap, path::Path};

use enforcer_common::{HoldKernel, PortCounters, Type3Mode};

use crate::datapath::{
    AttachMode, AttachedPort, Datapath, DatapathError, epochs::EpochStore, ifindex_of,
};

pub trait AgentDatapath: EpochStore<Error = DatapathError> + Send + 'static {
    /// The ifindex of an interface by name ([`DatapathError::UnknownInterface`] if none).
    fn ifindex(&self, port: &str) -> Result<u32, DatapathError>;
    fn is_attached(&self, ifindex: u32) -> bool;
    fn attached_ports(&self) -> Vec<AttachedPort>;
    fn port_name(&self, ifindex: u32) -> Option<String>;
    /// Counters by ifindex (remote VMs' slots keyed with `REMOTE_SLOT_KEY`), summed over CPUs.
    fn port_stats(&mut self) -> Result<BTreeMap<u32, PortCounters>, DatapathError>;
    fn type3_mode(&mut self) -> Result<Type3Mode, DatapathError>;
    fn set_type3_mode(&mut self, mode: Type3Mode) -> Result<(), DatapathError>;
    fn attach_mode(&self) -> AttachMode;
    fn pin_root(&self) -> &Path;
    /// Learned colors the overlay program could not report (its ring was full).
    fn learn_lost(&mut self) -> Result<u64, DatapathError>;
    /// Attaches `enforcer_record` to the egress of an attached port (see
    /// [`Datapath::attach_record`]); it stays attached while the returned link lives.
    fn attach_record(&mut self, ifindex: u32) -> Result<Box<dyn Send>, DatapathError>;
    /// See [`Datapath::set_record_skip`].
    fn set_record_skip(&mut self, slot: u32, on: bool) -> Result<(), DatapathError>;
}

impl AgentDatapath for Datapath {
    fn ifindex(&self, port: &str) -> Result<u32, DatapathError> {
        ifindex_of(port)
    }
    fn is_attached(&self, ifindex: u32) -> bool {
        Datapath::is_attached(self, ifindex)
    }
    fn attached_ports(&self) -> Vec<AttachedPort> {
        Datapath::attached_ports(self)
    }
    fn port_name(&self, ifindex: u32) -> Option<String> {
        Datapath::port_name(self, ifindex).map(str::to_owned)
    }
    fn port_stats(&mut self) -> Result<BTreeMap<u32, PortCounters>, DatapathError> {
        Datapath::port_stats(self)
    }
    fn type3_mode(&mut self) -> Result<Type3Mode, DatapathError> {
        Datapath::type3_mode(self)
    }
    fn set_type3_mode(&mut self, mode: Type3Mode) -> Result<(), DatapathError> {
        Datapath::set_type3_mode(self, mode)
    }
    fn attach_mode(&self) -> AttachMode {
        Datapath::attach_mode(self)
    }
    fn pin_root(&self) -> &Path {
        Datapath::pin_root(self)
    }
    fn learn_lost(&mut self) -> Result<u64, DatapathError> {
        self.hold_kernel(HoldKernel::LearnLost)
    }
    fn attach_record(&mut self, ifindex: u32) -> Result<Box<dyn Send>, DatapathError> {
        let name = Datapath::port_name(self, ifindex)
            .ok_or_else(|| DatapathError::UnknownInterface(format!("ifindex {ifindex}")))?
            .to_owned();
        Ok(Box::new(Datapath::attach_record(self, &name)?))
    }
    fn set_record_skip(&mut self, slot: u32, on: bool) -> Result<(), DatapathError> {
        Datapath::set_record_skip(self, slot, on)
    }
}

/// A datapath of plain tables for tests: ports by name, counters per ifindex.
#[cfg(test)]
pub(crate) mod memory {
    use std::{
        collections::BTreeMap,
        path::{Path, PathBuf},
    };

    use enforcer_common::{GroupState, MacKey, PortCounters, PortVm, Type3Mode, VmEpoch};

    use super::AgentDatapath;
    use crate::datapath::{
        AttachMode, AttachedPort, DatapathError, epochs::EpochStore, memory::MemoryStore,
    };

    pub(crate) struct MemoryDatapath {
        pub(crate) store: MemoryStore,
        /// Attached ports: name → ifindex.
        pub(crate) ports: BTreeMap<String, u32>,
        pub(crate) stats: BTreeMap<u32, PortCounters>,
        pub(crate) mode: Type3Mode,
        pin_root: PathBuf,
    }

    impl MemoryDatapath {
        /// Attached ports `names[i]` with ifindex `10 + i` (slot `i + 1`).
        pub(crate) fn with_ports(names: &[&str]) -> Self {
            let ifindexes: Vec<u32> = (0..names.len() as u32).map(|i| 10 + i).collect();
            Self {
                store: MemoryStore::with_ports(&ifindexes),
                ports: names
                    .iter()
                    .zip(&ifindexes)
                    .map(|(n, i)| ((*n).to_owned(), *i))
                    .collect(),
                stats: BTreeMap::new(),
                mode: Type3Mode::Buffer,
                pin_root: PathBuf::from("/sys/fs/bpf/enforcer-memory"),
            }
        }
    }

    fn ok<T>(r: Result<T, std::convert::Infallible>) -> Result<T, DatapathError> {
        r.map_err(|e| match e {})
    }

    impl EpochStore for MemoryDatapath {
        type Error = DatapathError;
        fn vm(&mut self, mac: &MacKey) -> Result<Option<VmEpoch>, DatapathError> {
            ok(self.store.vm(mac))
        }
        fn vms(&mut self) -> Result<Vec<(MacKey, VmEpoch)>, DatapathError> {
            ok(self.store.vms())
        }
        fn put_vm(&mut self, mac: MacKey, vm: VmEpoch) -> Result<(), DatapathError> {
            ok(self.store.put_vm(mac, vm))
        }
        fn remove_vm(&mut self, mac: &MacKey) -> Result<(), DatapathError> {
            ok(self.store.remove_vm(mac))
        }
        fn port(&mut self, ifindex: u32) -> Result<Option<PortVm>, DatapathError> {
            ok(self.store.port(ifindex))
        }
        fn port_slot(&mut self, ifindex: u32) -> Result<Option<u32>, DatapathError> {
            ok(self.store.port_slot(ifindex))
        }
        fn put_port(&mut self, ifindex: u32, port: PortVm) -> Result<(), DatapathError> {
            ok(self.store.put_port(ifindex, port))
        }
        fn remove_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
            ok(self.store.remove_port(ifindex))
        }
        fn group(&mut self, group: u32) -> Result<Option<GroupState>, DatapathError> {
            ok(self.store.group(group))
        }
        fn put_group(&mut self, group: u32, state: GroupState) -> Result<(), DatapathError> {
            ok(self.store.put_group(group, state))
        }
        fn remove_group(&mut self, group: u32) -> Result<(), DatapathError> {
            ok(self.store.remove_group(group))
        }
        fn alloc_remote_slot(&mut self) -> Result<Option<u32>, DatapathError> {
            ok(self.store.alloc_remote_slot())
        }
        fn free_remote_slot(&mut self, slot: u32) -> Result<(), DatapathError> {
            ok(self.store.free_remote_slot(slot))
        }
    }

    impl AgentDatapath for MemoryDatapath {
        fn ifindex(&self, port: &str) -> Result<u32, DatapathError> {
            match self.ports.get(port) {
                Some(i) => Ok(*i),
                // An interface of this host that is not a VM port.
                None if port == "lo" => Ok(1),
                None => Err(DatapathError::UnknownInterface(port.to_owned())),
            }
        }
        fn is_attached(&self, ifindex: u32) -> bool {
            self.ports.values().any(|i| *i == ifindex)
        }
        fn attached_ports(&self) -> Vec<AttachedPort> {
            self.ports
                .iter()
                .map(|(name, ifindex)| AttachedPort {
                    ifindex: *ifindex,
                    name: name.clone(),
                })
                .collect()
        }
        fn port_name(&self, ifindex: u32) -> Option<String> {
            self.ports
                .iter()
                .find(|(_, i)| **i == ifindex)
                .map(|(n, _)| n.clone())
        }
        fn port_stats(&mut self) -> Result<BTreeMap<u32, PortCounters>, DatapathError> {
            Ok(self.stats.clone())
        }
        fn type3_mode(&mut self) -> Result<Type3Mode, DatapathError> {
            Ok(self.mode)
        }
        fn set_type3_mode(&mut self, mode: Type3Mode) -> Result<(), DatapathError> {
            self.mode = mode;
            Ok(())
        }
        fn attach_mode(&self) -> AttachMode {
            AttachMode::Tc
        }
        fn pin_root(&self) -> &Path {
            &self.pin_root
        }
        fn learn_lost(&mut self) -> Result<u64, DatapathError> {
            Ok(0)
        }
        fn attach_record(&mut self, ifindex: u32) -> Result<Box<dyn Send>, DatapathError> {
            match self.ports.values().any(|i| *i == ifindex) {
                true => Ok(Box::new(())),
                false => Err(DatapathError::UnknownInterface(format!(
                    "ifindex {ifindex}"
                ))),
            }
        }
        fn set_record_skip(&mut self, _slot: u32, _on: bool) -> Result<(), DatapathError> {
            Ok(())
        }
    }
}
