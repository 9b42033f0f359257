//! Tier 0 of the buffer's decisions: a model of the rest of the host around [`Core`] — the
//! datapath's maps (a [`MemoryStore`]) classified by the same `decide_frame` the programs run,
//! their tickets and order counts, each CPU's FIFO hand-over to the buffer's socket (merged in
//! any order), the ports — and properties checked over random sequences of frames, reads,
//! advances and ticks.
//!
//! Notices reach the core synchronously, in the order the one epoch-change path sends them
//! (the protocol's intent: the buffer's copy first). The delay of the daemon's channel between
//! a notice and the frames after it is a separate hazard, outside this core.

#[path = "core_sim.rs"]
mod sim;

use std::collections::{HashMap, HashSet};

use enforcer_common::{MacKey, VmEpoch};
use proptest::prelude::*;
use sim::*;

use super::*;
use crate::{datapath::epochs, hold::advance};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Nothing released before its receiver advances; order per pair kept, under every
    /// interleaving of program runs, hand-overs and reads (case P2: no race left to count);
    /// nothing lost: every frame sent reaches each of its receivers exactly once.
    #[test]
    fn held_frames_are_released_late_in_order_and_all_of_them(
        n in 2usize..5,
        events in proptest::collection::vec(event(4), 1..400),
    ) {
        let mut sim = Sim::new(n, usize::MAX);
        for ev in &events {
            let ev = match *ev {
                Ev::Send { from, to } => Ev::Send { from: from % n, to: to.min(n) },
                Ev::SendInFlight { from, to } => Ev::SendInFlight { from: from % n, to: to.min(n) },
                Ev::Advance(i) => Ev::Advance(i % n),
                Ev::AdvanceUnheard(i) => Ev::AdvanceUnheard(i % n),
                ref other => other.clone(),
            };
            sim.apply(&ev);
        }
        sim.settle();
        prop_assert!(sim.early.is_empty(), "{:#?}", sim.early);
        prop_assert!(
            sim.order_breaks == 0,
            "{} pairs out of order: {:#?}", sim.order_breaks, sim.breaks
        );
        // Every order frame finished with, so nothing waits behind them any more.
        for (q, issued) in &sim.dp.order_issued {
            prop_assert_eq!(sim.ports.order_done.get(q).copied().unwrap_or(0), *issued);
        }
        prop_assert_eq!(sim.core.held_frames(), 0);
        prop_assert!(sim.core.draining().is_empty(), "flags left: {:?}", sim.core.draining());
        // Exactly once: per (sender, receiver), as many frames as were sent to it.
        let mut got: HashMap<(usize, usize), HashSet<u32>> = HashMap::new();
        for (port, f) in &sim.ports.log {
            let (from, seq, _) = parse(f);
            let to = sim.vm_of(*port);
            prop_assert!(got.entry((from, to)).or_default().insert(seq), "{from}#{seq} twice at {to}");
        }
        for from in 0..n {
            for to in (0..n).filter(|t| *t != from) {
                let want = sim.sent.get(&(from, to)).copied().unwrap_or(0)
                    + sim.sent.get(&(from, n)).copied().unwrap_or(0);
                let have = got.get(&(from, to)).map_or(0, |s| s.len()) as u32;
                prop_assert_eq!(have, want, "{} -> {}", from, to);
            }
        }
    }

    /// With a small memory bound, ports that vanish and a ring that overflows, frames are lost
    /// — but every one is counted with its reason, none reaches a VM early or twice.
    #[test]
    fn frames_that_cannot_be_delivered_are_counted(
        events in proptest::collection::vec(
            prop_oneof![9 => event(3), 1 => Just(Ev::LoseOne)], 1..300),
        bound in 0usize..20,
        gone in proptest::option::of(0usize..3),
    ) {
        let mut sim = Sim::new(3, bound * 60);
        if let Some(g) = gone {
            sim.ports.gone.insert(ifindex(g));
        }
        for ev in &events {
            sim.apply(ev);
        }
        sim.settle();
        prop_assert!(sim.early.is_empty(), "{:#?}", sim.early);
        prop_assert_eq!(sim.core.held_frames(), 0);
        let handed: u64 = sim.dp.seq.values().map(|s| s.all).sum();
        prop_assert_eq!(sim.core.total(HoldTotal::Received), handed, "read or counted lost");
        for (q, issued) in &sim.dp.order_issued {
            prop_assert_eq!(
                sim.ports.order_done.get(q).copied().unwrap_or(0), *issued,
                "order frames lost on the way are finished with too"
            );
        }
        let mut seen = HashSet::new();
        for (port, f) in &sim.ports.log {
            prop_assert!(seen.insert((*port, f.clone())), "delivered twice");
        }
    }
}

