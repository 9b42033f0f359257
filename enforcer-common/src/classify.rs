//! The frame classification of Mattern's snapshot algorithm (docs/design.md, "The algorithm"), as one pure
//! function over a read-only view of the datapath's maps. The eBPF program implements the view
//! with map lookups; the unit tests implement it with plain tables.

use crate::{
    maps::{GroupState, MacKey, Type3Mode, VmEpoch, group_queue, receiver_queue},
    outcome::{Outcome, Verdict},
    wire,
};

/// The type of a frame from a sender coloured `color` to a receiver at `receiver_epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    /// color == receiver epoch: both pre- or both post-snapshot.
    Type1,
    /// color < receiver epoch: sent pre-snapshot, received post-snapshot.
    Type2,
    /// color > receiver epoch: sent post-snapshot to a pre-snapshot receiver. Must not be
    /// delivered before the receiver advances.
    Type3,
}

/// Classifies by color and receiver epoch.
#[inline(always)]
pub const fn classify(color: u32, receiver_epoch: u32) -> FrameType {
    if color == receiver_epoch {
        FrameType::Type1
    } else if color < receiver_epoch {
        FrameType::Type2
    } else {
        FrameType::Type3
    }
}

/// Read-only view of the datapath state needed to classify one frame.
pub trait DatapathView {
    /// The VM registered with this MAC, if any.
    fn vm(&self, mac: &MacKey) -> Option<VmEpoch>;
    /// Whether a VM is registered on the port with this ifindex.
    fn port_has_vm(&self, ifindex: u32) -> bool;
    /// The group's state: the smallest epoch of any member (may lag, never leads), its flags
    /// and its abort count.
    fn group(&self, group: u32) -> Option<GroupState>;
    /// The configured Type-3 policy.
    fn type3_mode(&self) -> Type3Mode;
    /// Whether a buffer is ready to take held frames from this port.
    fn hold_ready(&self, ifindex: u32) -> bool;
    /// Whether frames held for order in hold queue `queue` ([`HoldKey::queue`]) are still on
    /// their way through the buffer (`hold_order_issued[queue]` > `hold_order_done[queue]`).
    fn order_pending(&self, queue: u32) -> bool;
}

/// Decides the fate of a well-formed frame from `src` to `dst` that entered the host on the
/// port `ifindex` (the sender's port: programs run where a VM's frames enter the host).
#[inline(always)]
pub fn decide<V: DatapathView>(view: &V, ifindex: u32, src: &MacKey, dst: &MacKey) -> Outcome {
    decide_frame(view, ifindex, src, dst).outcome
}

/// Which buffer queue a held frame joins, so the datapath can count what it hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldKey {
    None,
    /// A unicast frame: the receiver's port slot.
    Receiver(u32),
    /// A broadcast/multicast frame: the sender's group.
    Group(u32),
}

impl HoldKey {
    /// The index of the frame's hold queue in the `hold_seq` family of maps.
    #[inline(always)]
    pub const fn queue(self) -> Option<u32> {
        match self {
            HoldKey::None => None,
            HoldKey::Receiver(slot) => Some(receiver_queue(slot)),
            HoldKey::Group(group) => Some(group_queue(group)),
        }
    }
}

/// The outcome, the counter slot of the port when the sender was identified on it, and where
/// a held frame is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub sender_slot: Option<u32>,
    pub hold: HoldKey,
    /// The color the frame was classified with (0 when the sender is not identified).
    pub color: u32,
    /// A frame to hold: its sender's group's abort count, read after the sender's epoch
    /// ([`GroupState::aborts`]; 0 otherwise).
    pub aborts: u32,
    /// The frame came from a VM on another host and carried a color above this host's view of
    /// it: the view may be raised to `color` (it never leads: the color is the sender's epoch
    /// when it sent the frame).
    pub learn: bool,
    /// The `skb->mark` to give a delivered frame of a local sender, so the overlay carries its
    /// color to other hosts (VXLAN-GBP); 0: leave the mark alone.
    pub mark: u32,
}

