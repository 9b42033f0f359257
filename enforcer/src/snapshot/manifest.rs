//! What is kept of a snapshot (`<store>/<id>/manifest.json`) and shown of one while it runs:
//! its outcome, its images and each VM's step and timeline; and what a restore reports. Plain
//! serializable data; the API serves it as it is.

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use super::channel::ChannelState;
use crate::model::{GroupName, GroupSpec, MacAddr, SnapshotId, VmSpec};

/// How a group snapshot stops its VMs and captures them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutMethod {
    /// The coordinator stops every VM at one instant, advances each while it is stopped,
    /// freezes its disks (a qcow2 overlay each, O(1)) and its device state, and lets it run
    /// at once; memory is written afterwards as it was at the stop (QEMU's
    /// `background-snapshot`, userfaultfd write-protect). Downtime and the group's stop spread
    /// do not depend on memory or disk size.
    #[default]
    Instant,
    /// Each VM is copied live until its pre-copy converges; QEMU stops it then
    /// (`pause-before-switchover`) and its disks are copied while it stays stopped. For VMs
    /// whose memory cannot be write-tracked (hugepages, some device assignments) or a QEMU
    /// without `background-snapshot`. Each VM's stop is set by its own convergence.
    PreCopy,
}

impl CutMethod {
    pub const ALL: [CutMethod; 2] = [CutMethod::Instant, CutMethod::PreCopy];

    pub const fn name(self) -> &'static str {
        match self {
            CutMethod::Instant => "instant",
            CutMethod::PreCopy => "pre-copy",
        }
    }

    /// What manifests written before the method was recorded used.
    pub(crate) fn legacy() -> Self {
        CutMethod::PreCopy
    }
}

impl fmt::Display for CutMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// An unknown method name.
#[derive(Debug, thiserror::Error)]
#[error("no snapshot method {0:?} (instant, pre-copy)")]
pub struct NoSuchMethod(String);

impl std::str::FromStr for CutMethod {
    type Err = NoSuchMethod;

    fn from_str(s: &str) -> Result<Self, NoSuchMethod> {
        CutMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| NoSuchMethod(s.to_owned()))
    }
}

/// Milliseconds since the transaction started, per step of one VM.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    pub begin_ms: Option<f64>,
    /// The snapshot point: the hypervisor's timestamp of the stop when it has one.
    pub paused_ms: Option<f64>,
    /// When the coordinator learned of the stop.
    pub pause_seen_ms: Option<f64>,
    pub advanced_ms: Option<f64>,
    pub image_complete_ms: Option<f64>,
    pub resumed_ms: Option<f64>,
}

impl Timeline {
    /// Time the VM did not run: from its snapshot point to its resume.
    pub fn downtime_ms(&self) -> Option<f64> {
        Some(self.resumed_ms? - self.paused_ms?)
    }

    /// From the snapshot point to the datapath knowing the new epoch.
    pub fn pause_to_advance_ms(&self) -> Option<f64> {
        Some(self.advanced_ms? - self.paused_ms?)
    }

    /// The coordinator's own part: from learning of the stop to the map updated.
    pub fn seen_to_advance_ms(&self) -> Option<f64> {
        Some(self.advanced_ms? - self.pause_seen_ms?)
    }
}

/// The last step a VM reached in a snapshot (the transaction's states, in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Pending,
    Snapshotting,
    Paused,
    Advanced,
    ImageComplete,
    Resumed,
}