#[test]
fn nothing_leaves_before_the_receiver_advances_then_all_in_order() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    for _ in 0..100 {
        sim.apply(&Ev::Send { from: 0, to: 1 });
    }
    sim.apply(&Ev::Read(usize::MAX));
    assert_eq!(sim.core.held_frames(), 100);
    assert!(sim.ports.log.is_empty(), "nothing before the advance");
    sim.apply(&Ev::Advance(1));
    assert_eq!(sim.core.held_frames(), 0);
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(seqs, (0..100).collect::<Vec<_>>());
    let report = sim.core.report(sim.now);
    assert!(
        report.released_at_advance.contains(&(mac(1), 100)),
        "{:?}",
        report.released_at_advance
    );
    assert_eq!(sim.core.total(HoldTotal::Reinjected), 100);
}

#[test]
fn newer_frames_wait_behind_held_ones_until_the_flag_clears() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Advance(1));
    // Receiver draining: a Type-1 frame now is held for order (handed over, not yet read).
    assert!(sim.dp.map.vms[&mac(1)].is_draining());
    sim.apply(&Ev::Send { from: 0, to: 1 });
    assert_eq!(sim.ports.log.len(), 0, "the held one is still in the ring");
    sim.apply(&Ev::Read(usize::MAX));
    sim.apply(&Ev::Tick(0));
    assert!(!sim.dp.map.vms[&mac(1)].is_draining());
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(seqs, vec![0, 1]);
    // The order frame left: frames pass straight again.
    sim.apply(&Ev::Send { from: 0, to: 1 });
    assert_eq!(sim.ports.log.len(), 3);
}

/// Case P2: a drain ends under steady traffic. Frames keep coming less than 5 ms apart (the
/// old quiet time), read as they come: the flag clears at the first turn after the grace
/// period, with frames still flowing.
#[test]
fn a_drain_ends_under_steady_traffic() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Advance(1));
    for _ in 0..3 {
        sim.apply(&Ev::Send { from: 0, to: 1 });
        sim.apply(&Ev::Tick(1));
    }
    assert!(
        !sim.dp.map.vms[&mac(1)].is_draining(),
        "ended while frames flow"
    );
    for _ in 0..3 {
        sim.apply(&Ev::Send { from: 0, to: 1 });
        sim.apply(&Ev::Tick(1));
    }
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
}

/// Case P2, by construction: a frame held for order by a program run that saw the flag still
/// set, but ended after the flag cleared, keeps every later frame to its receiver behind it —
/// from any sender, on any CPU — until it has left; then frames pass straight again.
#[test]
fn a_frame_held_while_the_flag_clears_keeps_later_ones_behind_it() {
    // Four VMs: 0 and 2 send from CPU 0, 1 and 3 from CPU 1.
    let mut sim = Sim::new(4, usize::MAX);
    for i in [0, 2, 3] {
        sim.apply(&Ev::Advance(i));
    }
    sim.apply(&Ev::Tick(10));
    sim.apply(&Ev::Send { from: 0, to: 1 }); // Type-3, in the ring
    sim.apply(&Ev::Advance(1));
    // The buffer's turn before it reads: the drain's fence includes the frame in the ring.
    sim.core
        .progress_drains(&mut sim.ports, &mut sim.dp, true, sim.now);
    assert!(sim.dp.map.vms[&mac(1)].is_draining());
    // A program run decides while the flag is set, and ends only later.
    sim.apply(&Ev::SendInFlight { from: 0, to: 1 });
    // The buffer reads and releases the Type-3 frame; every frame before the fence came and
    // left: the flag clears, the run still going.
    sim.apply(&Ev::Read(usize::MAX));
    sim.core
        .progress_drains(&mut sim.ports, &mut sim.dp, true, sim.now);
    assert!(!sim.dp.map.vms[&mac(1)].is_draining(), "the flag cleared");
    assert_eq!(sim.ports.log.len(), 1);
    let run = sim.dp.in_flight.pop().expect("still running");
    sim.dp.hand_over(run);
    // Later frames to vm 1, from vm 0 itself and from vm 3 on the other CPU: held behind the
    // frame that run held, not delivered.
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Send { from: 3, to: 1 });
    assert_eq!(
        sim.ports.log.len(),
        1,
        "nothing passes while it is on its way"
    );
    sim.apply(&Ev::Tick(1));
    let from_0: Vec<u32> = sim
        .ports
        .log
        .iter()
        .filter(|(_, f)| parse(f).0 == 0)
        .map(|(_, f)| parse(f).1)
        .collect();
    assert_eq!(from_0, vec![0, 1, 2], "vm 0's frames in order");
    assert_eq!(sim.ports.log.len(), 4);
    sim.apply(&Ev::Send { from: 3, to: 1 });
    assert_eq!(sim.ports.log.len(), 5, "then frames pass straight");
}

