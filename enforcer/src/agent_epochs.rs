//! [`EpochControl`] over a daemon's HTTP API: a coordinator that runs outside the daemon that
//! owns the datapath (another process, or another host) drives that daemon — the agent — with
//! the same calls the daemon makes on itself. Blocks on a tokio runtime handle, so it must be
//! called from a plain thread (as the coordinator does), not from async code.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::runtime::Handle;

use crate::{
    client::{Client, ClientError},
    coordinator::{EpochControl, GroupSpec, VmSpec},
    hold::HoldReport,
};

pub struct AgentEpochs {
    pub client: Client,
    pub rt: Handle,
}

fn text(e: ClientError) -> String {
    e.to_string()
}

impl EpochControl for AgentEpochs {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, String> {
        self.rt
            .block_on(self.client.vm(vm.mac))
            .map(|r| r.epoch)
            .map_err(text)
    }

    fn advance(&self, vm: &VmSpec) -> Result<u32, String> {
        self.rt
            .block_on(self.client.advance(vm.mac))
            .map(|r| r.epoch)
            .map_err(text)
    }

    fn hold_report(&self) -> Result<Option<HoldReport>, String> {
        match self.rt.block_on(self.client.holds()) {
            Ok(report) => Ok(Some(report)),
            // No buffer on that agent: nothing is ever held.
            Err(e) if e.status() == Some(StatusCode::CONFLICT) => Ok(None),
            Err(e) => Err(text(e)),
        }
    }

    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), String> {
        self.rt
            .block_on(self.client.abort(group.id, epoch))
            .map(|_| ())
            .map_err(text)
    }

    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, String> {
        self.rt.block_on(async {
            match self.client.unregister_vm(vm.mac).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {}
                Err(e) => return Err(text(e)),
            }
            // A new tap is attached by the agent's port watcher a moment after it appears.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.client.register_vm(vm.mac, group, port, epoch).await {
                    Ok(r) => return Ok(r.epoch),
                    Err(e)
                        if Instant::now() < deadline
                            && matches!(
                                e.status(),
                                Some(StatusCode::CONFLICT) | Some(StatusCode::BAD_REQUEST)
                            ) =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(text(e)),
                }
            }
        })
    }

    fn unregister(&self, vm: &VmSpec) -> Result<(), String> {
        self.rt
            .block_on(self.client.unregister_vm(vm.mac))
            .map(|_| ())
            .map_err(text)
    }
}
