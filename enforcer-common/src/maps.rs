//! Keys and values of the pinned BPF maps (`/sys/fs/bpf/enforcer/<name>`).

use crate::outcome::Outcome;

/// Names of the maps, as pinned under the pin root and as named in the eBPF object.
pub mod names {
    pub const EPOCHS: &str = "epochs";
    pub const EPOCH_CACHE: &str = "epoch_cache";
    pub const PORTS: &str = "ports";
    pub const GROUPS: &str = "groups";
    pub const CONFIG: &str = "config";
    pub const PORT_SLOTS: &str = "port_slots";
    pub const PORT_STATS: &str = "port_stats";
    pub const HOLD_SEQ: &str = "hold_seq";
    pub const HOLD_ORDER_ISSUED: &str = "hold_order_issued";
    pub const HOLD_ORDER_DONE: &str = "hold_order_done";
    pub const SLOT_PORTS: &str = "slot_ports";
    pub const HOLD_KERNEL: &str = "hold_kernel";
    pub const HOLD_TOTALS: &str = "hold_totals";
    pub const LEARNED: &str = "learned";
    pub const RECORD_SKIP: &str = "record_skip";
    /// Every map the datapath pins.
    pub const ALL: [&str; 15] = [
        EPOCHS,
        EPOCH_CACHE,
        PORTS,
        GROUPS,
        CONFIG,
        PORT_SLOTS,
        PORT_STATS,
        HOLD_SEQ,
        HOLD_ORDER_ISSUED,
        HOLD_ORDER_DONE,
        SLOT_PORTS,
        HOLD_KERNEL,
        HOLD_TOTALS,
        LEARNED,
        RECORD_SKIP,
    ];
}

/// Capacity of the VM tables (epochs, ports) and of the per-port statistics.
pub const MAX_VMS: u32 = 4096;
/// Capacity of the group table.
pub const MAX_GROUPS: u32 = 1024;
/// Number of per-port counter slots. Slot 0 counts frames on ports that have none.
pub const MAX_PORTS: u32 = 1024;
/// The counter slot of frames seen on a port without a slot of its own.
pub const UNATTRIBUTED_SLOT: u32 = 0;
/// Hold queues: one per receiver port slot (unicast), then one per group (broadcast and
/// multicast). The index of `hold_seq`, `hold_order_issued` and `hold_order_done`.
pub const HOLD_QUEUES: u32 = MAX_PORTS + MAX_GROUPS;

/// The hold queue of unicast frames to the receiver with this port slot.
pub const fn receiver_queue(slot: u32) -> u32 {
    slot
}

/// The hold queue of a group's broadcast and multicast frames.
pub const fn group_queue(group: u32) -> u32 {
    MAX_PORTS + group
}

/// `BPF_F_MMAPABLE`: the buffer writes `hold_order_done` through shared memory, with atomic
/// stores, while the programs read it.
pub const MAP_MMAPABLE: usize = 1 << 10;

/// Value of the per-CPU `hold_seq` array, by hold queue: how many frames this CPU's program
/// runs have handed to the hold path for the queue. A held frame's tickets are the values
/// before its own increments. One CPU's hand-over reaches the buffer's socket in order (its
/// backlog and the socket's ring are FIFOs), so a gap in a CPU's tickets is a frame lost on the
/// way, known at once and exactly, order frames among them included.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HoldSeq {
    /// Every frame held for the queue (Type-3 and for order).
    pub all: u64,
    /// Frames held only for order ([`HOLD_FOR_ORDER`]), also counted, all CPUs together, in
    /// the shared `hold_order_issued`. While the buffer has not finished with all of them
    /// (`hold_order_done` below `hold_order_issued`), newer Type-1/2 frames to the queue are
    /// held too: a frame held in the instant its receiver's draining flag cleared keeps every
    /// later one behind it, so none overtakes it (case P2).
    pub order: u64,
}
const _: () = assert!(size_of::<HoldSeq>() == 16);

/// The EtherType of a [`HoldHeader`]: IEEE 802 "local experimental 1". Frames on the hold
/// device carry it in front, so the buffer's socket takes exactly them (and `tcpdump -i
/// <hold device> ether proto 0x88b5` shows them) and nothing on the way parses a held frame's
/// own headers at the wrong offset.
pub const HOLD_ETHER_TYPE: u16 = 0x88B5;

