//! Epoch enforcement on every VM port.
//!
//! Both programs run where a VM's frames enter the host (ingress of the host side of the VM's
//! tap/veth), look up the sender's epoch (the frame's color) and the receiver's epoch in the
//! pinned maps and apply [`enforcer_common::decide`]. `enforcer_tc` (tcx ingress) is the
//! default hot path: it sees GSO super-frames untouched. `enforcer_xdp` is the same logic for
//! ports where XDP is wanted; XDP on a veth costs TCP its GRO/GSO (see BENCHMARKS.md).
//!
//! Frames to be held (Type-3 in `buffer` mode, and newer frames queued behind them while they
//! are re-injected) take a ticket in their queue's `hold_seq` entry, get a [`HoldHeader`] in
//! front carrying it and the color they were classified with, and are redirected to the hold
//! device, a veth pair whose far end the buffer daemon reads with an AF_PACKET socket. A tc
//! frame goes as it is, GSO super-frame or jumbo frame, its checksum state and offload
//! metadata kept (the socket reads them as a virtio-net header).
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is not offered; the
// intrinsic, its result unused, compiles to the BPF atomic add (BPF_XADD, every BPF cpu).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT, tcx_action_base::TCX_NEXT, xdp_action},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::generated::{
        bpf_clone_redirect, bpf_get_smp_processor_id, bpf_redirect, bpf_skb_change_head,
        bpf_xdp_adjust_head,
    },
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use enforcer_common::{
    CACHE_OCCUPIED, CACHE_OVERFLOW, CachedVm, DatapathConfig, DatapathView, EPOCH_CACHE_SIZE,
    GroupState, HOLD_FOR_ORDER, HOLD_FROM_XDP, HOLD_QUEUES, HOLD_RECORD, HoldHeader, HoldKernel,
    HoldSeq, HoldTotal, LEARNED_RING_BYTES, LearnedEpoch, MAP_MMAPABLE, MAX_GROUPS, MAX_PORTS,
    MAX_VMS, MacKey, Outcome, PortCounters, PortVm, RECORD_COPY_MARK, REINJECT_MARK, Type3Mode,
    UNATTRIBUTED_SLOT, Verdict, VmEpoch, cache_index, decide_wire, inject_target, receiver_queue,
    wire,
};
use network_types::{
    eth::{EthHdr, EtherType},
    vlan::VlanHdr,
};

const MAX_VMS_USIZE: usize = MAX_VMS as usize;
/// `dev_queue_xmit`'s "congestion notified": the frame was queued.
const NET_XMIT_CN: i64 = 2;
const MAX_GROUPS_USIZE: usize = MAX_GROUPS as usize;
const MAX_PORTS_USIZE: usize = MAX_PORTS as usize;

#[btf_map(name = "epochs")]
static EPOCHS: HashMap<MacKey, VmEpoch, MAX_VMS_USIZE> = HashMap::new();

/// Direct-mapped copy of `epochs` (see `enforcer_common::CachedVm`).
#[btf_map(name = "epoch_cache")]
static EPOCH_CACHE: Array<CachedVm, { EPOCH_CACHE_SIZE as usize }> = Array::new();

#[btf_map(name = "ports")]
static PORTS: HashMap<u32, PortVm, MAX_VMS_USIZE> = HashMap::new();

#[btf_map(name = "groups")]
static GROUPS: HashMap<u32, GroupState, MAX_GROUPS_USIZE> = HashMap::new();

#[btf_map(name = "config")]
static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// ifindex → counter slot, for frames whose sender is not identified (the hot path takes the
/// slot from the sender's `epochs` entry instead).
#[btf_map(name = "port_slots")]
static PORT_SLOTS: HashMap<u32, u32, MAX_VMS_USIZE> = HashMap::new();

/// Per-port counters by slot: an array, so the lookup is inlined by the verifier.
#[btf_map(name = "port_stats")]
static PORT_STATS: PerCpuArray<PortCounters, MAX_PORTS_USIZE> = PerCpuArray::new();

