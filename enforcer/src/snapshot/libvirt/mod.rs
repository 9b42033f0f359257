//! The real [`Hypervisor`]: libvirt through the `virt` crate, driving QEMU's own migration
//! through libvirt's QMP passthrough (measured race-free; see docs/design.md, "Facts of the
//! platform"). Owns the connection, QEMU's events and the snapshots in progress per VM; the
//! domain XML ([`xml`]), the memory image's format ([`image`]), the disks ([`disks`]) and
//! their chains ([`chain`]) are its children.
//!
//! Why not libvirt's live snapshot: it pauses the VM at its final stop-and-copy and resumes it by
//! itself 35–170 ms later, with no hook, so an epoch advance that reacts to the pause races the
//! resume (invariant 3 in docs/design.md).
//!
//! **Instant** ([`CutMethod::Instant`]), per VM:
//! 1. `begin`: write the image's header and the domain XML; hand the fd to QEMU (`getfd`);
//!    enable `background-snapshot`. The VM runs on.
//! 2. `stop`: suspend the VM (the coordinator does this for every VM of the group at once).
//!    QEMU's `STOP` event gives the instant.
//! 3. the coordinator advances the epoch.
//! 4. `capture`: a disk-only external snapshot (`--atomic`) puts each disk on a new qcow2
//!    overlay (the old file frozen as it was at the stop); `migrate` to the fd: QEMU saves the
//!    device state, write-protects memory (userfaultfd) and runs the VM again by itself
//!    (QEMU 7.2), then writes memory as it was at the stop while the VM runs.
//! 5. `complete`: wait for the stream's end; mark the header complete.
//!
//! **Pre-copy** ([`CutMethod::PreCopy`]):
//! 1. `begin`: as above, with `pause-before-switchover`, and `migrate` at once: QEMU copies
//!    memory while the VM runs.
//! 2. `wait_paused`: QEMU stops the vCPUs for the final copy and waits in `pre-switchover`
//!    (as long as needed). Its `MIGRATION` event, with QEMU's own timestamp, wakes us.
//! 3. the coordinator advances the epoch.
//! 4. `complete`: `migrate-continue`; QEMU writes the last state, flushes and releases its
//!    disks and leaves the VM paused (`postmigrate`); the disk files are copied (still the
//!    snapshot point: the VM has not run); the header is marked complete.
//! 5. `resume`: `cont`.
//!
//! Restore is `virDomainRestoreFlags` of the memory image, paused, with the domain XML edited:
//! instant snapshots' disks on new overlays of the frozen files (never written over), pre-copy
//! snapshots' copies put back first; optionally onto another bridge.

mod chain;
mod disks;
mod hypervisor;
mod image;
mod xml;

use image::SaveImage;

pub use disks::{DiskCapture, DiskCopy, snapshot_disks_xml};
pub use xml::{DiskFormat, DomainNic, FileDisk, domain_name, file_disks, first_nic, for_restore};

use std::{
    collections::HashMap,
    ffi::{CStr, CString, c_char, c_int, c_longlong, c_uint, c_void},
    path::{Path, PathBuf},
    sync::{Condvar, Mutex, Once, OnceLock},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tracing::{debug, info, warn};
use virt::{connect::Connect, domain::Domain, sys};

use super::{
    backends::{HvError, HvErrorKind},
    manifest::CutMethod,
};
use crate::{
    sched::{Boost, make_this_thread_realtime},
    snapshot::DomainState,
};

pub const DEFAULT_URI: &str = "qemu:///system";
/// The name QEMU knows our image fd by.
const FD_NAME: &str = "enforcer-snapshot";

/// A QEMU event of a domain, with QEMU's timestamp (µs since the Unix epoch): a `MIGRATION`
/// event's status (`completed`, ...), or [`STOP`] / [`RESUME`] (the vCPUs stopped, running).
#[derive(Clone, Debug)]
struct MonitorEvent {
    status: String,
    at_unix_us: u64,
}

const STOP: &str = "STOP";
const RESUME: &str = "RESUME";

/// QEMU events of every domain, filled by libvirt's event loop thread.
#[derive(Default)]
struct Events {
    by_domain: Mutex<HashMap<String, Vec<MonitorEvent>>>,
    arrived: Condvar,
}

fn events() -> &'static Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS.get_or_init(Events::default)
}