/// [`HoldHeader::flags`]: the frame was held only to keep order (`held_for_order`), not as a
/// Type-3 frame.
pub const HOLD_FOR_ORDER: u16 = 1;
/// [`HoldHeader::flags`]: held by the XDP port program. The frame reached the hold path as raw
/// bytes, its offload state lost: a checksum it left to offload is not finished (the buffer
/// finishes TCP/UDP checksums of such frames before re-injecting them).
pub const HOLD_FROM_XDP: u16 = 2;
/// [`HoldHeader::flags`]: not held but recorded: a copy of a frame delivered to a group member
/// after its cut that its sender sent before its own (its color is below the receiver's
/// epoch): the channel state of the snapshot (invariant 7 in docs/design.md). The receiver got
/// the frame already; the buffer keeps this copy for the snapshot, and `queue`, `port` and
/// `ifindex` name the receiver's port.
pub const HOLD_RECORD: u16 = 4;

/// What the port programs put in front of every frame they hand to the hold path: an Ethernet
/// header of [`HOLD_ETHER_TYPE`] (addresses zero), then what the buffer must know about the
/// frame and cannot read from it:
/// - the color it was classified with: the buffer releases the frame by that color, never by
///   its own view of the sender, which may lag (the sender may have advanced after the frame
///   left, before the buffer heard of it: case P1 of the datapath review);
/// - the outer VLAN tag, which at tc ingress the kernel has moved from the frame's bytes into
///   the skb's metadata (case F3): the buffer puts it back before re-injecting.
///
/// Stripped before re-injection. Numbers in native byte order (it never leaves the host),
/// except the EtherType.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldHeader {
    /// The sender's epoch as the program saw it.
    pub color: u32,
    /// The sender's group's [`GroupState::aborts`] as the program saw it.
    pub aborts: u32,
    /// The CPU whose program run held it.
    pub cpu: u32,
    /// Its place among the frames that CPU held for its queue: [`HoldSeq::all`] before the
    /// program counted it.
    pub ticket: u64,
    /// [`HoldSeq::order`] before the program counted it (the order frames before it).
    pub order_ticket: u64,
    /// Its hold queue ([`receiver_queue`], [`group_queue`]).
    pub queue: u32,
    /// The counter slot of the port it entered the host on (its sender's; 0: the port has
    /// none): it is re-injected there, so the bridge forwards it as it would have (see
    /// [`REINJECT_MARK`]).
    pub port: u32,
    /// That port's ifindex: the buffer re-injects only while the slot still names it (a
    /// slot freed meanwhile may have been given to another port).
    pub ifindex: u32,
    /// [`HOLD_FOR_ORDER`], [`HOLD_FROM_XDP`].
    pub flags: u16,
    /// The outer VLAN tag's TPID (0x8100, 0x88a8) when the kernel had taken it out of the
    /// frame's bytes; 0: none (any tag is still in the bytes).
    pub vlan_proto: u16,
    /// That tag's TCI (priority, DEI, VLAN id).
    pub vlan_tci: u16,
}

impl HoldHeader {
    pub const LEN: usize = 56;

