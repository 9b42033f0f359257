//! The snapshot service of one host (`enforcer run` with libvirt): the coordinator over this
//! host's libvirt ([`Libvirt`]) and this agent's own datapath ([`LocalEpochs`]), so an epoch
//! advance is a map write in the same process as the code that saw the VM stop — no network
//! hop, and no HTTP type, between pause and advance.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Weak},
    thread,
    time::{Duration, Instant},
};

use super::{
    datapath::AgentDatapath,
    service::{Agent, AgentError},
};
use crate::{
    datapath::epochs::EpochError,
    hold::{HoldReport, RecordedFrame, Recording, Replayed},
    model::{GroupSpec, IfName, MacAddr, VmSpec},
    snapshot::{
        Coordinator, CoordinatorError, EpochControl, EpochControlError, Hypervisor, Snapshots,
        Timeouts,
        libvirt::{DEFAULT_URI, Libvirt, LibvirtError},
    },
};

#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// libvirt connection URI.
    pub uri: String,
    /// Where snapshots (images + manifests), the journal and the groups live.
    pub store: PathBuf,
    pub timeouts: Timeouts,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            uri: DEFAULT_URI.into(),
            store: PathBuf::from("/var/lib/enforcer/snapshots"),
            timeouts: Timeouts::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotsError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
}

/// Opens the service for an agent (recovering an unfinished snapshot first). Blocking.
pub fn open<D: AgentDatapath>(
    opts: &SnapshotOptions,
    agent: &Arc<Agent<D>>,
) -> Result<Snapshots, SnapshotsError> {
    let libvirt = Libvirt::open(&opts.uri)?;
    let epochs = LocalEpochs {
        agent: Arc::downgrade(agent),
    };
    Ok(Coordinator::open(
        Arc::new(libvirt) as Arc<dyn Hypervisor>,
        Arc::new(epochs) as Arc<dyn EpochControl>,
        &opts.store,
        opts.timeouts.clone(),
    )?)
}

/// Opens the service once libvirt answers, retrying every 2 s from a thread of its own; gives
/// up when the agent is gone. Meanwhile the snapshot routes answer 503 with the reason.
pub fn open_when_ready<D: AgentDatapath + 'static>(opts: SnapshotOptions, agent: Weak<Agent<D>>) {
    thread::Builder::new()
        .name("snapshots-open".into())
        .spawn(move || {
            loop {
                thread::sleep(Duration::from_secs(2));
                let Some(agent) = agent.upgrade() else {
                    return;
                };
                match open(&opts, &agent) {
                    Ok(c) => {
                        agent.set_snapshots(Arc::new(c));
                        agent.set_snapshots_pending(None);
                        tracing::info!(uri = opts.uri, "libvirt answers: snapshots are on");
                        return;
                    }
                    Err(err) => {
                        agent.set_snapshots_pending(Some(format!("{err}; retrying every 2 s")));
                    }
                }
            }
        })
        .expect("spawning the snapshots-open thread");
}

/// [`EpochControl`] on the agent's own datapath and buffer.
pub struct LocalEpochs<D: AgentDatapath> {
    // Weak: the agent owns the coordinator, which owns this.
    agent: Weak<Agent<D>>,
}

impl<D: AgentDatapath> LocalEpochs<D> {
    pub fn new(agent: &Arc<Agent<D>>) -> Self {
        Self {
            agent: Arc::downgrade(agent),
        }
    }

    fn agent(&self) -> Result<Arc<Agent<D>>, EpochControlError> {
        self.agent
            .upgrade()
            .ok_or_else(|| EpochControlError::Unavailable("the daemon is stopping".into()))
    }
}

/// The agent's refusal (by its rules) or failure (its datapath or buffer), by kind.
fn control_error(vm: &VmSpec, e: AgentError) -> EpochControlError {
    match e {
        AgentError::Epochs(EpochError::UnknownVm(mac)) => EpochControlError::NotRegistered {
            vm: vm.name.clone(),
            mac,
        },
        AgentError::PortNotAttached(port) => EpochControlError::PortNotAttached { port },
        AgentError::Epochs(EpochError::Store(e)) | AgentError::Datapath(e) => {
            EpochControlError::Unavailable(Box::new(e))
        }
        AgentError::BufferSilent | AgentError::NoBuffer | AgentError::SnapshotsOff => {
            EpochControlError::Unavailable(Box::new(e))
        }
        other => EpochControlError::Refused(Box::new(other)),
    }
}

