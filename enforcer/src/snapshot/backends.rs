//! What the snapshot transaction needs from the world, as two traits with typed errors: a
//! [`Hypervisor`] (per VM: begin a snapshot by either [`CutMethod`], stop or wait for the stop,
//! capture, complete, resume, cancel, restore) and an [`EpochControl`] (the datapath's epochs and the buffer's state). One host's
//! libvirt and agent implement them in process; the agents of several hosts over HTTP
//! (`multihost`); a fake in the tier-0 tests.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::manifest::CutMethod;
use crate::{
    hold::{HoldReport, QueueKey, RecordedFrame, Recording, Replayed},
    model::{GroupSpec, IfName, MacAddr, VmSpec},
};

/// What kind of hypervisor failure, for callers that act on it (an abort is clean when the VM
/// is gone; the API answers 404 for a domain that does not exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HvErrorKind {
    /// No domain of that name.
    NoSuchDomain,
    /// The domain is not running (paused, shut off) where it must be.
    NotRunning,
    /// A domain of that name runs where it must not (restoring over it).
    Running,
    /// The images given for a restore are not this VM's (another domain's name or MAC, or
    /// files of several snapshots): refused before anything changed.
    NotItsImage,
    /// Anything else: QEMU, libvirt, the images.
    Failed,
}

/// A domain as the hypervisor has it (`GET /v1/domains/{name}/state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// No domain of that name.
    Absent,
    /// Defined, not running (shut off, crashed).
    ShutOff,
    /// Its vCPUs run.
    Running,
    /// Paused (or suspended): restored and not resumed yet, or held by a snapshot.
    Paused,
}

/// A hypervisor step that failed for one VM.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{vm}: {detail}")]
pub struct HvError {
    pub vm: String,
    pub kind: HvErrorKind,
    /// For people: what the hypervisor said.
    pub detail: String,
}

impl HvError {
    pub fn new(vm: impl Into<String>, kind: HvErrorKind, detail: impl Into<String>) -> Self {
        Self {
            vm: vm.into(),
            kind,
            detail: detail.into(),
        }
    }

    pub fn failed(vm: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(vm, HvErrorKind::Failed, detail)
    }
}

/// When a VM stopped at its snapshot point.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Paused {
    /// The hypervisor's own timestamp of the stop, when it gives one (µs since the Unix epoch).
    pub hypervisor_unix_us: Option<u64>,
    /// When the coordinator learned of it.
    pub seen_unix_us: u64,
}