#[test]
fn frames_lost_in_the_ring_are_counted_at_once_and_exactly() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::LoseOne);
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Read(usize::MAX));
    assert_eq!(
        sim.core.total(HoldTotal::LostRing),
        1,
        "the gap in the tickets"
    );
    assert_eq!(sim.core.total(HoldTotal::Received), 2);
    sim.apply(&Ev::Advance(1));
    sim.apply(&Ev::Tick(0));
    assert!(!sim.dp.map.vms[&mac(1)].is_draining());
}

/// A frame lost at the end of its CPU's hand-over leaves no gap to see: the audit counts it
/// lost one period later — an order frame among them too, so the drain ends and later frames
/// are not held behind it for ever.
#[test]
fn a_frame_lost_last_is_counted_by_the_audit() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Advance(1));
    sim.apply(&Ev::LoseOne);
    sim.apply(&Ev::Send { from: 0, to: 1 }); // held for order, lost
    sim.apply(&Ev::Tick(10));
    assert_eq!(sim.ports.log.len(), 1, "the held Type-3 frame");
    assert!(
        sim.dp.map.vms[&mac(1)].is_draining(),
        "waits for the lost one"
    );
    sim.apply(&Ev::Tick(600));
    assert_eq!(sim.core.total(HoldTotal::LostRing), 1);
    assert!(!sim.dp.map.vms[&mac(1)].is_draining(), "then the flag goes");
    let handed: u64 = sim.dp.seq.values().map(|s| s.all).sum();
    assert_eq!(
        sim.core.total(HoldTotal::Received),
        handed,
        "each counted once"
    );
    sim.apply(&Ev::Send { from: 0, to: 1 });
    assert_eq!(sim.ports.log.len(), 2, "frames pass straight again");
}

/// A frame counted lost by the audit that turns up later (the thread stalled): it stays
/// counted lost, once, and is not delivered behind the frames that went on meanwhile.
#[test]
fn a_frame_that_comes_after_it_was_counted_lost_stays_lost() {
    let mut sim = Sim::new(3, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Tick(10));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    // The buffer does not read it in time (no tick reads the ring until the deadline).
    let stalled = sim.dp.rings[0].pop_front().expect("held");
    sim.apply(&Ev::Advance(1));
    sim.apply(&Ev::Tick(10));
    // Noted by one audit, counted lost by the next.
    sim.apply(&Ev::Tick(600));
    sim.apply(&Ev::Tick(600));
    assert_eq!(
        sim.core.total(HoldTotal::LostRing),
        1,
        "counted lost by the audit"
    );
    sim.dp.rings[0].push_back(stalled);
    sim.apply(&Ev::Tick(10));
    assert_eq!(sim.core.total(HoldTotal::LostRing), 1);
    assert_eq!(sim.core.total(HoldTotal::Received), 1, "counted once");
    assert!(sim.ports.log.is_empty(), "not delivered");
    assert!(sim.core.draining().is_empty());
}

