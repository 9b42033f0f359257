//! The model of the host around the buffer's [`Core`] that the tier-0 tests drive (see
//! `core_tests.rs`): maps, tickets and order counts, each CPU's hand-over, ports, program runs
//! in flight, and the checks made after every event.

use std::collections::{HashMap, HashSet, VecDeque};

use enforcer_common::{
    DatapathView, GroupState, HOLD_FOR_ORDER, HoldSeq, MacKey, Outcome, Type3Mode, Verdict,
    VmEpoch, decide_frame,
};
use proptest::prelude::*;

use super::super::*;
use crate::{
    datapath::{
        epochs::{self, EpochStore},
        memory::MemoryStore,
    },
    hold::advance::{self, BufferLink},
};

pub(super) const GROUP: u32 = 7;
pub(super) const ETHERTYPE: [u8; 2] = [0x88, 0xb6]; // local experimental 2: no checksum, not a hold header
pub(super) const BROADCAST: [u8; 6] = [0xff; 6];
/// CPUs of the modelled host: VM `i` sends from CPU `i % CPUS`.
pub(super) const CPUS: usize = 2;

pub(super) fn mac(i: usize) -> MacKey {
    MacKey::new([2, 0, 0, 0, 0, i as u8 + 1])
}

pub(super) fn ifindex(i: usize) -> u32 {
    100 + i as u32
}

/// A frame from VM `from` to VM `to` (or broadcast), carrying who sent it, its sequence
/// number and the color the datapath saw.
pub(super) fn frame(from: usize, to: Option<usize>, seq: u32, color: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&to.map_or(BROADCAST, |t| mac(t).addr));
    f.extend_from_slice(&mac(from).addr);
    f.extend_from_slice(&ETHERTYPE);
    f.push(from as u8);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&color.to_be_bytes());
    f.resize(60, 0);
    f
}

/// A frame as the programs hand it to the hold path: its hold header in front.
pub(super) fn held(f: Vec<u8>, header: HoldHeader) -> Received {
    let mut data = header.to_bytes().to_vec();
    data.extend_from_slice(&f);
    Received {
        vnet: VnetHeader::default(),
        data,
    }
}

pub(super) fn parse(f: &[u8]) -> (usize, u32, u32) {
    let from = f[14] as usize;
    let seq = u32::from_be_bytes(f[15..19].try_into().unwrap());
    let color = u32::from_be_bytes(f[19..23].try_into().unwrap());
    (from, seq, color)
}

/// The bridge and its ports: every frame that reaches a VM, in order (forwarded straight, or
/// re-injected at its sender's port and forwarded then); and the order counts the buffer
/// published (`hold_order_done`).
#[derive(Default)]
pub(super) struct Ports {
    /// VMs on the bridge: VM `i` has MAC `mac(i)` on port `ifindex(i)`.
    pub(super) n: usize,
    /// Port counter slot → ifindex (`slot_ports`).
    pub(super) slots: HashMap<u32, u32>,
    pub(super) log: Vec<(u32, Vec<u8>)>,
    /// Ports that vanished: the bridge forwards nothing to them.
    pub(super) gone: HashSet<u32>,
    pub(super) order_done: HashMap<u32, u64>,
}

impl Ports {
    /// The bridge forwards a frame that came in on `from`: to the VM of its destination, or a
    /// broadcast to every other port.
    pub(super) fn forward(&mut self, from: u32, frame: Vec<u8>) {
        let to: Vec<u32> = if frame[0] & 1 == 1 {
            (0..self.n).map(ifindex).filter(|p| *p != from).collect()
        } else {
            (0..self.n)
                .filter(|i| mac(*i).addr[..] == frame[..6])
                .map(ifindex)
                .collect()
        };
        for port in to.into_iter().filter(|p| !self.gone.contains(p)) {
            self.log.push((port, frame.clone()));
        }
    }
}

