//! The buffer's decisions, with no I/O of their own (sans-I/O): events in — a frame read, an
//! epoch notice, a tick — and effects out through two small traits, [`Wire`] (send frames out
//! of a port) and [`Kernel`] (read the programs' hand-over counts, clear a draining flag, wait
//! out an RCU grace period). The buffer thread implements them with AF_PACKET sockets and the
//! pinned maps; the tier-0 tests with a recording model.
//!
//! What this code promises, and what its tests check over random event sequences:
//! - **nothing released early** (invariant 1 in docs/design.md): a frame of color `c` leaves
//!   its receiver's queue only once that receiver was announced at `c` or above (or its group
//!   was released by an abort). `c` is the color the program classified the frame with, carried
//!   in its hold header, whatever notices this core has or has not read yet;
//! - **order kept** per sender→receiver pair (invariant 4): a queue is a FIFO, flushed from the
//!   front, and a frame that finds its queue non-empty waits behind it;
//! - **nothing lost silently** (invariant 4): every frame read is, at any moment, either held
//!   or counted once under one of [`HoldTotal::FATES`].
//!
//! Drains (the `FLAG_DRAINING` protocol): after an advance the datapath holds newer frames to
//! the receiver too (`held_for_order`), so none overtakes a held one. The flag is cleared once
//! the queue is empty, every frame the programs handed over for it has been read, and none
//! arrived for [`QUIET`]; then an RCU barrier waits out program runs that still saw the flag.
//! If the hand-over count grew meanwhile, a frame was held in that instant and a newer one may
//! overtake it: counted as an `order_race` (detected, not prevented). Frames handed over but
//! not read within [`RING_DEADLINE`] of being missed were lost at a full ring: counted as
//! `lost_ring` — exactly the ones missing then, and taken back if one turns up after all, so
//! each frame is counted once.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use enforcer_common::{HoldHeader, HoldTotal, MAX_GROUPS, MAX_PORTS, MacKey, VmEpoch, wire};

use super::{
    checksum::complete_l4_checksum,
    fifo::Fifo,
    protocol::Notice,
    report::{QueueKey, QueueReport},
};
use crate::{datapath::HoldTotals, model::MacAddr};

/// Frames re-injected per send call.
pub(crate) const BATCH: usize = 64;
/// How long a drained queue must see no new held frame (counting from its advance) before its
/// flag is cleared.
pub(crate) const QUIET: Duration = Duration::from_millis(5);
/// How long to wait for frames the kernel counted but the socket has not delivered.
pub(crate) const RING_DEADLINE: Duration = Duration::from_millis(500);
/// Upper bounds (s) of the hold-time histogram's buckets.
pub(crate) const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0];

/// Which queue a held frame waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// A unicast frame: its receiver's queue.
    Vm(MacKey),
    /// A broadcast/multicast frame: its sender's group's queue.
    Group(u32),
}

impl From<Key> for QueueKey {
    fn from(key: Key) -> Self {
        match key {
            Key::Vm(mac) => QueueKey::Vm(MacAddr::from(mac)),
            Key::Group(g) => QueueKey::Group(g),
        }
    }
}

/// The programs' hand-over counter of a queue: the receiver's port slot, or the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Counted {
    Port(u32),
    Group(u32),
}

/// The frames' way out.
pub(crate) trait Wire {
    /// Sends `frames` out of port `ifindex`, in order, each with `mark` as its `skb->mark`;
    /// returns how many went (the rest are lost: the port is gone).
    fn send(&mut self, ifindex: u32, mark: u32, frames: &[&[u8]]) -> usize;
}

/// What ending a drain reads and writes in the datapath.
pub(crate) trait Kernel {
    /// Frames the programs handed to the hold path for this counter so far (`None`: unreadable).
    fn handed(&mut self, counted: Counted) -> Option<u64>;
    /// Clears the draining flag of the queue's receiver (or group) in the maps.
    fn clear_draining(&mut self, key: Key);
    /// Returns once every program run that began before the call has ended.
    fn barrier(&mut self);
}

