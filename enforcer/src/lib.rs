//! enforcer: causally consistent live snapshots of VM groups, enforced in the kernel datapath.
//!
//! The product, in layers; each module may call only those below it (the map with a picture
//! and one snapshot's walk through it: docs/architecture.md; the algorithm and the invariants
//! the comments cite by number: docs/design.md).
//!
//! - [`cli`] — the command line; [`daemon`] — the two roles it runs, wired and served.
//! - [`multihost`] — the coordinator of several hosts, over their agents (through the API's
//!   client and its routes).
//! - [`api`] — the HTTP/JSON edge (routers, error codes, the client).
//! - [`agent`] — one host's service: VMs, epochs, buffer, snapshots over its libvirt.
//! - [`snapshot`] — the group snapshot transaction, restores, the store, libvirt.
//! - [`hold`] — the AF_XDP buffer: held frames and their re-injection, and the one
//!   epoch-change path.
//! - [`datapath`] — the eBPF programs, the pinned maps, the epoch rules, the VM ports.
//! - [`model`], [`sched`], [`sync`] — plain values; thread scheduling; locks.
//!
//! The kernel programs are `enforcer-ebpf`; the types and the classification they share with
//! this crate are `enforcer-common`. The lab (demos, fixtures, benchmarks) is `enforcer-lab`,
//! which depends on this crate and never the other way round.
pub mod agent;
pub mod api;
pub mod cli;
pub mod daemon;
pub mod datapath;
pub mod hold;
pub mod model;
pub mod multihost;
pub mod sched;
pub mod snapshot;
pub mod sync;