/// Frames handed to the hold path, by hold queue, per CPU (see [`HoldSeq`]): each frame's
/// tickets are the values before its own increments.
#[btf_map(name = "hold_seq")]
static HOLD_SEQ: PerCpuArray<HoldSeq, { HOLD_QUEUES as usize }> = PerCpuArray::new();

/// Frames held for order, by hold queue, all CPUs together (added to atomically).
#[btf_map(name = "hold_order_issued")]
static HOLD_ORDER_ISSUED: Array<u64, { HOLD_QUEUES as usize }> = Array::new();

/// Frames held for order the buffer has finished with, by hold queue (written by the buffer
/// only, through shared memory): while below `hold_order_issued`, newer Type-1/2 frames to
/// the queue are held too.
#[btf_map(name = "hold_order_done")]
static HOLD_ORDER_DONE: Array<u64, { HOLD_QUEUES as usize }, MAP_MMAPABLE> = Array::new();

/// Frames the hold path lost in the kernel, by reason (`HoldKernel`).
#[btf_map(name = "hold_kernel")]
static HOLD_KERNEL: PerCpuArray<u64, { HoldKernel::ENTRIES as usize }> = PerCpuArray::new();

/// The buffer daemon's own totals (`HoldTotal`), pinned with the rest so its accounting
/// survives a restart. Written by userspace only.
#[btf_map(name = "hold_totals")]
static HOLD_TOTALS: Array<u64, { HoldTotal::ENTRIES as usize }> = Array::new();

/// Colors learned from frames of VMs on other hosts, above this host's view of them: the
/// daemon raises its view (see `enforcer_common::wire`).
#[btf_map(name = "learned")]
static LEARNED: RingBuf<LearnedEpoch, { LEARNED_RING_BYTES as usize }> = RingBuf::new();

/// The hold device's ifindex, 0 when no buffer daemon serves.
#[inline(always)]
fn hold_ifindex() -> u32 {
    CONFIG.get(0).map_or(0, |config| config.hold_ifindex)
}

#[inline(always)]
fn bump(counter: Option<*mut u64>) {
    if let Some(counter) = counter {
        // SAFETY: a per-CPU value: only this CPU writes it, and the program is not preempted.
        unsafe { *counter += 1 };
    }
}

/// The datapath's view of the maps for [`decide`].
struct Maps;

impl DatapathView for Maps {
    #[inline(always)]
    fn vm(&self, mac: &MacKey) -> Option<VmEpoch> {
        if let Some(entry) = EPOCH_CACHE.get(cache_index(mac)) {
            if entry.state & CACHE_OCCUPIED != 0 && entry.mac.addr == mac.addr {
                return Some(entry.vm);
            }
            if entry.state & CACHE_OVERFLOW == 0 {
                return None;
            }
        }
        // SAFETY: the value is copied out at once; no reference outlives the lookup.
        unsafe { EPOCHS.get(mac).copied() }
    }

    #[inline(always)]
    fn port_has_vm(&self, ifindex: u32) -> bool {
        PORTS.get_ptr(ifindex).is_some()
    }

    #[inline(always)]
    fn group(&self, group: u32) -> Option<GroupState> {
        // SAFETY: the value is copied out at once.
        unsafe { GROUPS.get(group).copied() }
    }

    #[inline(always)]
    fn type3_mode(&self) -> Type3Mode {
        match CONFIG.get(0) {
            // An unknown mode falls on the safe side: nothing Type-3 gets through.
            Some(config) => Type3Mode::from_raw(config.type3_mode).unwrap_or(Type3Mode::Drop),
            None => Type3Mode::Drop,
        }
    }

    #[inline(always)]
    fn hold_ready(&self, _ifindex: u32) -> bool {
        hold_ifindex() != 0
    }

    #[inline(always)]
    fn order_pending(&self, queue: u32) -> bool {
        let (Some(issued), Some(done)) = (
            HOLD_ORDER_ISSUED.get_ptr(queue),
            HOLD_ORDER_DONE.get_ptr(queue),
        ) else {
            return false;
        };
        // SAFETY: pointers into array entries, valid for the program's run. Both are written
        // concurrently (the programs add, the buffer stores): volatile aligned 8-byte loads,
        // which BPF and the hardware make single-copy atomic (the target's cpu has no
        // load-acquire instruction).
        unsafe { issued.read_volatile() > done.read_volatile() }
    }
}