impl<D: AgentDatapath> EpochControl for LocalEpochs<D> {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        let agent = self.agent()?;
        agent
            .vm(vm.mac)
            .map(|r| r.epoch)
            .map_err(|e| control_error(vm, e))
    }

    fn advance(&self, vm: &VmSpec) -> Result<u32, EpochControlError> {
        // The transaction advances a VM it stopped, and tells `runs_again` when it runs.
        self.agent()?
            .advance_stopped(vm.mac, None)
            .map(|r| r.epoch)
            .map_err(|e| control_error(vm, e))
    }

    fn runs_again(&self, vm: &VmSpec) {
        if let Ok(agent) = self.agent() {
            agent.runs_again(vm.mac);
        }
    }

    fn hold_report(&self) -> Result<Option<HoldReport>, EpochControlError> {
        let agent = self.agent()?;
        if !agent.buffer_running() {
            return Ok(None);
        }
        agent
            .hold_report()
            .map(Some)
            .ok_or_else(|| EpochControlError::Unavailable(Box::new(AgentError::BufferSilent)))
    }

    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), EpochControlError> {
        self.agent()?
            .abort(group.id, epoch)
            .map(|_| ())
            .map_err(|e| match e {
                AgentError::Epochs(EpochError::Store(e)) | AgentError::Datapath(e) => {
                    EpochControlError::Unavailable(Box::new(e))
                }
                other => EpochControlError::Refused(Box::new(other)),
            })
    }

    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, EpochControlError> {
        let agent = self.agent()?;
        // A tap that just appeared is attached by the port watcher a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.port_attached(port) {
            if Instant::now() > deadline {
                return Err(EpochControlError::PortNotAttached { port: port.into() });
            }
            thread::sleep(Duration::from_millis(20));
        }
        let port: IfName = port
            .parse()
            .map_err(|e| EpochControlError::Refused(Box::new(e)))?;
        if agent.vm(vm.mac).is_ok() {
            agent.unregister(vm.mac).map_err(|e| control_error(vm, e))?;
        }
        agent
            .register(&super::service::RegisterVm {
                mac: vm.mac,
                group,
                port,
                epoch,
                remote: false,
            })
            .map(|r| r.epoch)
            .map_err(|e| control_error(vm, e))
    }

    fn unregister(&self, vm: &VmSpec) -> Result<(), EpochControlError> {
        self.agent()?
            .unregister(vm.mac)
            .map(|_| ())
            .map_err(|e| control_error(vm, e))
    }

    fn record_begin(&self, group: &GroupSpec) -> Result<(), EpochControlError> {
        let macs = group.macs();
        self.agent()?
            .record_begin(&macs)
            .map_err(|e| group_error(group, e))
    }

    fn shut_before_cut(&self, vm: &VmSpec) -> Result<bool, EpochControlError> {
        self.agent()?
            .shut_before_cut(vm.mac)
            .map_err(|e| control_error(vm, e))
    }

    fn record_end(
        &self,
        group: &GroupSpec,
    ) -> Result<BTreeMap<MacAddr, Recording>, EpochControlError> {
        let macs = group.macs();
        self.agent()?
            .record_end(&macs, RECORD_TAKE_TIMEOUT)
            .map_err(|e| group_error(group, e))
    }

    fn replay(
        &self,
        vm: &VmSpec,
        port: &str,
        frames: &[RecordedFrame],
    ) -> Result<Replayed, EpochControlError> {
        self.agent()?
            .replay(vm.mac, port, frames)
            .map_err(|e| control_error(vm, e))
    }
}

/// How long the buffer may take to hand a recording over: every frame handed to it before
/// must have come, or been found lost by its audit (every 0.5–2 s).
const RECORD_TAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A group-wide failure of this agent, by kind (as [`control_error`], without one VM).
fn group_error(group: &GroupSpec, e: AgentError) -> EpochControlError {
    match e {
        AgentError::Epochs(EpochError::UnknownVm(mac)) => EpochControlError::NotRegistered {
            vm: group
                .vms
                .iter()
                .find(|v| v.mac == mac)
                .map_or_else(|| mac.to_string(), |v| v.name.clone()),
            mac,
        },
        AgentError::Epochs(EpochError::Store(e)) | AgentError::Datapath(e) => {
            EpochControlError::Unavailable(Box::new(e))
        }
        AgentError::BufferSilent | AgentError::NoBuffer => {
            EpochControlError::Unavailable(Box::new(e))
        }
        other => EpochControlError::Refused(Box::new(other)),
    }
}
