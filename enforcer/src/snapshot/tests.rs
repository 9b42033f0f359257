//! Tier 0 of the transaction, restores, groups and the store, over the fake hypervisor and
//! datapath (`fake.rs`).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Duration,
};

use super::{
    coordinator::{Coordinator, CoordinatorError, Timeouts},
    fake::{self, Failure, FakeHypervisor, VmState},
    manifest::{CutMethod, Manifest, SnapshotOutcome as Outcome},
    store::{Journal, write_atomically},
};
use crate::{
    hold::HoldReport,
    model::{GroupName, GroupSpec, MacAddr, SnapshotId, VmSpec},
};
use enforcer_common::HoldTotal;

fn name(s: &str) -> GroupName {
    s.parse().unwrap()
}

fn id(s: &str) -> SnapshotId {
    s.parse().unwrap()
}

fn group(n: u8) -> GroupSpec {
    GroupSpec {
        name: name("g"),
        id: 1,
        vms: (1..=n)
            .map(|i| VmSpec {
                name: format!("vm{i}"),
                mac: MacAddr([2, 0, 0, 0, 0, i]),
            })
            .collect(),
    }
}

fn coordinator(
    g: &GroupSpec,
    store: &Path,
) -> (
    Coordinator<FakeHypervisor, fake::FakeEpochs>,
    FakeHypervisor,
) {
    open_on(FakeHypervisor::new(&g.vms), store)
}

/// A coordinator over this fake, with short timeouts.
fn open_on(
    hv: FakeHypervisor,
    store: &Path,
) -> (
    Coordinator<FakeHypervisor, fake::FakeEpochs>,
    FakeHypervisor,
) {
    let timeouts = Timeouts {
        pause: Duration::from_millis(200),
        complete: Duration::from_millis(200),
    };
    let c =
        Coordinator::open(Arc::new(hv.clone()), Arc::new(hv.epochs()), store, timeouts).unwrap();
    (c, hv)
}

fn store() -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "enforcer-coord-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let _ = fs::remove_dir_all(&p);
    p
}

const PRE: CutMethod = CutMethod::PreCopy;
const INSTANT: CutMethod = CutMethod::Instant;

/// A coordinator opened on `dir` after one died there leaving `journal` (at `path` under
/// `dir`), over a fake of `vms` in the state `died` leaves it.
fn reopened_after(
    dir: &Path,
    path: &str,
    journal: &Journal,
    vms: &[VmSpec],
    died: impl FnOnce(&mut fake::World),
) -> (
    Coordinator<FakeHypervisor, fake::FakeEpochs>,
    FakeHypervisor,
) {
    fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
    write_atomically(&dir.join(path), journal).unwrap();
    let hv = FakeHypervisor::new(vms);
    died(&mut hv.world.lock().unwrap());
    open_on(hv, dir)
}

/// Index of a step in the log.
fn at(log: &[(String, String)], what: &str, vm: &str) -> Option<usize> {
    log.iter().position(|(w, v)| w == what && v == vm)
}

