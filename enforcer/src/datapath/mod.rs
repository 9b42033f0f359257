//! This host's kernel side: loading, pinning and attaching the eBPF programs ([`load`]), the
//! typed maps ([`maps`]), the epoch rules over them ([`epochs`]), which interfaces are VM ports
//! ([`ports`]) and running a program on a crafted frame ([`test_run`]).
//!
//! Owns every BPF syscall and every map access of userspace. May call the model only; the
//! buffer, the snapshot transaction and the API sit above it and reach the maps through here.
pub mod epochs;
pub mod load;
pub mod maps;
#[cfg(test)]
pub(crate) mod memory;
pub mod ports;
pub mod store;
pub mod test_run;

pub use load::{
    AttachMode, AttachedPort, DEFAULT_PIN_ROOT, Datapath, DatapathError, ifindex_of, teardown,
};
pub use maps::{HoldTotals, OrderDone, SlotPorts};
pub use test_run::prog_test_run;
