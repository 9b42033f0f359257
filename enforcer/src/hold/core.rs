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
//! Tickets: each CPU's program runs number the frames they hold per queue ([`HoldSeq`]), and
//! one CPU's frames reach the socket in order. A gap in a CPU's tickets is therefore a frame
//! lost on the way (the socket's ring was full), known at once and exactly: counted
//! `lost_ring` (and `received`, so the totals balance), order frames among them included.
//!
//! Drains (the `FLAG_DRAINING` protocol): after an advance the datapath holds newer frames to
//! the receiver too (`held_for_order`), so none overtakes a held one. The core waits out an RCU
//! grace period from the advance (every program run that classified with the old epoch has
//! ended), reads what each CPU had handed over by then (the fence), and clears the flag once
//! every frame before the fence has come (or is known lost) and the queue is empty. No quiet
//! time is needed, so a drain ends under steady traffic. Frames held for order in the instant
//! of the clear are safe by construction: the programs count them (`hold_order_issued`), this
//! core counts those it has finished with (`hold_order_done`, published through [`Wire`] after
//! they left), and while the two differ every newer Type-1/2 frame to the queue is held behind
//! them.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use enforcer_common::{
    HOLD_FOR_ORDER, HOLD_FROM_XDP, HOLD_RECORD, HoldHeader, HoldSeq, HoldTotal, MAX_PORTS, MacKey,
    VmEpoch, group_queue, receiver_queue, wire,
};

use super::{
    checksum::complete_l4_checksum,
    fence::{Fence, FenceWait},
    fifo::Fifo,
    protocol::Notice,
    record::{RecordedFrame, Recorder, Recording},
    report::{QueueKey, QueueReport},
    ring::{Received, VnetHeader},
};
use crate::{datapath::HoldTotals, model::MacAddr};

/// Frames re-injected per send call.
pub(crate) const BATCH: usize = 64;
/// Batches a queue releases per turn of the buffer thread: a long queue is released over
/// several turns, so the thread keeps reading its ring and answering in between (frames that
/// come meanwhile wait behind the queue, in order).
pub(crate) const RELEASE_BATCHES: usize = 16;
/// How often the hand-over is audited for frames lost at its end (see [`Core::progress_drains`]):
/// a frame handed over that has not come one period later, while the socket has nothing more
/// to read, was lost on the way.
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

/// A frame on its way out: its virtio-net header (its offload state) and its bytes.
pub(crate) struct Outgoing<'a> {
    pub(crate) vnet: &'a VnetHeader,
    pub(crate) data: &'a [u8],
}

