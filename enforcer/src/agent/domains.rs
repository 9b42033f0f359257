//! One step of a snapshot or restore of a domain on this agent's host, for a coordinator of
//! several hosts (`POST /v1/domains/{name}/{op}`): the [`DomainOp`]s are the [`Hypervisor`]
//! calls, made here because QMP file-descriptor passing and the images are local to the host
//! that runs the VM. `wait-paused` with `advance` also advances the VM's epoch here, at once,
//! so no network hop separates its stop from its advance (invariant 3 in docs/design.md).
//! Blocking: callers run it off the async workers.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    datapath::AgentDatapath,
    service::{Agent, AgentError},
};
use crate::{
    model::{IfName, MacAddr, SnapshotId, VmSpec},
    sched::Realtime,
    snapshot::{CutMethod, DomainState, EpochControlError, HvError, HvErrorKind, Paused, unix_us},
};

/// `GET /v1/domains/{name}/state`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainStateView {
    pub state: DomainState,
}

/// The steps a coordinator of several hosts drives on each VM's own agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainOp {
    Begin,
    Stop,
    Capture,
    WaitPaused,
    Complete,
    Resume,
    Cancel,
    Destroy,
    Discard,
    Restore,
}

impl DomainOp {
    pub const ALL: [DomainOp; 10] = [
        DomainOp::Begin,
        DomainOp::Stop,
        DomainOp::Capture,
        DomainOp::WaitPaused,
        DomainOp::Complete,
        DomainOp::Resume,
        DomainOp::Cancel,
        DomainOp::Destroy,
        DomainOp::Discard,
        DomainOp::Restore,
    ];

    /// The operation's name in the path (`wait-paused`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DomainOp::Begin => "begin",
            DomainOp::Stop => "stop",
            DomainOp::Capture => "capture",
            DomainOp::WaitPaused => "wait-paused",
            DomainOp::Complete => "complete",
            DomainOp::Resume => "resume",
            DomainOp::Cancel => "cancel",
            DomainOp::Destroy => "destroy",
            DomainOp::Discard => "discard",
            DomainOp::Restore => "restore",
        }
    }
}

impl fmt::Display for DomainOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for DomainOp {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, DomainError> {
        DomainOp::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| DomainError::NoSuchOp(s.to_owned()))
    }
}

/// The body of `POST /v1/domains/{name}/{op}`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DomainCall {
    pub mac: MacAddr,
    /// The snapshot's id (`begin`, `discard`): its images live under this agent's store.
    #[serde(default)]
    pub snapshot: Option<SnapshotId>,
    /// `begin`: how the snapshot stops and captures the VM (a coordinator that sends none
    /// predates the instant method: pre-copy).
    #[serde(default = "CutMethod::legacy")]
    pub method: CutMethod,
    /// `wait-paused`, `complete`: how long to wait (ms; at most an hour).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `wait-paused`, `stop`: then advance the VM's epoch here at once (this agent owns it),
    /// so no network hop separates the stop from the advance.
    #[serde(default)]
    pub advance: bool,
    /// `restore`: the images `complete` returned.
    #[serde(default)]
    pub images: Vec<PathBuf>,
    /// `restore`: onto this bridge instead of the domain's own.
    #[serde(default)]
    pub bridge: Option<IfName>,
}

impl DomainCall {
    /// A call about the VM with this MAC, nothing else set.
    pub fn new(mac: MacAddr) -> Self {
        Self {
            mac,
            snapshot: None,
            method: CutMethod::default(),
            timeout_ms: None,
            advance: false,
            images: Vec::new(),
            bridge: None,
        }
    }
}

/// `wait-paused` or `stop` with `advance`: when the VM stopped, and its advance.
#[derive(Serialize, Deserialize, Debug)]
pub struct PausedAdvanced {
    pub paused: Paused,
    /// When the map had the new epoch (µs since the Unix epoch, the agent's clock).
    pub advanced_unix_us: u64,
    pub epoch: u32,
}

/// A domain's NIC: its MAC and host-side port.
#[derive(Serialize, Deserialize, Debug)]
pub struct DomainNic {
    pub mac: MacAddr,
    pub port: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error(
        "no domain operation {0:?} (begin, stop, capture, wait-paused, complete, resume, cancel, destroy, discard, restore)"
    )]
    NoSuchOp(String),
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("`{0}` needs the snapshot's id")]
    NoSnapshotId(DomainOp),
    #[error("no snapshot of this domain was begun through this agent")]
    NotBegun,
    #[error("its epoch: {0}")]
    Epoch(EpochControlError),
    #[error("advancing the epoch: {0}")]
    Advance(AgentError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not an image in this agent's store", .0.display())]
    NotInStore(PathBuf),
}

impl<D: AgentDatapath> Agent<D> {
    /// A running domain's NIC.
    pub fn domain_nic(&self, name: &str) -> Result<DomainNic, DomainError> {
        let (mac, port) = self.snapshots()?.hypervisor().nic(name)?;
        Ok(DomainNic { mac, port })
    }

    /// Whether the domain `name` exists here, and whether it runs.
    pub fn domain_state(&self, name: &str) -> Result<DomainStateView, DomainError> {
        Ok(DomainStateView {
            state: self.snapshots()?.hypervisor().state(name)?,
        })
    }