/// Restoring an older snapshot registers a VM again at a lower epoch: what it may receive is
/// its new epoch's, not the old one's (else Type-3 frames would be released to it at once).
/// VM `i` registered again at `epoch`, as the agent restores one (each step with its notice).
fn register_again(sim: &mut Sim, i: usize, epoch: u32) {
    let (m, now) = (mac(i), sim.now);
    epochs::unregister(&mut sim.dp.map, m.into()).unwrap();
    sim.core
        .on_notice(&mut sim.ports, Notice::Vm { mac: m, vm: None }, now);
    epochs::register(&mut sim.dp.map, m.into(), GROUP, ifindex(i), Some(epoch)).unwrap();
    let vm = Some(sim.dp.map.vms[&m]);
    sim.core
        .on_notice(&mut sim.ports, Notice::Vm { mac: m, vm }, now);
}

#[test]
fn a_vm_registered_again_lower_is_released_from_its_new_epoch() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Advance(1));
    sim.apply(&Ev::Advance(1));
    sim.apply(&Ev::Tick(10));
    register_again(&mut sim, 1, 0); // vm 1 was at 2
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Read(usize::MAX));
    assert!(sim.early.is_empty(), "{:?}", sim.early);
    assert_eq!(sim.core.held_frames(), 1, "held until vm 1 reaches 1 again");
}

/// Case S3, for broadcasts: a group registered again lower (a restore) holds the next
/// snapshot's broadcast for every member again (it was released through the old epoch).
#[test]
fn a_group_registered_again_lower_holds_its_broadcasts_again() {
    let mut sim = Sim::new(2, usize::MAX);
    for _ in 0..2 {
        sim.apply(&Ev::Advance(0));
        sim.apply(&Ev::Advance(1));
    }
    sim.apply(&Ev::Tick(10));
    (0..2).for_each(|i| register_again(&mut sim, i, 0));
    // The next snapshot: vm 0 advances first and broadcasts.
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 2 });
    sim.apply(&Ev::Read(usize::MAX));
    assert!(sim.early.is_empty(), "{:?}", sim.early);
    assert_eq!(sim.core.held_frames(), 1, "held until vm 1 reaches 1 again");
    sim.apply(&Ev::Advance(1));
    assert_eq!(sim.core.held_frames(), 0, "released once the group is at 1");
}

#[test]
fn the_memory_bound_drops_the_newest_and_counts_it() {
    let mut sim = Sim::new(2, 3 * 60);
    sim.apply(&Ev::Advance(0));
    for _ in 0..5 {
        sim.apply(&Ev::Send { from: 0, to: 1 });
    }
    sim.apply(&Ev::Read(usize::MAX));
    assert_eq!(sim.core.total(HoldTotal::DroppedBound), 2);
    sim.apply(&Ev::Advance(1));
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(seqs, vec![0, 1, 2], "the oldest kept, in order");
    let report = sim.core.report(sim.now);
    assert_eq!(report.queues[0].dropped_bound, 2);
}

/// A limit of the queues, shown: a broadcast and a later unicast from the same sender to the
/// same receiver wait in different queues (the group's and the receiver's), and the
/// receiver's advance releases its own queue before the group's, so the two may arrive
/// swapped. Each queue keeps its own order.
#[test]
fn a_broadcast_and_a_unicast_may_swap() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(1));
    sim.apply(&Ev::Send { from: 1, to: 2 });
    sim.apply(&Ev::Send { from: 1, to: 0 });
    sim.apply(&Ev::Read(usize::MAX));
    sim.apply(&Ev::Advance(0));
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(
        seqs,
        vec![1, 0],
        "the unicast first, then the broadcast sent before it"
    );
}

#[test]
fn a_broadcast_waits_for_the_whole_group() {
    let mut sim = Sim::new(3, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 3 });
    sim.apply(&Ev::Read(usize::MAX));
    sim.apply(&Ev::Advance(1));
    assert!(sim.ports.log.is_empty(), "vm 2 has not advanced");
    sim.apply(&Ev::Advance(2));
    let mut reached: Vec<usize> = sim.ports.log.iter().map(|(p, _)| sim.vm_of(*p)).collect();
    reached.sort();
    assert_eq!(reached, vec![1, 2]);
}