impl Wire for Ports {
    fn send(&mut self, slot: u32, ifindex: u32, _mark: u32, frames: &[Outgoing<'_>]) -> usize {
        // The sender's port is where the frame re-enters, while its slot still names it.
        if self.slots.get(&slot) != Some(&ifindex) || self.gone.contains(&ifindex) {
            return 0;
        }
        let port = ifindex;
        for f in frames {
            self.forward(port, f.data.to_vec());
        }
        frames.len()
    }

    fn order_done(&mut self, queue: u32, done: u64) {
        let old = self.order_done.insert(queue, done).unwrap_or(0);
        assert!(done >= old, "order counts only rise: {old} then {done}");
    }
}

/// A program run that decided to hold a frame and ends later (at the next grace period, or
/// when its CPU runs the next frame): only then does it count and hand the frame over.
pub(super) struct InFlight {
    pub(super) cpu: usize,
    pub(super) frame: Vec<u8>,
    pub(super) decision: enforcer_common::Decision,
}

/// The datapath: its maps, the programs' tickets and order counts, each CPU's hand-over to the
/// buffer's socket, and program runs still in flight.
pub(super) struct Datapath {
    pub(super) map: MemoryStore,
    pub(super) rings: Vec<VecDeque<Received>>,
    pub(super) seq: HashMap<(u32, usize), HoldSeq>,
    pub(super) order_issued: HashMap<u32, u64>,
    pub(super) in_flight: Vec<InFlight>,
    /// Frames the ring loses (overflow): handed over, never read.
    pub(super) lose_next: usize,
    /// Grace periods started.
    pub(super) graces: u64,
    /// Which CPU's frames the next read takes first.
    pub(super) turn: usize,
}

/// What the programs see: the maps, and whether order frames are still in the buffer.
pub(super) struct View<'a> {
    pub(super) map: &'a MemoryStore,
    pub(super) issued: &'a HashMap<u32, u64>,
    pub(super) done: &'a HashMap<u32, u64>,
}

impl DatapathView for View<'_> {
    fn vm(&self, mac: &MacKey) -> Option<VmEpoch> {
        self.map.vms.get(mac).copied()
    }
    fn port_has_vm(&self, ifindex: u32) -> bool {
        self.map.ports.contains_key(&ifindex)
    }
    fn group(&self, group: u32) -> Option<GroupState> {
        self.map.groups.get(&group).copied()
    }
    fn type3_mode(&self) -> Type3Mode {
        Type3Mode::Buffer
    }
    fn hold_ready(&self, _ifindex: u32) -> bool {
        true
    }
    fn order_pending(&self, queue: u32) -> bool {
        self.issued.get(&queue).copied().unwrap_or(0) > self.done.get(&queue).copied().unwrap_or(0)
    }
}

impl Datapath {
    /// The end of a program run that holds a frame: its tickets, its order count, and the frame
    /// into its CPU's hand-over (or lost there).
    pub(super) fn hand_over(&mut self, run: InFlight) {
        let d = run.decision;
        let queue = d.hold.queue().expect("held without a queue");
        let for_order = d.outcome == Outcome::HeldForOrder;
        let seq = self.seq.entry((queue, run.cpu)).or_default();
        let header = HoldHeader {
            color: d.color,
            aborts: d.aborts,
            cpu: run.cpu as u32,
            ticket: seq.all,
            order_ticket: seq.order,
            queue,
            port: self.map.vms[&mac(run.frame[14] as usize)].slot,
            ifindex: ifindex(run.frame[14] as usize),
            flags: if for_order { HOLD_FOR_ORDER } else { 0 },
            vlan_proto: 0,
            vlan_tci: 0,
        };
        seq.all += 1;
        if for_order {
            seq.order += 1;
            *self.order_issued.entry(queue).or_default() += 1;
        }
        if self.lose_next > 0 {
            self.lose_next -= 1;
        } else {
            self.rings[run.cpu].push_back(held(run.frame, header));
        }
    }

    /// The next frame the socket gives the buffer: the CPUs' hand-overs, each in order, taken
    /// in turns.
    pub(super) fn read(&mut self) -> Option<Received> {
        for k in 0..CPUS {
            let cpu = (self.turn + k) % CPUS;
            if let Some(f) = self.rings[cpu].pop_front() {
                self.turn = cpu + 1;
                return Some(f);
            }
        }
        None
    }

    pub(super) fn ring_len(&self) -> usize {
        self.rings.iter().map(|r| r.len()).sum()
    }
}

