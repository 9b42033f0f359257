//! The buffer's settings and its errors.

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
}

impl Default for HoldOptions {
    fn default() -> Self {
        Self {
            device: "enfhold".into(),
            max_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("hold device name {0:?} must be 1-14 characters")]
    BadName(String),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("AF_XDP socket on {device}: {detail}")]
    Xsk { device: String, detail: String },
    #[error("mapping the UMEM: {0}")]
    Mmap(std::io::Error),
    #[error("starting the buffer thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("the datapath's registrations: {0}")]
    Epochs(#[from] EpochError<DatapathError>),
}