#[test]
fn commit_advances_each_vm_while_it_is_held_then_resumes_it() {
    let g = group(4);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let m = c.snapshot(&g, PRE).unwrap();
    assert_eq!(m.outcome, Outcome::Committed, "{m:?}");
    assert_eq!(m.epoch, 1);
    let w = hv.world.lock().unwrap();
    assert!(w.ran_unadvanced.is_empty());
    for vm in &g.vms {
        let (p, a, c, r) = (
            at(&w.log, "paused", &vm.name).unwrap(),
            at(&w.log, "advance", &vm.name).unwrap(),
            at(&w.log, "complete", &vm.name).unwrap(),
            at(&w.log, "resume", &vm.name).unwrap(),
        );
        assert!(
            p < a && a < c && c < r,
            "{}: paused {p} advance {a} complete {c} resume {r}",
            vm.name
        );
        // What was kept back from it while stopped goes on once it runs (case R4).
        assert!(
            at(&w.log, "runs_again", &vm.name).is_some_and(|again| again > r),
            "{}: runs_again after its resume {r}: {:?}",
            vm.name,
            w.log
        );
        assert_eq!(w.states[&vm.name], VmState::Running);
        assert_eq!(w.epochs[&vm.mac], 1);
    }
    let released = w.log.iter().position(|(s, _)| s == "released").unwrap();
    assert!(
        g.vms
            .iter()
            .all(|vm| at(&w.log, "resume", &vm.name).unwrap() < released),
        "REINJECT after every VM_UNPAUSE: {:?}",
        w.log
    );
    assert!(m.released_ms.is_some());
    for r in &m.vms {
        let t = &r.timeline;
        assert!(t.downtime_ms().unwrap() >= t.pause_to_advance_ms().unwrap());
        assert_eq!(r.images.len(), 1);
    }
    // Kept on disk, listed, and the journal is gone.
    let listed = c.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (&listed[0].id, listed[0].outcome, listed[0].vms.len()),
        (&m.id, Outcome::Committed, 4)
    );
    assert!(!dir.join("journal.json").exists());
    assert_eq!(fs::read_dir(dir.join("journals")).unwrap().count(), 0);
    let _ = fs::remove_dir_all(dir);
}

