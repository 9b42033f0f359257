//! Loads the kernel programs, pins them and their maps, attaches them to VM ports, and gives
//! typed access to the maps.
//!
//! Everything the datapath needs lives under the pin root (default `/sys/fs/bpf/enforcer`):
//! the maps by name and one link per port under `links/`. A restarted daemon opens the same
//! maps and atomically swaps its freshly loaded program into the existing links, so enforcement
//! never stops and no epoch is reset (invariant 6).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use enforcer_common::{
    CACHE_OCCUPIED, CACHE_OVERFLOW, CachedVm, DatapathConfig, EPOCH_CACHE_SIZE, GroupState,
    MAX_PORTS, MacKey, PortCounters, PortVm, REMOTE_SLOT_KEY, Type3Mode, UNATTRIBUTED_SLOT,
    VmEpoch, cache_index, names,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::epochs::EpochStore;

/// The eBPF object built by `build.rs` from `enforcer-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/enforcer";
pub const TC_PROGRAM: &str = "enforcer_tc";
pub const XDP_PROGRAM: &str = "enforcer_xdp";
pub const HOLD_PROGRAM: &str = "enforcer_hold";

/// Which hook classifies frames on the VM ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// tcx ingress: keeps GRO/GSO super-frames intact (the default, see BENCHMARKS.md).
    Tc,
    /// XDP (native on veth/tap): per-frame, the kernel linearises GSO frames for it.
    Xdp,
}

impl AttachMode {
    /// The program that serves this hook.
    pub fn program_name(self) -> &'static str {
        match self {
            AttachMode::Tc => TC_PROGRAM,
            AttachMode::Xdp => XDP_PROGRAM,
        }
    }

    fn link_prefix(self) -> &'static str {
        match self {
            AttachMode::Tc => "tc",
            AttachMode::Xdp => "xdp",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs is not mounted at {0} (mount -t bpf bpf /sys/fs/bpf)")]
    NoBpffs(PathBuf),
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning program {name}: {detail}")]
    PinProgram { name: &'static str, detail: String },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map access: {0}")]
    Map(#[from] MapError),
    #[error("pinning or opening the link for port {port}: {detail}")]
    Link { port: String, detail: String },
    #[error("no interface named {0:?}")]
    UnknownInterface(String),
    #[error("port {0} is not attached")]
    NotAttached(u32),
    #[error("all {0} port counter slots are in use")]
    NoFreeSlot(u32),
    #[error(
        "pinned map {path} does not fit this build (key/value/entries {found:?}, expected {expected:?}): \
         it was left by another version; run `enforcer teardown --pin-root ...` first"
    )]
    IncompatiblePin {
        path: PathBuf,
        found: (u32, u32, u32),
        expected: (u32, u32, u32),
    },
    #[error("unknown Type-3 mode value {0} in the config map")]
    BadMode(u32),
}

/// A port the program is attached to.
#[derive(Debug)]
struct PortLink {
    name: String,
    pin: PathBuf,
    /// Holding the fd is not what keeps the program attached (the pin does); it is kept so the
    /// link stays ours to inspect while the daemon runs.
    _link: FdLink,
}

/// Summary of an attached port, for the API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachedPort {
    pub ifindex: u32,
    pub name: String,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_root: PathBuf,
    mode: AttachMode,
    ports: BTreeMap<u32, PortLink>,
}