struct Held {
    data: Vec<u8>,
    color: u32,
    /// The abort count of its sender's group when it was classified (its hold header's).
    aborts: u32,
    sender: MacKey,
    arrived: Instant,
}

#[derive(Default)]
struct Queue {
    frames: Fifo<Held>,
    bytes: usize,
    dropped_bound: u64,
    last_arrival: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
enum Drain {
    /// Waiting for the queue to empty and go quiet. Quiet counts from `since` (the advance)
    /// too: frames the datapath redirected right after it may not have reached us yet.
    Pending { since: Instant },
    /// Empty and quiet, but the programs had handed over `expected` frames and fewer were
    /// read: waiting for exactly those (frames handed over later do not count) until the
    /// deadline, then counting the rest as lost in the ring; then pending again.
    Missing {
        since: Instant,
        expected: u64,
        deadline: Instant,
    },
    /// Flag cleared; waiting for frames the kernel counted to be read (until the deadline).
    Waiting { expected: u64, deadline: Instant },
}

/// The buffer's state: its copy of the VMs, the queues, the drains and the accounting.
pub(crate) struct Core {
    max_bytes: usize,
    /// VMs as the notices last announced them (ahead of, or equal to, the map).
    vms: HashMap<MacKey, VmEpoch>,
    /// Epoch the map has for each VM / minimum per group: what may be released.
    released_vm: HashMap<MacKey, u32>,
    released_group: HashMap<u32, u32>,
    /// Each group's abort count, as the last abort's notice gave it: a held frame classified
    /// under a lower one is ordinary (its snapshot was aborted), whatever its color.
    aborts: HashMap<u32, u32>,
    queues: HashMap<Key, Queue>,
    drains: HashMap<Key, Drain>,
    /// Frames read per receiver slot / group, in the units of the programs' hand-over counts.
    read_port: Vec<u64>,
    read_group: Vec<u64>,
    held_bytes: usize,
    /// Frames each VM's last advance released (what was held for it).
    released_at_advance: HashMap<MacKey, u64>,
    /// Frames counted `lost_ring` per queue, in case one turns up after all.
    lost: HashMap<Key, u64>,
    totals: HoldTotals,
    totals_dirty: bool,
    hold_hist: [u64; BUCKETS.len() + 1],
    hold_sum: f64,
}

/// The queues and accounting as a report shows them (the thread adds the kernel's part).
pub(crate) struct CoreReport {
    pub(crate) queues: Vec<QueueReport>,
    pub(crate) held_frames: u64,
    pub(crate) held_bytes: u64,
    pub(crate) totals: HoldTotals,
    pub(crate) hold_time_buckets: Vec<(f64, u64)>,
    pub(crate) hold_time_sum_seconds: f64,
    pub(crate) hold_time_count: u64,
    pub(crate) released_at_advance: Vec<(MacKey, u64)>,
}

/// What a daemon that died left behind, found by the next one from the pinned counters:
/// frames it held in memory (read but never given a fate) and frames the programs handed over
/// that it never read. Both count as `lost_restart`; the unread ones as `received` too, so
/// the totals balance again. Returns (held in memory, unread).
pub(crate) fn account_restart(totals: &mut HoldTotals, handed: u64, no_socket: u64) -> (u64, u64) {
    let at = |t: HoldTotal| t.index() as usize;
    let fates: u64 = HoldTotal::FATES.iter().map(|t| totals[at(*t)]).sum();
    let in_memory = totals[at(HoldTotal::Received)].saturating_sub(fates);
    let unread = handed
        .saturating_sub(no_socket)
        .saturating_sub(totals[at(HoldTotal::Received)]);
    totals[at(HoldTotal::LostRestart)] += in_memory + unread;
    totals[at(HoldTotal::Received)] += unread;
    (in_memory, unread)
}

impl Core {
    /// A buffer over the VMs and groups the maps have now (nothing held: a new buffer holds
    /// nothing), the programs' hand-over counts read so far, and the pinned totals.
    pub(crate) fn new(
        max_bytes: usize,
        vms: impl IntoIterator<Item = (MacKey, VmEpoch)>,
        groups: impl IntoIterator<Item = (u32, u32, u32)>,
        read_port: Vec<u64>,
        read_group: Vec<u64>,
        totals: HoldTotals,
    ) -> Self {
        let vms: HashMap<MacKey, VmEpoch> = vms.into_iter().collect();
        let released_vm = vms.iter().map(|(mac, vm)| (*mac, vm.epoch)).collect();
        let groups: Vec<(u32, u32, u32)> = groups.into_iter().collect();
        Self {
            max_bytes,
            vms,
            released_vm,
            released_group: groups.iter().map(|(g, min, _)| (*g, *min)).collect(),
            aborts: groups.iter().map(|(g, _, a)| (*g, *a)).collect(),
            queues: HashMap::new(),
            drains: HashMap::new(),
            read_port,
            read_group,
            held_bytes: 0,
            released_at_advance: HashMap::new(),
            lost: HashMap::new(),
            totals,
            totals_dirty: false,
            hold_hist: [0; BUCKETS.len() + 1],
            hold_sum: 0.0,
        }
    }