impl Kernel for Datapath {
    fn clear_draining(&mut self, key: Key) {
        match key {
            Key::Vm(mac) => epochs::clear_vm_draining(&mut self.map, &mac).unwrap(),
            Key::Group(g) => epochs::clear_group_draining(&mut self.map, g).unwrap(),
        }
    }
}

impl Fence for Datapath {
    fn handed(&mut self, queue: u32) -> Option<Vec<HoldSeq>> {
        Some(
            (0..CPUS)
                .map(|cpu| self.seq.get(&(queue, cpu)).copied().unwrap_or_default())
                .collect(),
        )
    }
    fn grace_start(&mut self) -> u64 {
        self.graces += 1;
        self.graces
    }
    fn grace_passed(&mut self, _token: u64) -> bool {
        // Program runs that began before it end now: what they held reaches the rings.
        for run in std::mem::take(&mut self.in_flight) {
            self.hand_over(run);
        }
        true
    }
}

/// The daemon's link to the buffer thread: notices wait in its channel until the thread's
/// next turn ([`Ev::Tick`]); meanwhile it may read the ring ([`Ev::Read`]).
pub(super) struct Channel<'a> {
    pub(super) pending: &'a mut Vec<Notice>,
}

impl BufferLink for Channel<'_> {
    fn running(&self) -> bool {
        true
    }
    fn tell(&mut self, notice: Notice) -> bool {
        self.pending.push(notice);
        true
    }
}

/// The buffer thread's own link: notices applied at once.
pub(super) struct Link<'a> {
    pub(super) core: &'a mut Core,
    pub(super) ports: &'a mut Ports,
    pub(super) now: Instant,
}

impl BufferLink for Link<'_> {
    fn running(&self) -> bool {
        true
    }
    fn tell(&mut self, notice: Notice) -> bool {
        self.core.on_notice(self.ports, notice, self.now);
        true
    }
}

#[derive(Clone, Debug)]
pub(super) enum Ev {
    /// VM `from` sends to VM `to` (`to == n`: broadcast).
    Send {
        from: usize,
        to: usize,
    },
    /// The same, by a program run that ends only at the next barrier.
    SendInFlight {
        from: usize,
        to: usize,
    },
    /// The buffer reads up to this many frames from the ring.
    Read(usize),
    /// The ring overflows: the next frame handed over is lost.
    LoseOne,
    Advance(usize),
    /// An advance made by the daemon: the map changes at once, the buffer hears of it at its
    /// next turn (case P1 of the datapath review: frames of the new color may be read first).
    AdvanceUnheard(usize),
    /// The group's snapshot is aborted by the daemon: every member back to the lowest epoch,
    /// heard by the buffer at its next turn.
    Abort,
    /// Time passes (ms), in which the thread takes the notices waiting for it and reads
    /// everything the ring has (it polls it every millisecond or so); then drains progress, as
    /// at the end of each turn of its loop.
    Tick(u64),
}

pub(super) struct Sim {
    pub(super) n: usize,
    pub(super) core: Core,
    pub(super) dp: Datapath,
    pub(super) ports: Ports,
    pub(super) now: Instant,
    pub(super) seq: Vec<u32>,
    /// Frames each VM sent, per destination (`n`: broadcast).
    pub(super) sent: HashMap<(usize, usize), u32>,
    /// Frames the datapath dropped (only the ring's losses here).
    pub(super) early: Vec<String>,
    pub(super) order_breaks: u64,
    pub(super) breaks: Vec<String>,
    pub(super) last_seq: HashMap<(usize, usize, bool), u32>,
    pub(super) checked: usize,
    /// Notices in the daemon's channel, not yet taken by the buffer thread.
    pub(super) pending: Vec<Notice>,
    /// Per sender, the first sequence number sent after the last abort.
    pub(super) aborted_before: Vec<u32>,
}

