//! What the buffer shows of itself (`GET /v1/holds`, `/metrics`, the snapshot manifest): its
//! queues, the pinned totals ([`HoldTotal`]), the frames lost in the kernel ([`KernelLoss`])
//! and the hold-time histogram. Plain data with typed keys; serialized by name.

use std::{collections::BTreeMap, fmt, str::FromStr};

use enforcer_common::{HoldKernel, HoldTotal};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::MacAddr;

/// A queue of the buffer: one receiver's (unicast frames), or one group's (broadcast and
/// multicast). Written `vm <mac>` / `group <id>` in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueKey {
    Group(u32),
    Vm(MacAddr),
}

impl fmt::Display for QueueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&match self {
            QueueKey::Vm(mac) => format!("vm {mac}"),
            QueueKey::Group(g) => format!("group {g}"),
        })
    }
}

impl FromStr for QueueKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("queue {s:?}: `vm <mac>` or `group <id>`");
        match s.split_once(' ') {
            Some(("vm", mac)) => mac.parse().map(QueueKey::Vm).map_err(|_| bad()),
            Some(("group", g)) => g.parse().map(QueueKey::Group).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl Serialize for QueueKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for QueueKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Frames the hold path lost in the kernel, by reason: the programs' own count
/// ([`HoldKernel::NoHeadroom`]) and the socket's statistics (`PACKET_STATISTICS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelLoss {
    /// Dropped by the kernel at the buffer's socket: its ring was full (each such frame is
    /// also counted `lost_ring`, exactly, from the gap in its tickets).
    RingFull,
    /// Longer than a block of the ring, so cut short by the kernel: dropped, never delivered
    /// cut.
    Truncated,
    /// Frames to hold that got no room for their hold header, so were not held
    /// ([`HoldKernel::NoHeadroom`]).
    NoHeadroom,
    /// Frames on the hold device's way back that named no port to re-enter
    /// ([`HoldKernel::InjectRefused`]).
    InjectRefused,
}

impl KernelLoss {
    /// Stable snake_case name (`/metrics` prefixes it with `kernel_`).
    pub const fn name(self) -> &'static str {
        match self {
            KernelLoss::RingFull => "ring_full",
            KernelLoss::Truncated => "truncated",
            KernelLoss::NoHeadroom => HoldKernel::NoHeadroom.name(),
            KernelLoss::InjectRefused => HoldKernel::InjectRefused.name(),
        }
    }
}

/// One queue as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueReport {
    pub queue: QueueKey,
    pub frames: u64,
    pub bytes: u64,
    /// How long its oldest frame has waited (ms).
    pub oldest_ms: u64,
    /// Frames dropped at this queue because the memory bound was reached.
    pub dropped_bound: u64,
    /// Its held frames are being re-injected, and newer frames queue behind them.
    pub draining: bool,
}

/// What the buffer holds and has done.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HoldReport {
    pub device: String,
    pub held_frames: u64,
    pub held_bytes: u64,
    pub max_bytes: u64,
    pub queues: Vec<QueueReport>,
    /// The pinned totals, by name (`received`, `reinjected`, `dropped_bound`, ...).
    pub totals: BTreeMap<HoldTotal, u64>,
    /// Frames the kernel could not hand to the buffer, by reason.
    pub kernel: BTreeMap<KernelLoss, u64>,
    /// Hold time of re-injected frames: (upper bound in seconds, cumulative count).
    pub hold_time_buckets: Vec<(f64, u64)>,
    pub hold_time_sum_seconds: f64,
    pub hold_time_count: u64,
    /// Per receiver queue: frames its last advance released.
    #[serde(default)]
    pub released_at_advance: BTreeMap<QueueKey, u64>,
}

impl HoldReport {
    pub fn total(&self, total: HoldTotal) -> u64 {
        self.totals.get(&total).copied().unwrap_or(0)
    }

    /// Queues of these VMs or this group that still hold frames or are draining.
    pub fn pending(&self, vms: &[MacAddr], group: u32) -> Vec<QueueKey> {
        self.queues
            .iter()
            .filter(|q| match q.queue {
                QueueKey::Vm(mac) => vms.contains(&mac),
                QueueKey::Group(g) => g == group,
            })
            .filter(|q| q.frames > 0 || q.draining)
            .map(|q| q.queue)
            .collect()
    }

    /// Frames the VM's last advance released.
    pub fn released_at_advance_of(&self, mac: MacAddr) -> Option<u64> {
        self.released_at_advance.get(&QueueKey::Vm(mac)).copied()
    }

    /// What the buffer lost or dropped so far, by reason: every fate but `reinjected` and
    /// `recorded` (copies of delivered frames kept as channel state), the
    /// frames to hold that got no room for their hold header (`no_headroom`: Type-3 ones
    /// dropped), and frames refused on their way back (`inject_refused`). Running totals, so the difference of two reports is what was lost between.
    pub fn losses(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = HoldTotal::FATES
            .iter()
            .filter(|t| !matches!(t, HoldTotal::Reinjected | HoldTotal::Recorded))
            .map(|t| (t.name().to_owned(), self.total(*t)))
            .collect();
        let headroom = self
            .kernel
            .get(&KernelLoss::NoHeadroom)
            .copied()
            .unwrap_or(0);
        out.insert(KernelLoss::NoHeadroom.name().to_owned(), headroom);
        out
    }

    /// Another buffer's report added in: queues side by side, counts summed (a coordinator of
    /// several hosts shows its agents' buffers as one).
    pub fn merge(&mut self, other: HoldReport) {
        self.device = if self.device.is_empty() {
            other.device
        } else {
            format!("{},{}", self.device, other.device)
        };
        self.held_frames += other.held_frames;
        self.held_bytes += other.held_bytes;
        self.max_bytes += other.max_bytes;
        self.queues.extend(other.queues);
        add_all(&mut self.totals, other.totals);
        add_all(&mut self.kernel, other.kernel);
        add_all(&mut self.released_at_advance, other.released_at_advance);
        self.hold_time_sum_seconds += other.hold_time_sum_seconds;
        self.hold_time_count += other.hold_time_count;
        if self.hold_time_buckets.is_empty() {
            self.hold_time_buckets = other.hold_time_buckets;
        } else {
            for (mine, theirs) in self
                .hold_time_buckets
                .iter_mut()
                .zip(other.hold_time_buckets)
            {
                mine.1 += theirs.1;
            }
        }
    }
}

fn add_all<K: Ord>(into: &mut BTreeMap<K, u64>, from: BTreeMap<K, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_keep_their_wire_names() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let mut r = HoldReport::default();
        r.totals.insert(HoldTotal::Reinjected, 3);
        r.kernel.insert(KernelLoss::RingFull, 2);
        r.released_at_advance.insert(QueueKey::Vm(mac), 3);
        r.queues.push(QueueReport {
            queue: QueueKey::Group(7),
            frames: 1,
            bytes: 60,
            oldest_ms: 0,
            dropped_bound: 0,
            draining: true,
        });
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["totals"]["reinjected"], 3);
        assert_eq!(json["kernel"]["ring_full"], 2);
        assert_eq!(json["released_at_advance"]["vm 02:00:00:00:00:01"], 3);
        assert_eq!(json["queues"][0]["queue"], "group 7");
        let back: HoldReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.pending(&[mac], 7), vec![QueueKey::Group(7)]);
        assert_eq!(back.released_at_advance_of(mac), Some(3));
        assert!("vm nope".parse::<QueueKey>().is_err());
    }
}