    pub(crate) fn total(&self, total: HoldTotal) -> u64 {
        self.totals[total.index() as usize]
    }

    /// The totals, when they changed since the last call (to be written to the pinned map).
    pub(crate) fn take_dirty_totals(&mut self) -> Option<HoldTotals> {
        std::mem::take(&mut self.totals_dirty).then_some(self.totals)
    }

    /// The VMs the buffer knows, and the groups it has released (whose flags a graceful stop
    /// clears).
    pub(crate) fn vm_macs(&self) -> Vec<MacKey> {
        self.vms.keys().copied().collect()
    }

    pub(crate) fn groups(&self) -> Vec<u32> {
        self.released_group.keys().copied().collect()
    }

    fn bump(&mut self, total: HoldTotal, n: u64) {
        self.totals[total.index() as usize] += n;
        self.totals_dirty = true;
    }

    /// A frame read from the hold path ([`HoldHeader`] first, then the frame): re-injected at
    /// once if nothing waits before it and its receiver may have it, otherwise queued (or
    /// dropped at the memory bound, counted). Its color is the one the datapath classified it
    /// with, from its header: this core's copy of the sender's epoch may lag behind the map.
    pub(crate) fn on_frame(&mut self, wire: &mut impl Wire, mut data: Vec<u8>, now: Instant) {
        self.bump(HoldTotal::Received, 1);
        let Some((HoldHeader { color, aborts }, _)) = HoldHeader::split(&data) else {
            self.bump(HoldTotal::DroppedUnknown, 1);
            return;
        };
        data.drain(..HoldHeader::LEN);
        // The L4 checksum may still be left to offload: finish it, or the receiver drops it.
        complete_l4_checksum(&mut data);
        if data.len() < 14 {
            self.bump(HoldTotal::DroppedUnknown, 1);
            return;
        }
        let dst = MacKey::new(data[0..6].try_into().expect("6 bytes"));
        let sender = MacKey::new(data[6..12].try_into().expect("6 bytes"));
        let sender_vm = self.vms.get(&sender).copied();
        let key = if dst.is_multicast() {
            match sender_vm {
                Some(vm) => {
                    self.read_group[vm.group as usize % MAX_GROUPS as usize] += 1;
                    Key::Group(vm.group)
                }
                None => {
                    self.bump(HoldTotal::DroppedUnknown, 1);
                    return;
                }
            }
        } else {
            match self.vms.get(&dst) {
                Some(vm) => {
                    self.read_port[vm.slot as usize % MAX_PORTS as usize] += 1;
                    Key::Vm(dst)
                }
                None => {
                    self.bump(HoldTotal::DroppedUnknown, 1);
                    return;
                }
            }
        };
        let releasable = releasable(color, aborts, self.released(key), self.known_aborts(key));
        let queue = self.queues.entry(key).or_default();
        queue.last_arrival = Some(now);
        if queue.frames.is_empty() && releasable {
            self.inject(wire, key, sender, color, &data, now, now);
            return;
        }
        if self.held_bytes + data.len() > self.max_bytes {
            queue.dropped_bound += 1;
            self.bump(HoldTotal::DroppedBound, 1);
            return;
        }
        self.held_bytes += data.len();
        queue.bytes += data.len();
        queue.frames.push_back(Held {
            data,
            color,
            aborts,
            sender,
            arrived: now,
        });
    }