/// What the coordinator needs from a hypervisor, per VM.
///
/// [`CutMethod::Instant`]: `begin` → `stop` (the coordinator calls it for every VM at one
/// instant) → advance → `capture` (the VM runs again) → `complete`.
/// [`CutMethod::PreCopy`]: `begin` → `wait_paused` → advance → `complete` → `resume`.
pub trait Hypervisor: Send + Sync {
    /// Starts a snapshot of the VM into `image_dir`. Instant: only prepares it (the image
    /// file, the hypervisor's settings); the VM runs on. Pre-copy: starts copying memory while
    /// the VM runs, until the final stop-and-copy, where it stops and **waits** (for
    /// [`Hypervisor::complete`]).
    fn begin(&self, vm: &VmSpec, image_dir: &Path, method: CutMethod) -> Result<(), HvError>;
    /// Instant: stops the VM now, at its snapshot point. It does not run again before
    /// [`Hypervisor::capture`].
    fn stop(&self, vm: &VmSpec) -> Result<Paused, HvError>;
    /// [`Hypervisor::stop`], then the VM's epoch advanced right there by the agent on the
    /// VM's own host (as [`Hypervisor::advance_at_pause`]). `None`: not offered.
    fn stop_and_advance(&self, _vm: &VmSpec) -> Option<Result<(Paused, u64), HvError>> {
        None
    }
    /// Instant, after the advance: captures the stopped VM's disks and device state, starts
    /// writing its memory as it was at the stop, and runs it again. Returns when it runs (µs
    /// since the Unix epoch: the hypervisor's own timestamp where it has one).
    fn capture(&self, vm: &VmSpec) -> Result<u64, HvError>;
    /// Pre-copy: blocks until the VM is stopped at its snapshot point.
    fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<Paused, HvError>;
    /// [`Hypervisor::wait_paused`], then the VM's epoch advanced right there, by whoever sees
    /// the stop first: an agent on the VM's own host does both in one call, so no network
    /// hop separates the stop from the advance. Returns when the advance was made (µs since
    /// the Unix epoch). `None`: not offered; the coordinator waits, then advances itself.
    fn advance_at_pause(
        &self,
        _vm: &VmSpec,
        _timeout: Duration,
    ) -> Option<Result<(Paused, u64), HvError>> {
        None
    }
    /// Waits until the image is whole. Pre-copy: lets the final copy go on; the VM stays
    /// paused. Instant: the VM runs meanwhile. Returns the files written.
    fn complete(&self, vm: &VmSpec, timeout: Duration) -> Result<Vec<PathBuf>, HvError>;
    /// Runs the VM again.
    fn resume(&self, vm: &VmSpec) -> Result<(), HvError>;
    /// Abandons an unfinished snapshot of the VM and leaves the VM as it was before: running
    /// again if the snapshot stopped it (a VM paused by someone else stays paused).
    fn cancel(&self, vm: &VmSpec) -> Result<(), HvError>;
    /// A running VM's MAC and host-side port.
    fn nic(&self, vm: &str) -> Result<(MacAddr, String), HvError>;
    /// Whether a domain of that name exists, and whether it runs: what a restore checks before
    /// it changes anything, and what recovering an unfinished restore goes by.
    fn state(&self, vm: &str) -> Result<DomainState, HvError>;
    /// Brings a VM back from its images, paused; optionally onto another bridge. Returns its
    /// host-side port.
    fn restore_paused(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        bridge: Option<&IfName>,
    ) -> Result<String, HvError>;
    /// Stops a VM for good (undoing a partial restore).
    fn destroy(&self, vm: &VmSpec) -> Result<(), HvError>;
    /// Deletes the VM's images of the snapshot whose directory is `image_dir` (an aborted or
    /// deleted snapshot). Where the images live is the hypervisor's business: on the host
    /// that runs the VM.
    fn discard(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError>;
}

/// What went wrong reading or changing a datapath's epochs (this host's, or an agent's).
#[derive(Debug, thiserror::Error)]
pub enum EpochControlError {
    /// The VM is not registered where its epoch lives.
    #[error("{vm} ({mac}) is not registered")]
    NotRegistered { vm: String, mac: MacAddr },
    /// Its port is not attached (a restored VM's new tap did not show up in time).
    #[error("port {port} is not attached (is it on a bridge this daemon watches?)")]
    PortNotAttached { port: String },
    /// The datapath refused the change, by its rules (its own error says which).
    #[error("{0}")]
    Refused(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The datapath, its buffer or the agent that owns it does not answer, or is stopping.
    #[error("{0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Held frames were still being re-injected at the deadline.
    #[error("still held or draining: {}", list(.0))]
    NotReleased(Vec<QueueKey>),
    /// The VM's name does not say which host runs it, or names a host not in the hosts file.
    #[error("{0}")]
    NoHost(String),
    /// Finding the VM's port failed.
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    /// A view of the VM on another host failed.
    #[error("{vm} (view on {host}): {source}")]
    View {
        vm: String,
        host: String,
        source: Box<EpochControlError>,
    },
    /// Several hosts failed, each in its own way.
    #[error("{}", hosts(.0))]
    Hosts(Vec<(String, EpochControlError)>),
    /// This datapath does not do it (yet).
    #[error("{0}")]
    Unsupported(String),
}

fn list(queues: &[QueueKey]) -> String {
    queues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn hosts(failed: &[(String, EpochControlError)]) -> String {
    failed
        .iter()
        .map(|(host, e)| format!("{host}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the coordinator needs from the datapath.
pub trait EpochControl: Send + Sync {
    fn epoch(&self, vm: &VmSpec) -> Result<u32, EpochControlError>;
    fn advance(&self, vm: &VmSpec) -> Result<u32, EpochControlError>;
    /// The buffer's report: `Ok(None)` when no buffer runs (nothing is ever held), `Err` when
    /// it does not answer.
    fn hold_report(&self) -> Result<Option<HoldReport>, EpochControlError>;
    /// Frames held so far (a running total), when a buffer runs: what it read, less the
    /// channel-state copies it recorded.
    fn held_total(&self) -> Option<u64> {
        use enforcer_common::HoldTotal;
        let report = self.hold_report().ok()??;
        Some(
            report
                .total(HoldTotal::Received)
                .saturating_sub(report.total(HoldTotal::Recorded)),
        )
    }
    /// What the buffers lost so far, by reason ([`HoldReport::losses`]), when they answer.
    fn hold_losses(&self) -> Option<BTreeMap<String, u64>> {
        Some(self.hold_report().ok()??.losses())
    }
    /// Frames each VM's last advance released (what was held for it), where known.
    fn held_at_advance(&self, group: &GroupSpec) -> HashMap<MacAddr, u64> {
        let Ok(Some(report)) = self.hold_report() else {
            return HashMap::new();
        };
        group
            .vms
            .iter()
            .filter_map(|v| Some((v.mac, report.released_at_advance_of(v.mac)?)))
            .collect()
    }
    /// Waits until nothing is held for the group's VMs any more (REINJECT done). A buffer that
    /// does not answer (busy re-injecting) is asked again until the deadline.
    fn wait_released(&self, group: &GroupSpec, timeout: Duration) -> Result<(), EpochControlError> {
        let macs = group.macs();
        let deadline = Instant::now() + timeout;
        loop {
            let failed = match self.hold_report() {
                Ok(None) => return Ok(()),
                Ok(Some(report)) => {
                    let pending = report.pending(&macs, group.id);
                    if pending.is_empty() {
                        return Ok(());
                    }
                    EpochControlError::NotReleased(pending)
                }
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(failed);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
    /// Puts a VM on `port` in `group` at `epoch` (replacing what the datapath had for its MAC).
    /// Waits briefly for the port to be attached (a restored VM's tap is new).
    fn register(
        &self,
        vm: &VmSpec,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<u32, EpochControlError>;
    /// Forgets a VM.
    fn unregister(&self, vm: &VmSpec) -> Result<(), EpochControlError>;
    /// Registers again what a datapath has forgotten — an agent restarted on empty maps, or a
    /// host replaced — before a snapshot relies on it. `port_of` finds a VM's port where it
    /// runs. Returns what was registered again (for the log). One datapath keeps its
    /// registrations pinned and is never asked to forget them: nothing to do by default.
    fn restore_registrations(
        &self,
        _group: &GroupSpec,
        _port_of: &dyn Fn(&VmSpec) -> Result<String, HvError>,
    ) -> Result<Vec<String>, EpochControlError> {
        Ok(Vec::new())
    }
    /// Before a snapshot moves `group` to `epoch`: every datapath that keeps views of its
    /// members learns that they may now carry it, so their frames' wire colors up to it are
    /// accepted and higher ones dropped as forged (`VmEpoch::ceiling`). Only views need it:
    /// nothing to do on one host.
    fn announce(&self, _group: &GroupSpec, _epoch: u32) -> Result<(), EpochControlError> {
        Ok(())
    }
    /// `vm`, stopped by this snapshot and advanced by [`EpochControl::advance`], runs again:
    /// what its datapath kept back from it while it was stopped goes on. Datapaths that keep
    /// nothing back have nothing to do; across hosts the agent that runs the VM again does it
    /// itself.
    fn runs_again(&self, _vm: &VmSpec) {}
    /// Aborting a snapshot that started with the group at `epoch`: held frames are released
    /// and the group's members end at one epoch again. On one host they go back to `epoch`;
    /// across hosts they go forward to `epoch + 1` instead, because a view raised from a
    /// frame's color would lead a lowered epoch (see `multihost::hosts`).
    fn abort_epochs(&self, group: &GroupSpec, epoch: u32) -> Result<(), EpochControlError>;
    /// Starts recording the group's channel state (invariant 7): from each member's cut on,
    /// the frames delivered to it that their sender sent before its own. Called before the
    /// cut; [`EpochControl::record_end`] must follow, whatever the outcome.
    fn record_begin(&self, _group: &GroupSpec) -> Result<(), EpochControlError> {
        Err(EpochControlError::Unsupported(
            "this datapath does not record channel state".into(),
        ))
    }
    /// Just before an instant cut stops `vm`, while its channel state is being recorded: keeps
    /// every frame to it out of its tap until its cut (held, then recorded or delivered after
    /// it), so that nothing waits there when it stops. Returns whether its tap was empty when
    /// it was shut. Datapaths that do not record have nothing to shut.
    fn shut_before_cut(&self, _vm: &VmSpec) -> Result<bool, EpochControlError> {
        Ok(true)
    }
    /// Stops recording and hands over what was recorded, by receiver.
    fn record_end(
        &self,
        _group: &GroupSpec,
    ) -> Result<BTreeMap<MacAddr, Recording>, EpochControlError> {
        Err(EpochControlError::Unsupported(
            "this datapath does not record channel state".into(),
        ))
    }
    /// Puts a receiver's recorded channel state in front of it, restored on `port` and not
    /// running yet, in order.
    fn replay(
        &self,
        _vm: &VmSpec,
        _port: &str,
        _frames: &[RecordedFrame],
    ) -> Result<Replayed, EpochControlError> {
        Err(EpochControlError::Unsupported(
            "this datapath does not replay channel state".into(),
        ))
    }
}

/// Now, in µs since the Unix epoch (the clock hypervisors stamp their events with).
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}