/// By receiver port slot: non-zero while the daemon itself takes the frames in the receiver's
/// queue at its cut (see `enforcer_record`).
#[btf_map(name = "record_skip")]
static RECORD_SKIP: Array<u32, MAX_PORTS_USIZE> = Array::new();

/// Port slot → ifindex, the reverse of `port_slots` (written by userspace): where a frame the
/// buffer re-injects re-enters.
#[btf_map(name = "slot_ports")]
static SLOT_PORTS: Array<u32, MAX_PORTS_USIZE, MAP_MMAPABLE> = Array::new();

/// On the hold device's ingress: a frame the buffer re-injects, sent out of the socket side
/// with its mark naming the slot of the port it first came in on ([`inject_mark`]). It
/// re-enters the host at that port, marked [`REINJECT_MARK`], so the port program passes it
/// on and the bridge forwards it as it would have (cases R2 and R3 of the datapath review).
/// The frame is not touched: a GSO super-frame stays one. Anything else is dropped, counted.
#[classifier]
pub fn enforcer_inject(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let port = inject_target(mark)
        .and_then(|(slot, mark, tc)| Some((*SLOT_PORTS.get(slot)?, mark, tc)))
        .filter(|(port, _, _)| *port != 0);
    let Some((port, mark, tc)) = port else {
        bump(HOLD_KERNEL.get_ptr_mut(HoldKernel::InjectRefused.index()));
        return TC_ACT_SHOT;
    };
    // Only the tc port program clears the bit again: with XDP on the ports nothing would.
    ctx.set_mark(if tc { mark | REINJECT_MARK } else { mark });
    // SAFETY: a helper call with plain integer arguments; it returns TC_ACT_REDIRECT.
    unsafe { bpf_redirect(port, BPF_F_INGRESS as u64) as i32 }
}

/// On the egress of a group member's port, attached only while its group's snapshot runs: the
/// channel state (invariant 7 in docs/design.md). A frame the bridge delivers to the member
/// from a member of its group, with a color below the member's epoch, was sent before its
/// sender's cut and reaches the member after its own: it is in neither image. The member gets
/// it as it would have — an untouched copy, sent on at once (marked [`RECORD_COPY_MARK`], which
/// this program clears when the copy passes it) — and the frame itself goes to the buffer with
/// a hold header flagged [`HOLD_RECORD`], which keeps it with the snapshot.
///
/// The frame takes a ticket in its receiver's hold queue before anything else, so a copy that
/// could not be made, or a frame that got no room for its header, leaves a gap the buffer
/// counts: the recording says how many it misses, never silently.
#[classifier]
pub fn enforcer_record(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    if mark & RECORD_COPY_MARK != 0 {
        ctx.set_mark(mark & !RECORD_COPY_MARK);
        return TCX_NEXT;
    }
    let hold = hold_ifindex();
    // SAFETY: the value is copied out at once.
    let receiver_mac = unsafe { PORTS.get(ifindex).map(|p| p.mac) };
    let (Some(receiver_mac), true) = (receiver_mac, hold != 0) else {
        return TCX_NEXT;
    };
    let Some(receiver) = Maps.vm(&receiver_mac) else {
        return TCX_NEXT;
    };
    let Some((src, _)) = ethernet_addresses(ctx.data(), ctx.data_end()) else {
        return TCX_NEXT;
    };
    // Only frames of the receiver's own group: its cut says nothing about anyone else's.
    let sender = match Maps.vm(&src) {
        Some(sender) if sender.group == receiver.group => sender,
        _ => return TCX_NEXT,
    };
    // The color the sender's port program gave the frame (or the overlay brought); without one
    // (an XDP port sets no mark) the sender's epoch now stands in.
    let color = wire::decode(mark, sender.epoch).unwrap_or(sender.epoch);
    // While the daemon reads the receiver's queue at its cut, what passes here lands in that
    // queue and is taken from it: recorded there, not twice.
    if color >= receiver.epoch || RECORD_SKIP.get(receiver.slot).is_some_and(|s| *s != 0) {
        return TCX_NEXT;
    }
    let queue = receiver_queue(receiver.slot);
    let Some(seq) = HOLD_SEQ.get_ptr_mut(queue) else {
        return TCX_NEXT;
    };
    // SAFETY: a per-CPU value: only this CPU writes it, and the program is not preempted.
    // `order` is read, not taken: this frame is not held for order, and the buffer checks
    // the order tickets of this queue's stream too.
    let (ticket, order_ticket) = unsafe {
        let t = ((*seq).all, (*seq).order);
        (*seq).all += 1;
        t
    };
    let (vlan_proto, vlan_tci) = skb_vlan(&ctx);
    ctx.set_mark(mark | RECORD_COPY_MARK);
    // SAFETY: a helper call on this program's skb: it sends a copy out of this same port now
    // (this program passes the copy on, its bit cleared).
    let sent = unsafe { bpf_clone_redirect(ctx.skb.skb, ifindex, 0) };
    // `NET_XMIT_CN` (a qdisc under pressure) still queued the copy.
    let copied = sent == 0 || sent == NET_XMIT_CN;
    ctx.set_mark(mark);
    if !copied {
        // Delivered, not recorded: the ticket's gap counts it.
        return TCX_NEXT;
    }
    let header = HoldHeader {
        color,
        aborts: 0,
        // SAFETY: a helper call without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ticket,
        order_ticket,
        queue,
        port: receiver.slot,
        ifindex,
        flags: HOLD_RECORD,
        vlan_proto,
        vlan_tci,
    };
    let mut room = TcRoom(&ctx);
    if !room.make_room() || !room.write(&header.to_bytes()) {
        // The copy went; this one would reach no one: dropped, and the gap counts it.
        return TC_ACT_SHOT;
    }
    // SAFETY: a helper call with plain integer arguments; it returns TC_ACT_REDIRECT.
    unsafe { bpf_redirect(hold, 0) as i32 }
}