impl Sim {
    pub(super) fn new(n: usize, max_bytes: usize) -> Self {
        let ports: Vec<u32> = (0..n).map(ifindex).collect();
        let mut map = MemoryStore::with_ports(&ports);
        for i in 0..n {
            epochs::register(&mut map, mac(i).into(), GROUP, ifindex(i), Some(0)).unwrap();
        }
        let vms = map.vms().unwrap();
        let slots = (0..n)
            .map(|i| (map.vms[&mac(i)].slot, ifindex(i)))
            .collect();
        let groups = epochs::list_groups(&mut map)
            .unwrap()
            .into_iter()
            .map(|g| (g.group, g.min_epoch, 0));
        let core = Core::new(
            max_bytes,
            vms,
            groups,
            Vec::new(),
            Vec::new(),
            [0; HoldTotal::ENTRIES as usize],
        );
        Self {
            n,
            core,
            dp: Datapath {
                map,
                rings: (0..CPUS).map(|_| VecDeque::new()).collect(),
                seq: HashMap::new(),
                order_issued: HashMap::new(),
                in_flight: Vec::new(),
                lose_next: 0,
                graces: 0,
                turn: 0,
            },
            ports: Ports {
                n,
                slots,
                ..Ports::default()
            },
            now: Instant::now(),
            seq: vec![0; n],
            sent: HashMap::new(),
            early: Vec::new(),
            order_breaks: 0,
            breaks: Vec::new(),
            last_seq: HashMap::new(),
            checked: 0,
            pending: Vec::new(),
            aborted_before: vec![0; n],
        }
    }

    pub(super) fn epoch(&self, i: usize) -> u32 {
        self.dp.map.vms[&mac(i)].epoch
    }

    pub(super) fn vm_of(&self, ifindex_: u32) -> usize {
        (0..self.n).find(|i| ifindex(*i) == ifindex_).unwrap()
    }