#[test]
fn an_abort_delivers_everything_held_for_the_group() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    for _ in 0..3 {
        sim.apply(&Ev::Send { from: 0, to: 1 });
    }
    sim.apply(&Ev::Send { from: 0, to: 2 });
    sim.apply(&Ev::Read(usize::MAX));
    let mut link = Link {
        core: &mut sim.core,
        ports: &mut sim.ports,
        now: sim.now,
    };
    advance::roll_back(&mut sim.dp.map, &mut link, GROUP, 0).unwrap();
    assert_eq!(sim.core.held_frames(), 0);
    assert_eq!(sim.ports.log.len(), 4);
    assert_eq!(sim.core.total(HoldTotal::Reinjected), 4);
}

/// Held frames re-enter at their sender's port: if that port vanished they cannot, and are
/// counted (`inject_failed`); nor when its slot now names another port (found in review: they
/// would re-enter there, as if that port's VM had sent them). A receiver's vanished port is the
/// bridge's business, as for any frame.
#[test]
fn frames_whose_sender_port_vanished_are_counted() {
    let mut sim = Sim::new(3, usize::MAX);
    sim.ports.gone.insert(ifindex(0));
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Read(usize::MAX));
    sim.apply(&Ev::Advance(1));
    assert_eq!(sim.core.total(HoldTotal::InjectFailed), 1);
    assert!(sim.ports.log.is_empty());
    // vm 0's slot given to vm 2's port while its frame waits.
    sim.ports.gone.clear();
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Read(usize::MAX));
    let slot = sim.dp.map.vms[&mac(0)].slot;
    sim.ports.slots.insert(slot, ifindex(2));
    sim.apply(&Ev::Advance(1));
    assert_eq!(sim.core.total(HoldTotal::InjectFailed), 2);
    assert!(sim.ports.log.is_empty(), "not re-injected at vm 2's port");
}

#[test]
fn a_receiver_unregistered_costs_its_held_frames_counted() {
    let mut sim = Sim::new(2, usize::MAX);
    // An unregistered receiver's queue is dropped, counted.
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Read(usize::MAX));
    sim.core.on_notice(
        &mut sim.ports,
        Notice::Vm {
            mac: mac(1),
            vm: None,
        },
        sim.now,
    );
    assert_eq!(sim.core.total(HoldTotal::DroppedUnknown), 1);
    assert_eq!(sim.core.held_frames(), 0);
}

#[test]
fn a_new_buffer_accounts_for_what_a_dead_one_left() {
    let mut totals = [0; HoldTotal::ENTRIES as usize];
    let at = |t: HoldTotal| t.index() as usize;
    totals[at(HoldTotal::Received)] = 10;
    totals[at(HoldTotal::Reinjected)] = 6;
    // 4 held in memory; the programs handed over 13: 3 unread.
    let (in_memory, unread) = account_restart(&mut totals, 13);
    assert_eq!((in_memory, unread), (4, 3));
    assert_eq!(totals[at(HoldTotal::LostRestart)], 7);
    assert_eq!(totals[at(HoldTotal::Received)], 13);
    let fates: u64 = HoldTotal::FATES.iter().map(|t| totals[at(*t)]).sum();
    assert_eq!(fates, totals[at(HoldTotal::Received)], "balanced again");
}

#[test]
fn a_view_of_a_remote_vm_never_goes_down_in_the_copy() {
    let mut sim = Sim::new(2, usize::MAX);
    let remote = VmEpoch {
        epoch: 5,
        group: GROUP,
        ifindex: 900,
        slot: 9,
        flags: enforcer_common::FLAG_REMOTE,
        ceiling: 5,
    };
    let m = MacKey::new([2, 9, 9, 9, 9, 9]);
    let now = sim.now;
    sim.core.on_notice(
        &mut sim.ports,
        Notice::Vm {
            mac: m,
            vm: Some(remote),
        },
        now,
    );
    sim.core.on_notice(
        &mut sim.ports,
        Notice::Vm {
            mac: m,
            vm: Some(VmEpoch { epoch: 3, ..remote }),
        },
        now,
    );
    assert_eq!(sim.core.vms[&m].epoch, 5);
}