/// libvirt calls this on its event loop thread for every QEMU event of every domain.
unsafe extern "C" fn on_monitor_event(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: *const c_char,
    seconds: c_longlong,
    micros: c_uint,
    details: *const c_char,
    _opaque: *mut c_void,
) {
    // SAFETY: libvirt passes a live domain for the duration of the callback; the name it
    // returns belongs to the domain object and is only read here.
    let name = unsafe { sys::virDomainGetName(dom) };
    if name.is_null() || event.is_null() {
        return;
    }
    // SAFETY: NUL-terminated strings owned by libvirt for the callback's duration (details
    // may be null).
    let (name, event, details) = unsafe {
        (
            CStr::from_ptr(name).to_string_lossy().into_owned(),
            CStr::from_ptr(event).to_string_lossy().into_owned(),
            (!details.is_null()).then(|| CStr::from_ptr(details).to_string_lossy().into_owned()),
        )
    };
    let status = match event.as_str() {
        STOP | RESUME => event,
        "MIGRATION" => {
            let Some(status) = details
                .and_then(|d| serde_json::from_str::<Value>(&d).ok())
                .and_then(|v| v.get("status")?.as_str().map(str::to_owned))
            else {
                return;
            };
            status
        }
        _ => return,
    };
    let event = MonitorEvent {
        status,
        at_unix_us: (seconds.max(0) as u64) * 1_000_000 + u64::from(micros),
    };
    let ev = events();
    let mut map = ev.by_domain.lock().expect("events lock");
    let list = map.entry(name).or_default();
    // A domain that runs for long keeps only its recent events.
    if list.len() >= 256 {
        list.drain(..128);
    }
    list.push(event);
    drop(map);
    ev.arrived.notify_all();
}

/// libvirt's default event loop, started once per process (before any connection opens, as
/// libvirt requires for events).
fn start_event_loop() -> Result<(), String> {
    static STARTED: Once = Once::new();
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED.call_once(|| {
        let r = virt::event::event_register_default_impl()
            .map_err(|e| format!("libvirt event loop: {e}"));
        if r.is_ok() {
            thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| {
                    // It delivers the "VM stopped" events: on the pause→advance critical path.
                    make_this_thread_realtime("the libvirt event thread");
                    loop {
                        if let Err(e) = virt::event::event_run_default_impl() {
                            warn!(%e, "libvirt event loop iteration failed");
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                })
                .expect("spawning the libvirt event thread");
        }
        let _ = RESULT.set(r);
    });
    RESULT.get().cloned().unwrap_or(Ok(()))
}

/// A snapshot in progress on one VM.
struct Job {
    method: CutMethod,
    /// Looked up at `begin`, so `stop` is one call.
    dom: Domain,
    image: SaveImage,
    disks: Vec<FileDisk>,
    /// Instant: the overlays `capture` puts the disks on.
    captures: Vec<DiskCapture>,
    dir: PathBuf,
    /// Instant: stopped by `stop`, so `cancel` runs it again.
    stopped: bool,
    /// `migrate` was issued (QEMU took the image's fd; before, `cancel` hands it back).
    migrated: bool,
    /// Its QEMU's pid, read at `begin` (off the cut's path), for the boost.
    qemu_pid: Option<u32>,
    /// Instant: its QEMU boosted from the stop to the resume.
    boost: Option<Boost>,
}

pub struct Libvirt {
    uri: String,
    /// The connection to libvirtd, opened again when libvirtd went away (see
    /// [`Libvirt::conn`]).
    link: Mutex<Link>,
    jobs: Mutex<HashMap<String, Job>>,
    /// When each VM's current migration was started (µs since the Unix epoch).
    started: Mutex<HashMap<String, u64>>,
    /// Bytes of store promised to each VM's snapshot in progress, from `begin` to its end
    /// (see [`crate::snapshot::room`]).
    promised: Mutex<HashMap<String, u64>>,
}

/// Releases a VM's promise of store space when `begin` fails after making it.
pub(crate) struct Promise<'a> {
    libvirt: &'a Libvirt,
    vm: String,
    kept: bool,
}

impl Promise<'_> {
    /// `begin` went through: the promise lasts until the snapshot's end.
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Promise<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.libvirt.release(&self.vm);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(
        "connecting to libvirt at {uri}: {detail} (is libvirtd running? scripts/setup.sh starts it; or run without snapshots: --no-libvirt)"
    )]
    Connect { uri: String, detail: String },
    #[error("libvirt: {0}")]
    Events(String),
    #[error("domain {name}: {detail}")]
    Domain { name: String, detail: String },
}

