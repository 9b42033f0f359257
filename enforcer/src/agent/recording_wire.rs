//! How channel-state recordings cross HTTP between a coordinator and the agents of the hosts
//! its group's members run on (`/v1/recordings…`, `/v1/vms/{mac}/shut`, `…/replay`): request
//! and answer bodies, frames carried as base64 of the channel file's own format
//! (`snapshot::channel::encode`, `ENFCHAN1`).

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};

use crate::{
    hold::{RecordedFrame, Recording},
    model::MacAddr,
    snapshot::channel,
};

/// `POST /v1/recordings`: start recording these VMs' channel state (those of this host).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordBegin {
    pub vms: Vec<MacAddr>,
}

/// `POST /v1/recordings/take`: stop recording these VMs and hand over what was recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordTake {
    pub vms: Vec<MacAddr>,
    /// How long the buffer may take to hand the recordings over (ms); 10 s when absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `POST /v1/vms/{mac}/shut`'s answer: whether the VM's tap was empty when it was shut.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Shut {
    pub tap_empty: bool,
}

/// Frames in a body: base64 of the channel file's format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WireFrames(pub String);

impl WireFrames {
    pub fn encode(frames: &[RecordedFrame]) -> Self {
        Self(STANDARD.encode(channel::encode(frames)))
    }

    /// Errors: not base64, or not frames in the channel file's format.
    pub fn decode(&self) -> std::io::Result<Vec<RecordedFrame>> {
        let bytes = STANDARD
            .decode(&self.0)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        channel::decode(&bytes)
    }
}

/// One receiver's [`Recording`] on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecording {
    pub frames: WireFrames,
    pub bytes: u64,
    pub dropped_bound: u64,
    pub lost_at_most: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl From<&Recording> for WireRecording {
    fn from(r: &Recording) -> Self {
        Self {
            frames: WireFrames::encode(&r.frames),
            bytes: r.bytes,
            dropped_bound: r.dropped_bound,
            lost_at_most: r.lost_at_most,
            problem: r.problem.clone(),
        }
    }
}

impl WireRecording {
    /// Errors: its frames do not decode.
    pub fn into_recording(self) -> std::io::Result<Recording> {
        Ok(Recording {
            frames: self.frames.decode()?,
            bytes: self.bytes,
            dropped_bound: self.dropped_bound,
            lost_at_most: self.lost_at_most,
            problem: self.problem,
        })
    }
}

/// `POST /v1/recordings/take`'s answer: by receiver.
pub type WireRecordings = std::collections::BTreeMap<MacAddr, WireRecording>;

/// `POST /v1/vms/{mac}/replay`: frames to put in front of the VM restored on `port`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Replay {
    pub port: String,
    pub frames: WireFrames,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_crosses_the_wire_whole_and_bad_frames_are_refused() {
        let rec = Recording {
            frames: vec![
                RecordedFrame {
                    vnet: [1; 10],
                    data: (0..60).collect(),
                },
                RecordedFrame {
                    vnet: [0; 10],
                    data: vec![7; 9000],
                },
            ],
            bytes: 9060,
            dropped_bound: 1,
            lost_at_most: 2,
            problem: Some("x".into()),
        };
        let json = serde_json::to_string(&WireRecording::from(&rec)).unwrap();
        let back: WireRecording = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_recording().unwrap(), rec);
        assert!(WireFrames("not base64!".into()).decode().is_err());
        assert!(
            WireFrames(STANDARD.encode(b"ENFCHAN1\x01"))
                .decode()
                .is_err()
        );
    }
}
