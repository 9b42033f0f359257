//! Types shared by the kernel programs and userspace, and the one classification function
//! that both use.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size assertion, so the
//! layout the eBPF object was compiled with is the layout userspace reads and writes.
//! The pure decision logic ([`decide`]) lives here so it is unit-tested in userspace and
//! compiled unchanged into the datapath.
#![no_std]

pub mod classify;
pub mod maps;
pub mod wire;

pub use classify::{
    DatapathView, Decision, FrameType, HoldKey, Outcome, Verdict, classify, decide, decide_frame,
    decide_wire,
};
pub use maps::*;
