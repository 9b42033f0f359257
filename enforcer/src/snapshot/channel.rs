//! The channel state kept with a snapshot (invariant 7 in docs/design.md): per receiver, the
//! frames in flight at the group's cut — delivered to it after its cut, sent before their
//! sender's — recorded while the snapshot ran, written beside the images, and replayed into
//! the restored receiver before the group runs again.
//!
//! On disk, `<snapshot>/channel/<vm>.frames`: the 8 bytes `ENFCHAN1`, then per frame, in the
//! order it reached the receiver, its length (`u32`, little-endian), its virtio-net header
//! (10 bytes: `struct virtio_net_hdr`, native byte order; a GSO super-frame is kept whole, a
//! checksum left to offload stays to do) and its bytes from the Ethernet header on. The
//! manifest's [`ChannelState`] says what each file holds and whether anything is missing.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    hold::{RecordedFrame, Recording},
    model::{GroupSpec, MacAddr},
};

const MAGIC: &[u8; 8] = b"ENFCHAN1";
const VNET_LEN: usize = 10;
/// The longest frame a recording holds: a 64 KiB GSO super-frame, Ethernet header and two
/// VLAN tags.
const MAX_FRAME: usize = 65_535 + 14 + 8;

/// The manifest's account of the channel state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelState {
    /// Recorded and kept with the snapshot.
    pub recorded: bool,
    /// Why not, when not; when recorded, why it may be incomplete beyond what each receiver
    /// says (held frames lost while the snapshot ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// By receiver (VM name); receivers with nothing in flight are listed with 0 frames.
    #[serde(default)]
    pub receivers: BTreeMap<String, ReceiverChannel>,
}

/// What was in flight toward one receiver at the cut.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiverChannel {
    pub frames: u64,
    pub bytes: u64,
    /// Frames sent by each member (VM name; `other` for a source address no member has).
    pub from: BTreeMap<String, u64>,
    /// Frames not kept: the buffer's memory bound was reached.
    #[serde(default)]
    pub dropped_bound: u64,
    /// Frames that may have been lost on their way to the buffer (an upper bound).
    #[serde(default)]
    pub lost_at_most: u64,
    /// What else kept it from being complete (its tap's queue unreadable at its cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl ChannelState {
    /// The channel state was not recorded, and why.
    pub fn not_recorded(reason: impl Into<String>) -> Self {
        Self {
            recorded: false,
            reason: Some(reason.into()),
            receivers: BTreeMap::new(),
        }
    }

    /// Recorded, and nothing missing.
    pub fn complete(&self) -> bool {
        self.recorded
            && self.reason.is_none()
            && self
                .receivers
                .values()
                .all(|r| r.dropped_bound == 0 && r.lost_at_most == 0 && r.problem.is_none())
    }

    /// Frames recorded, over every receiver.
    pub fn frames(&self) -> u64 {
        self.receivers.values().map(|r| r.frames).sum()
    }
}

/// The file of a receiver's channel state in a snapshot's directory.
pub fn path(snapshot_dir: &Path, vm: &str) -> PathBuf {
    snapshot_dir.join("channel").join(format!("{vm}.frames"))
}

/// Writes each member's recording to `<dir>/channel/<vm>.frames` (durably) and returns the
/// manifest's account of them. A member with no recording gets an empty file.
pub fn save(
    dir: &Path,
    group: &GroupSpec,
    recordings: &BTreeMap<MacAddr, Recording>,
) -> io::Result<ChannelState> {
    fs::create_dir_all(dir.join("channel"))?;
    let names: BTreeMap<[u8; 6], &str> = group
        .vms
        .iter()
        .map(|v| (v.mac.0, v.name.as_str()))
        .collect();
    let mut receivers = BTreeMap::new();
    for vm in &group.vms {
        let empty = Recording::default();
        let rec = recordings.get(&vm.mac).unwrap_or(&empty);
        let out = encode(&rec.frames);
        let mut from: BTreeMap<String, u64> = BTreeMap::new();
        for f in &rec.frames {
            let src: Option<[u8; 6]> = f.data.get(6..12).and_then(|s| s.try_into().ok());
            let sender = src.and_then(|s| names.get(&s)).copied().unwrap_or("other");
            *from.entry(sender.to_owned()).or_default() += 1;
        }
        let file = path(dir, &vm.name);
        let mut w = fs::File::create(&file)?;
        w.write_all(&out)?;
        w.sync_all()?;
        receivers.insert(
            vm.name.clone(),
            ReceiverChannel {
                frames: rec.frames.len() as u64,
                bytes: rec.bytes,
                from,
                dropped_bound: rec.dropped_bound,
                lost_at_most: rec.lost_at_most,
                problem: rec.problem.clone(),
            },
        );
    }
    fs::File::open(dir.join("channel"))?.sync_all()?;
    Ok(ChannelState {
        recorded: true,
        reason: None,
        receivers,
    })
}

