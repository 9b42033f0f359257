//! Types shared by the kernel programs and userspace, and the one classification function
//! that both use.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size assertion, so the
//! layout the eBPF object was compiled with is the layout userspace reads and writes.
//! The pure decision logic ([`decide`]) lives here so it is unit-tested in userspace and
//! compiled unchanged into the datapath.
#![no_std]
// clap's derive names `::std` paths; userspace builds that want it have std anyway.
#[cfg(feature = "clap")]
extern crate std;

pub mod classify;
pub mod counters;
pub mod maps;
pub mod outcome;
pub mod wire;

pub use classify::{
    DatapathView, Decision, FrameType, HoldKey, classify, decide, decide_frame, decide_wire,
};
pub use counters::{HoldKernel, HoldTotal};
pub use maps::*;
pub use outcome::{Outcome, Verdict};
