//! Tier 0 of the transaction's crash safety (case S8 of the security review), by fault
//! injection over the fake hypervisor: the coordinator killed before each step, and the store
//! full at each file it writes.

use super::*;

/// What every fault must leave, once a coordinator `c` over `hv` started afresh on `dir`:
/// every VM of `g` running, no journal, the members at one epoch (the new one if a snapshot
/// committed), and each snapshot whole — committed with every image, aborted with its
/// manifest only — and no directory without its manifest.
fn assert_recovered(
    c: &Coordinator<FakeHypervisor, fake::FakeEpochs>,
    hv: &FakeHypervisor,
    g: &GroupSpec,
    dir: &Path,
    what: &str,
) {
    let w = hv.world.lock().unwrap();
    for vm in &g.vms {
        assert_eq!(w.states[&vm.name], VmState::Running, "{what}: {}", vm.name);
    }
    assert!(
        w.kept_back.is_empty(),
        "{what}: frames still kept back from running VMs {:?}",
        w.kept_back
    );
    assert_eq!(
        fs::read_dir(dir.join("journals")).map_or(0, |d| d.count()),
        0,
        "{what}: a journal left"
    );
    let epochs: Vec<u32> = g.vms.iter().map(|vm| w.epochs[&vm.mac]).collect();
    let manifests = c.list().unwrap();
    let committed = manifests.iter().any(|m| m.outcome == Outcome::Committed);
    assert_eq!(
        epochs,
        vec![u32::from(committed); g.vms.len()],
        "{what}: epochs {epochs:?}, committed {committed}"
    );
    for m in &manifests {
        let files: Vec<String> = fs::read_dir(dir.join(&m.id))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        match m.outcome {
            Outcome::Committed => assert!(
                m.vms.iter().all(|v| !v.images.is_empty()),
                "{what}: a committed snapshot without every image: {m:?}"
            ),
            _ => assert_eq!(files, vec!["manifest.json".to_owned()], "{what}"),
        }
    }
    // Every snapshot directory has its manifest: nothing half-kept.
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && name != "journals" && name != "restores" {
            assert!(
                entry.path().join("manifest.json").exists(),
                "{what}: {name} has no manifest"
            );
        }
    }
}

/// Case S8 of the security review, by fault injection: the coordinator killed (as SIGKILL
/// would: no clean-up) just before each step of a snapshot, by both methods; a new one opened
/// on the store as the kill left it, over the VMs and epochs as they were. After it: every VM
/// runs, no journal is left, the members share one epoch, and each snapshot in the store is
/// whole — committed with every image, or aborted with none.
#[test]
fn a_coordinator_killed_at_any_step_leaves_every_vm_running_and_the_store_whole() {
    let g = group(2);
    for method in [PRE, INSTANT] {
        let mut killed_at = 0;
        for at in 1.. {
            let dir = store();
            let (c, hv) = coordinator(&g, &dir);
            hv.kill_at(at, &dir);
            let _ = c.snapshot(&g, method);
            drop(c);
            let Some((world, copy)) = hv.killed() else {
                let _ = fs::remove_dir_all(&dir);
                break;
            };
            killed_at = at;
            let what = format!("{method:?} killed before step {at}");
            let (c, hv) = open_on(FakeHypervisor::from_world(world), &copy);
            assert_recovered(&c, &hv, &g, &copy, &what);
            let _ = fs::remove_dir_all(&dir);
            let _ = fs::remove_dir_all(&copy);
        }
        assert!(killed_at > 8, "{method:?}: only {killed_at} steps");
    }
}

/// Case S8: a crash after a commit's manifest, before its journal was removed (or a power loss
/// before the unlink reached the disk), leaves both. The next start keeps the snapshot
/// committed and only drops the journal (it aborted and discarded it before).
#[test]
fn a_committed_snapshot_whose_journal_was_left_stays_committed() {
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert_eq!(m.outcome, Outcome::Committed);
    let journal = Journal {
        id: m.id.clone(),
        group: g.clone(),
        epoch_before: 0,
        method: INSTANT,
        cut_started: true,
    };
    write_atomically(&c.journal_path(&m.id), &journal).unwrap();
    drop(c);
    let survivors = hv.world.lock().unwrap().survivors();
    let (c, hv) = open_on(FakeHypervisor::from_world(survivors), &dir);
    let listed = c.list().unwrap();
    assert_eq!(
        (listed.len(), listed[0].outcome),
        (1, Outcome::Committed),
        "{listed:?}"
    );
    assert!(dir.join(&m.id).join("manifest.json").exists());
    assert_eq!(fs::read_dir(dir.join("journals")).unwrap().count(), 0);
    let w = hv.world.lock().unwrap();
    for vm in &g.vms {
        assert_eq!(w.epochs[&vm.mac], 1, "{}: not rolled back", vm.name);
    }
    assert!(
        !w.log.iter().any(|(s, _)| s == "rollback" || s == "discard"),
        "{:?}",
        w.log
    );
    drop(w);
    let _ = fs::remove_dir_all(dir);
}

