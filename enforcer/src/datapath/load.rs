//! Loads the kernel programs, pins them and their maps, and attaches them to VM ports (and the
//! hold program to the hold device).
//!
//! Everything the datapath needs lives under the pin root (default `/sys/fs/bpf/enforcer`):
//! the maps by name and one link per port under `links/`. A restarted daemon opens the same
//! maps and atomically swaps its freshly loaded program into the existing links, so enforcement
//! never stops and no epoch is reset (invariant 6 in docs/design.md).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use enforcer_common::names;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::epochs::EpochStore;

/// The eBPF object built by `build.rs` from `enforcer-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/enforcer";
pub const TC_PROGRAM: &str = "enforcer_tc";
pub const XDP_PROGRAM: &str = "enforcer_xdp";
pub const INJECT_PROGRAM: &str = "enforcer_inject";
pub const RECORD_PROGRAM: &str = "enforcer_record";

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
    pub(super) ebpf: Ebpf,
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
        for name in [INJECT_PROGRAM, RECORD_PROGRAM] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        // Pin the programs too (`bpftool prog show pinned ...`); a restart replaces the pins
        // of the previous daemon's programs, which stay alive while links still use them.
        for name in [TC_PROGRAM, XDP_PROGRAM, INJECT_PROGRAM, RECORD_PROGRAM] {
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
        dp.rebuild_slot_ports()?;
        Ok(dp)
    }

    /// Attaches `enforcer_inject` (tcx ingress) to the hold device, where the buffer's
    /// re-injected frames arrive. The link is not pinned: it lives as long as the returned fd
    /// (the buffer's), and a new buffer makes a new hold device.
    pub fn attach_inject(&mut self, device: &str) -> Result<FdLink, DatapathError> {
        self.attach_unpinned(
            INJECT_PROGRAM,
            device,
            TcAttachType::Ingress,
            LinkOrder::default(),
        )
    }

    /// Attaches `enforcer_record` (tcx egress) to a VM port while its group's snapshot runs: it
    /// records the frames delivered to the VM after its cut that were sent before their
    /// sender's (the channel state). The link is not pinned: it lives as long as the returned
    /// fd, and a snapshot whose daemon died is aborted anyway.
    /// First in the port's egress chain: the copy it delivers passes it again, and no other
    /// program may have rewritten the mark that says it is a copy by then.
    pub fn attach_record(&mut self, port: &str) -> Result<FdLink, DatapathError> {
        self.attach_unpinned(
            RECORD_PROGRAM,
            port,
            TcAttachType::Egress,
            LinkOrder::first(),
        )
    }

    fn attach_unpinned(
        &mut self,
        name: &'static str,
        device: &str,
        hook: TcAttachType,
        order: LinkOrder,
    ) -> Result<FdLink, DatapathError> {
        let err = |detail: String| DatapathError::Link {
            port: device.to_owned(),
            detail,
        };
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let id = prog
            .attach_with_options(device, hook, TcAttachOptions::TcxOrder(order))
            .map_err(|e| err(e.to_string()))?;
        prog.take_link(id)
            .map_err(|e| err(e.to_string()))?
            .try_into()
            .map_err(|e: LinkError| err(e.to_string()))
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
                // Native only: generic XDP would also run on frames the buffer re-injects into
                // the port (it cannot see their mark) and classify them a second time.
                let prog: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
                let id = prog
                    .attach(name, XdpMode::Driver)
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
        if EpochStore::port(self, ifindex)?.is_none() {
            let slot = self.port_slots_map()?.get(&ifindex, 0).ok();
            match self.port_slots_map()?.remove(&ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(slot) = slot {
                self.set_slot_port(slot, 0)?;
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
