//! Tier 0 of the channel state (invariant 7) over the fake hypervisor and a recording fake
//! datapath: kept with the snapshot, accounted in its manifest, replayed before the group runs.

use super::*;

/// Invariant 7: what the datapath recorded while the snapshot ran is kept beside its images,
/// accounted in its manifest, and replayed into each restored receiver, in order, before any
/// VM runs; a datapath that cannot record leaves a manifest that says so.
#[test]
fn the_channel_state_is_kept_with_the_snapshot_and_replayed_before_the_group_runs() {
    use crate::hold::{RecordedFrame, Recording};
    let g = group(3);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let frame = |src: &VmSpec, n: u8| RecordedFrame {
        vnet: [0; 10],
        data: [&g.vms[1].mac.0[..], &src.mac.0[..], &[0x08, 0x00, n][..]].concat(),
    };
    let to_vm2 = Recording {
        frames: vec![
            frame(&g.vms[0], 1),
            frame(&g.vms[2], 2),
            frame(&g.vms[0], 3),
        ],
        bytes: 3 * 15,
        ..Recording::default()
    };
    hv.world.lock().unwrap().in_flight = Some(BTreeMap::from([(g.vms[1].mac, to_vm2.clone())]));
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert_eq!(m.outcome, Outcome::Committed);
    assert!(!hv.world.lock().unwrap().recording, "the recording ended");
    let state = m.channel_state.clone().unwrap();
    assert!(state.complete(), "{state:?}");
    let vm2 = &state.receivers["vm2"];
    assert_eq!((vm2.frames, vm2.bytes), (3, 45));
    assert_eq!(
        vm2.from,
        BTreeMap::from([("vm1".to_owned(), 2), ("vm3".to_owned(), 1)])
    );
    assert_eq!(state.receivers["vm1"].frames, 0);
    // The manifest on disk says the same (what `snapshot show` reads).
    assert_eq!(c.get(&m.id).unwrap().channel_state, Some(state));
    // Every member is shut before the first stop: nothing waits in a tap when its VM stops.
    {
        let w = hv.world.lock().unwrap();
        let first_stop = g
            .vms
            .iter()
            .map(|vm| at(&w.log, "stop", &vm.name).unwrap())
            .min()
            .unwrap();
        for vm in &g.vms {
            assert!(
                at(&w.log, "shut", &vm.name).unwrap() < first_stop,
                "{:?}",
                w.log
            );
        }
    }

    hv.world.lock().unwrap().states.clear();
    hv.world.lock().unwrap().log.clear();
    let r = c.restore(&m.id, None).unwrap();
    let w = hv.world.lock().unwrap();
    assert_eq!(w.replayed["vm2"], to_vm2.frames, "all of it, in order");
    assert!(
        !w.replayed.contains_key("vm1"),
        "nothing to replay: no call"
    );
    let replayed = at(&w.log, "replay", "vm2").unwrap();
    for vm in &g.vms {
        assert!(
            replayed < at(&w.log, "resume", &vm.name).unwrap(),
            "{:?}",
            w.log
        );
    }
    let vm2 = r.vms.iter().find(|v| v.name == "vm2").unwrap();
    assert_eq!((vm2.replayed, vm2.replay_error.as_deref()), (Some(3), None));
    drop(w);

    // Without a recording datapath the snapshot still commits, and says what it lacks.
    hv.world.lock().unwrap().in_flight = None;
    let m = c.snapshot(&g, INSTANT).unwrap();
    let state = m.channel_state.unwrap();
    assert!(!state.recorded && !state.complete());
    assert!(state.reason.unwrap().contains("no recording here"));
    let _ = fs::remove_dir_all(dir);
}

/// Found in review: frames still held at the deadline may cross the cut after the recording
/// ended, so such a snapshot's channel state is not called complete.
#[test]
fn a_snapshot_whose_held_frames_were_not_all_released_does_not_claim_its_channel_state() {
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    {
        let mut w = hv.world.lock().unwrap();
        w.in_flight = Some(BTreeMap::new());
        w.unreleased = true;
    }
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert_eq!(m.outcome, Outcome::Committed, "the images are consistent");
    let state = m.channel_state.unwrap();
    assert!(!state.recorded, "{state:?}");
    assert!(state.reason.unwrap().contains("re-injected"));
    assert!(
        !hv.world.lock().unwrap().recording,
        "the recording ended anyway"
    );
    let _ = fs::remove_dir_all(dir);
}

/// Found in review: held frames lost while the snapshot ran (a frame held for a receiver
/// around its cut may have been in flight) leave its channel state incomplete, and it says why.
#[test]
fn a_snapshot_that_lost_held_frames_does_not_claim_its_channel_state_whole() {
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    {
        let mut w = hv.world.lock().unwrap();
        w.in_flight = Some(BTreeMap::new());
        w.hold = Some(crate::hold::HoldReport::default());
        w.lose_at_advance = 1;
    }
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert!(!m.held_lost.is_empty(), "{:?}", m.held_lost);
    let state = m.channel_state.unwrap();
    assert!(state.recorded && !state.complete(), "{state:?}");
    assert!(state.reason.unwrap().contains("held frames were lost"));
    let _ = fs::remove_dir_all(dir);
}