    pub const fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        // In the source address of the Ethernet header, which nothing reads.
        let x = self.ifindex.to_ne_bytes();
        b[6] = x[0];
        b[7] = x[1];
        b[8] = x[2];
        b[9] = x[3];
        let et = HOLD_ETHER_TYPE.to_be_bytes();
        b[12] = et[0];
        b[13] = et[1];
        let f = self.flags.to_ne_bytes();
        b[14] = f[0];
        b[15] = f[1];
        let p = self.vlan_proto.to_ne_bytes();
        b[16] = p[0];
        b[17] = p[1];
        let t = self.vlan_tci.to_ne_bytes();
        b[18] = t[0];
        b[19] = t[1];
        let c = self.color.to_ne_bytes();
        let a = self.aborts.to_ne_bytes();
        let u = self.cpu.to_ne_bytes();
        let mut i = 0;
        while i < 4 {
            b[20 + i] = c[i];
            b[24 + i] = a[i];
            b[28 + i] = u[i];
            i += 1;
        }
        let k = self.ticket.to_ne_bytes();
        let o = self.order_ticket.to_ne_bytes();
        let mut i = 0;
        while i < 8 {
            b[32 + i] = k[i];
            b[40 + i] = o[i];
            i += 1;
        }
        let q = self.queue.to_ne_bytes();
        let p = self.port.to_ne_bytes();
        let mut i = 0;
        while i < 4 {
            b[48 + i] = q[i];
            b[52 + i] = p[i];
            i += 1;
        }
        b
    }

    /// The header and the frame behind it; `None` when too short or not a hold header.
    pub fn split(bytes: &[u8]) -> Option<(HoldHeader, &[u8])> {
        let (h, frame) = bytes.split_at_checked(Self::LEN)?;
        if u16::from_be_bytes([h[12], h[13]]) != HOLD_ETHER_TYPE {
            return None;
        }
        let u16_at = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_ne_bytes(b)
        };
        Some((
            HoldHeader {
                color: u32_at(20),
                aborts: u32_at(24),
                cpu: u32_at(28),
                queue: u32_at(48),
                port: u32_at(52),
                ifindex: u32_at(6),
                ticket: u64_at(32),
                order_ticket: u64_at(40),
                flags: u16_at(14),
                vlan_proto: u16_at(16),
                vlan_tci: u16_at(18),
            },
            frame,
        ))
    }
}

/// `skb->mark` bit of a frame the buffer re-injects into the port it came in on: the port
/// program passes it on without classifying or counting it again (it was when it was held)
/// and clears the bit. Only `enforcer_inject` sets it, and a VM cannot: its frames enter with
/// no mark, and VXLAN-GBP decapsulation sets only a mark's low 16 bits ([`crate::wire`]) and
/// two flag bits (19, 22).
///
/// How a frame gets there: the buffer sends it out of the socket side of the hold device with
/// `SO_MARK` = [`inject_mark`] (the counter slot of the port it came in on, and its wire
/// color); `enforcer_inject`, on the hold device's ingress, looks the port up in `slot_ports`
/// and redirects the frame into that port's ingress, its mark the wire color | this bit. The
/// frame itself is not touched (a GSO super-frame stays one; the mark is all that crosses a
/// veth untouched). So a held frame meets the bridge where it would have — its forwarding
/// database, isolated ports, VLAN filtering, link-local groups, nft bridge rules, the host and
/// the ports outside the group — instead of being written straight to its receiver's port
/// (cases R2 and R3 of the datapath review).
pub const REINJECT_MARK: u32 = 0x4000_0000;
/// `skb->mark` bit of the copy `enforcer_record` delivers to a receiver whose frame it records:
/// the record program, which runs again on the copy, clears it and passes the copy on.
pub const RECORD_COPY_MARK: u32 = 0x2000_0000;
/// [`inject_mark`]: a port slot is named (bits 16-25).
const INJECT_VIA: u32 = 0x0800_0000;
/// [`inject_mark`]: the tc port program runs on the ports and clears [`REINJECT_MARK`] again
/// (with XDP on the ports nothing would, so the bit is not set).
const INJECT_TC: u32 = 0x0400_0000;

/// The mark a re-injected frame leaves the buffer with: the counter slot of the port it
/// re-enters (`< MAX_PORTS`), the low 16 bits of the mark it gets there, and whether the tc
/// port program runs there.
pub const fn inject_mark(slot: u32, mark: u32, tc: bool) -> u32 {
    INJECT_VIA | if tc { INJECT_TC } else { 0 } | ((slot & (MAX_PORTS - 1)) << 16) | (mark & 0xffff)
}

/// The port slot, the mark and the tc flag [`inject_mark`] put in `mark`; `None` when it
/// names none.
pub const fn inject_target(mark: u32) -> Option<(u32, u32, bool)> {
    if mark & INJECT_VIA == 0 {
        return None;
    }
    Some((
        (mark >> 16) & (MAX_PORTS - 1),
        mark & 0xffff,
        mark & INJECT_TC != 0,
    ))
}

/// `VmEpoch::flags` / `GroupState::flags`: the buffer daemon is still re-injecting frames held
/// for this receiver (group), so newer frames to it are held too and cannot overtake them.
pub const FLAG_DRAINING: u32 = 1;
/// `VmEpoch::flags`: the VM runs on another host. Its entry is this host's view of its epoch
/// (it may lag, never lead) and its `ifindex` is the overlay port its frames arrive on.
pub const FLAG_REMOTE: u32 = 2;