/// The outer VLAN tag the kernel keeps in the skb's metadata rather than in the frame's bytes
/// (TPID, TCI); (0, 0): none there.
#[inline(always)]
fn skb_vlan(ctx: &TcContext) -> (u16, u16) {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let skb = unsafe { &*ctx.skb.skb };
    if skb.vlan_present != 0 {
        (u16::from_be(skb.vlan_proto as u16), skb.vlan_tci as u16)
    } else {
        (0, 0)
    }
}

/// How a program puts a [`HoldHeader`] in front of a frame: first room, then (once the tickets
/// are taken: a frame that gets no room takes none) the bytes.
trait HoldRoom {
    /// [`HoldHeader::flags`] of the frames this program holds.
    const FLAGS: u16;
    fn make_room(&mut self) -> bool;
    fn write(&mut self, header: &[u8; HoldHeader::LEN]) -> bool;
}

struct XdpRoom<'a>(&'a XdpContext);

impl HoldRoom for XdpRoom<'_> {
    const FLAGS: u16 = HOLD_FROM_XDP;

    #[inline(always)]
    fn make_room(&mut self) -> bool {
        // SAFETY: a helper call on this program's context; it moves `data` back by the header.
        unsafe { bpf_xdp_adjust_head(self.0.ctx, -(HoldHeader::LEN as i32)) == 0 }
    }

    #[inline(always)]
    fn write(&mut self, header: &[u8; HoldHeader::LEN]) -> bool {
        let (data, data_end) = (self.0.data(), self.0.data_end());
        if data + HoldHeader::LEN > data_end {
            return false;
        }
        // SAFETY: within [data, data_end), checked above; the header is plain bytes.
        unsafe { *(data as *mut [u8; HoldHeader::LEN]) = *header };
        true
    }
}

struct TcRoom<'a>(&'a TcContext);