impl Decision {
    /// The frame cannot be held after all (no room for its hold header): Type-3 is dropped (and
    /// counted), a frame held only for ordering is delivered.
    #[inline(always)]
    pub fn unheld(mut self) -> Self {
        self.outcome = match self.outcome {
            Outcome::Type3Held => Outcome::Type3Unbuffered,
            Outcome::HeldForOrder => Outcome::Type1,
            other => other,
        };
        self.hold = HoldKey::None;
        self
    }
}

/// [`decide`], also returning the sender's counter slot so the datapath need not look it up.
#[inline(always)]
pub fn decide_frame<V: DatapathView>(
    view: &V,
    ifindex: u32,
    src: &MacKey,
    dst: &MacKey,
) -> Decision {
    decide_wire(view, ifindex, src, dst, 0)
}

/// [`decide_frame`] for a frame that arrived with `skb->mark` = `mark`. For a sender on another
/// host (registered with [`FLAG_REMOTE`] on the overlay port) a mark carrying a wire color
/// ([`wire::decode`]) is the frame's exact color; without one, this host's view of the sender
/// (which may lag) stands in, and the sender's host, which knows the color exactly, has
/// already held the frame if it was Type-3 to its view of the receiver.
#[inline(always)]
pub fn decide_wire<V: DatapathView>(
    view: &V,
    ifindex: u32,
    src: &MacKey,
    dst: &MacKey,
    mark: u32,
) -> Decision {
    let unidentified = |outcome| Decision {
        outcome,
        sender_slot: None,
        hold: HoldKey::None,
        color: 0,
        aborts: 0,
        learn: false,
        mark: 0,
    };
    let sender = match view.vm(src) {
        Some(vm) if vm.ifindex == ifindex => vm,
        // A registered VM's MAC on another port: someone is using another VM's address.
        Some(_) => return unidentified(Outcome::ForeignSource),
        None if view.port_has_vm(ifindex) => return unidentified(Outcome::ForeignSource),
        None => return unidentified(Outcome::Unregistered),
    };
    let remote = sender.is_remote();
    let color = if remote {
        match wire::decode(mark, sender.epoch) {
            // Above what the coordinator announced the VM may reach: not the VM's frame
            // (anyone who can reach the overlay's UDP port can write a color), so it is
            // dropped and teaches nothing; a view never leads its owner on such input.
            Some(color) if !sender.may_carry(color) => {
                return Decision {
                    sender_slot: Some(sender.slot),
                    color,
                    ..unidentified(Outcome::ForgedColor)
                };
            }
            Some(color) => color,
            None => sender.epoch,
        }
    } else {
        sender.epoch
    };
    let learn = remote && color > sender.epoch;
    let decided = |outcome: Outcome, hold| Decision {
        outcome,
        sender_slot: Some(sender.slot),
        hold,
        color,
        aborts: 0,
        learn,
        // Only frames to group members carry the color; other traffic keeps its mark.
        mark: if remote || outcome == Outcome::OutsideGroup {
            0
        } else {
            wire::encode(color)
        },
    };

    let (frame_type, flags, hold) = if dst.is_multicast() {
        // Broadcast/multicast reaches every member: it is Type-3 if any member is still
        // pre-snapshot relative to the sender, so compare with the group's minimum epoch.
        match view.group(sender.group) {
            Some(g) => (
                classify(color, g.min_epoch),
                g.flags,
                HoldKey::Group(sender.group),
            ),
            None => return decided(Outcome::OutsideGroup, HoldKey::None),
        }
    } else {
        match view.vm(dst) {
            // Between two VMs of other hosts, flooded through this one: the receiver's own
            // host enforces it, and the bridge drops it here (it came in on the overlay port,
            // where the receiver is). Holding it here would deliver it twice.
            Some(receiver) if remote && receiver.is_remote() => {
                return decided(Outcome::OutsideGroup, HoldKey::None);
            }
            Some(receiver) if receiver.group == sender.group => (
                classify(color, receiver.epoch),
                receiver.flags,
                HoldKey::Receiver(receiver.slot),
            ),
            _ => return decided(Outcome::OutsideGroup, HoldKey::None),
        }
    };

    // Frames the buffer is still re-injecting to this receiver must not be overtaken: those
    // held while it drains (the flag), and those held for order after the flag cleared (a
    // frame held in the instant of the clear keeps every later one behind it).
    let behind_held = |flags: u32| {
        flags & crate::maps::FLAG_DRAINING != 0
            || hold.queue().is_some_and(|q| view.order_pending(q))
    };
    let outcome = match frame_type {
        FrameType::Type1 | FrameType::Type2 if view.hold_ready(ifindex) && behind_held(flags) => {
            Outcome::HeldForOrder
        }
        FrameType::Type1 => Outcome::Type1,
        FrameType::Type2 => Outcome::Type2,
        FrameType::Type3 => match view.type3_mode() {
            Type3Mode::Buffer if view.hold_ready(ifindex) => Outcome::Type3Held,
            Type3Mode::Buffer => Outcome::Type3Unbuffered,
            Type3Mode::Drop => Outcome::Type3Dropped,
            Type3Mode::Monitor => Outcome::Type3Monitored,
        },
    };
    if outcome.verdict() != Verdict::Hold {
        return decided(outcome, HoldKey::None);
    }
    // Read after the epochs, which an abort rolls back before it counts itself: a frame under
    // the new count was classified with rolled-back epochs (never early); one that read an
    // epoch from before the abort with the new count waits for its color (late, not early).
    let aborts = view.group(sender.group).map_or(0, |g| g.aborts);
    Decision {
        aborts,
        ..decided(outcome, hold)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeMap, vec::Vec};

    use super::*;

    struct Tables {
        vms: BTreeMap<MacKey, VmEpoch>,
        mode: Type3Mode,
        hold_ready: bool,
        group_flags: u32,
        aborts: u32,
        order_pending: Vec<u32>,
    }

    impl Tables {
        fn new(mode: Type3Mode) -> Self {
            Self {
                vms: BTreeMap::new(),
                mode,
                hold_ready: false,
                aborts: 0,
                group_flags: 0,
                order_pending: Vec::new(),
            }
        }
        fn add(&mut self, n: u8, group: u32, epoch: u32) -> MacKey {
            let mac = mac(n);
            let vm = VmEpoch {
                epoch,
                group,
                ifindex: 100 + n as u32,
                slot: n as u32,
                flags: 0,
                ceiling: 0,
            };
            self.vms.insert(mac, vm);
            mac
        }
    }

    impl DatapathView for Tables {
        fn vm(&self, mac: &MacKey) -> Option<VmEpoch> {
            self.vms.get(mac).copied()
        }
        fn port_has_vm(&self, ifindex: u32) -> bool {
            self.vms.values().any(|vm| vm.ifindex == ifindex)
        }
        fn group(&self, group: u32) -> Option<GroupState> {
            let members = self.vms.values().filter(|vm| vm.group == group);
            let min = members.clone().map(|vm| vm.epoch).min()?;
            Some(GroupState {
                min_epoch: min,
                members: members.count() as u32,
                flags: self.group_flags,
                aborts: self.aborts,
            })
        }
        fn type3_mode(&self) -> Type3Mode {
            self.mode
        }
        fn hold_ready(&self, _ifindex: u32) -> bool {
            self.hold_ready
        }
        fn order_pending(&self, queue: u32) -> bool {
            self.order_pending.contains(&queue)
        }
    }

    fn mac(n: u8) -> MacKey {
        MacKey::new([0x02, 0, 0, 0, 0, n])
    }
    const BROADCAST: MacKey = MacKey::new([0xff; 6]);

    /// A VM on another host, seen through the overlay port 900.
    fn add_remote(t: &mut Tables, n: u8, group: u32, view: u32) -> MacKey {
        let m = t.add(n, group, view);
        let vm = t.vms.get_mut(&m).expect("added");
        vm.ifindex = 900;
        vm.flags |= crate::maps::FLAG_REMOTE;
        m
    }

    #[test]
    fn frames_from_another_host_are_classified_with_their_wire_color() {
        let mut t = Tables::new(Type3Mode::Buffer);
        t.hold_ready = true;
        let local = t.add(1, 7, 0);
        // This host's view of the remote sender lags: 0, while it already sent at 1 (the
        // snapshot to 1 the coordinator announced).
        let remote = add_remote(&mut t, 2, 7, 0);
        t.vms.get_mut(&remote).expect("added").ceiling = 1;
        let d = decide_wire(&t, 900, &remote, &local, wire::encode(1));
        assert_eq!(d.outcome, Outcome::Type3Held);
        assert_eq!((d.color, d.learn, d.mark), (1, true, 0));
        // Without a wire color the view stands in (the sender's host has enforced already).
        let d = decide_wire(&t, 900, &remote, &local, 0);
        assert_eq!((d.outcome, d.color, d.learn), (Outcome::Type1, 0, false));
        // An old frame (color below the view) is not learned from, and is Type-2 once the
        // receiver has moved on.
        t.vms.get_mut(&local).expect("added").epoch = 1;
        t.vms.get_mut(&remote).expect("added").epoch = 1;
        let d = decide_wire(&t, 900, &remote, &local, wire::encode(0));
        assert_eq!((d.outcome, d.color, d.learn), (Outcome::Type2, 0, false));
        // A remote VM's MAC on a local port is foreign.
        assert_eq!(
            decide_wire(&t, 101, &remote, &local, 0).outcome,
            Outcome::ForeignSource
        );
        // Between two VMs of other hosts (flooded through this one): never held here, or the
        // receiver would get it twice; its own host enforces it.
        let other = add_remote(&mut t, 3, 7, 0);
        let d = decide_wire(&t, 900, &remote, &other, wire::encode(1));
        assert_eq!((d.outcome, d.hold), (Outcome::OutsideGroup, HoldKey::None));
    }

    #[test]
    fn a_wire_color_above_what_the_coordinator_announced_is_forged_and_teaches_nothing() {
        let mut t = Tables::new(Type3Mode::Buffer);
        t.hold_ready = true;
        let local = t.add(1, 7, 0);
        let remote = add_remote(&mut t, 2, 7, 0);
        // Nothing announced: the view (0) is all the VM may carry.
        for forged in [1, 2, 0x3fff] {
            let d = decide_wire(&t, 900, &remote, &local, wire::encode(forged));
            assert_eq!(
                (d.outcome, d.learn, d.hold, d.sender_slot),
                (Outcome::ForgedColor, false, HoldKey::None, Some(2)),
                "color {forged}"
            );
            assert_eq!(d.outcome.verdict(), Verdict::Drop);
        }
        // Also to VMs outside the group, and to broadcast: a forged color is never learned.
        for dst in [mac(77), BROADCAST] {
            let d = decide_wire(&t, 900, &remote, &dst, wire::encode(5));
            assert_eq!((d.outcome, d.learn), (Outcome::ForgedColor, false));
        }
        // Announced 1: color 1 is the VM's own (learned), 2 is still forged.
        t.vms.get_mut(&remote).expect("added").ceiling = 1;
        let d = decide_wire(&t, 900, &remote, &local, wire::encode(1));
        assert_eq!((d.outcome, d.learn), (Outcome::Type3Held, true));
        let d = decide_wire(&t, 900, &remote, &local, wire::encode(2));
        assert_eq!((d.outcome, d.learn), (Outcome::ForgedColor, false));
        // A view raised past an old ceiling bounds by itself; this host's own VMs carry no
        // wire color at all.
        t.vms.get_mut(&remote).expect("added").epoch = 3;
        let d = decide_wire(&t, 900, &remote, &local, wire::encode(3));
        assert_ne!(d.outcome, Outcome::ForgedColor);
        assert!(t.vms[&local].may_carry(u32::MAX));
    }

    #[test]
    fn frames_to_another_host_are_held_by_the_lagging_view_and_carry_their_color() {
        let mut t = Tables::new(Type3Mode::Buffer);
        t.hold_ready = true;
        let local = t.add(1, 7, 1);
        let remote = add_remote(&mut t, 2, 7, 0);
        let d = decide_wire(&t, 101, &local, &remote, 0);
        assert_eq!(d.outcome, Outcome::Type3Held);
        assert_eq!(d.hold, HoldKey::Receiver(2));
        t.vms.get_mut(&remote).expect("added").epoch = 1;
        let d = decide_wire(&t, 101, &local, &remote, 0);
        assert_eq!((d.outcome, d.mark), (Outcome::Type1, wire::encode(1)));
        // Traffic leaving the group keeps its mark.
        assert_eq!(decide_wire(&t, 101, &local, &mac(77), 0).mark, 0);
    }

    #[test]
    fn classify_by_color_and_receiver_epoch() {
        assert_eq!(classify(3, 3), FrameType::Type1);
        assert_eq!(classify(2, 3), FrameType::Type2);
        assert_eq!(classify(4, 3), FrameType::Type3);
        assert_eq!(classify(0, u32::MAX), FrameType::Type2);
        assert_eq!(classify(u32::MAX, 0), FrameType::Type3);
    }

    #[test]
    fn unicast_types_follow_epochs() {
        let mut t = Tables::new(Type3Mode::Drop);
        let a = t.add(1, 7, 1);
        let b = t.add(2, 7, 0);
        let c = t.add(3, 7, 1);
        assert_eq!(decide(&t, 101, &a, &b), Outcome::Type3Dropped);
        assert_eq!(decide(&t, 102, &b, &a), Outcome::Type2);
        assert_eq!(decide(&t, 101, &a, &c), Outcome::Type1);
        assert_eq!(decide(&t, 102, &b, &b), Outcome::Type1);
    }

    #[test]
    fn type3_follows_mode() {
        let mut t = Tables::new(Type3Mode::Buffer);
        let a = t.add(1, 7, 1);
        let b = t.add(2, 7, 0);
        assert_eq!(
            decide(&t, 101, &a, &b),
            Outcome::Type3Unbuffered,
            "no socket: never pass"
        );
        assert_eq!(Outcome::Type3Unbuffered.verdict(), Verdict::Drop);
        t.hold_ready = true;
        assert_eq!(decide(&t, 101, &a, &b), Outcome::Type3Held);
        assert_eq!(Outcome::Type3Held.verdict(), Verdict::Hold);
        t.mode = Type3Mode::Monitor;
        assert_eq!(decide(&t, 101, &a, &b), Outcome::Type3Monitored);
        assert_eq!(Outcome::Type3Monitored.verdict(), Verdict::Pass);
        t.mode = Type3Mode::Drop;
        assert_eq!(Outcome::Type3Dropped.verdict(), Verdict::Drop);
    }

    #[test]
    fn broadcast_is_type3_while_any_member_is_behind() {
        let mut t = Tables::new(Type3Mode::Drop);
        let a = t.add(1, 7, 1);
        let b = t.add(2, 7, 0);
        t.add(3, 9, 0); // another group, behind, must not matter
        assert_eq!(decide(&t, 101, &a, &BROADCAST), Outcome::Type3Dropped);
        // Compared with the slowest member (b itself, at 0): Type-1.
        assert_eq!(decide(&t, 102, &b, &BROADCAST), Outcome::Type1);
        t.vms.get_mut(&b).unwrap().epoch = 1;
        assert_eq!(decide(&t, 101, &a, &BROADCAST), Outcome::Type1);
        let multicast = MacKey::new([0x01, 0x00, 0x5e, 0, 0, 1]);
        assert_eq!(decide(&t, 101, &a, &multicast), Outcome::Type1);
    }

    #[test]
    fn sources_are_checked_against_the_port() {
        let mut t = Tables::new(Type3Mode::Drop);
        let a = t.add(1, 7, 0);
        let b = t.add(2, 7, 0);
        // a's MAC sent from b's port.
        assert_eq!(decide(&t, 102, &a, &b), Outcome::ForeignSource);
        // Unknown MAC from a port with a VM.
        assert_eq!(decide(&t, 101, &mac(50), &b), Outcome::ForeignSource);
        // Unknown MAC from a port without a VM.
        assert_eq!(decide(&t, 999, &mac(50), &b), Outcome::Unregistered);
        assert_eq!(Outcome::ForeignSource.verdict(), Verdict::Drop);
    }

    #[test]
    fn other_groups_and_unknown_destinations_are_outside() {
        let mut t = Tables::new(Type3Mode::Drop);
        let a = t.add(1, 7, 5);
        let x = t.add(2, 8, 0);
        assert_eq!(decide(&t, 101, &a, &x), Outcome::OutsideGroup);
        assert_eq!(decide(&t, 101, &a, &mac(77)), Outcome::OutsideGroup);
        assert_eq!(Outcome::OutsideGroup.verdict(), Verdict::Pass);
    }

    /// Invariant 1 over every epoch combination: a delivered frame's color never exceeds the
    /// receiver's epoch, whatever the mode (except `monitor`, which makes no such promise).
    #[test]
    fn no_type3_is_ever_delivered() {
        for mode in [Type3Mode::Buffer, Type3Mode::Drop] {
            for hold_ready in [false, true] {
                for ea in 0..4 {
                    for eb in 0..4 {
                        let mut t = Tables::new(mode);
                        t.hold_ready = hold_ready;
                        let a = t.add(1, 7, ea);
                        let b = t.add(2, 7, eb);
                        let outcome = decide(&t, 101, &a, &b);
                        if ea > eb {
                            assert_ne!(outcome.verdict(), Verdict::Pass, "{ea}->{eb} {mode:?}");
                        } else {
                            assert_eq!(outcome.verdict(), Verdict::Pass, "{ea}->{eb} {mode:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn draining_receivers_hold_newer_frames_behind_the_held_ones() {
        let mut t = Tables::new(Type3Mode::Buffer);
        t.hold_ready = true;
        let a = t.add(1, 7, 1);
        let b = t.add(2, 7, 1);
        t.vms.get_mut(&b).unwrap().flags = crate::maps::FLAG_DRAINING;
        let d = decide_frame(&t, 101, &a, &b);
        assert_eq!(
            (d.outcome, d.hold),
            (Outcome::HeldForOrder, HoldKey::Receiver(2))
        );
        assert_eq!(Outcome::HeldForOrder.verdict(), Verdict::Hold);
        // Without a buffer there is nothing to wait for.
        t.hold_ready = false;
        assert_eq!(decide(&t, 101, &a, &b), Outcome::Type1);
        // Broadcast follows the group's flag.
        t.hold_ready = true;
        assert_eq!(decide(&t, 101, &a, &BROADCAST), Outcome::Type1);
        t.group_flags = crate::maps::FLAG_DRAINING;
        let d = decide_frame(&t, 101, &a, &BROADCAST);
        assert_eq!(
            (d.outcome, d.hold),
            (Outcome::HeldForOrder, HoldKey::Group(7))
        );
    }

    #[test]
    fn frames_held_for_order_keep_later_ones_behind_them_after_the_flag_clears() {
        let mut t = Tables::new(Type3Mode::Buffer);
        t.hold_ready = true;
        let a = t.add(1, 7, 1);
        let b = t.add(2, 7, 1);
        assert_eq!(decide(&t, 101, &a, &b), Outcome::Type1);
        // No flag, but frames held for order to b are still in the buffer.
        t.order_pending = Vec::from([receiver_queue(2)]);
        let d = decide_frame(&t, 101, &a, &b);
        assert_eq!(
            (d.outcome, d.hold),
            (Outcome::HeldForOrder, HoldKey::Receiver(2))
        );
        // Other queues are not affected; broadcasts follow their group's queue.
        let c = t.add(3, 7, 1);
        assert_eq!(decide(&t, 101, &a, &c), Outcome::Type1);
        assert_eq!(decide(&t, 101, &a, &BROADCAST), Outcome::Type1);
        t.order_pending = Vec::from([group_queue(7)]);
        assert_eq!(decide(&t, 101, &a, &BROADCAST), Outcome::HeldForOrder);
        // Type-3 is Type-3 whatever is pending; without a buffer nothing is held.
        t.vms.get_mut(&a).unwrap().epoch = 2;
        t.order_pending = Vec::from([receiver_queue(2)]);
        assert_eq!(decide(&t, 101, &a, &b), Outcome::Type3Held);
        t.vms.get_mut(&a).unwrap().epoch = 1;
        t.hold_ready = false;
        assert_eq!(decide(&t, 101, &a, &b), Outcome::Type1);
    }

    #[test]
    fn held_frames_carry_their_queue_and_frames_without_room_are_not_held() {
        let mut t = Tables::new(Type3Mode::Buffer);
        t.hold_ready = true;
        let a = t.add(1, 7, 1);
        let b = t.add(2, 7, 0);
        let d = decide_frame(&t, 101, &a, &b);
        assert_eq!(
            (d.outcome, d.hold),
            (Outcome::Type3Held, HoldKey::Receiver(2))
        );
        // No room for the hold header: Type-3 is dropped, never delivered.
        let unheld = d.unheld();
        assert_eq!(
            (unheld.outcome, unheld.hold),
            (Outcome::Type3Unbuffered, HoldKey::None)
        );
        let d = decide_frame(&t, 101, &a, &BROADCAST);
        assert_eq!((d.outcome, d.hold), (Outcome::Type3Held, HoldKey::Group(7)));
        t.mode = Type3Mode::Drop;
        assert_eq!(decide_frame(&t, 101, &a, &b).hold, HoldKey::None);
    }

    #[test]
    fn the_sender_slot_comes_with_identified_senders_only() {
        let mut t = Tables::new(Type3Mode::Drop);
        let a = t.add(1, 7, 0);
        let b = t.add(2, 7, 0);
        assert_eq!(decide_frame(&t, 101, &a, &b).sender_slot, Some(1));
        assert_eq!(
            decide_frame(&t, 101, &a, &mac(77)).sender_slot,
            Some(1),
            "outside group"
        );
        assert_eq!(
            decide_frame(&t, 102, &a, &b).sender_slot,
            None,
            "foreign source"
        );
        assert_eq!(
            decide_frame(&t, 999, &mac(50), &b).sender_slot,
            None,
            "unregistered"
        );
    }

    #[test]
    fn counters_have_one_slot_per_outcome() {
        use crate::maps::PortCounters;
        let mut c = PortCounters::default();
        for (i, o) in Outcome::ALL.iter().enumerate() {
            c.counter_mut(*o).frames += 1 << i;
        }
        let slots: Vec<u64> = Outcome::ALL.iter().map(|o| c.counter(*o).frames).collect();
        assert_eq!(slots, (0..12).map(|i| 1u64 << i).collect::<Vec<_>>());
        assert_eq!(c.total_frames(), (1 << 12) - 1);
    }
}
