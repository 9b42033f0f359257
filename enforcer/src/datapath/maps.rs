//! Typed access to the pinned maps: the VM, port and group tables (the [`EpochStore`] the
//! epoch rules run on, with `epoch_cache` kept in step), the config, the port counters and
//! slots, and the hold path's counters and totals. Every map is read and written here and
//! nowhere else in userspace.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf};
use enforcer_common::{
    CACHE_OCCUPIED, CACHE_OVERFLOW, CachedVm, DatapathConfig, EPOCH_CACHE_SIZE, GroupState,
    HOLD_QUEUES, HoldKernel, HoldSeq, HoldTotal, MAX_PORTS, MacKey, PortCounters, PortVm,
    REMOTE_SLOT_KEY, Type3Mode, UNATTRIBUTED_SLOT, VmEpoch, cache_index, names,
};
use tracing::info;

use super::{
    epochs::EpochStore,
    load::{Datapath, DatapathError},
};

/// The buffer's pinned totals, indexed by [`HoldTotal::index`].
pub type HoldTotals = [u64; HoldTotal::ENTRIES as usize];

impl Datapath {
    fn epoch_cache_map(&mut self) -> Result<Array<&mut MapData, CachedVm>, DatapathError> {
        Ok(Array::try_from(self.map(names::EPOCH_CACHE)?)?)
    }

    /// Rewrites `epoch_cache` from `epochs` (at start: the cache may predate this daemon).
    pub(super) fn rebuild_epoch_cache(&mut self) -> Result<(), DatapathError> {
        let vms = EpochStore::vms(self)?;
        let mut entries = vec![CachedVm::default(); EPOCH_CACHE_SIZE as usize];
        for (mac, vm) in vms {
            let e = &mut entries[cache_index(&mac) as usize];
            if e.state & CACHE_OCCUPIED == 0 {
                *e = CachedVm {
                    mac,
                    vm,
                    state: CACHE_OCCUPIED | (e.state & CACHE_OVERFLOW),
                    _pad: 0,
                };
            } else {
                e.state |= CACHE_OVERFLOW;
            }
        }
        let mut cache = self.epoch_cache_map()?;
        for (i, e) in entries.into_iter().enumerate() {
            cache.set(i as u32, e, 0)?;
        }
        Ok(())
    }

    /// Keeps the cache entry of `mac`'s index in step with `epochs` after a change to `mac`.
    fn sync_epoch_cache(&mut self, mac: &MacKey, vm: Option<VmEpoch>) -> Result<(), DatapathError> {
        let index = cache_index(mac);
        let entry = self.epoch_cache_map()?.get(&index, 0)?;
        let occupant = entry.state & CACHE_OCCUPIED != 0;
        let new = match vm {
            Some(vm) if !occupant || entry.mac == *mac => CachedVm {
                mac: *mac,
                vm,
                state: CACHE_OCCUPIED | (entry.state & CACHE_OVERFLOW),
                _pad: 0,
            },
            // Another VM holds the slot: this one lives in `epochs` only.
            Some(_) => CachedVm {
                state: entry.state | CACHE_OVERFLOW,
                ..entry
            },
            None if occupant && entry.mac != *mac && entry.state & CACHE_OVERFLOW == 0 => {
                return Ok(());
            }
            // Removed (or the overflow set changed): rebuild this index from `epochs`.
            None => {
                let same: Vec<(MacKey, VmEpoch)> = EpochStore::vms(self)?
                    .into_iter()
                    .filter(|(m, _)| cache_index(m) == index)
                    .collect();
                let keep = same
                    .iter()
                    .find(|(m, _)| occupant && *m == entry.mac)
                    .or(same.first());
                match keep {
                    Some((m, v)) => CachedVm {
                        mac: *m,
                        vm: *v,
                        state: CACHE_OCCUPIED | if same.len() > 1 { CACHE_OVERFLOW } else { 0 },
                        _pad: 0,
                    },
                    None => CachedVm::default(),
                }
            }
        };
        if new != entry {
            self.epoch_cache_map()?.set(index, new, 0)?;
        }
        Ok(())
    }