impl HoldRoom for TcRoom<'_> {
    const FLAGS: u16 = 0;

    #[inline(always)]
    fn make_room(&mut self) -> bool {
        // SAFETY: a helper call on this program's skb; it adds room in front of the frame.
        unsafe { bpf_skb_change_head(self.0.skb.skb, HoldHeader::LEN as u32, 0) == 0 }
    }

    #[inline(always)]
    fn write(&mut self, header: &[u8; HoldHeader::LEN]) -> bool {
        self.0.store(0, header, 0).is_ok()
    }
}

#[xdp]
pub fn enforcer_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let ifindex = ctx.ingress_ifindex() as u32;
    // XDP sees no skb mark: frames from other hosts are classified with this host's view of
    // their sender, and delivered frames carry no color to other hosts. A VLAN tag is still in
    // the frame's bytes.
    let (verdict, _mark) = try_enforce(
        ctx.data(),
        ctx.data_end(),
        ifindex,
        bytes,
        0,
        (0, 0),
        XdpRoom(&ctx),
    );
    match verdict {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        // SAFETY: a helper call with plain integer arguments; it returns XDP_REDIRECT.
        Verdict::Hold => unsafe { bpf_redirect(hold_ifindex(), 0) as u32 },
    }
}

#[classifier]
pub fn enforcer_tc(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    if mark & REINJECT_MARK != 0 {
        // Held, and now put back by the buffer (`enforcer_inject`): classified and counted
        // when it was held; on to the bridge.
        ctx.set_mark(mark & !REINJECT_MARK);
        return TCX_NEXT;
    }
    let len = ctx.len();
    // Headers of a received skb are normally linear; pull them in if not, so a frame is never
    // called malformed just because of how it is laid out in memory.
    let wanted = (EthHdr::LEN + VlanHdr::LEN) as u32;
    if ctx.data_end() - ctx.data() < wanted as usize && len > (ctx.data_end() - ctx.data()) as u32 {
        let _ = ctx.pull_data(if len < wanted { len } else { wanted });
    }
    // At tc ingress the kernel has moved the outer VLAN tag into the skb's metadata; a held
    // frame carries it in its hold header, and the buffer puts it back.
    let vlan = skb_vlan(&ctx);
    let (verdict, color_mark) = try_enforce(
        ctx.data(),
        ctx.data_end(),
        ifindex,
        len as u64,
        mark,
        vlan,
        TcRoom(&ctx),
    );
    match verdict {
        Verdict::Pass => {
            if color_mark != 0 {
                // VXLAN-GBP carries it to the receiver's host.
                ctx.set_mark(color_mark);
            }
            // Not TC_ACT_OK, which ends tc processing on the port: other tcx programs and tc
            // filters after this one (libvirt's QoS, an operator's filter) still run (case R1
            // of the datapath review). With none, the frame passes.
            TCX_NEXT
        }
        Verdict::Drop => TC_ACT_SHOT,
        // SAFETY: a helper call with plain integer arguments; it returns TC_ACT_REDIRECT.
        Verdict::Hold => unsafe { bpf_redirect(hold_ifindex(), 0) as i32 },
    }
}

