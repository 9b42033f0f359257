//! Per-port counters as the API and `/metrics` show them: each port (or remote VM's slot on the
//! overlay port) with its name, its VM, and frames and bytes by [`Outcome`] name.

use std::collections::BTreeMap;

use enforcer_common::{Outcome, REMOTE_SLOT_KEY};
use serde::{Deserialize, Serialize};

use super::{
    datapath::AgentDatapath,
    service::{Agent, AgentError},
};
use crate::{
    datapath::epochs::{self, VmRecord},
    model::MacAddr,
};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterJson {
    pub frames: u64,
    pub bytes: u64,
}

/// Counters of one port, by outcome name (`type1`, `type3_dropped`, ...).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PortStats {
    pub ifindex: u32,
    pub port: Option<String>,
    pub vm: Option<MacAddr>,
    /// The counters of one VM on another host (frames from it that arrived on the overlay).
    #[serde(default)]
    pub remote: bool,
    pub counters: BTreeMap<String, CounterJson>,
}

impl PortStats {
    pub fn frames(&self, outcome: Outcome) -> u64 {
        self.counters.get(outcome.name()).map_or(0, |c| c.frames)
    }
    pub fn bytes(&self, outcome: Outcome) -> u64 {
        self.counters.get(outcome.name()).map_or(0, |c| c.bytes)
    }
    pub fn total_frames(&self) -> u64 {
        self.counters.values().map(|c| c.frames).sum()
    }
}

impl<D: AgentDatapath> Agent<D> {
    /// Counters of every port that has any, with the port's name and VM when known.
    pub fn stats(&self) -> Result<Vec<PortStats>, AgentError> {
        stats_of(&mut *self.datapath())
    }

    /// The counters and the VMs read under one lock (for `/metrics`, so they agree).
    pub fn stats_and_vms(&self) -> Result<(Vec<PortStats>, Vec<VmRecord>), AgentError> {
        let mut dp = self.datapath();
        let stats = stats_of(&mut *dp)?;
        Ok((stats, epochs::list_vms(&mut *dp)?))
    }
}

/// [`Agent::stats`] over a datapath already locked.
fn stats_of<D: AgentDatapath>(dp: &mut D) -> Result<Vec<PortStats>, AgentError> {
    let vms = dp.vms()?;
    let stats = dp.port_stats()?;
    Ok(stats
        .into_iter()
        .map(|(key, counters)| {
            // A VM on another host has a slot of its own on the shared overlay port.
            let (ifindex, vm) = if key & REMOTE_SLOT_KEY != 0 {
                let slot = key & !REMOTE_SLOT_KEY;
                let vm = vms.iter().find(|(_, vm)| vm.is_remote() && vm.slot == slot);
                (vm.map_or(0, |(_, vm)| vm.ifindex), vm)
            } else {
                let vm = vms
                    .iter()
                    .find(|(_, vm)| !vm.is_remote() && vm.ifindex == key);
                (key, vm)
            };
            PortStats {
                ifindex,
                port: dp.port_name(ifindex),
                vm: vm.map(|(mac, _)| MacAddr::from(*mac)),
                remote: vm.is_some_and(|(_, vm)| vm.is_remote()),
                counters: Outcome::ALL
                    .iter()
                    .map(|o| {
                        let c = counters.counter(*o);
                        (
                            o.name().to_owned(),
                            CounterJson {
                                frames: c.frames,
                                bytes: c.bytes,
                            },
                        )
                    })
                    .collect(),
            }
        })
        .collect())
}
