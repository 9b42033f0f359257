//! The channel state of a group across hosts (invariant 7): each member's own agent records
//! it — frames from members on other hosts reach it over the overlay with their color — and
//! hands it over, and replays it into the member restored there.

use std::collections::BTreeMap;

use super::{Host, Hosts, retry_unreachable};
use crate::{
    hold::Recording,
    model::{GroupSpec, MacAddr},
    multihost::agent_epochs::{RECORD_TAKE_TIMEOUT, remote},
    snapshot::EpochControlError,
};

impl Hosts {
    /// On each host that runs members, its agent starts recording theirs. All or none: the
    /// agents that began stop again if one fails.
    pub(super) fn begin_recordings(&self, group: &GroupSpec) -> Result<(), EpochControlError> {
        let by_host = self.members_by_host(group)?;
        for (k, (host, macs)) in by_host.iter().enumerate() {
            let client = &host.agent.client;
            let begun = self
                .0
                .rt
                .block_on(retry_unreachable(async || client.record_begin(macs).await));
            if let Err(e) = begun {
                for (host, macs) in &by_host[..k] {
                    let _ = self
                        .0
                        .rt
                        .block_on(host.agent.client.record_take(macs, RECORD_TAKE_TIMEOUT));
                }
                return Err(EpochControlError::Hosts(vec![(
                    host.spec.name.clone(),
                    remote(e),
                )]));
            }
        }
        Ok(())
    }

    /// Every host's recordings, by receiver. A take is not sent twice: it hands a recording
    /// over once.
    pub(super) fn take_recordings(
        &self,
        group: &GroupSpec,
    ) -> Result<BTreeMap<MacAddr, Recording>, EpochControlError> {
        let mut all = BTreeMap::new();
        let mut failed = Vec::new();
        for (host, macs) in self.members_by_host(group)? {
            match self
                .0
                .rt
                .block_on(host.agent.client.record_take(&macs, RECORD_TAKE_TIMEOUT))
            {
                Ok(taken) => all.extend(taken),
                Err(e) => failed.push((host.spec.name.clone(), remote(e))),
            }
        }
        if failed.is_empty() {
            Ok(all)
        } else {
            Err(EpochControlError::Hosts(failed))
        }
    }

    /// The group's members' MACs by the host that runs them, in the group's order.
    fn members_by_host(
        &self,
        group: &GroupSpec,
    ) -> Result<Vec<(&Host, Vec<MacAddr>)>, EpochControlError> {
        let mut by_host: Vec<(&Host, Vec<MacAddr>)> = Vec::new();
        for vm in &group.vms {
            let (owner, _) = self.owner(vm)?;
            match by_host
                .iter_mut()
                .find(|(h, _)| h.spec.name == owner.spec.name)
            {
                Some((_, macs)) => macs.push(vm.mac),
                None => by_host.push((owner, vec![vm.mac])),
            }
        }
        Ok(by_host)
    }
}