    /// The abort count this core heard last for the group of a queue's frames (a receiver's
    /// queue: the receiver's group).
    fn known_aborts(&self, key: Key) -> u32 {
        let group = match key {
            Key::Group(g) => g,
            Key::Vm(mac) => self.vms.get(&mac).map_or(0, |vm| vm.group),
        };
        self.aborts.get(&group).copied().unwrap_or(0)
    }

    fn released(&self, key: Key) -> u32 {
        match key {
            Key::Vm(mac) => self.released_vm.get(&mac).copied().unwrap_or(0),
            Key::Group(g) => self.released_group.get(&g).copied().unwrap_or(0),
        }
    }

    /// An epoch notice (see [`Notice`]): the copy updated, or a queue released.
    pub(crate) fn on_notice(&mut self, wire: &mut impl Wire, notice: Notice, now: Instant) {
        match notice {
            Notice::Vm {
                mac,
                vm: Some(mut vm),
            } => {
                // A view of a VM on another host only rises while registered: this thread may
                // have raised it from a frame's color after an older change was queued.
                if vm.is_remote()
                    && let Some(copy) = self.vms.get(&mac)
                {
                    vm.epoch = vm.epoch.max(copy.epoch);
                }
                self.released_vm.entry(mac).or_insert(vm.epoch);
                let group = vm.group;
                self.vms.insert(mac, vm);
                // A member registered lower (a restore) lowers what the group's broadcasts may
                // be released at too: never above its members' epochs (late, not early).
                if let Some(min) = self
                    .vms
                    .values()
                    .filter(|v| v.group == group)
                    .map(|v| v.epoch)
                    .min()
                    && let Some(released) = self.released_group.get_mut(&group)
                {
                    *released = (*released).min(min);
                }
            }
            Notice::Vm { mac, vm: None } => {
                self.vms.remove(&mac);
                self.released_vm.remove(&mac);
                if let Some(q) = self.queues.remove(&Key::Vm(mac)) {
                    self.held_bytes -= q.bytes;
                    self.bump(HoldTotal::DroppedUnknown, q.frames.len() as u64);
                }
                self.drains.remove(&Key::Vm(mac));
            }
            Notice::Advanced { mac, epoch } => {
                // Advances only raise (a queued older one must not lower a learned one).
                let released = self.released_vm.entry(mac).or_insert(epoch);
                *released = (*released).max(epoch);
                let n = self.flush(wire, Key::Vm(mac), now);
                self.released_at_advance.insert(mac, n);
                self.drains
                    .insert(Key::Vm(mac), Drain::Pending { since: now });
            }
            Notice::GroupAdvanced { group, min_epoch } => {
                self.released_group.insert(group, min_epoch);
                let _ = self.flush(wire, Key::Group(group), now);
                self.drains
                    .insert(Key::Group(group), Drain::Pending { since: now });
            }
            Notice::Release { group, aborts } => {
                let known = self.aborts.entry(group).or_insert(aborts);
                if older(*known, aborts) {
                    *known = aborts;
                }
                let members: Vec<(MacKey, u32)> = self
                    .vms
                    .iter()
                    .filter(|(_, vm)| vm.group == group)
                    .map(|(m, vm)| (*m, vm.epoch))
                    .collect();
                let min = members.iter().map(|(_, e)| *e).min().unwrap_or(0);
                self.released_group.insert(group, min);
                // Everything held from the aborted snapshot goes (an older count); a frame a
                // new snapshot classified meanwhile (this count) waits for its color.
                for (mac, epoch) in &members {
                    self.released_vm.insert(*mac, *epoch);
                    let _ = self.flush(wire, Key::Vm(*mac), now);
                    self.drains
                        .insert(Key::Vm(*mac), Drain::Pending { since: now });
                }
                let _ = self.flush(wire, Key::Group(group), now);
                self.drains
                    .insert(Key::Group(group), Drain::Pending { since: now });
            }
        }
    }