/// `port_slots` keys with this bit hold the counter slots of VMs on other hosts (`key & !bit`
/// is the slot); an ifindex never has it.
pub const REMOTE_SLOT_KEY: u32 = 0x8000_0000;

/// Size in bytes of the `learned` ring buffer (a power of two, a multiple of the page size).
pub const LEARNED_RING_BYTES: u32 = 64 * 1024;

/// An entry of the `learned` ring buffer: a frame from another host carried a color above this
/// host's view of its sender, so the view may rise to `epoch`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LearnedEpoch {
    pub mac: MacKey,
    pub epoch: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<LearnedEpoch>() == 16);

/// An Ethernet address as a map key, padded to 8 bytes so the key has no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MacKey {
    pub addr: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<MacKey>() == 8);

impl MacKey {
    pub const fn new(addr: [u8; 6]) -> Self {
        Self { addr, _pad: [0; 2] }
    }

    /// Group bit set: broadcast or multicast destination.
    pub const fn is_multicast(&self) -> bool {
        self.addr[0] & 1 == 1
    }
}

/// Value of the `epochs` map, keyed by the VM's MAC: the VM's current epoch as this host sees
/// it, the group it belongs to and the ifindex of the switch port it sends from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VmEpoch {
    pub epoch: u32,
    pub group: u32,
    /// Host-side ifindex of the VM's port; a frame with this source MAC arriving on another port
    /// is a foreign (spoofed) source.
    pub ifindex: u32,
    /// Counter slot of that port (`port_stats` index): the hot path counts without a lookup.
    pub slot: u32,
    /// [`FLAG_DRAINING`] while held frames to this VM are being re-injected.
    pub flags: u32,
    /// For a view of a VM on another host ([`FLAG_REMOTE`]): the highest epoch the coordinator
    /// has announced the VM may reach (the snapshot it is taking, or the VM's epoch when none
    /// is). A frame whose wire color is above it cannot come from the VM: it is forged, and
    /// teaches nothing ([`VmEpoch::may_carry`]). Unused (0) for this host's own VMs.
    pub ceiling: u32,
}
const _: () = assert!(size_of::<VmEpoch>() == 24);

impl VmEpoch {
    /// The entry is this host's view of a VM on another host ([`FLAG_REMOTE`]).
    pub const fn is_remote(&self) -> bool {
        self.flags & FLAG_REMOTE != 0
    }

    /// Held frames to this VM are being re-injected ([`FLAG_DRAINING`]).
    pub const fn is_draining(&self) -> bool {
        self.flags & FLAG_DRAINING != 0
    }

    /// Whether a frame of this VM may carry `color`: never above what the coordinator has
    /// announced ([`VmEpoch::ceiling`]), nor above the view itself (a view rose only to values
    /// the VM had). Any color of this host's own VMs (it is their epoch, not a wire value).
    pub const fn may_carry(&self, color: u32) -> bool {
        !self.is_remote() || color <= self.epoch || color <= self.ceiling
    }
}

/// Entries of the `epoch_cache` array: a direct-mapped copy of `epochs`, so the hot path finds
/// a VM with an array lookup (inlined by the verifier) instead of a hash lookup.
pub const EPOCH_CACHE_SIZE: u32 = 4096;
/// `CachedVm::state`: the entry holds a VM.
pub const CACHE_OCCUPIED: u32 = 1;
/// `CachedVm::state`: another VM with the same index lives only in `epochs`: on a miss, look
/// there.
pub const CACHE_OVERFLOW: u32 = 2;

/// Where a MAC sits in `epoch_cache`: its three 16-bit words xor-folded, masked to the size.
#[inline(always)]
pub const fn cache_index(mac: &MacKey) -> u32 {
    let a = mac.addr;
    let folded = u16::from_be_bytes([a[0], a[1]])
        ^ u16::from_be_bytes([a[2], a[3]])
        ^ u16::from_be_bytes([a[4], a[5]]);
    folded as u32 & (EPOCH_CACHE_SIZE - 1)
}

/// Value of the `epoch_cache` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CachedVm {
    pub mac: MacKey,
    pub vm: VmEpoch,
    /// [`CACHE_OCCUPIED`] | [`CACHE_OVERFLOW`].
    pub state: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CachedVm>() == 40);