fn hv_err(vm: &str, detail: impl Into<String>) -> HvError {
    HvError::failed(vm, detail)
}

/// One connection to libvirtd and its registration for QEMU's events.
struct Link {
    conn: Connect,
    callback_id: c_int,
}

impl Link {
    fn open(uri: &str) -> Result<Self, LibvirtError> {
        let conn = Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
            uri: uri.into(),
            detail: e.to_string(),
        })?;
        // SAFETY: the connection is open; a null event name asks for every event; the
        // callback is a plain function that only touches process-global state, so no opaque
        // pointer has to outlive anything.
        let callback_id = unsafe {
            sys::virConnectDomainQemuMonitorEventRegister(
                conn.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null(),
                Some(on_monitor_event),
                std::ptr::null_mut(),
                None,
                0,
            )
        };
        if callback_id < 0 {
            return Err(LibvirtError::Events(format!(
                "registering for QEMU events: {}",
                virt::error::Error::last_error()
            )));
        }
        Ok(Self { conn, callback_id })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // SAFETY: the id came from registering on this connection, which is still referenced
        // (a connection libvirtd closed only fails the call).
        unsafe {
            sys::virConnectDomainQemuMonitorEventDeregister(self.conn.as_ptr(), self.callback_id);
        }
    }
}

impl Libvirt {
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        // libvirt's default handler prints every error (a lookup that misses included) to
        // stderr; errors reach callers through results instead.
        virt::error::clear_error_callback();
        start_event_loop().map_err(LibvirtError::Events)?;
        Ok(Self {
            uri: uri.to_owned(),
            link: Mutex::new(Link::open(uri)?),
            jobs: Mutex::new(HashMap::new()),
            started: Mutex::new(HashMap::new()),
            promised: Mutex::new(HashMap::new()),
        })
    }

    /// The connection to libvirtd. One that libvirtd closed (restarted, upgraded: case S13 of
    /// the security review) is opened again, with QEMU's events registered again, so the
    /// daemon goes on without a restart of its own; until libvirtd answers, the step fails
    /// (`vm`'s, for the error) and the snapshot aborts as for any failed step.
    pub fn conn(&self, vm: &str) -> Result<Connect, HvError> {
        {
            let link = self.link.lock().expect("libvirt link lock");
            if link.conn.is_alive().unwrap_or(false) {
                return Ok(link.conn.clone());
            }
        }
        // Opened without the lock: other calls need not wait for a libvirtd that starts.
        let fresh = Link::open(&self.uri).map_err(|e| hv_err(vm, e.to_string()))?;
        let mut link = self.link.lock().expect("libvirt link lock");
        if !link.conn.is_alive().unwrap_or(false) {
            warn!(uri = self.uri, "libvirtd went away: connected again");
            *link = fresh;
        }
        Ok(link.conn.clone())
    }

    pub fn domain(&self, name: &str) -> Result<Domain, HvError> {
        self.conn(name)?.lookup_domain_by_name(name).map_err(|e| {
            // Only libvirt's own "no such domain" says it is gone; any other failure (an RPC
            // cut by a libvirtd restart) says nothing about the domain.
            let gone = matches!(
                Result::<_, _>::from(e.code()),
                Ok(virt::error::ErrorNumber::NoDomain)
            );
            if gone {
                HvError::new(
                    name,
                    HvErrorKind::NoSuchDomain,
                    format!("no such domain ({})", e.message()),
                )
            } else {
                hv_err(name, format!("looking the domain up: {}", e.message()))
            }
        })
    }

    /// The live XML of a running domain.
    pub fn live_xml(&self, name: &str) -> Result<String, HvError> {
        self.domain(name)?
            .xml_desc(0)
            .map_err(|e| hv_err(name, e.to_string()))
    }

    /// Runs a QMP command through libvirt, optionally passing one fd; returns `return`.
    fn qmp(&self, vm: &str, command: Value, fd: Option<c_int>) -> Result<Value, HvError> {
        let dom = self.domain(vm)?;
        let text = CString::new(command.to_string()).expect("JSON has no NUL");
        let mut result: *mut c_char = std::ptr::null_mut();
        let mut infiles = fd.into_iter().collect::<Vec<c_int>>();
        // SAFETY: `dom` is a live domain; `text` and `infiles` outlive the call; libvirt
        // allocates `result`, which is freed below; no output fds are requested.
        let rc = unsafe {
            sys::virDomainQemuMonitorCommandWithFiles(
                dom.as_ptr(),
                text.as_ptr(),
                infiles.len() as c_uint,
                if infiles.is_empty() {
                    std::ptr::null_mut()
                } else {
                    infiles.as_mut_ptr()
                },
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut result,
                0,
            )
        };
        if rc < 0 {
            return Err(hv_err(
                vm,
                format!("QMP {command}: {}", virt::error::Error::last_error()),
            ));
        }
        // SAFETY: libvirt returned a malloc'd NUL-terminated string, ours to free.
        let reply = unsafe {
            let s = CStr::from_ptr(result).to_string_lossy().into_owned();
            libc::free(result.cast());
            s
        };
        let reply: Value = serde_json::from_str(&reply)
            .map_err(|e| hv_err(vm, format!("QMP reply {reply:?}: {e}")))?;
        if let Some(err) = reply.get("error") {
            return Err(hv_err(
                vm,
                format!(
                    "QMP {}: {}",
                    command["execute"],
                    err.get("desc").and_then(Value::as_str).unwrap_or("error")
                ),
            ));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    fn migration_status(&self, vm: &str) -> Result<String, HvError> {
        let r = self.qmp(vm, json!({"execute": "query-migrate"}), None)?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_owned())
    }

    /// Waits for the VM's migration to reach `want`; fails on `failed`/`cancelled`. Woken by
    /// QEMU's events; polls `query-migrate` too, so a lost event costs time, not correctness.
    /// Returns QEMU's timestamp of the event when there was one.
    fn wait_status(&self, vm: &str, want: &str, timeout: Duration) -> Result<Option<u64>, HvError> {
        let deadline = Instant::now() + timeout;
        let ev = events();
        let mut last_poll = Instant::now();
        // Events of an earlier migration of this VM (say, the `cancelled` of an abort) can be
        // delivered late: only events from this migration on count.
        let since = self
            .started
            .lock()
            .expect("started lock")
            .get(vm)
            .copied()
            .unwrap_or(0);
        loop {
            {
                let mut map = ev.by_domain.lock().expect("events lock");
                loop {
                    let list = map.get(vm).map(Vec::as_slice).unwrap_or_default();
                    for e in list.iter().filter(|e| e.at_unix_us >= since) {
                        debug!(vm, status = e.status, "migration event");
                        if e.status == want {
                            return Ok(Some(e.at_unix_us));
                        }
                        if e.status == "failed" || e.status == "cancelled" {
                            return Err(hv_err(vm, format!("QEMU's migration {}", e.status)));
                        }
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(hv_err(vm, format!("timed out waiting for `{want}`")));
                    }
                    if now.duration_since(last_poll) >= Duration::from_millis(200) {
                        break;
                    }
                    let wait = (deadline - now).min(Duration::from_millis(200));
                    map = ev.arrived.wait_timeout(map, wait).expect("events lock").0;
                }
            }
            last_poll = Instant::now();
            match self.migration_status(vm)?.as_str() {
                s if s == want => return Ok(None),
                s @ ("failed" | "cancelled") => {
                    return Err(hv_err(vm, format!("QEMU's migration is `{s}`")));
                }
                _ => {}
            }
        }
    }

    /// QEMU's timestamp of the VM's first `status` event (`STOP`, `RESUME`) at or after
    /// `since`, waiting up to `wait` for it to be delivered.
    fn event_at(&self, vm: &str, status: &str, since: u64, wait: Duration) -> Option<u64> {
        let deadline = Instant::now() + wait;
        let ev = events();
        let mut map = ev.by_domain.lock().expect("events lock");
        loop {
            if let Some(e) = map.get(vm).and_then(|l| {
                l.iter()
                    .find(|e| e.status == status && e.at_unix_us >= since)
            }) {
                return Some(e.at_unix_us);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            map = ev
                .arrived
                .wait_timeout(map, deadline - now)
                .expect("events lock")
                .0;
        }
    }

    /// Restores a domain from its memory image with `xml` as its definition, paused. Returns
    /// the domain's NIC as it came up (MAC, bridge, tap). The caller has checked that no domain
    /// of that name runs and has put its disks in place.
    fn restore_image_paused(
        &self,
        vm: &str,
        image: &Path,
        xml: String,
    ) -> Result<DomainNic, HvError> {
        let path = image
            .to_str()
            .ok_or_else(|| hv_err(vm, "image path is not UTF-8"))?;
        self.conn(vm)?
            .restore_domain_flags(path, Some(&xml), sys::VIR_DOMAIN_SAVE_PAUSED)
            .map_err(|e| hv_err(vm, format!("restoring {path}: {e}")))?;
        first_nic(&self.live_xml(vm)?).map_err(|e| hv_err(vm, e))
    }

    /// The pid of a running domain's QEMU, from the pid file libvirt's system driver keeps.
    fn qemu_pid(&self, vm: &str) -> Option<u32> {
        std::fs::read_to_string(format!("/run/libvirt/qemu/{vm}.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts QEMU's migration into the image's fd.
    fn migrate(&self, vm: &str) -> Result<Value, HvError> {
        self.qmp(
            vm,
            json!({"execute": "migrate", "arguments": {"uri": format!("fd:{FD_NAME}")}}),
            None,
        )
    }

    /// Resumes a paused domain through libvirt.
    pub fn resume_domain(&self, vm: &str) -> Result<(), HvError> {
        self.domain(vm)?
            .resume()
            .map_err(|e| hv_err(vm, e.to_string()))
    }

    pub fn destroy_domain(&self, vm: &str) -> Result<(), HvError> {
        match self.conn(vm)?.lookup_domain_by_name(vm) {
            Ok(dom) if dom.is_active().unwrap_or(false) => {
                dom.destroy().map_err(|e| hv_err(vm, e.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Promises `need` bytes of the store at `dir` to `vm`'s snapshot if they fit beside what
    /// is promised to the others in progress ([`crate::snapshot::room::check`]); refused
    /// with the numbers otherwise.
    pub(crate) fn promise(
        &self,
        vm: &str,
        dir: &Path,
        need: u64,
        what: &str,
    ) -> Result<Promise<'_>, HvError> {
        let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| {
            hv_err(
                vm,
                format!("the store's free space ({}): {e}", dir.display()),
            )
        })?;
        let free = stat.blocks_available().saturating_mul(stat.fragment_size());
        let mut promised = self.promised.lock().expect("promised lock");
        let others: u64 = promised
            .iter()
            .filter(|(name, _)| name.as_str() != vm)
            .map(|(_, n)| n)
            .sum();
        crate::snapshot::room::check(free, others, need, what)
            .map_err(|e| hv_err(vm, e.to_string()))?;
        promised.insert(vm.to_owned(), need);
        info!(
            vm,
            need, free, others, "store space promised to the snapshot ({what})"
        );
        Ok(self.promise_until_dropped(vm))
    }

    /// `vm`'s promise, ended when the returned guard is dropped.
    pub(crate) fn promise_until_dropped(&self, vm: &str) -> Promise<'_> {
        Promise {
            libvirt: self,
            vm: vm.to_owned(),
            kept: false,
        }
    }

    /// The end of `vm`'s snapshot: its image is written (or gone), its promise too.
    pub(crate) fn release(&self, vm: &str) {
        self.promised.lock().expect("promised lock").remove(vm);
    }

    /// Whether the domain exists and runs (see [`DomainState`]).
    pub fn domain_state(&self, vm: &str) -> Result<DomainState, HvError> {
        use virt::domain::DomainState as S;
        let dom = match self.domain(vm) {
            Ok(dom) => dom,
            Err(e) if e.kind == HvErrorKind::NoSuchDomain => return Ok(DomainState::Absent),
            Err(e) => return Err(e),
        };
        let (state, _) = dom.state().map_err(|e| hv_err(vm, e.to_string()))?;
        Ok(match Result::<_, _>::from(state) {
            Ok(S::Running | S::Blocked) => DomainState::Running,
            Ok(S::Paused | S::PMSuspended) => DomainState::Paused,
            Ok(S::Shutoff | S::Shutdown | S::Crashed) => DomainState::ShutOff,
            Ok(S::NoState) | Err(_) => {
                return Err(hv_err(
                    vm,
                    format!("libvirt reports no known state ({state:?})"),
                ));
            }
        })
    }

    fn running(&self, vm: &str) -> Result<bool, HvError> {
        let (state, _) = self
            .domain(vm)?
            .state()
            .map_err(|e| hv_err(vm, e.to_string()))?;
        Ok(matches!(
            Result::<_, _>::from(state),
            Ok(virt::domain::DomainState::Running)
        ))
    }
}