/// Case S8: the store full (ENOSPC) at each file a snapshot writes — its journal, the mark of
/// its cut, its manifest — by both methods. Whatever the snapshot answered, once there is
/// space again and the coordinator starts afresh: every VM runs, no journal is left, the
/// members share one epoch, and a snapshot is committed with its images or not kept.
#[test]
fn a_full_store_at_any_write_leaves_every_vm_running_and_the_store_whole() {
    use crate::snapshot::private::full;
    let g = group(2);
    for method in [PRE, INSTANT] {
        let mut writes = 0;
        for n in 1.. {
            let dir = store();
            let (c, hv) = coordinator(&g, &dir);
            full::from_nth_file(&dir, n);
            let answer = c.snapshot(&g, method);
            full::freed(&dir);
            let what = format!("{method:?}, full from write {n}: {answer:?}");
            drop(c);
            let (c, _) = open_on(hv.clone(), &dir);
            assert_recovered(&c, &hv, &g, &dir, &what);
            let _ = fs::remove_dir_all(&dir);
            if matches!(&answer, Ok(m) if m.outcome == Outcome::Committed) {
                // The first write that is not needed any more: every one was tried.
                writes = n - 1;
                break;
            }
        }
        // The journal, the cut's mark (instant only), the manifest.
        let expected = if method == INSTANT { 3 } else { 2 };
        assert_eq!(writes, expected, "{method:?}: {writes} writes tried");
    }
}

/// The same for a restore: the coordinator killed before each of its steps, over a committed
/// snapshot whose VMs are gone. After a fresh start nothing is paused, no restore journal is
/// left, and it was all or nothing: every VM running at the snapshot's epoch (the resumes had
/// begun), or none there (they had not).
#[test]
fn a_coordinator_killed_at_any_step_of_a_restore_leaves_all_or_none_running() {
    let g = group(3);
    let mut last = 0;
    for at in 1.. {
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        let m = c.snapshot(&g, INSTANT).unwrap();
        assert_eq!(m.outcome, Outcome::Committed);
        let start = {
            let mut w = hv.world.lock().unwrap();
            w.states.clear();
            w.log.len()
        };
        hv.kill_at(start + at, &dir);
        let answer = c.restore(&m.id, None);
        drop(c);
        let Some((world, copy)) = hv.killed() else {
            assert!(answer.is_ok(), "{answer:?}");
            let _ = fs::remove_dir_all(&dir);
            break;
        };
        last = at;
        let what = format!("killed before restore step {at}");
        let (_c, hv) = open_on(FakeHypervisor::from_world(world), &copy);
        let w = hv.world.lock().unwrap();
        let states: Vec<Option<VmState>> = g
            .vms
            .iter()
            .map(|vm| w.states.get(&vm.name).copied())
            .collect();
        let all_running = states.iter().all(|s| *s == Some(VmState::Running));
        let none_there = states.iter().all(Option::is_none);
        assert!(all_running || none_there, "{what}: {states:?}");
        if all_running {
            for vm in &g.vms {
                assert_eq!(w.epochs[&vm.mac], 1, "{what}: {}", vm.name);
                assert!(w.registered.contains_key(&vm.mac), "{what}: {}", vm.name);
            }
        }
        assert_eq!(
            fs::read_dir(copy.join("restores")).map_or(0, |d| d.count()),
            0,
            "{what}: a restore journal left"
        );
        drop(w);
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&copy);
    }
    // Three restores, three registrations and three resumes at least.
    assert!(last >= 9, "only {last} steps");
}

/// A restore changes nothing while a VM of the group is there (case S4): refused before any
/// image is touched.
#[test]
fn a_restore_refuses_while_a_vm_of_the_group_is_there() {
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let m = c.snapshot(&g, INSTANT).unwrap();
    hv.world.lock().unwrap().states.remove("vm1");
    let err = c.restore(&m.id, None).unwrap_err();
    assert!(err.to_string().contains("vm2"), "{err}");
    let w = hv.world.lock().unwrap();
    assert!(!w.log.iter().any(|(s, _)| s == "restore"), "{:?}", w.log);
    assert!(!w.states.contains_key("vm1"), "vm1 stays gone");
    drop(w);
    let _ = fs::remove_dir_all(dir);
}

/// A journal left by a snapshot whose manifest could not be written is finished before the
/// group's next snapshot, not at some later start (where its abort would roll the group back
/// under the newer snapshots).
#[test]
fn a_leftover_journal_is_finished_before_the_groups_next_snapshot() {
    use crate::snapshot::private::full;
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    // The manifest is the second file a pre-copy snapshot writes.
    full::from_nth_file(&dir, 2);
    assert!(c.snapshot(&g, PRE).is_err());
    full::freed(&dir);
    assert_eq!(fs::read_dir(dir.join("journals")).unwrap().count(), 1);
    let m = c.snapshot(&g, PRE).unwrap();
    assert_eq!((m.outcome, m.epoch), (Outcome::Committed, 1), "{m:?}");
    assert_eq!(fs::read_dir(dir.join("journals")).unwrap().count(), 0);
    // A later start finds nothing to roll back: the committed snapshot and its epochs stand.
    drop(c);
    let survivors = hv.world.lock().unwrap().survivors();
    let (c, hv) = open_on(FakeHypervisor::from_world(survivors), &dir);
    let w = hv.world.lock().unwrap();
    assert!(
        g.vms.iter().all(|vm| w.epochs[&vm.mac] == 1),
        "{:?}",
        w.epochs
    );
    let committed: Vec<Manifest> = c
        .list()
        .unwrap()
        .into_iter()
        .filter(|m| m.outcome == Outcome::Committed)
        .collect();
    assert_eq!(committed.len(), 1);
    drop(w);
    let _ = fs::remove_dir_all(dir);
}