    pub(super) fn send(&mut self, from: usize, to: usize, in_flight: bool) {
        if from == to {
            return;
        }
        // A CPU runs one program at a time: a run still in flight there ends before the next
        // one begins.
        let cpu = from % CPUS;
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dp.in_flight)
            .into_iter()
            .partition(|run| run.cpu == cpu);
        self.dp.in_flight = others;
        for run in mine {
            self.dp.hand_over(run);
        }
        let dst = (to < self.n).then_some(to);
        let color = self.epoch(from);
        let seq = self.seq[from];
        self.seq[from] += 1;
        *self.sent.entry((from, to)).or_default() += 1;
        let f = frame(from, dst, seq, color);
        let dst_mac = dst.map_or(MacKey::new(BROADCAST), mac);
        let view = View {
            map: &self.dp.map,
            issued: &self.dp.order_issued,
            done: &self.ports.order_done,
        };
        let d = decide_frame(&view, ifindex(from), &mac(from), &dst_mac);
        match d.outcome.verdict() {
            Verdict::Pass => self.ports.forward(ifindex(from), f),
            Verdict::Hold => {
                let run = InFlight {
                    cpu,
                    frame: f,
                    decision: d,
                };
                if in_flight {
                    self.dp.in_flight.push(run);
                } else {
                    self.dp.hand_over(run);
                }
            }
            Verdict::Drop => panic!("nothing is dropped here: {d:?}"),
        }
    }

    pub(super) fn apply(&mut self, ev: &Ev) {
        match *ev {
            Ev::Send { from, to } => self.send(from, to, false),
            Ev::SendInFlight { from, to } => self.send(from, to, true),
            Ev::Read(k) => {
                for _ in 0..k {
                    let Some(f) = self.dp.read() else {
                        break;
                    };
                    self.core.on_frame(&mut self.ports, f, self.now);
                }
            }
            Ev::LoseOne => self.dp.lose_next += 1,
            Ev::Advance(i) | Ev::AdvanceUnheard(i) => {
                // Members stay within two epochs of each other, as snapshots keep them.
                let min = (0..self.n).map(|j| self.epoch(j)).min().unwrap();
                if self.epoch(i) > min + 1 {
                    return;
                }
                if matches!(ev, Ev::AdvanceUnheard(_)) {
                    let mut link = Channel {
                        pending: &mut self.pending,
                    };
                    advance::change_epoch(&mut self.dp.map, &mut link, mac(i).into(), None, false)
                        .unwrap();
                } else {
                    // Heard at once, so after what the channel holds.
                    self.hear();
                    let mut link = Link {
                        core: &mut self.core,
                        ports: &mut self.ports,
                        now: self.now,
                    };
                    advance::change_epoch(&mut self.dp.map, &mut link, mac(i).into(), None, false)
                        .unwrap();
                }
            }
            Ev::Abort => {
                let min = (0..self.n).map(|j| self.epoch(j)).min().unwrap();
                // Frames sent before it belong to the aborted epoch: ordinary from now on.
                self.aborted_before = self.seq.clone();
                let mut link = Channel {
                    pending: &mut self.pending,
                };
                advance::roll_back(&mut self.dp.map, &mut link, GROUP, min).unwrap();
            }
            Ev::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                self.hear();
                while let Some(f) = self.dp.read() {
                    self.core.on_frame(&mut self.ports, f, self.now);
                }
                while self.core.release_more(&mut self.ports, self.now) {}
                self.core
                    .progress_drains(&mut self.ports, &mut self.dp, true, self.now);
            }
        }
        self.check(ev);
    }

    /// The buffer thread takes the notices waiting in its channel, in order.
    pub(super) fn hear(&mut self) {
        for notice in std::mem::take(&mut self.pending) {
            self.core.on_notice(&mut self.ports, notice, self.now);
        }
    }

    /// After every event: what reached a VM since the last check was no Type-3 to it, pairs
    /// kept their order, and every frame read is held or counted.
    pub(super) fn check(&mut self, ev: &Ev) {
        for k in self.checked..self.ports.log.len() {
            let (port, f) = &self.ports.log[k];
            let to = self.vm_of(*port);
            let (from, seq, color) = parse(f);
            // A frame of an aborted epoch is an ordinary frame once the abort is made.
            if color > self.epoch(to) && seq >= self.aborted_before[from] {
                self.early.push(format!(
                    "{ev:?}: frame {from}#{seq} of color {color} reached vm {to} at epoch {}",
                    self.epoch(to)
                ));
            }
            // Order is promised per queue: a receiver's unicast frames from one sender, and a
            // group's broadcasts from one sender (see `a_broadcast_and_a_unicast_may_swap`).
            let broadcast = f[0] & 1 == 1;
            let last = self.last_seq.insert((from, to, broadcast), seq);
            if last.is_some_and(|l| l >= seq) {
                self.order_breaks += 1;
                if self.breaks.len() < 5 {
                    self.breaks.push(format!(
                        "{ev:?}: {from}#{seq} at vm {to} after #{}{}",
                        last.unwrap_or(0),
                        if broadcast { " (broadcast)" } else { "" }
                    ));
                }
            }
        }
        self.checked = self.ports.log.len();
        let fates: u64 = HoldTotal::FATES.iter().map(|t| self.core.total(*t)).sum();
        assert_eq!(
            self.core.total(HoldTotal::Received),
            fates + self.core.held_frames(),
            "{ev:?}: every frame read is held or counted once"
        );
    }

    /// Program runs end, everyone advances to the same epoch, the ring empties, time passes:
    /// nothing may stay.
    pub(super) fn settle(&mut self) {
        for run in std::mem::take(&mut self.dp.in_flight) {
            self.dp.hand_over(run);
        }
        let top = (0..self.n).map(|i| self.epoch(i)).max().unwrap();
        for i in 0..self.n {
            while self.epoch(i) < top {
                self.apply(&Ev::Advance(i));
            }
        }
        for _ in 0..4 {
            self.apply(&Ev::Tick(0));
            self.apply(&Ev::Read(usize::MAX));
            self.apply(&Ev::Tick(600));
        }
    }
}

pub(super) fn event(n: usize) -> impl Strategy<Value = Ev> {
    prop_oneof![
        8 => (0..n, 0..=n).prop_map(|(from, to)| Ev::Send { from, to }),
        2 => (0..n, 0..=n).prop_map(|(from, to)| Ev::SendInFlight { from, to }),
        4 => (1..16usize).prop_map(Ev::Read),
        1 => (0..n).prop_map(Ev::Advance),
        1 => (0..n).prop_map(Ev::AdvanceUnheard),
        1 => Just(Ev::Abort),
        2 => (0..8u64).prop_map(Ev::Tick),
        1 => (400..700u64).prop_map(Ev::Tick),
    ]
}