    /// The counter slot of a port, allocating the lowest free one (with zeroed counters) if it
    /// has none. Slots live in the pinned `port_slots` map, so a restarted daemon keeps them.
    pub fn ensure_port_slot(&mut self, ifindex: u32) -> Result<u32, DatapathError> {
        let slots = self.port_slots_map()?;
        if let Ok(slot) = slots.get(&ifindex, 0) {
            return Ok(slot);
        }
        let used: Result<Vec<(u32, u32)>, MapError> = slots.iter().collect();
        let used: Vec<u32> = used?.into_iter().map(|(_, slot)| slot).collect();
        let slot = (UNATTRIBUTED_SLOT + 1..MAX_PORTS)
            .find(|s| !used.contains(s))
            .ok_or(DatapathError::NoFreeSlot(MAX_PORTS - 1))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::IoError(e))?;
        let zero = PerCpuValues::try_from(vec![PortCounters::default(); cpus])
            .map_err(MapError::IoError)?;
        self.port_stats_map()?.set(slot, zero, 0)?;
        self.port_slots_map()?.insert(ifindex, slot, 0)?;
        // A VM on another host's counter slot names no port of this host to re-enter.
        self.set_slot_port(
            slot,
            if ifindex & REMOTE_SLOT_KEY == 0 {
                ifindex
            } else {
                0
            },
        )?;
        Ok(slot)
    }

    /// `slot_ports[slot]` = `ifindex` (0: the slot is free): where a frame re-injected at
    /// that port's slot re-enters (see `enforcer_common::REINJECT_MARK`).
    pub(super) fn set_slot_port(&mut self, slot: u32, ifindex: u32) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, u32> = Array::try_from(self.map(names::SLOT_PORTS)?)?;
        map.set(slot, ifindex, 0)?;
        Ok(())
    }

    /// Rewrites `slot_ports` from `port_slots` (at start: it may predate this daemon).
    pub(super) fn rebuild_slot_ports(&mut self) -> Result<(), DatapathError> {
        let slots: Result<Vec<(u32, u32)>, MapError> = self.port_slots_map()?.iter().collect();
        let mut ports = vec![0u32; MAX_PORTS as usize];
        for (key, slot) in slots? {
            if key & REMOTE_SLOT_KEY == 0
                && let Some(p) = ports.get_mut(slot as usize)
            {
                *p = key;
            }
        }
        for (slot, ifindex) in ports.into_iter().enumerate() {
            self.set_slot_port(slot as u32, ifindex)?;
        }
        Ok(())
    }

    /// The ring of colors learned from other hosts' frames; its one consumer takes it.
    pub fn take_learned_ring(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map(names::LEARNED)
            .ok_or(DatapathError::MissingMap(names::LEARNED))?;
        Ok(RingBuf::try_from(map)?)
    }

    pub(super) fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))
    }

    fn epochs_map(&mut self) -> Result<HashMap<&mut MapData, MacKey, VmEpoch>, DatapathError> {
        Ok(HashMap::try_from(self.map(names::EPOCHS)?)?)
    }

    fn ports_map(&mut self) -> Result<HashMap<&mut MapData, u32, PortVm>, DatapathError> {
        Ok(HashMap::try_from(self.map(names::PORTS)?)?)
    }

    fn groups_map(&mut self) -> Result<HashMap<&mut MapData, u32, GroupState>, DatapathError> {
        Ok(HashMap::try_from(self.map(names::GROUPS)?)?)
    }

    fn config_map(&mut self) -> Result<Array<&mut MapData, DatapathConfig>, DatapathError> {
        Ok(Array::try_from(self.map(names::CONFIG)?)?)
    }

    pub(super) fn port_slots_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, u32, u32>, DatapathError> {
        Ok(HashMap::try_from(self.map(names::PORT_SLOTS)?)?)
    }

    fn port_stats_map(&mut self) -> Result<PerCpuArray<&mut MapData, PortCounters>, DatapathError> {
        Ok(PerCpuArray::try_from(self.map(names::PORT_STATS)?)?)
    }

    pub fn type3_mode(&mut self) -> Result<Type3Mode, DatapathError> {
        let raw = self.config_map()?.get(&0, 0)?.type3_mode;
        Type3Mode::from_raw(raw).ok_or(DatapathError::BadMode(raw))
    }

    pub fn set_type3_mode(&mut self, mode: Type3Mode) -> Result<(), DatapathError> {
        let mut config = self.config_map()?.get(&0, 0)?;
        config.type3_mode = mode as u32;
        self.config_map()?.set(0, config, 0)?;
        info!(?mode, "Type-3 mode set");
        Ok(())
    }

    /// Where held frames go: the hold device's ifindex, or 0 (no buffer: Type-3 frames are
    /// dropped and counted as `type3_unbuffered`).
    pub fn set_hold_ifindex(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let mut config = self.config_map()?.get(&0, 0)?;
        config.hold_ifindex = ifindex;
        self.config_map()?.set(0, config, 0)?;
        Ok(())
    }

    pub fn hold_ifindex(&mut self) -> Result<u32, DatapathError> {
        Ok(self.config_map()?.get(&0, 0)?.hold_ifindex)
    }

    /// Frames the hold path lost in the kernel for this reason, summed over CPUs.
    pub fn hold_kernel(&mut self, reason: HoldKernel) -> Result<u64, DatapathError> {
        self.per_cpu_sum(names::HOLD_KERNEL, reason.index())
    }

    /// Sets `record_skip[slot]`: while on, `enforcer_record` leaves the receiver's frames to
    /// the daemon, which takes them from the receiver's queue at its cut.
    pub fn set_record_skip(&mut self, slot: u32, on: bool) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, u32> = Array::try_from(self.map(names::RECORD_SKIP)?)?;
        map.set(slot, u32::from(on), 0)?;
        Ok(())
    }

    /// What each CPU's programs handed to the hold path for hold queue `queue` (`hold_seq`),
    /// indexed by CPU. Read twice until both reads agree, so no pair is torn by a program
    /// run counting at the same moment.
    pub fn hold_seq(&mut self, queue: u32) -> Result<Vec<HoldSeq>, DatapathError> {
        let array: PerCpuArray<&mut MapData, HoldSeq> =
            PerCpuArray::try_from(self.map(names::HOLD_SEQ)?)?;
        let mut last = array.get(&queue, 0)?.to_vec();
        loop {
            let now = array.get(&queue, 0)?.to_vec();
            if now == last {
                return Ok(now);
            }
            last = now;
        }
    }

    /// [`Datapath::hold_seq`] of every queue with anything handed over: (queue, per CPU).
    pub fn hold_seqs(&mut self) -> Result<Vec<(u32, Vec<HoldSeq>)>, DatapathError> {
        let mut out = Vec::new();
        for queue in 0..HOLD_QUEUES {
            let seq = self.hold_seq(queue)?;
            if seq.iter().any(|s| *s != HoldSeq::default()) {
                out.push((queue, seq));
            }
        }
        Ok(out)
    }

    /// Frames held for order, all CPUs together, by hold queue (`hold_order_issued`).
    pub fn hold_order_issued(&mut self) -> Result<Vec<u64>, DatapathError> {
        let array: Array<&mut MapData, u64> = Array::try_from(self.map(names::HOLD_ORDER_ISSUED)?)?;
        (0..array.len()).map(|i| Ok(array.get(&i, 0)?)).collect()
    }

    /// `slot_ports`, mapped into this process for reading (see [`SlotPorts`]).
    pub fn slot_ports(&mut self) -> Result<SlotPorts, DatapathError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let aya::maps::Map::Array(map) = self.map(names::SLOT_PORTS)? else {
            return Err(DatapathError::MissingMap(names::SLOT_PORTS));
        };
        let fd = map.fd().as_fd().as_raw_fd();
        SlotPorts::map(fd).map_err(|e| DatapathError::Link {
            port: names::SLOT_PORTS.into(),
            detail: format!("mapping the array: {e}"),
        })
    }

    /// `hold_order_done`, mapped into this process: the buffer writes it with atomic stores
    /// while the programs read it (see [`OrderDone`]).
    pub fn hold_order_done(&mut self) -> Result<OrderDone, DatapathError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let aya::maps::Map::Array(map) = self.map(names::HOLD_ORDER_DONE)? else {
            return Err(DatapathError::MissingMap(names::HOLD_ORDER_DONE));
        };
        let fd = map.fd().as_fd().as_raw_fd();
        OrderDone::map(fd).map_err(|e| DatapathError::Link {
            port: names::HOLD_ORDER_DONE.into(),
            detail: format!("mapping the array: {e}"),
        })
    }

    /// Sum over CPUs of a per-CPU u64 array entry (hold counters).
    fn per_cpu_sum(&mut self, map: &'static str, index: u32) -> Result<u64, DatapathError> {
        let array: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(map)?)?;
        Ok(array.get(&index, 0)?.iter().sum())
    }

    /// The buffer daemon's pinned totals, indexed by [`HoldTotal::index`].
    pub fn hold_totals(&mut self) -> Result<HoldTotals, DatapathError> {
        let array: Array<&mut MapData, u64> = Array::try_from(self.map(names::HOLD_TOTALS)?)?;
        let mut out = [0; HoldTotal::ENTRIES as usize];
        for (i, v) in out.iter_mut().enumerate().take(array.len() as usize) {
            *v = array.get(&(i as u32), 0)?;
        }
        Ok(out)
    }

    pub fn set_hold_totals(&mut self, totals: &HoldTotals) -> Result<(), DatapathError> {
        let mut array: Array<&mut MapData, u64> = Array::try_from(self.map(names::HOLD_TOTALS)?)?;
        for (i, v) in totals.iter().enumerate() {
            array.set(i as u32, *v, 0)?;
        }
        Ok(())
    }

    /// Per-port counters by ifindex, summed over CPUs. Frames seen on ports without a slot
    /// (not attached by this daemon) appear under ifindex 0 when there are any.
    pub fn port_stats(&mut self) -> Result<BTreeMap<u32, PortCounters>, DatapathError> {
        let slots: Result<Vec<(u32, u32)>, MapError> = self.port_slots_map()?.iter().collect();
        let mut slots = slots?;
        slots.push((0, UNATTRIBUTED_SLOT));
        let stats = self.port_stats_map()?;
        let mut out = BTreeMap::new();
        for (ifindex, slot) in slots {
            let mut total = PortCounters::default();
            for cpu in stats.get(&slot, 0)?.iter() {
                total.add(cpu);
            }
            if ifindex != 0 || total.total_frames() > 0 {
                out.insert(ifindex, total);
            }
        }
        Ok(out)
    }
}