    /// Sends what may be released from a queue, in order and in batches; returns how many
    /// frames left it.
    fn flush(&mut self, wire: &mut impl Wire, key: Key, now: Instant) -> u64 {
        let released = self.released(key);
        let known = self.known_aborts(key);
        let mut released_frames = 0;
        loop {
            let Some(q) = self.queues.get_mut(&key) else {
                return released_frames;
            };
            let mut batch = Vec::new();
            while batch.len() < BATCH {
                match q.frames.front() {
                    Some(front) if releasable(front.color, front.aborts, released, known) => {
                        let held = q.frames.pop_front().expect("front exists");
                        q.bytes -= held.data.len();
                        batch.push(held);
                    }
                    _ => break,
                }
            }
            if batch.is_empty() {
                return released_frames;
            }
            released_frames += batch.len() as u64;
            self.held_bytes -= batch.iter().map(|h| h.data.len()).sum::<usize>();
            match key {
                Key::Vm(mac) => {
                    let receiver = self.vms.get(&mac).copied();
                    let mut sent = 0;
                    // Runs of one color: to another host, each run goes with its color mark.
                    while let Some(receiver) = receiver
                        && sent < batch.len()
                    {
                        let color = batch[sent].color;
                        let run = batch[sent..]
                            .iter()
                            .take_while(|h| h.color == color)
                            .count();
                        let frames: Vec<&[u8]> = batch[sent..sent + run]
                            .iter()
                            .map(|h| h.data.as_slice())
                            .collect();
                        let n = wire.send(receiver.ifindex, remote_mark(&receiver, color), &frames);
                        sent += n;
                        if n < run {
                            break;
                        }
                    }
                    for held in &batch[..sent] {
                        self.record_reinjected(held.arrived, now);
                    }
                    self.bump(HoldTotal::InjectFailed, (batch.len() - sent) as u64);
                }
                Key::Group(_) => {
                    for held in batch {
                        self.inject(
                            wire,
                            key,
                            held.sender,
                            held.color,
                            &held.data,
                            held.arrived,
                            now,
                        );
                    }
                }
            }
        }
    }

    /// Sends one frame to its receiver's port (a broadcast: to every other port of its group).
    #[allow(clippy::too_many_arguments)]
    fn inject(
        &mut self,
        wire: &mut impl Wire,
        key: Key,
        sender: MacKey,
        color: u32,
        data: &[u8],
        arrived: Instant,
        now: Instant,
    ) {
        let mut ports: Vec<(u32, u32)> = match key {
            Key::Vm(mac) => self
                .vms
                .get(&mac)
                .map(|vm| vec![(vm.ifindex, remote_mark(vm, color))])
                .unwrap_or_default(),
            Key::Group(g) => {
                let from = self.vms.get(&sender).map(|vm| vm.ifindex);
                self.vms
                    .values()
                    .filter(|vm| vm.group == g && Some(vm.ifindex) != from)
                    .map(|vm| (vm.ifindex, remote_mark(vm, color)))
                    .collect()
            }
        };
        // VMs on another host share the overlay port: one copy goes out there.
        ports.sort_unstable();
        ports.dedup();
        let mut ok = !ports.is_empty() || matches!(key, Key::Group(_));
        for (port, mark) in ports {
            ok &= wire.send(port, mark, &[data]) == 1;
        }
        if ok {
            self.record_reinjected(arrived, now);
        } else {
            self.bump(HoldTotal::InjectFailed, 1);
        }
    }