/// Reads a receiver's recorded frames back, in order.
pub fn load(snapshot_dir: &Path, vm: &str) -> io::Result<Vec<RecordedFrame>> {
    let mut bytes = Vec::new();
    fs::File::open(path(snapshot_dir, vm))?.read_to_end(&mut bytes)?;
    decode(&bytes)
}

/// Frames in the file's format (`ENFCHAN1`, then per frame its length, virtio-net header and
/// bytes): also how agents hand recordings over HTTP.
pub fn encode(frames: &[RecordedFrame]) -> Vec<u8> {
    let bytes: usize = frames.iter().map(|f| 4 + VNET_LEN + f.data.len()).sum();
    let mut out = Vec::with_capacity(MAGIC.len() + bytes);
    out.extend_from_slice(MAGIC);
    for f in frames {
        out.extend_from_slice(&(f.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&f.vnet);
        out.extend_from_slice(&f.data);
    }
    out
}

/// The frames [`encode`] wrote, in order. Errors (`InvalidData`): no `ENFCHAN1` in front, a
/// length no frame has (under an Ethernet header, over a GSO super-frame with two VLAN tags),
/// or the bytes cut short.
pub fn decode(bytes: &[u8]) -> io::Result<Vec<RecordedFrame>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("not a channel-state file (no ENFCHAN1)"))?;
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("cut short in a frame's length"))?;
        let len = u32::from_le_bytes(*len) as usize;
        // An Ethernet header at least; at most a GSO super-frame with two VLAN tags.
        if !(14..=MAX_FRAME).contains(&len) {
            return Err(bad("a frame length no frame has"));
        }
        let (vnet, tail) = tail
            .split_first_chunk::<VNET_LEN>()
            .ok_or_else(|| bad("cut short in a frame's virtio-net header"))?;
        let (data, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| bad("cut short in a frame"))?;
        frames.push(RecordedFrame {
            vnet: *vnet,
            data: data.to_vec(),
        });
        rest = tail;
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VmSpec;

    fn frame(src: u8, n: u8) -> RecordedFrame {
        let mut data = vec![0xff; 6];
        data.extend_from_slice(&[2, 0, 0, 0, 0, src]);
        data.extend_from_slice(&[0x08, 0x00, n]);
        RecordedFrame {
            vnet: [n; VNET_LEN],
            data,
        }
    }

    #[test]
    fn a_recording_round_trips_in_order_and_is_accounted_by_sender() {
        let dir = std::env::temp_dir().join(format!("enforcer-channel-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let vm = |name: &str, last: u8| VmSpec {
            name: name.into(),
            mac: MacAddr([2, 0, 0, 0, 0, last]),
        };
        let group = GroupSpec {
            name: "g".parse().unwrap(),
            id: 7,
            vms: vec![vm("a", 1), vm("b", 2)],
        };
        let rec = Recording {
            frames: vec![frame(1, 1), frame(9, 2), frame(1, 3)],
            bytes: 45,
            dropped_bound: 0,
            lost_at_most: 2,
            problem: None,
        };
        let state = save(
            &dir,
            &group,
            &BTreeMap::from([(MacAddr([2, 0, 0, 0, 0, 2]), rec.clone())]),
        )
        .unwrap();
        assert_eq!(load(&dir, "b").unwrap(), rec.frames);
        assert!(load(&dir, "a").unwrap().is_empty());
        let b = &state.receivers["b"];
        assert_eq!((b.frames, b.bytes, b.lost_at_most), (3, 45, 2));
        assert_eq!(
            b.from,
            BTreeMap::from([("a".into(), 2), ("other".into(), 1)])
        );
        assert!(
            !state.complete(),
            "a possible loss is never called complete"
        );
        assert_eq!(state.frames(), 3);
        // A file cut short is refused, not read as fewer frames.
        let bytes = fs::read(path(&dir, "b")).unwrap();
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(b"ENFCHAN0").is_err());
        let mut zero = MAGIC.to_vec();
        zero.extend_from_slice(&[0; 4 + VNET_LEN]);
        assert!(decode(&zero).is_err(), "a zero-length frame is corruption");
        fs::remove_dir_all(&dir).unwrap();
    }
}