/// Issue 12, item 3: a snapshot whose hosts' buffers lost held frames while it ran is not
/// committed as if nothing happened: its manifest says how many and why. One that lost none
/// says nothing, and neither counts what was lost before it began.
#[test]
fn frames_a_buffer_lost_during_the_snapshot_are_in_its_manifest() {
    let g = group(3);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let mut before = HoldReport::default();
    before.totals.insert(HoldTotal::LostRing, 7);
    before.totals.insert(HoldTotal::DroppedBound, 2);
    hv.world.lock().unwrap().hold = Some(before);
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert_eq!(m.outcome, Outcome::Committed, "{m:?}");
    assert!(
        m.held_lost.is_empty(),
        "nothing lost while it ran: {:?}",
        m.held_lost
    );
    hv.world.lock().unwrap().lose_at_advance = 5;
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert_eq!(m.outcome, Outcome::Committed, "{m:?}");
    assert_eq!(
        m.held_lost,
        BTreeMap::from([("lost_ring".to_owned(), 15)]),
        "5 at each of the 3 advances"
    );
    let listed = c.list().unwrap();
    let on_disk = listed.iter().find(|l| l.id == m.id).expect("listed");
    assert_eq!(
        on_disk.held_lost, m.held_lost,
        "kept in the manifest on disk"
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn an_instant_cut_stops_every_vm_once_all_are_ready_and_advances_each_before_it_runs() {
    let g = group(4);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert_eq!(
        (m.outcome, m.method),
        (Outcome::Committed, INSTANT),
        "{m:?}"
    );
    let w = hv.world.lock().unwrap();
    assert!(w.ran_unadvanced.is_empty(), "{:?}", w.ran_unadvanced);
    let last_begin = g
        .vms
        .iter()
        .map(|vm| at(&w.log, "begin", &vm.name).unwrap())
        .max()
        .unwrap();
    for vm in &g.vms {
        let (s, a, cap, done) = (
            at(&w.log, "stop", &vm.name).unwrap(),
            at(&w.log, "advance", &vm.name).unwrap(),
            at(&w.log, "capture", &vm.name).unwrap(),
            at(&w.log, "complete", &vm.name).unwrap(),
        );
        assert!(
            last_begin < s,
            "{} stopped before every VM was ready",
            vm.name
        );
        let again = at(&w.log, "runs_again", &vm.name);
        assert!(
            again.is_some_and(|again| cap < again && again < done),
            "{}: runs_again {again:?} once captured ({cap}), before its image completes ({done})",
            vm.name
        );
        assert!(
            s < a && a < cap && cap < done,
            "{}: stop {s} advance {a} capture {cap} complete {done}",
            vm.name
        );
        assert_eq!(at(&w.log, "resume", &vm.name), None, "capture runs it");
        assert_eq!(w.states[&vm.name], VmState::Running);
        assert_eq!(w.epochs[&vm.mac], 1);
    }
    for r in &m.vms {
        let t = &r.timeline;
        assert!(
            t.paused_ms <= t.advanced_ms && t.advanced_ms <= t.resumed_ms,
            "{t:?}"
        );
        assert!(t.resumed_ms <= t.image_complete_ms, "{t:?}");
        assert_eq!(r.images.len(), 1);
    }
    // The fake's VMs got ready up to 8 ms apart; the cut does not inherit that.
    let spread = m.stop_spread_ms.expect("stop spread recorded");
    assert!(spread < 5.0, "stop spread {spread} ms");
    drop(w);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn an_instant_cut_advanced_by_the_agents_advances_each_vm_once() {
    let g = group(3);
    let dir = store();
    let mut hv = FakeHypervisor::new(&g.vms);
    hv.advances_at_pause = true;
    let (c, hv) = open_on(hv, &dir);
    let m = c.snapshot(&g, INSTANT).unwrap();
    assert_eq!(m.outcome, Outcome::Committed, "{m:?}");
    let w = hv.world.lock().unwrap();
    assert!(w.ran_unadvanced.is_empty());
    for vm in &g.vms {
        let (s, a, cap) = (
            at(&w.log, "stop", &vm.name).unwrap(),
            at(&w.log, "agent-advance", &vm.name).unwrap(),
            at(&w.log, "capture", &vm.name).unwrap(),
        );
        assert!(s < a && a < cap, "{}: {:?}", vm.name, w.log);
        assert_eq!(at(&w.log, "advance", &vm.name), None, "advanced twice");
        assert_eq!(w.epochs[&vm.mac], 1);
    }
    drop(w);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_vm_advanced_where_it_runs_is_advanced_once_before_it_completes() {
    let g = group(3);
    let dir = store();
    let mut hv = FakeHypervisor::new(&g.vms);
    hv.advances_at_pause = true;
    let (c, hv) = open_on(hv, &dir);
    let m = c.snapshot(&g, PRE).unwrap();
    assert_eq!(m.outcome, Outcome::Committed, "{m:?}");
    let w = hv.world.lock().unwrap();
    for vm in &g.vms {
        let (p, a, done) = (
            at(&w.log, "paused", &vm.name).unwrap(),
            at(&w.log, "agent-advance", &vm.name).unwrap(),
            at(&w.log, "complete", &vm.name).unwrap(),
        );
        assert!(p < a && a < done, "{}: {:?}", vm.name, w.log);
        assert_eq!(at(&w.log, "advance", &vm.name), None, "advanced twice");
        assert_eq!(w.epochs[&vm.mac], 1);
    }
    for r in &m.vms {
        assert!(r.timeline.advanced_ms.is_some() && r.timeline.pause_to_advance_ms().is_some());
    }
    drop(w);
    let _ = fs::remove_dir_all(dir);
}

fn assert_aborted_cleanly(
    c: &Coordinator<FakeHypervisor, fake::FakeEpochs>,
    hv: &FakeHypervisor,
    m: &Manifest,
    g: &GroupSpec,
    expect: &str,
) {
    assert_eq!(m.outcome, Outcome::Aborted);
    assert!(
        m.reason.as_deref().unwrap_or("").contains(expect),
        "{:?}",
        m.reason
    );
    let w = hv.world.lock().unwrap();
    for vm in &g.vms {
        if let Some(state) = w.states.get(&vm.name) {
            assert_eq!(*state, VmState::Running, "{} left {state:?}", vm.name);
        }
        assert_eq!(w.epochs[&vm.mac], 0, "{} epoch rolled back", vm.name);
    }
    assert!(
        w.kept_back.is_empty(),
        "nothing kept back from the running VMs (case R4): {:?}",
        w.kept_back
    );
    assert!(
        m.vms.iter().all(|v| v.images.is_empty()),
        "images discarded"
    );
    let kept: Vec<String> = fs::read_dir(c.store.join(&m.id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        kept,
        vec!["manifest.json".to_owned()],
        "only the manifest of the aborted snapshot remains"
    );
    assert!(!c.store.join("journal.json").exists());
    assert_eq!(
        fs::read_dir(c.store.join("journals")).map_or(0, |d| d.count()),
        0,
        "no journal left"
    );
}

/// Runs a snapshot of `n` VMs where `vm` fails with `failure`; checks the abort was clean.
fn aborts_when(
    method: CutMethod,
    n: u8,
    vm: &str,
    failure: Failure,
    reason: &str,
) -> Vec<(String, String)> {
    let g = group(n);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    hv.fail(vm, failure);
    let m = c.snapshot(&g, method).unwrap();
    assert_eq!(m.method, method);
    assert_aborted_cleanly(&c, &hv, &m, &g, reason);
    let _ = fs::remove_dir_all(dir);
    hv.world.lock().unwrap().log.clone()
}

#[test]
fn a_vanished_vm_aborts_the_whole_group() {
    aborts_when(PRE, 3, "vm2", Failure::Vanish, "no such domain");
    let log = aborts_when(INSTANT, 3, "vm2", Failure::Vanish, "no such domain");
    assert!(
        !log.iter().any(|(w, _)| w == "stop"),
        "no VM stopped: the cut waits for every VM to be ready: {log:?}"
    );
}

#[test]
fn an_image_write_failure_after_the_advance_rolls_the_epoch_back() {
    aborts_when(INSTANT, 3, "vm3", Failure::ImageFails, "no space left");
    aborts_when(INSTANT, 3, "vm1", Failure::CaptureFails, "no space left");
    let log = aborts_when(PRE, 3, "vm3", Failure::ImageFails, "no space left");
    let rollback = log
        .iter()
        .position(|(w, _)| w == "rollback")
        .expect("epochs rolled back");
    let advanced = log
        .iter()
        .position(|(w, v)| w == "advance" && v == "vm3")
        .expect("vm3 advanced");
    assert!(
        advanced < rollback,
        "the advance came first, then its roll-back: {log:?}"
    );
}

#[test]
fn a_thread_that_panics_before_the_cut_aborts_instead_of_holding_the_others() {
    // Run on a thread of its own: a gate that waits for the dead thread would hang the test.
    let (done, finished) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let log = aborts_when(INSTANT, 3, "vm2", Failure::Panics, "thread failed");
        let _ = done.send(log);
    });
    let log = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the snapshot ended instead of waiting for a thread that panicked");
    assert!(
        !log.iter().any(|(w, _)| w == "stop"),
        "no VM stopped: {log:?}"
    );
}

#[test]
fn a_vm_that_never_pauses_times_out_and_aborts() {
    let log = aborts_when(INSTANT, 3, "vm1", Failure::NeverPauses, "does not stop");
    assert!(
        !log.iter().any(|(w, v)| w == "advance" && v == "vm1"),
        "vm1 never advanced"
    );
    let log = aborts_when(PRE, 2, "vm1", Failure::NeverPauses, "timed out");
    assert!(
        !log.iter().any(|(w, v)| w == "advance" && v == "vm1"),
        "vm1 never advanced"
    );
}

#[test]
fn a_restarted_coordinator_aborts_the_unfinished_snapshot() {
    let g = group(2);
    let dir = store();
    // A coordinator died mid-snapshot: its journal is there, one VM held, one advanced.
    let journal = Journal {
        id: id("g-1-e1"),
        group: g.clone(),
        epoch_before: 0,
        method: PRE,
        cut_started: false,
    };
    let (c, hv) = reopened_after(&dir, "journal.json", &journal, &g.vms, |w| {
        w.states.insert("vm1".into(), VmState::HeldAtSnapshot);
        w.states.insert("vm2".into(), VmState::Paused);
        *w.epochs.get_mut(&g.vms[1].mac).unwrap() = 1;
    });
    let list = c.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_aborted_cleanly(&c, &hv, &list[0], &g, "coordinator stopped");
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_coordinator_that_died_during_an_instant_cut_leaves_no_vm_paused() {
    let g = group(3);
    let dir = store();
    // It died after the cut: vm1 stopped, vm2 advanced and captured (running), vm3 stopped
    // and advanced. The new process knows nothing of why vm1 and vm3 are paused.
    let journal = Journal {
        id: id("g-1-e1"),
        group: g.clone(),
        epoch_before: 0,
        method: INSTANT,
        cut_started: true,
    };
    let (c, hv) = reopened_after(&dir, "journal.json", &journal, &g.vms, |w| {
        w.states.insert("vm1".into(), VmState::Stopped);
        w.states.insert("vm3".into(), VmState::Stopped);
        *w.epochs.get_mut(&g.vms[1].mac).unwrap() = 1;
        *w.epochs.get_mut(&g.vms[2].mac).unwrap() = 1;
    });
    assert_aborted_cleanly(&c, &hv, &c.list().unwrap()[0], &g, "coordinator stopped");
    let _ = fs::remove_dir_all(&dir);

    // Before the cut began (no mark in the journal) a paused VM was paused by someone else:
    // it stays so.
    let journal = Journal {
        cut_started: false,
        ..journal
    };
    let (_c, hv) = reopened_after(&dir, "journal.json", &journal, &g.vms, |w| {
        w.states.insert("vm1".into(), VmState::Stopped);
    });
    assert_eq!(hv.world.lock().unwrap().states["vm1"], VmState::Stopped);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn refuses_groups_that_cannot_start() {
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    *hv.world
        .lock()
        .unwrap()
        .epochs
        .get_mut(&g.vms[0].mac)
        .unwrap() = 3;
    assert!(matches!(
        c.snapshot(&g, INSTANT),
        Err(CoordinatorError::Inconsistent { .. })
    ));
    let empty = GroupSpec { vms: vec![], ..g };
    assert!(matches!(
        c.snapshot(&empty, INSTANT),
        Err(CoordinatorError::EmptyGroup(_))
    ));
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn restore_registers_every_vm_at_the_snapshot_epoch_before_any_resumes() {
    let g = group(3);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let m = c.snapshot(&g, INSTANT).unwrap();
    // The VMs gone (a restore never goes over a VM that is there).
    hv.world.lock().unwrap().states.clear();
    hv.world.lock().unwrap().log.clear();
    let r = c.restore(&m.id, None).unwrap();
    assert_eq!((r.epoch, r.vms.len()), (1, 3));
    let w = hv.world.lock().unwrap();
    let last_register = g
        .vms
        .iter()
        .map(|vm| at(&w.log, "register", &vm.name).unwrap())
        .max()
        .unwrap();
    for vm in &g.vms {
        let restored = at(&w.log, "restore", &vm.name).unwrap();
        let resumed = at(&w.log, "resume", &vm.name).unwrap();
        assert!(
            restored < last_register && last_register < resumed,
            "{:?}",
            w.log
        );
        assert_eq!(w.epochs[&vm.mac], 1);
        assert_eq!(w.registered[&vm.mac], (1, format!("tap-{}", vm.name)));
        assert_eq!(w.states[&vm.name], VmState::Running);
    }
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_failed_restore_destroys_what_it_restored_and_runs_nothing() {
    let g = group(3);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let m = c.snapshot(&g, INSTANT).unwrap();
    hv.fail("vm3", Failure::RestoreFails);
    hv.world.lock().unwrap().states.clear();
    hv.world.lock().unwrap().log.clear();
    let err = c.restore(&m.id, None).unwrap_err();
    assert!(err.to_string().contains("unreadable"), "{err}");
    let w = hv.world.lock().unwrap();
    assert!(
        w.log.iter().all(|(step, _)| step != "resume"),
        "{:?}",
        w.log
    );
    for vm in ["vm1", "vm2"] {
        assert!(
            at(&w.log, "destroy", vm).is_some(),
            "{vm} destroyed: {:?}",
            w.log
        );
    }
    drop(w);
    // An unknown snapshot is not found.
    assert!(matches!(
        c.restore(&id("nope-1-e1"), None),
        Err(CoordinatorError::UnknownSnapshot(_))
    ));
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn an_aborted_snapshot_is_not_restorable() {
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    hv.fail("vm2", Failure::ImageFails);
    let m = c.snapshot(&g, PRE).unwrap();
    assert_eq!(m.outcome, Outcome::Aborted);
    hv.world.lock().unwrap().log.clear();
    assert!(matches!(
        c.restore(&m.id, None),
        Err(CoordinatorError::NotRestorable { .. })
    ));
    assert!(
        hv.world.lock().unwrap().log.is_empty(),
        "nothing was touched"
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_busy_group_refuses_a_second_snapshot_until_the_first_ends() {
    let g = group(2);
    let dir = store();
    let (c, _hv) = coordinator(&g, &dir);
    let first = c.prepare(&g, PRE).unwrap();
    let live = c.get(&first.id).unwrap();
    assert_eq!(live.outcome, Outcome::Running);
    assert!(matches!(
        c.prepare(&g, PRE),
        Err(CoordinatorError::Busy { .. })
    ));
    assert!(matches!(
        c.delete(&first.id),
        Err(CoordinatorError::Busy { .. })
    ));
    let m = c.run(first).unwrap();
    assert_eq!(m.outcome, Outcome::Committed);
    let second = c.prepare(&g, PRE).unwrap();
    assert!(second.id != m.id);
    c.run(second).unwrap();
    assert_eq!(c.list().unwrap().len(), 2);
    c.delete(&m.id).unwrap();
    assert_eq!(c.list().unwrap().len(), 1);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn groups_are_checked_registered_and_kept_on_disk() {
    let g = group(2);
    let dir = store();
    let (c, hv) = coordinator(&g, &dir);
    let names = vec!["vm1".to_owned(), "vm2".to_owned()];
    // A bad name is refused where names are made, before anything reaches the coordinator.
    let err = "bad name!".parse::<GroupName>().unwrap_err();
    assert!(err.to_string().contains("name"), "bad name!: {err}");
    for (name_, domains, expect) in [
        ("g", vec!["vm1".into(), "vm1".into()], "twice"),
        ("g", vec![], "no VMs"),
        ("g", vec!["ghost".into()], "no such domain"),
    ] {
        let err = c.define_group(&name(name_), None, &domains).unwrap_err();
        assert!(
            err.to_string().contains(expect),
            "{name_} {domains:?}: {err}"
        );
    }
    let defined = c.define_group(&name("web"), None, &names).unwrap();
    assert_eq!(defined.id, 1);
    assert_eq!(hv.world.lock().unwrap().registered.len(), 2);
    assert!(matches!(
        c.define_group(&name("web"), None, &names),
        Err(CoordinatorError::GroupExists(_))
    ));
    assert!(
        c.define_group(&name("other"), None, &names[..1]).is_err(),
        "vm1 is taken"
    );
    // A new coordinator on the same store knows the group.
    drop(c);
    let c = Coordinator::open(
        Arc::new(hv.clone()),
        Arc::new(hv.epochs()),
        &dir,
        Timeouts::default(),
    )
    .unwrap();
    assert_eq!(c.group(&name("web")).unwrap(), defined);
    c.remove_group(&name("web")).unwrap();
    assert!(hv.world.lock().unwrap().registered.is_empty());
    assert!(matches!(
        c.group(&name("web")),
        Err(CoordinatorError::UnknownGroup(_))
    ));
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn every_groups_unfinished_snapshot_is_recovered() {
    let (a, mut b) = (group(2), group(2));
    b.name = name("h");
    b.id = 2;
    for (i, vm) in b.vms.iter_mut().enumerate() {
        vm.name = format!("other{i}");
        vm.mac = MacAddr([2, 0, 0, 0, 1, i as u8]);
    }
    let dir = store();
    fs::create_dir_all(dir.join("journals")).unwrap();
    for g in [&a, &b] {
        let id = id(&format!("{}-1-e1", g.name));
        let journal = Journal {
            id: id.clone(),
            group: g.clone(),
            epoch_before: 0,
            method: INSTANT,
            cut_started: false,
        };
        write_atomically(&dir.join("journals").join(format!("{id}.json")), &journal).unwrap();
    }
    let hv = FakeHypervisor::new(&[a.vms.clone(), b.vms.clone()].concat());
    {
        let mut w = hv.world.lock().unwrap();
        w.states.insert("vm1".into(), VmState::HeldAtSnapshot);
        w.states.insert("other1".into(), VmState::HeldAtSnapshot);
    }
    let c = Coordinator::open(
        Arc::new(hv.clone()),
        Arc::new(hv.epochs()),
        &dir,
        Timeouts::default(),
    )
    .unwrap();
    let list = c.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|m| m.outcome == Outcome::Aborted));
    let w = hv.world.lock().unwrap();
    assert!(
        w.states.values().all(|s| *s == VmState::Running),
        "{:?}",
        w.states
    );
    drop(w);
    assert_eq!(fs::read_dir(dir.join("journals")).unwrap().count(), 0);
    let _ = fs::remove_dir_all(dir);
}

/// Every directory and file under `dir`, with its mode bits.
fn modes(dir: &Path) -> Vec<(PathBuf, bool, u32)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = vec![(
        dir.to_owned(),
        true,
        fs::metadata(dir).unwrap().permissions().mode() & 0o777,
    )];
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(modes(&path));
        } else {
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            out.push((path, false, mode));
        }
    }
    out
}

/// Case of the security review: images were written 0644 in 0755 directories, readable by any
/// local account (a memory image holds everything the VM had in memory). Every directory of
/// the store is 0700 and every file 0600, a store made looser before included.
#[test]
fn the_store_is_its_owners_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let g = group(2);
    let dir = store();
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let (c, _hv) = coordinator(&g, &dir);
    for method in [PRE, INSTANT] {
        assert_eq!(c.snapshot(&g, method).unwrap().outcome, Outcome::Committed);
    }
    let all = modes(&dir);
    assert!(all.iter().filter(|(_, d, _)| !*d).count() >= 2, "{all:?}");
    for (path, is_dir, mode) in all {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }
    let _ = fs::remove_dir_all(dir);
}

/// Case S10 of the security review, the second half: an epoch moved by something else during
/// the snapshot (a raw abort, `bpftool`) left a member off the new epoch, and the snapshot
/// committed anyway. The coordinator reads every member's epoch back before it commits.
#[test]
fn a_member_off_the_new_epoch_at_commit_aborts_the_snapshot() {
    for method in [PRE, INSTANT] {
        let g = group(3);
        let dir = store();
        let (c, hv) = coordinator(&g, &dir);
        hv.world
            .lock()
            .unwrap()
            .failures
            .insert("vm2".into(), Failure::EpochMovedBack);
        let m = c.snapshot(&g, method).unwrap();
        assert_eq!(m.outcome, Outcome::Aborted, "{method}: {m:?}");
        let reason = m.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("vm2") && reason.contains("epoch"),
            "{reason}"
        );
        let w = hv.world.lock().unwrap();
        for vm in &g.vms {
            assert_eq!(w.epochs[&vm.mac], 0, "{method}: {} back at 0", vm.name);
            assert_eq!(
                w.states[&vm.name],
                VmState::Running,
                "{method}: {}",
                vm.name
            );
        }
        drop(w);
        let _ = fs::remove_dir_all(dir);
    }
}

/// Case S9 of the security review: discarding VM `vm1.disks` deleted `vm1`'s disk list (files
/// were matched by the prefix `<name>.`), and VM `a` took `a.b`'s files with it. Only a VM's
/// own files go.
#[test]
fn discarding_a_vm_deletes_its_own_files_only() {
    let dir = store();
    fs::create_dir_all(&dir).unwrap();
    let files = [
        "a.save",
        "a.disks.json",
        "a.overlays.json",
        "a.vda.disk",
        "a.b.save",
        "a.b.vda.disk",
        "vm1.disks.json",
        "manifest.json",
    ];
    for f in files {
        fs::write(dir.join(f), b"x").unwrap();
    }
    super::store::discard_local("vm1.disks", &dir).unwrap();
    super::store::discard_local("a", &dir).unwrap();
    let mut left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "a.b.save",
            "a.b.vda.disk",
            "manifest.json",
            "vm1.disks.json"
        ]
    );
    let _ = fs::remove_dir_all(dir);
}

mod channel;
mod crash;