/// An abort while Type-3 frames are still on their way to the buffer (in the ring, colored
/// with the aborted epoch): once the group is rolled back they are ordinary frames, delivered —
/// not queued behind a color nobody will reach, which would hold every later frame to their
/// receiver until the next snapshot (found in review: a regression of carrying the color).
#[test]
fn frames_on_their_way_at_an_abort_are_delivered_and_nothing_sticks() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    sim.apply(&Ev::Tick(10));
    for _ in 0..3 {
        sim.apply(&Ev::Send { from: 0, to: 1 });
    }
    assert_eq!(sim.dp.ring_len(), 3, "held, not yet read");
    sim.apply(&Ev::Abort);
    sim.apply(&Ev::Tick(10));
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Send { from: 1, to: 0 });
    for _ in 0..4 {
        sim.apply(&Ev::Tick(600));
    }
    assert_eq!(sim.core.held_frames(), 0, "nothing stuck");
    assert!(sim.core.draining().is_empty(), "{:?}", sim.core.draining());
    let to_1 = sim
        .ports
        .log
        .iter()
        .filter(|(port, _)| *port == ifindex(1))
        .count();
    assert_eq!(
        to_1, 4,
        "the three from the aborted epoch, then the new one"
    );
}

/// A long queue is released over several turns of the buffer thread (which meanwhile reads
/// its ring and answers), and frames that come in between wait behind it, in order.
#[test]
fn a_long_queue_is_released_over_several_turns_in_order() {
    let mut sim = Sim::new(2, usize::MAX);
    sim.apply(&Ev::Advance(0));
    for _ in 0..3000 {
        sim.apply(&Ev::Send { from: 0, to: 1 });
    }
    sim.apply(&Ev::Read(usize::MAX));
    sim.apply(&Ev::Advance(1));
    let turn = RELEASE_BATCHES * BATCH;
    assert_eq!(sim.ports.log.len(), turn, "one turn's worth at the advance");
    // A frame sent now (held for order) waits behind the rest of the queue.
    sim.apply(&Ev::Send { from: 0, to: 1 });
    sim.apply(&Ev::Read(usize::MAX));
    assert_eq!(sim.ports.log.len(), turn);
    assert!(
        sim.core.release_more(&mut sim.ports, sim.now),
        "more to come"
    );
    assert_eq!(sim.ports.log.len(), 2 * turn);
    while sim.core.release_more(&mut sim.ports, sim.now) {}
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(seqs, (0..3001).collect::<Vec<_>>());
    let report = sim.core.report(sim.now);
    assert!(report.released_at_advance.contains(&(mac(1), 3001)));
}

/// The channel state a recording keeps (`hold::record`), found in review: recordings count
/// against the memory bound that held frames are checked against too, and arming a receiver
/// again starts its recording afresh (a snapshot that failed before it took its recording must
/// not leave its frames to the next one).
#[test]
fn recordings_share_the_memory_bound_and_start_afresh_when_armed_again() {
    // Room for three 60-byte frames.
    let mut sim = Sim::new(2, 180);
    let queue = enforcer_common::receiver_queue(sim.dp.map.vms[&mac(1)].slot);
    let header = |ticket: u64, flags: u16| HoldHeader {
        color: 0,
        ticket,
        queue,
        port: sim.dp.map.vms[&mac(1)].slot,
        ifindex: ifindex(1),
        flags,
        ..HoldHeader::default()
    };
    let now = sim.now;
    sim.core.recorder.arm(&[queue]);
    for seq in 0..3 {
        let f = held(frame(0, Some(1), seq, 0), header(seq as u64, HOLD_RECORD));
        sim.core.on_frame(&mut sim.ports, f, now);
    }
    assert_eq!(sim.core.total(HoldTotal::Recorded), 3);
    // A Type-3 frame to the same receiver now finds the bound reached.
    let mut type3 = header(3, 0);
    type3.color = 1;
    sim.core
        .on_frame(&mut sim.ports, held(frame(0, Some(1), 3, 1), type3), now);
    assert_eq!(
        sim.core.total(HoldTotal::DroppedBound),
        1,
        "one bound for both"
    );
    assert_eq!(sim.core.held_frames(), 0);

    let take = |sim: &mut Sim| {
        sim.core.recorder.take(7, vec![queue]);
        let done = sim.core.progress_takes(&mut sim.dp);
        assert_eq!(done.len(), 1, "nothing was still on its way");
        let (id, mut recordings) = done.into_iter().next().unwrap();
        assert_eq!(id, 7);
        recordings.remove(0).1
    };
    // Armed again without a take: what it had is gone, not carried into the new recording.
    sim.core.recorder.arm(&[queue]);
    let f = held(frame(0, Some(1), 4, 0), header(4, HOLD_RECORD));
    sim.core.on_frame(&mut sim.ports, f, now);
    let rec = take(&mut sim);
    assert_eq!(
        rec.frames.len(),
        1,
        "only what came since it was armed again"
    );
    assert_eq!(parse(&rec.frames[0].data).1, 4);
    assert_eq!(take(&mut sim), Recording::default(), "taken: disarmed");
}