/// Value of the `ports` map, keyed by ifindex: which VM is registered on the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortVm {
    pub mac: MacKey,
    pub group: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PortVm>() == 16);

/// Value of the `groups` map, keyed by group id. `min_epoch` is the smallest epoch of any
/// member: a broadcast/multicast frame coloured above it would reach a pre-snapshot member.
/// Userspace writes it after the members' epochs, so it may lag the truth but never lead it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GroupState {
    pub min_epoch: u32,
    pub members: u32,
    /// [`FLAG_DRAINING`] while held broadcast/multicast frames of the group are re-injected.
    pub flags: u32,
    /// How many times this host rolled the group back (aborted a snapshot), written after the
    /// members' epochs. A held frame carries the count it was classified under
    /// ([`HoldHeader::aborts`]): one from before the last abort is an ordinary frame, whatever
    /// its color.
    pub aborts: u32,
}
const _: () = assert!(size_of::<GroupState>() == 16);

impl GroupState {
    /// Held broadcast/multicast frames of the group are being re-injected ([`FLAG_DRAINING`]).
    pub const fn is_draining(&self) -> bool {
        self.flags & FLAG_DRAINING != 0
    }
}

/// What the datapath does with a Type-3 frame: the one Type-3 mode type, stored in the
/// `config` map as its `u32` value and shown by name (`buffer`, `drop`, `monitor`) in the API
/// and on the command line (serde and clap derives behind the `serde` and `clap` features).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Type3Mode {
    /// Hold the frame and re-inject it after the receiver advances (the AF_XDP buffer). While
    /// no buffer socket serves the port the frame is dropped and counted as `type3_unbuffered`.
    #[default]
    Buffer = 0,
    /// Drop the frame, counted as `type3_dropped` (the receiver's TCP retransmits it later).
    Drop = 1,
    /// Deliver it but count it: for observing a workload, gives no consistency.
    Monitor = 2,
}

impl Type3Mode {
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Buffer),
            1 => Some(Self::Drop),
            2 => Some(Self::Monitor),
            _ => None,
        }
    }

    /// The mode's name, as the API and the command line spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Buffer => "buffer",
            Self::Drop => "drop",
            Self::Monitor => "monitor",
        }
    }
}

impl core::fmt::Display for Type3Mode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(self.name())
    }
}

/// The single entry of the `config` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// A [`Type3Mode`] as u32; an unknown value is treated as `Drop` (the safe side).
    pub type3_mode: u32,
    /// ifindex the datapath redirects held frames to (the hold device, whose XDP program feeds
    /// the buffer daemon's AF_XDP socket); 0 while no buffer daemon runs.
    pub hold_ifindex: u32,
}
const _: () = assert!(size_of::<DatapathConfig>() == 8);

/// Frames and bytes of one outcome.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub frames: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

impl Counter {
    pub fn add(&mut self, other: &Counter) {
        self.frames += other.frames;
        self.bytes += other.bytes;
    }
}

/// Value of the per-CPU `port_stats` array, indexed by the port's slot (`port_slots` maps
/// ifindex → slot): one counter per [`Outcome`].
/// Named fields so `bpftool map dump` prints what each number means.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortCounters {
    /// Type-1 (color == receiver epoch): delivered.
    pub type1: Counter,
    /// Type-2 (color < receiver epoch): delivered.
    pub type2: Counter,
    /// Type-3 handed to the buffer daemon to be held.
    pub type3_held: Counter,
    /// Type-3 dropped because the mode is `drop`.
    pub type3_dropped: Counter,
    /// Type-3 dropped because the mode is `buffer` but no buffer socket serves the port.
    pub type3_unbuffered: Counter,
    /// Type-3 delivered because the mode is `monitor`.
    pub type3_monitored: Counter,
    /// Sender in a group, destination outside it (unknown MAC or another group): delivered.
    pub outside_group: Counter,
    /// No VM registered on the port and the source is no known VM: delivered, not enforced.
    pub unregistered: Counter,
    /// Source MAC is not the VM registered on this port: dropped.
    pub foreign_source: Counter,
    /// Shorter than an Ethernet header, or a truncated VLAN tag: dropped.
    pub malformed: Counter,
    /// Type-1/2 to a receiver whose held frames are still being re-injected: held behind
    /// them so it cannot overtake them, then delivered.
    pub held_for_order: Counter,
    /// From a VM on another host with a wire color above what the coordinator announced it
    /// may reach ([`VmEpoch::may_carry`]): forged, dropped, nothing learned from it.
    pub forged_color: Counter,
}
const _: () = assert!(size_of::<PortCounters>() == 12 * size_of::<Counter>());