    /// Runs one step on the domain `name`; returns what the step returns, as JSON.
    pub fn domain_op(
        &self,
        name: &str,
        op: DomainOp,
        call: DomainCall,
    ) -> Result<Value, DomainError> {
        let c = self.snapshots()?;
        let hv = c.hypervisor();
        let vm = VmSpec {
            name: name.to_owned(),
            mac: call.mac,
        };
        let image_dir = |op| match &call.snapshot {
            Some(id) => Ok(self.image_dir(id)?),
            None => Err(DomainError::NoSnapshotId(op)),
        };
        // At most an hour: a step waits that long at the very most, and no deadline overflows.
        let timeout = Duration::from_millis(call.timeout_ms.unwrap_or(60_000).min(3_600_000));
        let done = || json!({});
        Ok(match op {
            DomainOp::Begin => {
                let dir = image_dir(op)?;
                crate::snapshot::private::private_dir(&dir).map_err(|source| DomainError::Io {
                    path: dir.clone(),
                    source,
                })?;
                // The epoch the VM starts its snapshot at: `wait-paused` with `advance` moves it
                // to the next one and no further, even if that wait outlives an abort that
                // already moved it there.
                let epoch = c.epochs().epoch(&vm).map_err(DomainError::Epoch)?;
                hv.begin(&vm, &dir, call.method)?;
                self.begun
                    .lock()
                    .expect("begun lock")
                    .insert(vm.name.clone(), epoch);
                done()
            }
            DomainOp::WaitPaused | DomainOp::Stop if call.advance => {
                let target = self
                    .begun
                    .lock()
                    .expect("begun lock")
                    .remove(&vm.name)
                    .map(|e| e + 1)
                    .ok_or(DomainError::NotBegun)?;
                let (paused, advanced, advanced_unix_us) = {
                    // The stop → advance window is on the critical path (see the transaction).
                    let _realtime = Realtime::enter("an agent's snapshot step");
                    let paused = match op {
                        DomainOp::Stop => hv.stop(&vm)?,
                        _ => hv.wait_paused(&vm, timeout)?,
                    };
                    let advanced = self.advance_stopped(vm.mac, Some(target));
                    (paused, advanced, unix_us())
                };
                let epoch = advanced.map_err(DomainError::Advance)?.epoch;
                json!(PausedAdvanced {
                    paused,
                    advanced_unix_us,
                    epoch,
                })
            }
            DomainOp::WaitPaused => json!(hv.wait_paused(&vm, timeout)?),
            DomainOp::Stop => json!(hv.stop(&vm)?),
            // Each runs the VM again (or ends it): what was kept back from it since its
            // stop and advance goes on, whatever the step's outcome.
            DomainOp::Capture => {
                let captured = hv.capture(&vm);
                self.runs_again(vm.mac);
                json!(captured?)
            }
            DomainOp::Complete => json!(hv.complete(&vm, timeout)?),
            DomainOp::Resume | DomainOp::Cancel | DomainOp::Destroy => {
                let stepped = match op {
                    DomainOp::Resume => hv.resume(&vm),
                    DomainOp::Cancel => hv.cancel(&vm),
                    _ => hv.destroy(&vm),
                };
                self.runs_again(vm.mac);
                stepped.map(|()| done())?
            }
            DomainOp::Discard => {
                let dir = image_dir(op)?;
                hv.discard(&vm, &dir)?;
                // The last VM's images gone: the directory goes too.
                let _ = std::fs::remove_dir(&dir);
                done()
            }
            DomainOp::Restore => {
                let store = c
                    .store()
                    .canonicalize()
                    .unwrap_or_else(|_| c.store().into());
                let mut dirs = Vec::new();
                for image in &call.images {
                    let real = image
                        .canonicalize()
                        .ok()
                        .filter(|p| p.starts_with(&store))
                        .ok_or_else(|| DomainError::NotInStore(image.clone()))?;
                    let dir = real.parent().map(Path::to_path_buf);
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                // A snapshot's own directory: right under the store, named as snapshots are.
                let snapshot_dir = |d: &Option<PathBuf>| {
                    d.as_deref().is_some_and(|d| {
                        d.parent() == Some(store.as_path())
                            && d.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.parse::<SnapshotId>().is_ok())
                    })
                };
                if let Some(other) = dirs.iter().find(|d| !snapshot_dir(d)) {
                    return Err(DomainError::Hypervisor(HvError::new(
                        &vm.name,
                        HvErrorKind::NotItsImage,
                        format!(
                            "{} is no snapshot's directory of the store",
                            other.as_deref().unwrap_or(Path::new("/")).display()
                        ),
                    )));
                }
                // One snapshot's files only: a memory image of one with the disks of another
                // would restore a VM whose disks never matched its memory.
                if dirs.len() > 1 {
                    return Err(DomainError::Hypervisor(HvError::new(
                        &vm.name,
                        HvErrorKind::NotItsImage,
                        format!(
                            "the images come from {} directories; a restore takes one snapshot's",
                            dirs.len()
                        ),
                    )));
                }
                let port = hv.restore_paused(&vm, &call.images, call.bridge.as_ref())?;
                json!(DomainNic { mac: vm.mac, port })
            }
        })
    }
}
