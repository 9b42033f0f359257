//! Tier 3: real guests (QEMU/TCG under libvirt) talking over TCP and UDP. A group snapshot under
//! that traffic through the HTTP API, every VM destroyed, the group restored, and the restored
//! state checked pair by pair; then the same guests snapshotted one after another without
//! enforcement, which the same check must catch. Needs root, libvirtd and the guest image
//! (scripts/setup.sh provides all three); without them it fails, it does not skip.

use std::time::Duration;

use enforcer_lab::demo::{e2e as vmdemo, vms::VmDemoOptions};
use enforcer_tests::require_root;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_group_is_consistent_and_the_unenforced_one_is_caught() {
    require_root();
    let mut opts = VmDemoOptions::default();
    // Apart from the demo's names, so both can run on one host.
    opts.lab.prefix = "enft3".into();
    opts.lab.subnet = 3;
    opts.pin_root = format!("/sys/fs/bpf/enforcer-t3-{}", std::process::id()).into();
    opts.store = format!("/var/lib/enforcer/t3-snapshots-{}", std::process::id()).into();
    opts.hold_device = "enft3hold".into();
    opts.restored = Duration::from_secs(2);
    let report = vmdemo::e2e(opts).await.expect("tier-3 scenario");
    println!("{report}");
    let last = report.lines().last().unwrap_or_default();
    // Nothing in flight at the cuts is lost (the channel state replayed), while the same guests
    // snapshotted without the enforcer lose datagrams: the check can fail.
    let without: u64 = last
        .strip_prefix("consistency: OK violations=0 udp_lost=0 (without enforcer: ")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!(without > 0, "{last}");
}