impl Step {
    pub const fn name(self) -> &'static str {
        match self {
            Step::Pending => "pending",
            Step::Snapshotting => "snapshotting",
            Step::Paused => "paused",
            Step::Advanced => "advanced",
            Step::ImageComplete => "image-complete",
            Step::Resumed => "resumed",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One VM of a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapshotVm {
    pub name: String,
    pub mac: MacAddr,
    pub images: Vec<PathBuf>,
    pub step: Step,
    pub timeline: Timeline,
    /// Frames held for this VM until it advanced (then re-injected).
    #[serde(default)]
    pub held_frames: Option<u64>,
    pub error: Option<String>,
}

impl SnapshotVm {
    /// A VM's record before any step of the transaction.
    pub(crate) fn pending(vm: &VmSpec) -> Self {
        Self {
            name: vm.name.clone(),
            mac: vm.mac,
            images: Vec::new(),
            step: Step::Pending,
            timeline: Timeline::default(),
            held_frames: None,
            error: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotOutcome {
    /// Still in progress (only in live views).
    Running,
    Committed,
    Aborted,
}

impl SnapshotOutcome {
    pub const fn name(self) -> &'static str {
        match self {
            SnapshotOutcome::Running => "running",
            SnapshotOutcome::Committed => "committed",
            SnapshotOutcome::Aborted => "aborted",
        }
    }
}

impl fmt::Display for SnapshotOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// What is kept with a snapshot (`<store>/<id>/manifest.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub id: SnapshotId,
    pub group: GroupSpec,
    /// The epoch the snapshot moved the group to (committed), or tried to (aborted).
    pub epoch: u32,
    pub outcome: SnapshotOutcome,
    pub reason: Option<String>,
    /// How the VMs were stopped and captured.
    #[serde(default = "CutMethod::legacy")]
    pub method: CutMethod,
    pub started_unix_ms: u64,
    /// From the first VM's stop to the last one's (ms): how far the group's cut is from one
    /// instant.
    #[serde(default)]
    pub stop_spread_ms: Option<f64>,
    /// Type-3 frames the buffer held while the snapshot ran (all released by its end).
    #[serde(default)]
    pub held_frames: Option<u64>,
    /// When everything held for the group had been re-injected (ms from the start; REINJECT).
    #[serde(default)]
    pub released_ms: Option<f64>,
    /// Frames the buffers of the group's hosts lost or dropped while the snapshot ran, by
    /// reason (`lost_ring`, `dropped_bound`, ...; see `HoldTotal`); empty: none. A snapshot is
    /// never committed as if nothing happened: the images are consistent either way (what a
    /// buffer holds is after the cut), but frames the live group sent were lost. The totals
    /// are each buffer's, so another group's losses in the same window are counted too.
    #[serde(default)]
    pub held_lost: BTreeMap<String, u64>,
    /// The frames in flight at the cut, recorded with the snapshot and replayed on restore
    /// (invariant 7; see `snapshot::channel`); `None` in live views and older manifests.
    #[serde(default)]
    pub channel_state: Option<ChannelState>,
    pub vms: Vec<SnapshotVm>,
}

impl Manifest {
    /// From the first VM's stop to the last one's, over the VMs that stopped.
    pub fn stop_spread(vms: &[SnapshotVm]) -> Option<f64> {
        let stops: Vec<f64> = vms.iter().filter_map(|v| v.timeline.paused_ms).collect();
        let first = stops.iter().copied().reduce(f64::min)?;
        Some(stops.iter().copied().fold(first, f64::max) - first)
    }

    /// Whether the snapshot is over (committed or aborted).
    pub fn finished(&self) -> bool {
        self.outcome != SnapshotOutcome::Running
    }
}

/// A snapshot being taken: visible to readers while it runs.
pub(crate) struct Live {
    pub(crate) id: SnapshotId,
    pub(crate) group: GroupSpec,
    pub(crate) epoch: u32,
    pub(crate) method: CutMethod,
    pub(crate) started_unix_ms: u64,
    pub(crate) records: Vec<Arc<Mutex<SnapshotVm>>>,
}

impl Live {
    pub(crate) fn manifest(&self) -> Manifest {
        Manifest {
            id: self.id.clone(),
            group: self.group.clone(),
            epoch: self.epoch,
            outcome: SnapshotOutcome::Running,
            reason: None,
            method: self.method,
            started_unix_ms: self.started_unix_ms,
            stop_spread_ms: None,
            held_frames: None,
            released_ms: None,
            held_lost: BTreeMap::new(),
            channel_state: None,
            vms: self
                .records
                .iter()
                .map(|r| r.lock().expect("record lock").clone())
                .collect(),
        }
    }
}

/// One VM brought back by a restore.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RestoredVm {
    pub name: String,
    pub mac: MacAddr,
    pub port: String,
    pub restored_ms: f64,
    pub resumed_ms: f64,
    /// Channel-state frames put in front of it before it ran (its port took them); `None`:
    /// the snapshot has none recorded.
    #[serde(default)]
    pub replayed: Option<u64>,
    /// Why its channel state was not (all) replayed, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    pub snapshot: SnapshotId,
    pub group: GroupName,
    pub epoch: u32,
    pub vms: Vec<RestoredVm>,
    /// From the first VM resumed to the last.
    pub resume_spread_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_outcomes_keep_their_wire_names() {
        assert_eq!(
            serde_json::to_value(Step::ImageComplete).unwrap(),
            "image-complete"
        );
        assert_eq!(Step::ImageComplete.to_string(), "image-complete");
        assert_eq!(
            serde_json::from_value::<Step>("snapshotting".into()).unwrap(),
            Step::Snapshotting
        );
        assert_eq!(
            serde_json::to_value(SnapshotOutcome::Committed).unwrap(),
            "committed"
        );
        assert!(
            Step::Pending < Step::Resumed,
            "steps in the transaction's order"
        );
        for m in CutMethod::ALL {
            assert_eq!(m.name().parse::<CutMethod>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
        assert!("fast".parse::<CutMethod>().is_err());
    }
}