/// The frames' way out.
pub(crate) trait Wire {
    /// Re-injects `frames`, in order, into the ingress of the port with counter slot `slot`
    /// (where they first came in), each with `mark` (its wire color); returns how many went:
    /// none when the slot no longer names port `ifindex` (the port is gone, and the slot may
    /// have been given to another).
    fn send(&mut self, slot: u32, ifindex: u32, mark: u32, frames: &[Outgoing<'_>]) -> usize;
    /// Publishes that the buffer has finished with `done` frames held for order in hold queue
    /// `queue` (`hold_order_done`): called only once they left.
    fn order_done(&mut self, queue: u32, done: u64);
}

/// What the programs have handed over, by hold queue, then by CPU.
type Handed = Vec<(u32, Vec<HoldSeq>)>;

/// What ending a drain reads and writes in the datapath: the wait for the hand-over
/// ([`Fence`]), then the flag.
pub(crate) trait Kernel: Fence {
    /// Clears the draining flag of the queue's receiver (or group) in the maps.
    fn clear_draining(&mut self, key: Key);
}

struct Held {
    data: Vec<u8>,
    vnet: VnetHeader,
    /// Held only for order: its queue's `hold_order_done` counts it once it leaves.
    for_order: bool,
    /// Its hold queue (the programs' index).
    queue: u32,
    /// The counter slot of the port it came in on (its sender's), where it is re-injected.
    port: u32,
    /// That port's ifindex when the frame came in.
    ifindex: u32,
    color: u32,
    /// The abort count of its sender's group when it was classified (its hold header's).
    aborts: u32,
    arrived: Instant,
}

#[derive(Default)]
struct Queue {
    frames: Fifo<Held>,
    bytes: usize,
    dropped_bound: u64,
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
    drains: HashMap<Key, FenceWait>,
    /// The next tickets expected from each (hold queue, CPU).
    streams: HashMap<(u32, u32), HoldSeq>,
    /// Frames held for order this core has finished with, by hold queue (what it published).
    order_done: HashMap<u32, u64>,
    /// The last audit: when, and what the programs had handed over then, by queue and CPU.
    audit: Option<(Instant, Handed)>,
    held_bytes: usize,
    /// Frames each VM's last advance released (what was held for it).
    released_at_advance: HashMap<MacKey, u64>,
    /// Queues releasing over several turns, in the order their releases began.
    releasing: Vec<Key>,
    totals: HoldTotals,
    totals_dirty: bool,
    hold_hist: [u64; BUCKETS.len() + 1],
    hold_sum: f64,
    /// The channel state being recorded (see [`super::record`]): armed and taken through it,
    /// handed out by [`Core::progress_takes`].
    pub(crate) recorder: Recorder,
    /// Receivers whose queues are kept whatever may be released ([`Notice::Freeze`]), since
    /// when: a freeze is thawed after [`FREEZE_MAX`] whatever happened to whoever froze it.
    frozen: HashMap<MacKey, Instant>,
}

/// The longest a receiver's queue stays frozen ([`Notice::Freeze`]): an instant cut's shut
/// lasts milliseconds to its cut, the read of its tap at its cut less.
pub(crate) const FREEZE_MAX: Duration = Duration::from_secs(30);

/// A frozen queue holds at most this fraction (1/n) of the buffer's memory bound before it is
/// thawed: it must not crowd out the frames held for the other VMs.
pub(crate) const FROZEN_SHARE: usize = 4;

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
/// (`handed`, all queues and CPUs) that it never read. Both count as `lost_restart`; the
/// unread ones as `received` too, so the totals balance again. Returns (held in memory, unread).
pub(crate) fn account_restart(totals: &mut HoldTotals, handed: u64) -> (u64, u64) {
    let at = |t: HoldTotal| t.index() as usize;
    let fates: u64 = HoldTotal::FATES.iter().map(|t| totals[at(*t)]).sum();
    let in_memory = totals[at(HoldTotal::Received)].saturating_sub(fates);
    let unread = handed.saturating_sub(totals[at(HoldTotal::Received)]);
    totals[at(HoldTotal::LostRestart)] += in_memory + unread;
    totals[at(HoldTotal::Received)] += unread;
    (in_memory, unread)
}

impl Core {
    /// A buffer over the VMs and groups the maps have now (nothing held: a new buffer holds
    /// nothing), what the programs had handed over when it started (`handed`: per queue, per
    /// CPU; everything before is another buffer's), the order frames they had held by then
    /// (`order_issued`, per queue: all done, as far as this buffer is concerned), and the
    /// pinned totals.
    pub(crate) fn new(
        max_bytes: usize,
        vms: impl IntoIterator<Item = (MacKey, VmEpoch)>,
        groups: impl IntoIterator<Item = (u32, u32, u32)>,
        handed: impl IntoIterator<Item = (u32, Vec<HoldSeq>)>,
        order_issued: impl IntoIterator<Item = (u32, u64)>,
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
            streams: handed
                .into_iter()
                .flat_map(|(q, cpus)| {
                    cpus.into_iter()
                        .enumerate()
                        .map(move |(cpu, seq)| ((q, cpu as u32), seq))
                })
                .collect(),
            order_done: order_issued.into_iter().collect(),
            audit: None,
            held_bytes: 0,
            released_at_advance: HashMap::new(),
            releasing: Vec::new(),
            totals,
            totals_dirty: false,
            hold_hist: [0; BUCKETS.len() + 1],
            hold_sum: 0.0,
            recorder: Recorder::default(),
            frozen: HashMap::new(),
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
    pub(crate) fn on_frame(&mut self, wire: &mut impl Wire, received: Received, now: Instant) {
        self.bump(HoldTotal::Received, 1);
        let Some((header, frame)) = HoldHeader::split(&received.data) else {
            self.bump(HoldTotal::DroppedUnknown, 1);
            return;
        };
        if !self.take_tickets(wire, &header) {
            return;
        }
        let for_order = header.flags & HOLD_FOR_ORDER != 0;
        let queue_index = header.queue;
        // The frame as the sender sent it: its outer VLAN tag back in (at tc the kernel had
        // moved it into metadata), its offload state moved with the bytes.
        let tag = (header.vlan_proto != 0).then(|| {
            let mut t = [0u8; 4];
            t[..2].copy_from_slice(&header.vlan_proto.to_be_bytes());
            t[2..].copy_from_slice(&header.vlan_tci.to_be_bytes());
            t
        });
        let (color, aborts) = (header.color, header.aborts);
        if frame.len() < 14 {
            self.bump(HoldTotal::DroppedUnknown, 1);
            self.finish_order(wire, queue_index, for_order as u64);
            return;
        }
        let mut data = Vec::with_capacity(frame.len() + 4);
        data.extend_from_slice(&frame[..12]);
        data.extend_from_slice(tag.as_ref().map_or(&[][..], |t| &t[..]));
        data.extend_from_slice(&frame[12..]);
        let vnet = received
            .vnet
            .moved(HoldHeader::LEN, if tag.is_some() { 4 } else { 0 });
        if header.flags & HOLD_RECORD != 0 {
            let frame = RecordedFrame { vnet: vnet.0, data };
            let fate = (self.recorder).record(
                queue_index,
                frame,
                self.max_bytes.saturating_sub(self.held_bytes),
            );
            self.bump(fate, 1);
            return;
        }
        if header.flags & HOLD_FROM_XDP != 0 {
            // Its offload state was lost at XDP: a checksum left to offload is finished here,
            // or the receiver drops the frame.
            complete_l4_checksum(&mut data);
        }
        let dst = MacKey::new(data[0..6].try_into().expect("6 bytes"));
        let key = if queue_index >= MAX_PORTS {
            Some(Key::Group(queue_index - MAX_PORTS))
        } else {
            self.vms.contains_key(&dst).then_some(Key::Vm(dst))
        };
        let Some(key) = key else {
            self.bump(HoldTotal::DroppedUnknown, 1);
            self.finish_order(wire, queue_index, for_order as u64);
            return;
        };
        let releasable = releasable(color, aborts, self.released(key), self.known_aborts(key))
            && !self.is_frozen(key);
        let queue = self.queues.entry(key).or_default();
        let held = Held {
            data,
            vnet,
            for_order,
            queue: queue_index,
            port: header.port,
            ifindex: header.ifindex,
            color,
            aborts,
            arrived: now,
        };
        if queue.frames.is_empty() && releasable {
            self.send(wire, std::slice::from_ref(&held), now);
            return;
        }
        // Held frames and recordings share the bound.
        if self.held_bytes + self.recorder.bytes() as usize + held.data.len() > self.max_bytes {
            queue.dropped_bound += 1;
            self.bump(HoldTotal::DroppedBound, 1);
            self.finish_order(wire, queue_index, for_order as u64);
            return;
        }
        self.held_bytes += held.data.len();
        queue.bytes += held.data.len();
        queue.frames.push_back(held);
    }

    /// The takes complete by now, with their recordings.
    pub(crate) fn progress_takes(
        &mut self,
        kernel: &mut impl Kernel,
    ) -> Vec<(u64, Vec<(u32, Recording)>)> {
        let streams = &self.streams;
        self.recorder.progress(kernel, |queue, cpu| {
            streams.get(&(queue, cpu)).map_or(0, |s| s.all)
        })
    }

    /// Checks a frame's tickets against what its CPU handed over for its queue before it: a gap
    /// is frames lost on the way, counted exactly. Returns false for a frame that comes after
    /// it was counted lost (a drain's deadline passed first): it stays counted lost, and is
    /// dropped rather than delivered behind newer frames.
    fn take_tickets(&mut self, wire: &mut impl Wire, header: &HoldHeader) -> bool {
        let for_order = header.flags & HOLD_FOR_ORDER != 0;
        let next = self.streams.entry((header.queue, header.cpu)).or_default();
        if header.ticket < next.all {
            let at = HoldTotal::Received.index() as usize;
            self.totals[at] -= 1;
            return false;
        }
        let lost = header.ticket - next.all;
        let lost_order = header.order_ticket.saturating_sub(next.order);
        *next = HoldSeq {
            all: header.ticket + 1,
            order: header.order_ticket + for_order as u64,
        };
        self.lost_on_the_way(wire, header.queue, lost, lost_order);
        true
    }

    /// `lost` frames handed over for hold queue `queue`, `lost_order` of them held for order,
    /// never reached the buffer (its socket's ring was full): counted received and lost, so
    /// the totals balance.
    fn lost_on_the_way(&mut self, wire: &mut impl Wire, queue: u32, lost: u64, lost_order: u64) {
        if lost > 0 {
            self.bump(HoldTotal::LostRing, lost);
            self.bump(HoldTotal::Received, lost);
            self.recorder.lost(queue, lost);
        }
        self.finish_order(wire, queue, lost_order);
    }

    /// `n` more frames held for order in `queue` are finished with (sent, dropped or lost):
    /// published, so once none is left newer frames to the queue pass again.
    fn finish_order(&mut self, wire: &mut impl Wire, queue: u32, n: u64) {
        if n == 0 {
            return;
        }
        let done = self.order_done.entry(queue).or_default();
        *done += n;
        wire.order_done(queue, *done);
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

    fn is_frozen(&self, key: Key) -> bool {
        matches!(key, Key::Vm(mac) if self.frozen.contains_key(&mac))
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
                self.frozen.remove(&mac);
                self.vms.remove(&mac);
                self.released_vm.remove(&mac);
                if let Some(mut q) = self.queues.remove(&Key::Vm(mac)) {
                    self.held_bytes -= q.bytes;
                    self.bump(HoldTotal::DroppedUnknown, q.frames.len() as u64);
                    while let Some(held) = q.frames.pop_front() {
                        self.finish_order(wire, held.queue, held.for_order as u64);
                    }
                }
                self.drains.remove(&Key::Vm(mac));
            }
            Notice::Advanced { mac, epoch } => {
                // Advances only raise (a queued older one must not lower a learned one).
                let released = self.released_vm.entry(mac).or_insert(epoch);
                *released = (*released).max(epoch);
                self.released_at_advance.insert(mac, 0);
                self.release(wire, Key::Vm(mac), now);
                self.drains.insert(Key::Vm(mac), FenceWait::Start);
            }
            Notice::GroupAdvanced { group, min_epoch } => {
                self.released_group.insert(group, min_epoch);
                self.release(wire, Key::Group(group), now);
                self.drains.insert(Key::Group(group), FenceWait::Start);
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
                for (mac, _) in &members {
                    self.frozen.remove(mac);
                }
                // Everything held from the aborted snapshot goes (an older count); a frame a
                // new snapshot classified meanwhile (this count) waits for its color.
                for (mac, epoch) in &members {
                    self.released_vm.insert(*mac, *epoch);
                    self.release(wire, Key::Vm(*mac), now);
                    self.drains.insert(Key::Vm(*mac), FenceWait::Start);
                }
                self.release(wire, Key::Group(group), now);
                self.drains.insert(Key::Group(group), FenceWait::Start);
            }
            Notice::Freeze { mac } => {
                self.frozen.entry(mac).or_insert(now);
            }
            Notice::Thaw { mac } => {
                if self.frozen.remove(&mac).is_some() {
                    self.release(wire, Key::Vm(mac), now);
                    // Its draining flag (set at its advance, or when it was shut before its
                    // cut) is cleared once what it held is out; a drain under way goes on.
                    self.drains.entry(Key::Vm(mac)).or_insert(FenceWait::Start);
                }
            }
        }
    }

    /// Sends what may be released from a queue, in order and in batches; returns how many
    /// frames left it.
    fn flush(&mut self, wire: &mut impl Wire, key: Key, batches: usize, now: Instant) -> u64 {
        if self.is_frozen(key) {
            return 0;
        }
        let released = self.released(key);
        let known = self.known_aborts(key);
        let mut released_frames = 0;
        for _ in 0..batches {
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
            self.send(wire, &batch, now);
        }
        released_frames
    }

    /// Releases what a queue may release now: [`RELEASE_BATCHES`] at once, the rest over the
    /// next turns ([`Core::release_more`]).
    fn release(&mut self, wire: &mut impl Wire, key: Key, now: Instant) {
        if !self.releasing.contains(&key) {
            self.releasing.push(key);
        }
        self.release_turn(wire, key, now);
    }

    /// One turn of a queue's release; returns whether it has more to release.
    fn release_turn(&mut self, wire: &mut impl Wire, key: Key, now: Instant) -> bool {
        let n = self.flush(wire, key, RELEASE_BATCHES, now);
        if let Key::Vm(mac) = key
            && let Some(count) = self.released_at_advance.get_mut(&mac)
        {
            *count += n;
        }
        let more = n == (RELEASE_BATCHES * BATCH) as u64;
        if !more {
            self.releasing.retain(|k| *k != key);
        }
        more
    }

    /// Moves every release in progress on by one turn; returns whether any has more to do.
    pub(crate) fn release_more(&mut self, wire: &mut impl Wire, now: Instant) -> bool {
        let keys = self.releasing.clone();
        let mut more = false;
        for key in keys {
            more |= self.release_turn(wire, key, now);
        }
        more
    }

    /// Re-injects frames, in order, each at the port it came in on (the bridge forwards it
    /// from there: to its receiver, or a broadcast to every port it floods to), in runs of one
    /// port and color; counts each reinjected, or failed when its port is gone; then finishes
    /// the order frames among them (only now that they left may newer frames pass them).
    fn send(&mut self, wire: &mut impl Wire, batch: &[Held], now: Instant) {
        let mut at = 0;
        while at < batch.len() {
            let (port, ifindex, color) = (batch[at].port, batch[at].ifindex, batch[at].color);
            let run = batch[at..]
                .iter()
                .take_while(|h| h.port == port && h.ifindex == ifindex && h.color == color)
                .count();
            // A frame from a port without a slot has nowhere to re-enter.
            let sent = if port != enforcer_common::UNATTRIBUTED_SLOT {
                let frames: Vec<Outgoing<'_>> = batch[at..at + run]
                    .iter()
                    .map(|h| Outgoing {
                        vnet: &h.vnet,
                        data: &h.data,
                    })
                    .collect();
                wire.send(port, ifindex, wire::encode(color), &frames)
            } else {
                0
            };
            for held in &batch[at..at + sent] {
                self.record_reinjected(held.arrived, now);
            }
            self.bump(HoldTotal::InjectFailed, (run - sent) as u64);
            at += run;
        }
        for held in batch {
            self.finish_order(wire, held.queue, held.for_order as u64);
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

    /// The programs' index of a queue.
    fn queue_index(&self, key: Key) -> Option<u32> {
        match key {
            Key::Vm(mac) => Some(receiver_queue(self.vms.get(&mac)?.slot)),
            Key::Group(g) => Some(group_queue(g)),
        }
    }

    /// Moves every drain on as far as it can go (see the module's header), and audits the
    /// hand-over when due. `ring_idle`: the socket had nothing more to read, so frames not
    /// come by now are not waiting in it.
    pub(crate) fn progress_drains(
        &mut self,
        wire: &mut impl Wire,
        kernel: &mut impl Kernel,
        ring_idle: bool,
        now: Instant,
    ) {
        self.audit(wire, kernel, ring_idle, now);
        // A freeze left behind (its VM shut for a snapshot whose coordinator died, or whose
        // cut never came) must not keep the VM's frames held for good.
        // Nor take from the others the room the bound gives every queue: past a quarter of it,
        // a frozen queue goes on (its VM gets its frames in its tap, as any paused VM).
        let stale: Vec<(MacKey, &str)> = self
            .frozen
            .iter()
            .filter_map(|(mac, since)| {
                let bytes = self.queues.get(&Key::Vm(*mac)).map_or(0, |q| q.bytes);
                if now.saturating_duration_since(*since) >= FREEZE_MAX {
                    Some((*mac, "it was frozen for its bound (30 s)"))
                } else if bytes > self.max_bytes / FROZEN_SHARE {
                    Some((*mac, "it holds over a quarter of the buffer's memory bound"))
                } else {
                    None
                }
            })
            .collect();
        for (mac, why) in stale {
            tracing::warn!(
                vm = %crate::model::MacAddr::from(mac),
                "its frozen queue goes on: {why}"
            );
            self.on_notice(wire, Notice::Thaw { mac }, now);
        }
        let keys: Vec<Key> = self.drains.keys().copied().collect();
        for key in keys {
            let Some(queue) = self.queue_index(key) else {
                self.drains.remove(&key);
                continue;
            };
            self.progress_drain(kernel, key, queue);
        }
    }

    /// Moves one drain as far as it goes in this turn; its flag clears once every frame handed
    /// over before its fence has come (or is known lost) and left.
    fn progress_drain(&mut self, kernel: &mut impl Kernel, key: Key, queue: u32) {
        let Some(wait) = self.drains.get_mut(&key) else {
            return;
        };
        let streams = &self.streams;
        let next = |q, cpu| streams.get(&(q, cpu)).map_or(0, |s: &HoldSeq| s.all);
        // A frozen queue (its receiver's tap is being read at its cut) keeps newer frames
        // held until it thaws, however empty it is.
        if !wait.passed(kernel, &[queue], next)
            || self.is_frozen(key)
            || self.queues.get(&key).is_some_and(|q| !q.frames.is_empty())
        {
            return;
        }
        kernel.clear_draining(key);
        self.drains.remove(&key);
    }

    /// Finds frames lost at the end of a CPU's hand-over, which no later frame reveals: every
    /// [`RING_DEADLINE`] while the socket has nothing more to read (every four when it stays
    /// busy), what the programs have handed over for each queue in use is noted, and whatever
    /// of the previous note has still not come is counted lost (order frames among them finished with, so nothing waits
    /// behind them for ever).
    fn audit(
        &mut self,
        wire: &mut impl Wire,
        kernel: &mut impl Kernel,
        ring_idle: bool,
        now: Instant,
    ) {
        let since = self
            .audit
            .as_ref()
            .map(|(at, _)| now.saturating_duration_since(*at));
        // While the socket still has frames to read, a frame noted may just be in it: wait for
        // the socket to go idle, or for four periods (the ring holds well under that).
        let due = since.is_none_or(|since| {
            since >= RING_DEADLINE && (ring_idle || since >= 4 * RING_DEADLINE)
        });
        if !due {
            return;
        }
        let mut queues: Vec<u32> = self
            .vms
            .values()
            .map(|vm| receiver_queue(vm.slot))
            .collect();
        queues.extend(self.released_group.keys().map(|g| group_queue(*g)));
        queues.sort_unstable();
        queues.dedup();
        let current: Handed = queues
            .into_iter()
            .filter_map(|q| Some((q, kernel.handed(q)?)))
            .collect();
        if let Some((_, noted)) = self.audit.take() {
            for (queue, cpus) in noted {
                for (cpu, then) in cpus.into_iter().enumerate() {
                    let next = self
                        .streams
                        .get(&(queue, cpu as u32))
                        .copied()
                        .unwrap_or_default();
                    if next.all < then.all {
                        self.streams.insert((queue, cpu as u32), then);
                        let lost_order = then.order.saturating_sub(next.order);
                        self.lost_on_the_way(wire, queue, then.all - next.all, lost_order);
                    }
                }
            }
        }
        self.audit = Some((now, current));
    }

    /// A graceful stop: everything that may be delivered is, the rest is dropped and counted
    /// (`dropped_shutdown`).
    pub(crate) fn shutdown(&mut self, wire: &mut impl Wire, now: Instant) {
        let keys: Vec<Key> = self.queues.keys().copied().collect();
        for key in keys {
            let _ = self.flush(wire, key, usize::MAX, now);
            if let Some(mut q) = self.queues.remove(&key) {
                let n = q.frames.len() as u64;
                if n > 0 {
                    self.bump(HoldTotal::DroppedShutdown, n);
                }
                while let Some(held) = q.frames.pop_front() {
                    self.finish_order(wire, held.queue, held.for_order as u64);
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

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
