//! The daemon's snapshot service: the [`Coordinator`] over libvirt ([`Libvirt`]) and this
//! daemon's own datapath ([`DatapathEpochs`]), so an epoch advance is a map write in the same
//! process as the code that saw the VM stop — no network hop between pause and advance.

use std::{
    path::PathBuf,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use enforcer_common::VmEpoch;
use tokio::runtime::Handle;

use crate::{
    api::{self, AppState},
    coordinator::{
        Coordinator, CoordinatorError, EpochControl, GroupSpec, Hypervisor, Timeouts, VmSpec,
    },
    datapath::{DatapathError, ifindex_of},
    epochs::{self, EpochError, EpochStore as _},
    hold::{Command, HoldReport},
    libvirt::{Libvirt, LibvirtError},
};

/// The coordinator behind the API: over this host's libvirt and datapath (`enforcer run`), or
/// over the agents of several hosts (`enforcer coordinator`, see `hosts.rs`).
pub type Snapshots = Coordinator<Box<dyn Hypervisor>, Box<dyn EpochControl>>;

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
            uri: crate::libvirt::DEFAULT_URI.into(),
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

/// Opens the service for a daemon's state (recovering an unfinished snapshot first).
pub fn open(
    opts: &SnapshotOptions,
    state: &Arc<AppState>,
    rt: Handle,
) -> Result<Snapshots, SnapshotsError> {
    let libvirt = Libvirt::open(&opts.uri)?;
    let epochs = DatapathEpochs {
        state: Arc::downgrade(state),
        rt,
    };
    Ok(Coordinator::open(
        Box::new(libvirt) as Box<dyn Hypervisor>,
        Box::new(epochs) as Box<dyn EpochControl>,
        &opts.store,
        opts.timeouts.clone(),
    )?)
}

/// [`EpochControl`] on the daemon's datapath and buffer. Called from the coordinator's
/// threads (never from the async runtime), so it blocks on the runtime's handle.
pub struct DatapathEpochs {
    // Weak: the daemon's state owns the coordinator, which owns this.
    state: Weak<AppState>,
    rt: Handle,
}

impl DatapathEpochs {
    fn state(&self) -> Result<Arc<AppState>, String> {
        self.state
            .upgrade()
            .ok_or_else(|| "the daemon is stopping".to_owned())
    }
}

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl EpochControl for DatapathEpochs {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, String> {
        let s = self.state()?;
        self.rt.block_on(async {
            let mut dp = s.datapath.lock().await;
            dp.vm(&vm.mac.key())
                .map_err(text)?
                .map(|v| v.epoch)
                .ok_or_else(|| format!("{} ({}) is not registered", vm.name, vm.mac))
        })
    }

    fn advance(&self, vm: &VmSpec) -> Result<u32, String> {
        let s = self.state()?;
        self.rt
            .block_on(api::change_epoch(&s, vm.mac, None, false))
            .map(|r| r.epoch)
            .map_err(|e| e.message)
    }

    fn hold_report(&self) -> Result<Option<HoldReport>, String> {
        let s = self.state()?;
        if !s.buffer_running() {
            return Ok(None);
        }
        s.hold_report()
            .map(Some)
            .ok_or_else(|| "the buffer does not answer".to_owned())
    }

    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), String> {
        let s = self.state()?;
        self.rt
            .block_on(api::roll_back_group(&s, group.id, epoch))
            .map(|_| ())
            .map_err(|e| e.message)
    }

    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, String> {
        let s = self.state()?;
        let key = vm.mac.key();
        self.rt.block_on(async {
            // A tap that just appeared is attached by the port watcher a moment later.
            let deadline = Instant::now() + Duration::from_secs(10);
            let ifindex = loop {
                if let Ok(ifindex) = ifindex_of(port)
                    && s.datapath.lock().await.is_attached(ifindex)
                {
                    break ifindex;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "port {port} is not attached (is it on a bridge this daemon watches?)"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let mut dp = s.datapath.lock().await;
            if dp.vm(&key).map_err(text)?.is_some() {
                epochs::unregister(&mut *dp, vm.mac).map_err(text)?;
            }
            let record = epochs::register(&mut *dp, vm.mac, group, ifindex, epoch)
                .map_err(|e: EpochError<DatapathError>| e.to_string())?;
            let current: Option<VmEpoch> = dp.vm(&key).ok().flatten();
            s.to_buffer(Command::Vm {
                mac: key,
                vm: current,
            });
            Ok(record.epoch)
        })
    }

    fn unregister(&self, vm: &VmSpec) -> Result<(), String> {
        let s = self.state()?;
        self.rt.block_on(async {
            let mut dp = s.datapath.lock().await;
            epochs::unregister(&mut *dp, vm.mac).map_err(text)?;
            s.to_buffer(Command::Vm {
                mac: vm.mac.key(),
                vm: None,
            });
            Ok(())
        })
    }
}
