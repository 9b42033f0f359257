//! [`EpochControl`] over an agent's HTTP API: a coordinator that runs outside the agent that
//! owns the datapath (another process, or another host) drives it with the same calls the agent
//! makes on itself ([`crate::agent::LocalEpochs`]). Blocks on a tokio runtime handle, so it must
//! be called from a plain thread (as the coordinator does), not from async code.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tokio::runtime::Handle;

use crate::{
    api::{
        ErrorCode,
        client::{Client, ClientError},
    },
    hold::{HoldReport, RecordedFrame, Recording, Replayed},
    model::{GroupSpec, MacAddr, VmSpec},
    snapshot::{EpochControl, EpochControlError},
};

/// How long an agent's buffer may take to hand recordings over (as on the agent itself).
pub(crate) const RECORD_TAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentEpochs {
    pub client: Client,
    pub rt: Handle,
}

/// An agent's answer as an epoch-control error, by kind: unreachable, or refused (its code
/// says why).
pub(crate) fn remote(e: ClientError) -> EpochControlError {
    match e.status() {
        // It refused, by its rules (a 4xx, with its code).
        Some(status) if status.is_client_error() => EpochControlError::Refused(Box::new(e)),
        // It failed, or could not be reached.
        _ => EpochControlError::Unavailable(Box::new(e)),
    }
}

impl EpochControl for AgentEpochs {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        match self.rt.block_on(self.client.vm(vm.mac)) {
            Ok(r) => Ok(r.epoch),
            Err(e) if e.is(ErrorCode::UnknownVm) => Err(EpochControlError::NotRegistered {
                vm: vm.name.clone(),
                mac: vm.mac,
            }),
            Err(e) => Err(remote(e)),
        }
    }

    fn advance(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        self.rt
            .block_on(self.client.advance(vm.mac))
            .map(|r| r.epoch)
            .map_err(remote)
    }

    fn hold_report(&self) -> Result<Option<HoldReport>, EpochControlError> {
        match self.rt.block_on(self.client.holds()) {
            Ok(report) => Ok(Some(report)),
            // No buffer on that agent: nothing is ever held.
            Err(e) if e.is(ErrorCode::NoBuffer) => Ok(None),
            Err(e) => Err(remote(e)),
        }
    }

    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), EpochControlError> {
        self.rt
            .block_on(self.client.abort(group.id, epoch))
            .map(|_| ())
            .map_err(remote)
    }

    fn record_begin(&self, group: &GroupSpec) -> Result<(), EpochControlError> {
        let macs = group.macs();
        self.rt
            .block_on(self.client.record_begin(&macs))
            .map_err(remote)
    }

    fn shut_before_cut(&self, vm: &VmSpec) -> Result<bool, EpochControlError> {
        self.rt.block_on(self.client.shut(vm.mac)).map_err(remote)
    }

    fn record_end(
        &self,
        group: &GroupSpec,
    ) -> Result<BTreeMap<MacAddr, Recording>, EpochControlError> {
        let macs = group.macs();
        self.rt
            .block_on(self.client.record_take(&macs, RECORD_TAKE_TIMEOUT))
            .map_err(remote)
    }

    fn replay(
        &self,
        vm: &VmSpec,
        port: &str,
        frames: &[RecordedFrame],
    ) -> Result<Replayed, EpochControlError> {
        self.rt
            .block_on(self.client.replay(vm.mac, port, frames))
            .map_err(remote)
    }

    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, EpochControlError> {
        self.rt.block_on(async {
            match self.client.unregister_vm(vm.mac).await {
                Ok(_) => {}
                Err(e) if e.is(ErrorCode::UnknownVm) => {}
                Err(e) => return Err(remote(e)),
            }
            // A new tap is attached by the agent's port watcher a moment after it appears.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.client.register_vm(vm.mac, group, port, epoch).await {
                    Ok(r) => return Ok(r.epoch),
                    Err(e)
                        if Instant::now() < deadline
                            && (e.is(ErrorCode::PortNotAttached)
                                || e.is(ErrorCode::UnknownInterface)) =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(remote(e)),
                }
            }
        })
    }

    fn unregister(&self, vm: &VmSpec) -> Result<(), EpochControlError> {
        self.rt
            .block_on(self.client.unregister_vm(vm.mac))
            .map(|_| ())
            .map_err(remote)
    }
}
