//! enforcer's lab: everything that exercises the product without being part of it. The product
//! (`enforcer`) never depends on this crate; this crate, the privileged tests (`tests/`) and
//! `cargo xtask` depend on the product.
//!
//! - Fixtures: [`netns`] (network-namespace "VMs" on a bridge), [`traffic`] (numbered messages
//!   between them), [`vms`] (real guests under libvirt/QEMU, running `enforcer-guest`),
//!   [`overlay`] (two emulated hosts joined by VXLAN-GBP), [`redis`] (Redis replication on the
//!   guests: a real application's own check of a restore), [`raw`] (whole Ethernet frames in
//!   and out of a VM, VLAN tags as on the wire).
//! - Scenarios: [`demo`] — the README's main job on real VMs (and its netns variant), tier 3 on
//!   one host and across two emulated hosts, each ending with the consistency check.
//! - [`bench`]: the benchmarks behind `cargo xtask bench …` and BENCHMARKS.md.
pub mod bench;
pub mod demo;
pub mod netns;
pub mod overlay;
pub mod raw;
pub mod redis;
pub mod stats;
pub mod traffic;
pub mod vms;

/// A unix socket for a lab daemon's API (`/run/enforcer/lab-<name>.sock`): the daemons serve
/// TCP only with a token, and the lab's single-host daemons need none.
pub fn api_socket(name: &str) -> enforcer::api::Endpoint {
    enforcer::api::Endpoint::Unix(format!("/run/enforcer/lab-{name}.sock").into())
}

/// At the end of a lab run, its daemons stopped: the pin root detached and freed, and its
/// lock file removed (a lab's pin root is its own; tier-3 runs name theirs per process).
pub fn forget_pin_root(pin_root: &std::path::Path) {
    let _ = enforcer::datapath::teardown(pin_root);
    let _ = std::fs::remove_file(enforcer::daemon::lock::lock_path(pin_root));
}
