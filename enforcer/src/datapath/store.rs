//! The tables the epoch rules run on, as a trait: the pinned maps in the daemon
//! ([`super::Datapath`]), plain tables in tests ([`super::memory`]).

use enforcer_common::{GroupState, MacKey, PortVm, VmEpoch};

/// Storage of the VM, port and group tables: the pinned maps in the daemon, plain tables in
/// the unit tests.
pub trait EpochStore {
    type Error: std::error::Error + Send + Sync + 'static;
    fn vm(&mut self, mac: &MacKey) -> Result<Option<VmEpoch>, Self::Error>;
    fn vms(&mut self) -> Result<Vec<(MacKey, VmEpoch)>, Self::Error>;
    fn put_vm(&mut self, mac: MacKey, vm: VmEpoch) -> Result<(), Self::Error>;
    fn remove_vm(&mut self, mac: &MacKey) -> Result<(), Self::Error>;
    fn port(&mut self, ifindex: u32) -> Result<Option<PortVm>, Self::Error>;
    /// The counter slot of an attached port.
    fn port_slot(&mut self, ifindex: u32) -> Result<Option<u32>, Self::Error>;
    fn put_port(&mut self, ifindex: u32, port: PortVm) -> Result<(), Self::Error>;
    fn remove_port(&mut self, ifindex: u32) -> Result<(), Self::Error>;
    fn group(&mut self, group: u32) -> Result<Option<GroupState>, Self::Error>;
    fn put_group(&mut self, group: u32, state: GroupState) -> Result<(), Self::Error>;
    fn remove_group(&mut self, group: u32) -> Result<(), Self::Error>;
    /// A counter slot of its own for a VM on another host (they share the overlay port);
    /// `None` when every slot is taken.
    fn alloc_remote_slot(&mut self) -> Result<Option<u32>, Self::Error>;
    fn free_remote_slot(&mut self, slot: u32) -> Result<(), Self::Error>;
}
