//! Tier 3 across hosts: real guests (QEMU/TCG under libvirt) on two emulated hosts, each with
//! its own bridge and agent, joined by a VXLAN-GBP overlay, driven by a coordinator over HTTP
//! with a token. An agent is killed and restarted mid-snapshot (the snapshot must abort with
//! every VM running and the epochs level on both hosts); then group snapshots under traffic,
//! every VM destroyed, the group restored and checked pair by pair, across the hosts too.
//! Needs root, libvirtd and the guest image (scripts/setup.sh); without them it fails.

use std::time::Duration;

use enforcer_lab::demo::{hosts as vmhosts, vms::VmDemoOptions};
use enforcer_tests::require_root;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_across_hosts_restores_consistently_after_an_agent_dies_mid_snapshot() {
    require_root();
    let mut opts = VmDemoOptions::default();
    // Apart from the demo's and tier3_vms' names, so they can run on one host.
    opts.lab.prefix = "enft4".into();
    opts.lab.subnet = 4;
    opts.lab.on_second_bridge = 1;
    opts.pin_root = format!("/sys/fs/bpf/enforcer-t4-{}", std::process::id()).into();
    opts.store = format!("/var/lib/enforcer/t4-snapshots-{}", std::process::id()).into();
    opts.hold_device = "enft4h".into();
    opts.restored = Duration::from_secs(2);
    let report = vmhosts::e2e(opts)
        .await
        .expect("tier-3 scenario across hosts");
    println!("{report}");
    assert!(
        report.contains("killed mid-snapshot") && report.contains("aborted"),
        "{report}"
    );
    let last = report.lines().last().unwrap_or_default();
    // The channel state recorded on each member's host and replayed there: nothing in flight
    // at the cut is lost, across the hosts too.
    assert_eq!(
        last, "consistency across hosts: OK violations=0 udp_lost=0",
        "{report}"
    );
}