    fn record_reinjected(&mut self, arrived: Instant, now: Instant) {
        self.bump(HoldTotal::Reinjected, 1);
        let held = now.saturating_duration_since(arrived).as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| held <= *b)
            .unwrap_or(BUCKETS.len());
        self.hold_hist[bucket] += 1;
        self.hold_sum += held;
    }

    fn counted(&self, key: Key) -> Option<Counted> {
        match key {
            Key::Vm(mac) => Some(Counted::Port(self.vms.get(&mac)?.slot)),
            Key::Group(g) => Some(Counted::Group(g)),
        }
    }

    fn read_count(&mut self, key: Key) -> Option<&mut u64> {
        match key {
            Key::Vm(mac) => {
                let slot = self.vms.get(&mac)?.slot as usize;
                self.read_port.get_mut(slot)
            }
            Key::Group(g) => self.read_group.get_mut(g as usize),
        }
    }

    /// Frames the programs handed over for `key` (`expected` of them by then) that never
    /// reached the buffer (a full ring): counted as received and lost, so the totals balance.
    fn lost_on_the_way(&mut self, key: Key, expected: u64, read: u64) {
        let missing = expected - read;
        if let Some(r) = self.read_count(key) {
            *r += missing;
        }
        *self.lost.entry(key).or_default() += missing;
        self.bump(HoldTotal::LostRing, missing);
        self.bump(HoldTotal::Received, missing);
    }

    /// More frames read for `key` than the programs handed over: frames counted lost turned
    /// up after all (a thread stalled past the deadline). They were counted when they came:
    /// take back the loss, so each frame is counted once.
    fn found_after_all(&mut self, key: Key, handed: u64, read: u64) -> u64 {
        let back = (read - handed).min(self.lost.get(&key).copied().unwrap_or(0));
        if back > 0 {
            if let Some(r) = self.read_count(key) {
                *r -= back;
            }
            if let Some(l) = self.lost.get_mut(&key) {
                *l -= back;
            }
            self.totals[HoldTotal::LostRing.index() as usize] -= back;
            self.totals[HoldTotal::Received.index() as usize] -= back;
            self.totals_dirty = true;
        }
        read - back
    }

    /// Moves every drain on as far as it can go (see the module's header).
    pub(crate) fn progress_drains(&mut self, kernel: &mut impl Kernel, now: Instant) {
        if self.drains.is_empty() {
            return;
        }
        let keys: Vec<(Key, Drain)> = self.drains.iter().map(|(k, d)| (*k, *d)).collect();
        for (key, drain) in keys {
            let queue_empty = self.queues.get(&key).is_none_or(|q| q.frames.is_empty());
            let last_arrival = self.queues.get(&key).and_then(|q| q.last_arrival);
            let (Some(read), Some(counted)) = (self.read_count(key).map(|r| *r), self.counted(key))
            else {
                self.drains.remove(&key);
                continue;
            };
            match drain {
                Drain::Pending { since } => {
                    let latest = last_arrival.map_or(since, |t| t.max(since));
                    if !queue_empty || now.saturating_duration_since(latest) < QUIET {
                        continue;
                    }
                    let Some(before) = kernel.handed(counted) else {
                        continue;
                    };
                    let read = if read > before {
                        self.found_after_all(key, before, read)
                    } else {
                        read
                    };
                    if before > read {
                        // Counted but not yet read: on their way, or lost at a full ring.
                        self.drains.insert(
                            key,
                            Drain::Missing {
                                since,
                                expected: before,
                                deadline: now + RING_DEADLINE,
                            },
                        );
                        continue;
                    }
                    kernel.clear_draining(key);
                    kernel.barrier();
                    let after = kernel.handed(counted).unwrap_or(before);
                    if after <= read {
                        self.drains.remove(&key);
                    } else {
                        self.bump(HoldTotal::OrderRaces, 1);
                        self.drains.insert(
                            key,
                            Drain::Waiting {
                                expected: after,
                                deadline: now + RING_DEADLINE,
                            },
                        );
                    }
                }
                Drain::Missing {
                    since,
                    expected,
                    deadline,
                } => {
                    if read < expected && now <= deadline {
                        continue;
                    }
                    if read < expected {
                        // Exactly the frames counted when they went missing: any handed over
                        // since then are still to come, and are counted when they do.
                        self.lost_on_the_way(key, expected, read);
                    }
                    self.drains.insert(key, Drain::Pending { since });
                }
                Drain::Waiting { expected, deadline } => {
                    if read >= expected {
                        self.drains.remove(&key);
                    } else if now > deadline {
                        self.lost_on_the_way(key, expected, read);
                        self.drains.remove(&key);
                    }
                }
            }
        }
    }