impl EpochStore for Datapath {
    type Error = DatapathError;

    fn vm(&mut self, mac: &MacKey) -> Result<Option<VmEpoch>, DatapathError> {
        match self.epochs_map()?.get(mac, 0) {
            Ok(vm) => Ok(Some(vm)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn vms(&mut self) -> Result<Vec<(MacKey, VmEpoch)>, DatapathError> {
        let map = self.epochs_map()?;
        let vms: Result<Vec<_>, MapError> = map.iter().collect();
        Ok(vms?)
    }

    fn put_vm(&mut self, mac: MacKey, vm: VmEpoch) -> Result<(), DatapathError> {
        // The hash first, then its cache: both only ever move forward together.
        self.epochs_map()?.insert(mac, vm, 0)?;
        self.sync_epoch_cache(&mac, Some(vm))
    }

    fn remove_vm(&mut self, mac: &MacKey) -> Result<(), DatapathError> {
        self.epochs_map()?.remove(mac)?;
        self.sync_epoch_cache(mac, None)
    }

    fn port(&mut self, ifindex: u32) -> Result<Option<PortVm>, DatapathError> {
        match self.ports_map()?.get(&ifindex, 0) {
            Ok(port) => Ok(Some(port)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn port_slot(&mut self, ifindex: u32) -> Result<Option<u32>, DatapathError> {
        match self.port_slots_map()?.get(&ifindex, 0) {
            Ok(slot) => Ok(Some(slot)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn put_port(&mut self, ifindex: u32, port: PortVm) -> Result<(), DatapathError> {
        Ok(self.ports_map()?.insert(ifindex, port, 0)?)
    }

    fn remove_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        match self.ports_map()?.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn group(&mut self, group: u32) -> Result<Option<GroupState>, DatapathError> {
        match self.groups_map()?.get(&group, 0) {
            Ok(g) => Ok(Some(g)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn put_group(&mut self, group: u32, state: GroupState) -> Result<(), DatapathError> {
        Ok(self.groups_map()?.insert(group, state, 0)?)
    }

    fn remove_group(&mut self, group: u32) -> Result<(), DatapathError> {
        match self.groups_map()?.remove(&group) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn alloc_remote_slot(&mut self) -> Result<Option<u32>, DatapathError> {
        match self.ensure_port_slot(REMOTE_SLOT_KEY) {
            Ok(slot) => {
                // Re-key it: the slot number is in the key, so the VM's entry finds it again.
                let slots = &mut self.port_slots_map()?;
                slots.remove(&REMOTE_SLOT_KEY)?;
                slots.insert(REMOTE_SLOT_KEY | slot, slot, 0)?;
                Ok(Some(slot))
            }
            Err(DatapathError::NoFreeSlot(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn free_remote_slot(&mut self, slot: u32) -> Result<(), DatapathError> {
        match self.port_slots_map()?.remove(&(REMOTE_SLOT_KEY | slot)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.set_slot_port(slot, 0)
    }
}

/// `hold_order_done` mapped into this process (`BPF_F_MMAPABLE`): one `u64` per hold queue,
/// stored atomically, so a program run never reads a half-written count. The mapping keeps the
/// map alive; it is unmapped on drop.
pub struct OrderDone {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory of atomics; it is used through `&self` only with
// atomic operations.
unsafe impl Send for OrderDone {}

impl OrderDone {
    fn map(fd: std::os::fd::RawFd) -> std::io::Result<Self> {
        let bytes = HOLD_QUEUES as usize * size_of::<u64>();
        Ok(Self {
            ptr: map_values(fd, bytes, libc::PROT_READ | libc::PROT_WRITE)?.cast(),
            len: HOLD_QUEUES as usize,
        })
    }

    fn slot(&self, queue: u32) -> &std::sync::atomic::AtomicU64 {
        let i = queue as usize;
        assert!(i < self.len, "hold queue {queue} out of range");
        // SAFETY: within the mapping (checked), which lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }

    pub fn get(&self, queue: u32) -> u64 {
        self.slot(queue).load(std::sync::atomic::Ordering::Acquire)
    }

    /// Publishes that the buffer has finished with `done` order frames of `queue` (sent them,
    /// or counted them dropped or lost): only after they left.
    pub fn set(&self, queue: u32, done: u64) {
        self.slot(queue)
            .store(done, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for OrderDone {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * size_of::<u64>()) };
    }
}

/// `slot_ports` mapped into this process (`BPF_F_MMAPABLE`), read with atomic loads: before the
/// buffer re-injects frames at a port slot, it checks the slot still names the port they came
/// in on (a freed slot may have been given to another port meanwhile).
pub struct SlotPorts {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
}

// SAFETY: the mapping is plain shared memory of atomics, read only with atomic loads.
unsafe impl Send for SlotPorts {}

impl SlotPorts {
    /// The kernel lays an array's values out 8 bytes apart (`round_up(value_size, 8)`): each
    /// u32 sits in the low half of its 8 bytes, the rest zero.
    const BYTES: usize = MAX_PORTS as usize * size_of::<u64>();

    fn map(fd: std::os::fd::RawFd) -> std::io::Result<Self> {
        Ok(Self {
            ptr: map_values(fd, Self::BYTES, libc::PROT_READ)?.cast(),
        })
    }

    /// The ifindex at `slot` now (0: none).
    pub fn get(&self, slot: u32) -> u32 {
        if slot >= MAX_PORTS {
            return 0;
        }
        // SAFETY: within the mapping (checked), which lives as long as `self`.
        let entry = unsafe { &*self.ptr.as_ptr().add(slot as usize) }
            .load(std::sync::atomic::Ordering::Acquire);
        // The u32 in native byte order at the entry's start.
        u32::from_ne_bytes(entry.to_ne_bytes()[..4].try_into().expect("4 bytes"))
    }
}

impl Drop for SlotPorts {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), Self::BYTES) };
    }
}

/// Maps the first `bytes` of a `BPF_F_MMAPABLE` array map's values (shared, `prot`). The
/// kernel lays the values out from offset 0, each `round_up(value_size, 8)` bytes apart.
fn map_values(
    fd: std::os::fd::RawFd,
    bytes: usize,
    prot: libc::c_int,
) -> std::io::Result<std::ptr::NonNull<u8>> {
    // SAFETY: a shared mapping of a BPF array map's values, checked for failure; the caller
    // unmaps it once, with the same length.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::ptr::NonNull::new(ptr.cast()).expect("mmap returned a non-null pointer"))
}
