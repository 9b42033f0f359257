//! What a group is: its name, its datapath id and its VMs, each known by its hypervisor name
//! and the MAC its frames carry.

use serde::{Deserialize, Serialize};

use super::{mac::MacAddr, names::GroupName};

/// A VM of a group: its hypervisor name (`domain`, or `domain@host` for a group spanning
/// hosts) and the MAC the datapath knows it by.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub mac: MacAddr,
}

/// A group of VMs snapshotted together.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: GroupName,
    /// The datapath's group id (`0..MAX_GROUPS`).
    pub id: u32,
    pub vms: Vec<VmSpec>,
}

impl GroupSpec {
    /// Its VMs' MACs, in its order.
    pub fn macs(&self) -> Vec<MacAddr> {
        self.vms.iter().map(|v| v.mac).collect()
    }
}