impl Datapath {
    /// Loads the programs, creating or adopting the maps pinned under `pin_root`.
    pub fn open(pin_root: &Path, mode: AttachMode) -> Result<Self, DatapathError> {
        let bpffs = pin_root.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(bpffs) {
            return Err(DatapathError::NoBpffs(bpffs.to_owned()));
        }
        let links_dir = pin_root.join("links");
        fs::create_dir_all(&links_dir).map_err(|source| DatapathError::PinDir {
            path: links_dir.clone(),
            source,
        })?;

        let pins: Vec<(&'static str, PathBuf)> = names::ALL
            .iter()
            .map(|name| (*name, pin_root.join(name)))
            .collect();
        let adopted = pins.iter().filter(|(_, path)| path.exists()).count();
        check_pinned_layouts(&pins)?;
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let tc: &mut SchedClassifier = program(&mut ebpf, TC_PROGRAM)?;
        tc.load().map_err(|source| DatapathError::Program {
            name: TC_PROGRAM,
            source,
        })?;
        let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?;
        xdp.load().map_err(|source| DatapathError::Program {
            name: XDP_PROGRAM,
            source,
        })?;
        let hold: &mut Xdp = program(&mut ebpf, HOLD_PROGRAM)?;
        hold.load().map_err(|source| DatapathError::Program {
            name: HOLD_PROGRAM,
            source,
        })?;
        // Pin the programs too (`bpftool prog show pinned ...`); a restart replaces the pins
        // of the previous daemon's programs, which stay alive while links still use them.
        for name in [TC_PROGRAM, XDP_PROGRAM, HOLD_PROGRAM] {
            let path = pin_root.join(name);
            let _ = fs::remove_file(&path);
            let prog = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?;
            prog.pin(&path).map_err(|e| DatapathError::PinProgram {
                name,
                detail: e.to_string(),
            })?;
        }

        info!(pin_root = %pin_root.display(), adopted_maps = adopted, ?mode, "datapath loaded");
        let mut dp = Self {
            ebpf,
            pin_root: pin_root.to_owned(),
            mode,
            ports: BTreeMap::new(),
        };
        dp.rebuild_epoch_cache()?;
        Ok(dp)
    }

    fn epoch_cache_map(&mut self) -> Result<Array<&mut MapData, CachedVm>, DatapathError> {
        Ok(Array::try_from(self.map(names::EPOCH_CACHE)?)?)
    }

    /// Rewrites `epoch_cache` from `epochs` (at start: the cache may predate this daemon).
    fn rebuild_epoch_cache(&mut self) -> Result<(), DatapathError> {
        let vms = crate::epochs::EpochStore::vms(self)?;
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
                let same: Vec<(MacKey, VmEpoch)> = crate::epochs::EpochStore::vms(self)?
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

    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    fn link_pin(&self, ifindex: u32) -> PathBuf {
        self.pin_root
            .join("links")
            .join(format!("{}-{ifindex}", self.mode.link_prefix()))
    }

    /// Attaches the program to a port, adopting a link a previous daemon pinned for it.
    pub fn attach(&mut self, name: &str) -> Result<u32, DatapathError> {
        let ifindex = ifindex_of(name)?;
        if self.ports.contains_key(&ifindex) {
            return Ok(ifindex);
        }
        let pin = self.link_pin(ifindex);
        let link_err = |detail: String| DatapathError::Link {
            port: name.to_owned(),
            detail,
        };

        let adopted = match PinnedLink::from_pin(&pin) {
            Ok(old) => match self.swap_into(FdLink::from(old)) {
                Ok(link) => Some(link),
                Err(err) => {
                    // A link left by a port that was deleted (and its ifindex reused) cannot be
                    // updated: forget it and attach afresh.
                    warn!(port = name, %err, "stale pinned link, attaching anew");
                    let _ = fs::remove_file(&pin);
                    None
                }
            },
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(link_err(err.to_string())),
        };
        let was_adopted = adopted.is_some();
        let link = match adopted {
            Some(link) => link,
            None => {
                let fd_link = self.attach_new(name)?;
                FdLink::from(fd_link.pin(&pin).map_err(|e| link_err(e.to_string()))?)
            }
        };
        self.ensure_port_slot(ifindex)?;
        info!(port = name, ifindex, adopted = was_adopted, "attached");
        self.ports.insert(
            ifindex,
            PortLink {
                name: name.to_owned(),
                pin,
                _link: link,
            },
        );
        Ok(ifindex)
    }

    /// Atomically replaces the program in an existing (pinned) link with ours.
    fn swap_into(&mut self, old: FdLink) -> Result<FdLink, String> {
        match self.mode {
            AttachMode::Tc => {
                let link = SchedClassifierLink::try_from(old).map_err(|e| e.to_string())?;
                let prog: &mut SchedClassifier =
                    program(&mut self.ebpf, TC_PROGRAM).map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                let link = prog.take_link(id).map_err(|e| e.to_string())?;
                link.try_into().map_err(|e: LinkError| e.to_string())
            }
            AttachMode::Xdp => {
                let link = XdpLink::try_from(old).map_err(|e| e.to_string())?;
                let prog: &mut Xdp =
                    program(&mut self.ebpf, XDP_PROGRAM).map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                let link = prog.take_link(id).map_err(|e| e.to_string())?;
                link.try_into().map_err(|e: LinkError| e.to_string())
            }
        }
    }

    fn attach_new(&mut self, name: &str) -> Result<FdLink, DatapathError> {
        let link_err = |detail: String| DatapathError::Link {
            port: name.to_owned(),
            detail,
        };
        match self.mode {
            AttachMode::Tc => {
                let prog: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?;
                let id = prog
                    .attach_with_options(
                        name,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| link_err(e.to_string()))?;
                prog.take_link(id)
                    .map_err(|e| link_err(e.to_string()))?
                    .try_into()
                    .map_err(|e: LinkError| link_err(e.to_string()))
            }
            AttachMode::Xdp => {
                let prog: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
                let id = prog
                    .attach(name, XdpMode::Default)
                    .map_err(|e| link_err(e.to_string()))?;
                prog.take_link(id)
                    .map_err(|e| link_err(e.to_string()))?
                    .try_into()
                    .map_err(|e: LinkError| link_err(e.to_string()))
            }
        }
    }

    /// Detaches from a port (it left the bridge or was deleted) and removes its link pin.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let port = self
            .ports
            .remove(&ifindex)
            .ok_or(DatapathError::NotAttached(ifindex))?;
        // Removing the pin and dropping our fd, the last references, detaches the program.
        if let Err(err) = fs::remove_file(&port.pin) {
            warn!(port = port.name, %err, "removing link pin");
        }
        // Free the counter slot unless a VM is still registered on the port (its entry holds it).
        if crate::epochs::EpochStore::port(self, ifindex)?.is_none() {
            match self.port_slots_map()?.remove(&ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        info!(port = port.name, ifindex, "detached");
        Ok(())
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.ports.contains_key(&ifindex)
    }

    pub fn attached_ports(&self) -> Vec<AttachedPort> {
        self.ports
            .iter()
            .map(|(ifindex, port)| AttachedPort {
                ifindex: *ifindex,
                name: port.name.clone(),
            })
            .collect()
    }

    /// Removes link pins of ports this daemon did not attach (ports gone while it was down).
    pub fn remove_stale_links(&self) {
        let Ok(entries) = fs::read_dir(self.pin_root.join("links")) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let known = self
                .ports
                .keys()
                .any(|ifindex| self.link_pin(*ifindex).file_name() == Some(&file));
            if !known {
                info!(pin = %entry.path().display(), "removing stale link pin");
                let _ = fs::remove_file(entry.path());
            }
        }
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
        Ok(slot)
    }

    /// The ring of colors learned from other hosts' frames; its one consumer takes it.
    pub fn take_learned_ring(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map(names::LEARNED)
            .ok_or(DatapathError::MissingMap(names::LEARNED))?;
        Ok(RingBuf::try_from(map)?)
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
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

    fn port_slots_map(&mut self) -> Result<HashMap<&mut MapData, u32, u32>, DatapathError> {
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

    /// Attaches `enforcer_hold` (native XDP) to the socket side of the hold device, pinned at
    /// `links/hold`: if the daemon dies, frames still redirected there are counted
    /// (`hold_kernel.no_socket`) instead of vanishing. Returns the pin.
    pub fn attach_hold_program(&mut self, device: &str) -> Result<PathBuf, DatapathError> {
        let err = |detail: String| DatapathError::Link {
            port: device.to_owned(),
            detail,
        };
        let pin = self.pin_root.join("links").join("hold");
        let _ = fs::remove_file(&pin);
        let prog: &mut Xdp = program(&mut self.ebpf, HOLD_PROGRAM)?;
        let id = prog
            .attach(device, XdpMode::Driver)
            .map_err(|e| err(e.to_string()))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| err(e.to_string()))?
            .try_into()
            .map_err(|e: LinkError| err(e.to_string()))?;
        link.pin(&pin).map_err(|e| err(e.to_string()))?;
        Ok(pin)
    }

    /// Puts the buffer daemon's AF_XDP socket in the `hold_socks` map.
    pub fn set_hold_socket(&mut self, fd: std::os::fd::RawFd) -> Result<(), DatapathError> {
        let map = self.map(names::HOLD_SOCKS)?;
        let mut socks: aya::maps::XskMap<&mut MapData> = aya::maps::XskMap::try_from(map)?;
        socks.set(0, fd, 0)?;
        Ok(())
    }

    /// Sum over CPUs of a per-CPU u64 array entry (hold counters).
    pub fn per_cpu_sum(&mut self, map: &'static str, index: u32) -> Result<u64, DatapathError> {
        let array: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(map)?)?;
        Ok(array.get(&index, 0)?.iter().sum())
    }

    /// All entries of a per-CPU u64 array, summed over CPUs.
    pub fn per_cpu_sums(&mut self, map: &'static str) -> Result<Vec<u64>, DatapathError> {
        let array: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(map)?)?;
        let mut out = Vec::with_capacity(array.len() as usize);
        for i in 0..array.len() {
            out.push(array.get(&i, 0)?.iter().sum());
        }
        Ok(out)
    }

    /// The buffer daemon's pinned totals (`hold_totals::*`).
    pub fn hold_totals(&mut self) -> Result<Vec<u64>, DatapathError> {
        let array: Array<&mut MapData, u64> = Array::try_from(self.map(names::HOLD_TOTALS)?)?;
        let mut out = Vec::new();
        for i in 0..array.len() {
            out.push(array.get(&i, 0)?);
        }
        Ok(out)
    }

    pub fn set_hold_totals(&mut self, totals: &[u64]) -> Result<(), DatapathError> {
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

    pub fn port_name(&self, ifindex: u32) -> Option<&str> {
        self.ports.get(&ifindex).map(|p| p.name.as_str())
    }

    /// The fd of a loaded program (valid while `self` lives), e.g. for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, mode: AttachMode) -> Result<std::os::fd::RawFd, DatapathError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let name = mode.program_name();
        let prog = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let fd = prog
            .fd()
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(fd.as_fd().as_raw_fd())
    }

    /// The kernel's id of the loaded program for the active attach mode (for run-time stats).
    pub fn program_info(&self) -> Result<aya::programs::ProgramInfo, DatapathError> {
        let name = self.mode.program_name();
        let prog = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        prog.info()
            .map_err(|source| DatapathError::Program { name, source })
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
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Refuses to adopt pinned maps whose layout differs from this build's (a daemon of another
/// version left them): reading them with the wrong layout would be garbage.
fn check_pinned_layouts(pins: &[(&'static str, PathBuf)]) -> Result<(), DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| DatapathError::Link {
        port: "(object)".into(),
        detail: e.to_string(),
    })?;
    for (name, path) in pins {
        if !path.exists() {
            continue;
        }
        let Some(def) = object.maps.get(*name) else {
            continue;
        };
        let expected = (def.key_size(), def.value_size(), def.max_entries());
        let info = aya::maps::MapInfo::from_pin(path)?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if found != expected {
            return Err(DatapathError::IncompatiblePin {
                path: path.clone(),
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// The ifindex of an interface, by name.
pub fn ifindex_of(name: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|_| DatapathError::UnknownInterface(name.to_owned()))
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Removes everything pinned under `pin_root`: links (which detaches the programs) and maps
/// (which, with no program left using them, frees them). The datapath stops enforcing.
pub fn teardown(pin_root: &Path) -> io::Result<bool> {
    match fs::remove_dir_all(pin_root) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs a loaded program `repeat` times over `frame` with BPF_PROG_TEST_RUN, as if the frame
/// arrived on the loopback device; returns the program's return value and the kernel's mean
/// run time per repetition in ns.
pub fn prog_test_run(
    prog_fd: std::os::fd::RawFd,
    frame: &[u8],
    repeat: u32,
) -> io::Result<(u32, u32)> {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    let mut out = vec![0u8; frame.len() + 512];
    // SAFETY: bpf_attr is a plain C union of integer fields; all-zero is its "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.test.prog_fd = prog_fd as u32;
    attr.test.data_in = frame.as_ptr() as u64;
    attr.test.data_size_in = frame.len() as u32;
    attr.test.data_out = out.as_mut_ptr() as u64;
    attr.test.data_size_out = out.len() as u32;
    attr.test.repeat = repeat;
    // SAFETY: `attr` is a valid bpf_attr for BPF_PROG_TEST_RUN whose buffers outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_TEST_RUN as libc::c_int,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled in the `test` member.
    Ok(unsafe { (attr.test.retval, attr.test.duration) })
}