/// Classifies one frame and counts it; returns what to do with it, and the mark that carries
/// its color to other hosts (0: none). A frame to hold takes its tickets and gets its
/// [`HoldHeader`] through `room`; if it gets no room it is not held: Type-3 is dropped
/// (`type3_unbuffered`), a frame held only for order is delivered.
#[inline(always)]
fn try_enforce<R: HoldRoom>(
    data: usize,
    data_end: usize,
    ifindex: u32,
    bytes: u64,
    mark: u32,
    (vlan_proto, vlan_tci): (u16, u16),
    mut room: R,
) -> (Verdict, u32) {
    let (outcome, sender_slot, color_mark) = match ethernet_addresses(data, data_end) {
        Some((src, dst)) => {
            let mut decision = decide_wire(&Maps, ifindex, &src, &dst, mark);
            if decision.learn {
                // This host's view of a remote sender is raised from it (see `wire`); a held
                // frame needs none of it: its color rides in its hold header.
                learn(src, decision.color);
            }
            if decision.outcome.verdict() == Verdict::Hold {
                let seq = (decision.hold.queue())
                    .and_then(|q| HOLD_SEQ.get_ptr_mut(q).map(|seq| (q, seq)));
                // The queue first: room made for a frame that is not held after all would
                // deliver it with the room in front.
                let held = match seq.filter(|_| room.make_room()) {
                    Some((queue, seq)) => {
                        let for_order = decision.outcome == Outcome::HeldForOrder;
                        // SAFETY: a per-CPU value: only this CPU writes it, and the program is
                        // not preempted, so the pair is this frame's own place in this CPU's
                        // hand-over (which reaches the buffer in order).
                        let (ticket, order_ticket) = unsafe {
                            let tickets = ((*seq).all, (*seq).order);
                            (*seq).all += 1;
                            if for_order {
                                (*seq).order += 1;
                            }
                            tickets
                        };
                        if for_order && let Some(issued) = HOLD_ORDER_ISSUED.get_ptr_mut(queue) {
                            // SAFETY: a pointer into an array entry, valid for the program's
                            // run; programs on every CPU add to it, hence the atomic add.
                            unsafe {
                                atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(issued, 1)
                            };
                        }
                        let header = HoldHeader {
                            color: decision.color,
                            aborts: decision.aborts,
                            // SAFETY: a helper call without arguments.
                            cpu: unsafe { bpf_get_smp_processor_id() },
                            ticket,
                            order_ticket,
                            queue,
                            // SAFETY: the value is copied out at once.
                            port: unsafe { PORT_SLOTS.get(ifindex).copied() }
                                .unwrap_or(UNATTRIBUTED_SLOT),
                            ifindex,
                            flags: R::FLAGS | if for_order { HOLD_FOR_ORDER } else { 0 },
                            vlan_proto,
                            vlan_tci,
                        };
                        room.write(&header.to_bytes())
                    }
                    None => false,
                };
                if !held {
                    bump(HOLD_KERNEL.get_ptr_mut(HoldKernel::NoHeadroom.index()));
                    decision = decision.unheld();
                }
            }
            (decision.outcome, decision.sender_slot, decision.mark)
        }
        None => (Outcome::Malformed, None, 0),
    };
    let slot = match sender_slot {
        Some(slot) => slot,
        // SAFETY: the value is copied out at once.
        None => unsafe { PORT_SLOTS.get(ifindex).copied() }.unwrap_or(UNATTRIBUTED_SLOT),
    };
    count(slot, outcome, bytes);
    (outcome.verdict(), color_mark)
}

/// Reports a color learned from another host's frame; false (and counted) when the ring is
/// full.
#[inline(always)]
fn learn(mac: MacKey, epoch: u32) -> bool {
    let entry = LearnedEpoch {
        mac,
        epoch,
        _pad: 0,
    };
    if LEARNED.output(entry, 0).is_err() {
        bump(HOLD_KERNEL.get_ptr_mut(HoldKernel::LearnLost.index()));
        return false;
    }
    true
}

/// Source and destination MAC of a well-formed frame: at least an Ethernet header, and the
/// whole tag when it carries an 802.1Q/802.1ad VLAN tag.
#[inline(always)]
fn ethernet_addresses(data: usize, data_end: usize) -> Option<(MacKey, MacKey)> {
    if data + EthHdr::LEN > data_end {
        return None;
    }
    let eth = data as *const EthHdr;
    // SAFETY: the header lies within [data, data_end), checked above.
    let (src, dst, ether_type) = unsafe { ((*eth).src_addr, (*eth).dst_addr, (*eth).ether_type) };
    let tagged =
        ether_type == EtherType::Ieee8021q as u16 || ether_type == EtherType::Ieee8021ad as u16;
    if tagged && data + EthHdr::LEN + VlanHdr::LEN > data_end {
        return None;
    }
    Some((MacKey::new(src), MacKey::new(dst)))
}

#[inline(always)]
fn count(slot: u32, outcome: Outcome, bytes: u64) {
    // Out of range only if userspace wrote a bad slot: then the frame is not counted.
    let Some(stats) = PORT_STATS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a per-CPU value: only this CPU writes it, and the program is not preempted.
    let counter = unsafe { &mut *stats }.counter_mut(outcome);
    counter.frames += 1;
    counter.bytes += bytes;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