    /// A graceful stop: everything that may be delivered is, the rest is dropped and counted
    /// (`dropped_shutdown`).
    pub(crate) fn shutdown(&mut self, wire: &mut impl Wire, now: Instant) {
        let keys: Vec<Key> = self.queues.keys().copied().collect();
        for key in keys {
            let _ = self.flush(wire, key, now);
            if let Some(q) = self.queues.get_mut(&key) {
                let n = q.frames.len() as u64;
                q.frames.clear();
                q.bytes = 0;
                if n > 0 {
                    self.bump(HoldTotal::DroppedShutdown, n);
                }
            }
        }
        self.held_bytes = 0;
    }

    pub(crate) fn report(&self, now: Instant) -> CoreReport {
        let mut queues: Vec<QueueReport> = self
            .queues
            .iter()
            .filter(|(k, q)| {
                !q.frames.is_empty() || q.dropped_bound > 0 || self.drains.contains_key(k)
            })
            .map(|(k, q)| QueueReport {
                queue: (*k).into(),
                frames: q.frames.len() as u64,
                bytes: q.bytes as u64,
                oldest_ms: q.frames.front().map_or(0, |h| {
                    now.saturating_duration_since(h.arrived).as_millis() as u64
                }),
                dropped_bound: q.dropped_bound,
                draining: self.drains.contains_key(k),
            })
            .collect();
        queues.sort_by_key(|a| a.queue);
        let mut cumulative = 0;
        let mut hold_time_buckets = Vec::new();
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.hold_hist[i];
            hold_time_buckets.push((*le, cumulative));
        }
        CoreReport {
            queues,
            held_frames: self.queues.values().map(|q| q.frames.len() as u64).sum(),
            held_bytes: self.held_bytes as u64,
            totals: self.totals,
            hold_time_buckets,
            hold_time_sum_seconds: self.hold_sum,
            hold_time_count: cumulative + self.hold_hist[BUCKETS.len()],
            released_at_advance: self
                .released_at_advance
                .iter()
                .map(|(m, n)| (*m, *n))
                .collect(),
        }
    }

    /// Frames held now (all queues).
    #[cfg(test)]
    pub(crate) fn held_frames(&self) -> u64 {
        self.queues.values().map(|q| q.frames.len() as u64).sum()
    }

    /// Queues whose draining flag is still set.
    #[cfg(test)]
    pub(crate) fn draining(&self) -> Vec<Key> {
        self.drains.keys().copied().collect()
    }
}

/// Whether abort count `a` comes before `b` (wrapping counters, as TCP compares sequence
/// numbers).
fn older(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// Whether a held frame (of `color`, classified under abort count `aborts`) may leave a queue
/// whose receiver (or group) was announced at `released`, with `known` the last abort count
/// heard for its group:
/// - classified before an abort heard since: an ordinary frame, whatever its color;
/// - classified after an abort not heard yet: not until it is (`released` is from before that
///   abort, when the receiver may have been further on);
/// - otherwise by its color.
fn releasable(color: u32, aborts: u32, released: u32, known: u32) -> bool {
    if older(aborts, known) {
        return true;
    }
    !older(known, aborts) && color <= released
}

/// The mark a frame of `color` goes out with towards `receiver`: its wire color when the
/// receiver is on another host (the overlay carries it), none otherwise.
fn remote_mark(receiver: &VmEpoch, color: u32) -> u32 {
    if receiver.is_remote() {
        wire::encode(color)
    } else {
        0
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