/// At a receiver's cut the daemon takes what waits in its tap and puts it back; meanwhile its
/// buffer queue is frozen: frames that may go are kept, in order, and leave only at the thaw
/// (so none overtakes what is put back). An abort thaws too.
#[test]
fn a_frozen_queue_keeps_what_may_go_until_it_thaws_then_sends_it_in_order() {
    let mut sim = Sim::new(2, usize::MAX);
    let slot = sim.dp.map.vms[&mac(1)].slot;
    let sender_slot = sim.dp.map.vms[&mac(0)].slot;
    let header = |ticket: u64| HoldHeader {
        color: 0,
        ticket,
        queue: enforcer_common::receiver_queue(slot),
        port: sender_slot,
        ifindex: ifindex(0),
        flags: HOLD_FOR_ORDER,
        ..HoldHeader::default()
    };
    let now = sim.now;
    sim.core
        .on_notice(&mut sim.ports, Notice::Freeze { mac: mac(1) }, now);
    for seq in 0..3 {
        let f = held(frame(0, Some(1), seq, 0), header(seq as u64));
        sim.core.on_frame(&mut sim.ports, f, now);
    }
    assert!(
        sim.ports.log.is_empty(),
        "kept while frozen: {:?}",
        sim.ports.log
    );
    assert_eq!(sim.core.held_frames(), 3);
    sim.core
        .on_notice(&mut sim.ports, Notice::Thaw { mac: mac(1) }, now);
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(seqs, [0, 1, 2], "all of it at the thaw, in order");

    // Its advance at its cut while frozen: the drain that follows does not end (newer frames
    // keep being held) until the thaw, even with nothing in the queue (found in review).
    sim.core
        .on_notice(&mut sim.ports, Notice::Freeze { mac: mac(1) }, now);
    sim.core.on_notice(
        &mut sim.ports,
        Notice::Advanced {
            mac: mac(1),
            epoch: 1,
        },
        now,
    );
    for _ in 0..3 {
        sim.core
            .progress_drains(&mut sim.ports, &mut sim.dp, true, now);
    }
    assert_eq!(sim.core.draining(), [Key::Vm(mac(1))], "held while frozen");
    sim.core
        .on_notice(&mut sim.ports, Notice::Thaw { mac: mac(1) }, now);
    sim.core
        .progress_drains(&mut sim.ports, &mut sim.dp, true, now);
    assert!(sim.core.draining().is_empty(), "ends once thawed");

    // Frozen again, then the group's snapshot aborted: the abort releases it.
    sim.core
        .on_notice(&mut sim.ports, Notice::Freeze { mac: mac(1) }, now);
    let f = held(frame(0, Some(1), 3, 0), header(3));
    sim.core.on_frame(&mut sim.ports, f, now);
    assert_eq!(sim.ports.log.len(), 3);
    sim.core.on_notice(
        &mut sim.ports,
        Notice::Release {
            group: GROUP,
            aborts: 1,
        },
        now,
    );
    assert_eq!(sim.ports.log.len(), 4, "an abort thaws the queue");
}

