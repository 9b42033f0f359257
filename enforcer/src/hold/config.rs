//! The buffer's settings and its errors.

use std::sync::Arc;

use crate::datapath::{DatapathError, epochs::EpochError};

/// Buffer settings.
#[derive(Clone, Debug)]
pub struct HoldOptions {
    /// Name of the hold device (the veth end the datapath redirects to; the socket side is
    /// `<name>p`). At most 14 characters.
    pub device: String,
    /// Memory bound for held frames, all receivers together (bytes). When reached, the newest
    /// frame is dropped and counted (`dropped_bound`).
    pub max_bytes: usize,
    /// Called by the buffer thread at each point of its loop (none by default). A test stops
    /// the thread at a chosen point by blocking in it: the buffer's promises must hold under
    /// every scheduling of its thread.
    pub at_point: LoopHook,
}

impl Default for HoldOptions {
    fn default() -> Self {
        Self {
            device: "enfhold".into(),
            max_bytes: 64 << 20,
            at_point: LoopHook::default(),
        }
    }
}

/// The points of the buffer thread's loop, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoopPoint {
    /// Before it takes the epoch notices and requests waiting in its channel.
    TakeNotices,
    /// Before it raises views from colors learned from other hosts' frames.
    ApplyLearned,
    /// Before it reads the ring of frames handed to the hold path.
    ReadRing,
    /// Before it moves drains on (clearing draining flags).
    ProgressDrains,
    /// Before it waits for frames, when a turn found nothing to do.
    Wait,
}

impl LoopPoint {
    pub const ALL: [LoopPoint; 5] = [
        LoopPoint::TakeNotices,
        LoopPoint::ApplyLearned,
        LoopPoint::ReadRing,
        LoopPoint::ProgressDrains,
        LoopPoint::Wait,
    ];
}

/// A function the buffer thread calls at each [`LoopPoint`] ([`HoldOptions::at_point`]).
#[derive(Clone, Default)]
pub struct LoopHook(Option<Arc<dyn Fn(LoopPoint) + Send + Sync>>);

impl LoopHook {
    pub fn new(f: impl Fn(LoopPoint) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    #[inline]
    pub(crate) fn at(&self, point: LoopPoint) {
        if let Some(f) = &self.0 {
            f(point);
        }
    }
}

impl std::fmt::Debug for LoopHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "LoopHook(set)"
        } else {
            "LoopHook(none)"
        })
    }
}

/// The alias (`ifalias`) every hold device carries: the only links a daemon deletes by name.
pub(crate) const HOLD_ALIAS: &str = "enforcer-hold-device";

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("hold device name {0:?} must be 1-14 characters")]
    BadName(String),
    #[error(
        "a link named {0} exists and is not an enforcer hold device (neither the `{HOLD_ALIAS}` \
         alias nor a veth paired with {0}p): choose another --hold-device"
    )]
    NotOurs(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("the hold device's socket on {device}: {detail}")]
    Socket { device: String, detail: String },
    #[error("starting the buffer thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("the datapath's registrations: {0}")]
    Epochs(#[from] EpochError<DatapathError>),
}