impl PortCounters {
    pub fn counter_mut(&mut self, outcome: Outcome) -> &mut Counter {
        match outcome {
            Outcome::Type1 => &mut self.type1,
            Outcome::Type2 => &mut self.type2,
            Outcome::Type3Held => &mut self.type3_held,
            Outcome::Type3Dropped => &mut self.type3_dropped,
            Outcome::Type3Unbuffered => &mut self.type3_unbuffered,
            Outcome::Type3Monitored => &mut self.type3_monitored,
            Outcome::OutsideGroup => &mut self.outside_group,
            Outcome::Unregistered => &mut self.unregistered,
            Outcome::ForeignSource => &mut self.foreign_source,
            Outcome::Malformed => &mut self.malformed,
            Outcome::HeldForOrder => &mut self.held_for_order,
            Outcome::ForgedColor => &mut self.forged_color,
        }
    }

    pub fn counter(&self, outcome: Outcome) -> &Counter {
        match outcome {
            Outcome::Type1 => &self.type1,
            Outcome::Type2 => &self.type2,
            Outcome::Type3Held => &self.type3_held,
            Outcome::Type3Dropped => &self.type3_dropped,
            Outcome::Type3Unbuffered => &self.type3_unbuffered,
            Outcome::Type3Monitored => &self.type3_monitored,
            Outcome::OutsideGroup => &self.outside_group,
            Outcome::Unregistered => &self.unregistered,
            Outcome::ForeignSource => &self.foreign_source,
            Outcome::Malformed => &self.malformed,
            Outcome::HeldForOrder => &self.held_for_order,
            Outcome::ForgedColor => &self.forged_color,
        }
    }

    /// Adds another CPU's (or port's) counters into these.
    pub fn add(&mut self, other: &PortCounters) {
        for outcome in Outcome::ALL {
            self.counter_mut(outcome).add(other.counter(outcome));
        }
    }

    /// Every frame the program saw on the port, whatever happened to it.
    pub fn total_frames(&self) -> u64 {
        Outcome::ALL.iter().map(|o| self.counter(*o).frames).sum()
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: each type is #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields (asserted sizes above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for MacKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VmEpoch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortVm {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CachedVm {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GroupState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DatapathConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LearnedEpoch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HoldSeq {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_header_reads_back_what_was_written_and_nothing_else() {
        let header = HoldHeader {
            color: 7,
            aborts: 3,
            ticket: (5 << 32) | 9,
            order_ticket: 4,
            cpu: 1,
            queue: 1030,
            port: 77,
            ifindex: 0x1234_5678,
            flags: HOLD_FOR_ORDER,
            vlan_proto: 0x8100,
            vlan_tci: 0x2064,
        };
        let mut bytes = header.to_bytes().to_vec();
        assert_eq!(
            &bytes[12..14],
            &[0x88, 0xb5],
            "an Ethernet header of its own type"
        );
        bytes.extend_from_slice(b"frame");
        assert_eq!(HoldHeader::split(&bytes), Some((header, &b"frame"[..])));
        // Anything else on the hold device is not a held frame.
        bytes[13] = 0;
        assert_eq!(HoldHeader::split(&bytes), None);
        assert_eq!(HoldHeader::split(&[0; HoldHeader::LEN - 1]), None);
    }

    #[test]
    fn the_reinject_bit_is_out_of_the_overlays_reach() {
        assert_eq!(REINJECT_MARK & 0xffff, 0, "out of the overlay's 16 bits");
        assert_eq!(MAX_PORTS, 1024, "a slot takes bits 16-25");
        for (slot, mark, tc) in [(1, 0x8003, true), (1023, 0xffff, false), (0, 0, true)] {
            let m = inject_mark(slot, mark, tc);
            assert_eq!(inject_target(m), Some((slot, mark, tc)));
            assert_eq!(m & REINJECT_MARK, 0);
        }
        assert_eq!(inject_target(0x8003), None, "a color alone names no port");
    }
}