/// A VM shut just before its cut (its map entry flagged draining, its queue frozen): what is
/// held for it waits; at the thaw it goes, in order, and the drain that follows clears the
/// flag, even when its cut never came (the snapshot failed before it).
#[test]
fn a_vm_shut_before_its_cut_is_drained_at_the_thaw() {
    let mut sim = Sim::new(2, usize::MAX);
    let now = shut_vm1(&mut sim);
    for seq in 0..3 {
        let f = for_order_to_vm1(&sim, seq);
        sim.core.on_frame(&mut sim.ports, f, now);
    }
    sim.core
        .progress_drains(&mut sim.ports, &mut sim.dp, true, now);
    assert!(sim.ports.log.is_empty(), "kept while shut");
    assert!(sim.dp.map.vms[&mac(1)].is_draining());
    sim.core
        .on_notice(&mut sim.ports, Notice::Thaw { mac: mac(1) }, now);
    let seqs: Vec<u32> = sim.ports.log.iter().map(|(_, f)| parse(f).1).collect();
    assert_eq!(seqs, [0, 1, 2], "all of it at the thaw, in order");
    for _ in 0..3 {
        sim.core
            .progress_drains(&mut sim.ports, &mut sim.dp, true, now);
    }
    assert!(sim.core.draining().is_empty());
    assert!(
        !sim.dp.map.vms[&mac(1)].is_draining(),
        "the flag is cleared once drained"
    );
}

/// A VM shut for a snapshot whose coordinator died (nobody thaws it, nothing moves its
/// epoch): after [`FREEZE_MAX`] its queue is thawed and drained anyway, so its frames are not
/// held for good (found in review).
#[test]
fn a_freeze_nobody_ends_is_thawed_after_its_bound() {
    let mut sim = Sim::new(2, usize::MAX);
    let now = shut_vm1(&mut sim);
    let f = for_order_to_vm1(&sim, 0);
    sim.core.on_frame(&mut sim.ports, f, now);
    let almost = now + FREEZE_MAX - std::time::Duration::from_millis(1);
    sim.core
        .progress_drains(&mut sim.ports, &mut sim.dp, true, almost);
    assert!(sim.ports.log.is_empty(), "still within its bound");
    for _ in 0..3 {
        sim.core
            .progress_drains(&mut sim.ports, &mut sim.dp, true, now + FREEZE_MAX);
    }
    assert_eq!(sim.ports.log.len(), 1, "released once its bound passed");
    assert!(!sim.dp.map.vms[&mac(1)].is_draining(), "and drained");
}

#[test]
fn a_frozen_queue_past_a_quarter_of_the_bound_goes_on_before_anything_is_dropped() {
    let max = 4000;
    let mut sim = Sim::new(2, max);
    let now = shut_vm1(&mut sim);
    let held = |sim: &Sim| sim.core.report(now).held_bytes as usize;
    let mut seq = 0;
    // Up to a quarter of the bound it stays frozen.
    loop {
        let f = for_order_to_vm1(&sim, seq);
        let before = held(&sim);
        sim.core.on_frame(&mut sim.ports, f, now);
        seq += 1;
        if held(&sim) > max / FROZEN_SHARE {
            break;
        }
        sim.core
            .progress_drains(&mut sim.ports, &mut sim.dp, true, now);
        assert!(sim.ports.log.is_empty(), "frozen at {before} bytes");
    }
    sim.core
        .progress_drains(&mut sim.ports, &mut sim.dp, true, now);
    assert_eq!(
        sim.ports.log.len() as u32,
        seq,
        "past a quarter of the bound: every frame goes on"
    );
    assert_eq!(
        sim.core.report(now).totals[HoldTotal::DroppedBound.index() as usize],
        0
    );
}

/// vm1 shut before its cut, as the agent does: its queue frozen, its entry flagged draining.
/// Returns the simulation's now.
fn shut_vm1(sim: &mut Sim) -> std::time::Instant {
    let now = sim.now;
    sim.core
        .on_notice(&mut sim.ports, Notice::Freeze { mac: mac(1) }, now);
    epochs::flag_vm_draining(&mut sim.dp.map, mac(1).into()).unwrap();
    now
}

/// vm0's frame `seq` to vm1, color 0, held for order in vm1's queue with ticket `seq`.
fn for_order_to_vm1(sim: &Sim, seq: u32) -> Received {
    let header = HoldHeader {
        color: 0,
        ticket: seq as u64,
        queue: enforcer_common::receiver_queue(sim.dp.map.vms[&mac(1)].slot),
        port: sim.dp.map.vms[&mac(0)].slot,
        ifindex: ifindex(0),
        flags: HOLD_FOR_ORDER,
        ..HoldHeader::default()
    };
    held(frame(0, Some(1), seq, 0), header)
}
