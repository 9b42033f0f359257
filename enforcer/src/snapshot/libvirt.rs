//! The real [`Hypervisor`]: libvirt through the `virt` crate, driving QEMU's own migration
//! through libvirt's QMP passthrough (measured race-free; see docs/design.md, "Facts of the
//! platform").
//!
//! Why not libvirt's live snapshot: it pauses the VM at its final stop-and-copy and resumes it by
//! itself 35–170 ms later, with no hook, so an epoch advance that reacts to the pause races the
//! resume (invariant 3 in docs/design.md). Instead, per VM:
//! 1. `begin`: open the image file and write a libvirt save header (marked partial) plus the
//!    domain XML; hand the fd to QEMU (`getfd`); enable `pause-before-switchover`; `migrate` to
//!    `fd:`. QEMU copies memory while the VM runs.
//! 2. `wait_paused`: QEMU stops the vCPUs for the final copy and waits in `pre-switchover`
//!    (as long as needed). Its `MIGRATION` event, with QEMU's own timestamp, wakes us.
//! 3. the coordinator advances the epoch.
//! 4. `complete`: `migrate-continue`; QEMU writes the last state, flushes and releases its
//!    disks and leaves the VM paused (`postmigrate`); the disk files are copied (still the
//!    snapshot point: the VM has not run); the header is marked complete, so
//!    `virDomainRestore` accepts the file.
//! 5. `resume`: `cont`.
//!
//! Restore puts the disk copies back and is `virDomainRestoreFlags` of the memory image,
//! paused, optionally onto another bridge.

use std::{
    collections::HashMap,
    ffi::{CStr, CString, c_char, c_int, c_longlong, c_uint, c_void},
    fs::{File, OpenOptions},
    io::{Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Condvar, Mutex, Once, OnceLock},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{debug, warn};
use virt::{connect::Connect, domain::Domain, sys};

use super::{
    backends::{HvError, HvErrorKind, Hypervisor, Paused, unix_us},
    store::discard_local,
};
use crate::{
    model::{IfName, MacAddr, VmSpec},
    sched::make_this_thread_realtime,
};

pub const DEFAULT_URI: &str = "qemu:///system";
/// The name QEMU knows our image fd by.
const FD_NAME: &str = "enforcer-snapshot";

/// libvirt's save-image header (`virQEMUSaveHeader`, version 2): 16-byte magic, then 19 native
/// u32s (version, data_len, was_running, compressed, cookieOffset, 14 unused). The domain XML
/// follows, NUL-terminated, then QEMU's migration stream.
const SAVE_MAGIC: &[u8; 16] = b"LibvirtQemudSave";
const SAVE_PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
const SAVE_VERSION: u32 = 2;
const SAVE_HEADER_LEN: usize = 16 + 19 * 4;

fn save_header(magic: &[u8; 16], data_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(SAVE_HEADER_LEN);
    h.extend_from_slice(magic);
    for field in [
        SAVE_VERSION,
        data_len,
        1, /* was running */
        0, /* raw */
        0, /* no cookie */
    ] {
        h.extend_from_slice(&field.to_ne_bytes());
    }
    h.resize(SAVE_HEADER_LEN, 0);
    h
}

/// A QEMU `MIGRATION` event: status and QEMU's timestamp (µs since the Unix epoch).
#[derive(Clone, Debug)]
struct MigrationEvent {
    status: String,
    at_unix_us: u64,
}

/// Migration events of every domain, filled by libvirt's event loop thread.
#[derive(Default)]
struct Events {
    by_domain: Mutex<HashMap<String, Vec<MigrationEvent>>>,
    arrived: Condvar,
}

fn events() -> &'static Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS.get_or_init(Events::default)
}

/// libvirt calls this on its event loop thread for every QEMU `MIGRATION` event.
unsafe extern "C" fn on_migration_event(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: *const c_char,
    seconds: c_longlong,
    micros: c_uint,
    details: *const c_char,
    _opaque: *mut c_void,
) {
    // SAFETY: libvirt passes a live domain for the duration of the callback; the name it
    // returns belongs to the domain object and is only read here.
    let name = unsafe { sys::virDomainGetName(dom) };
    if name.is_null() || details.is_null() {
        return;
    }
    // SAFETY: both are NUL-terminated strings owned by libvirt for the callback's duration.
    let (name, details) = unsafe {
        (
            CStr::from_ptr(name).to_string_lossy().into_owned(),
            CStr::from_ptr(details).to_string_lossy().into_owned(),
        )
    };
    let Some(status) = serde_json::from_str::<Value>(&details)
        .ok()
        .and_then(|v| v.get("status")?.as_str().map(str::to_owned))
    else {
        return;
    };
    let event = MigrationEvent {
        status,
        at_unix_us: (seconds.max(0) as u64) * 1_000_000 + u64::from(micros),
    };
    let ev = events();
    ev.by_domain
        .lock()
        .expect("events lock")
        .entry(name)
        .or_default()
        .push(event);
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
    image: PathBuf,
    file: File,
    data_len: u32,
    disks: Vec<(String, PathBuf)>,
    dir: PathBuf,
}

pub struct Libvirt {
    conn: Connect,
    callback_id: c_int,
    jobs: Mutex<HashMap<String, Job>>,
    /// When each VM's current migration was started (µs since the Unix epoch).
    started: Mutex<HashMap<String, u64>>,
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

/// What a domain's live XML says about its network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainNic {
    pub mac: MacAddr,
    pub bridge: Option<String>,
    /// The host-side tap (`vnetN`), when the domain runs.
    pub tap: Option<String>,
}

/// The first NIC of a domain XML.
pub fn first_nic(xml: &str) -> Result<DomainNic, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let nic = doc
        .descendants()
        .find(|n| n.has_tag_name("interface"))
        .ok_or("the domain has no network interface")?;
    let child_attr = |tag: &str, attr: &str| {
        nic.children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.attribute(attr))
            .map(str::to_owned)
    };
    let mac = child_attr("mac", "address")
        .ok_or("the domain's interface has no MAC")?
        .parse()
        .map_err(|e| format!("the domain's MAC: {e}"))?;
    Ok(DomainNic {
        mac,
        bridge: child_attr("source", "bridge"),
        tap: child_attr("target", "dev"),
    })
}

/// A domain's disk and where a snapshot keeps its copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    /// The guest's name for it (`vda`).
    pub target: String,
    /// The file the domain uses.
    pub source: PathBuf,
    /// The copy taken at the snapshot point.
    pub copy: PathBuf,
}

/// The domain's disks as (target, file). Only file-backed disks can be captured; any other
/// disk is refused rather than left out (memory restored with a disk that moved on would be
/// inconsistent). CD-ROMs and floppies are read-only media and are not captured.
fn file_disks(xml: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let mut out = Vec::new();
    for disk in doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device").unwrap_or("disk") == "disk")
    {
        let target = disk
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("?")
            .to_owned();
        let kind = disk.attribute("type").unwrap_or("file");
        let source = disk
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| s.attribute("file"));
        match (kind, source) {
            ("file", Some(file)) => out.push((target, PathBuf::from(file))),
            _ => {
                return Err(format!(
                    "disk {target} is a `{kind}` disk: only file-backed disks can be captured"
                ));
            }
        }
    }
    Ok(out)
}

/// The XML with every bridge-type interface moved onto `bridge`.
pub fn with_bridge(xml: &str, bridge: &str) -> String {
    // A textual edit keeps everything else byte for byte (libvirt re-validates it).
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(i) = rest.find("<source bridge=") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "<source bridge=".len()..];
        let quote = after.chars().next().unwrap_or('\'');
        let end = after[1..].find(quote).map_or(after.len(), |e| e + 2);
        out.push_str(&format!("<source bridge={quote}{bridge}{quote}"));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

impl Libvirt {
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        // libvirt's default handler prints every error (a lookup that misses included) to
        // stderr; errors reach callers through results instead.
        virt::error::clear_error_callback();
        start_event_loop().map_err(LibvirtError::Events)?;
        let conn = Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
            uri: uri.into(),
            detail: e.to_string(),
        })?;
        let event = CString::new("MIGRATION").expect("static name");
        // SAFETY: the connection is open; the callback is a plain function that only touches
        // process-global state, so no opaque pointer has to outlive anything.
        let callback_id = unsafe {
            sys::virConnectDomainQemuMonitorEventRegister(
                conn.as_ptr(),
                std::ptr::null_mut(),
                event.as_ptr(),
                Some(on_migration_event),
                std::ptr::null_mut(),
                None,
                0,
            )
        };
        if callback_id < 0 {
            return Err(LibvirtError::Events(format!(
                "registering for QEMU MIGRATION events: {}",
                virt::error::Error::last_error()
            )));
        }
        Ok(Self {
            conn,
            callback_id,
            jobs: Mutex::new(HashMap::new()),
            started: Mutex::new(HashMap::new()),
        })
    }

    pub fn connection(&self) -> &Connect {
        &self.conn
    }

    pub fn domain(&self, name: &str) -> Result<Domain, HvError> {
        self.conn.lookup_domain_by_name(name).map_err(|e| {
            HvError::new(
                name,
                HvErrorKind::NoSuchDomain,
                format!("no such domain ({})", e.message()),
            )
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
        let mut seen = 0;
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
                    for e in list[seen.min(list.len())..]
                        .iter()
                        .filter(|e| e.at_unix_us >= since)
                    {
                        debug!(vm, status = e.status, "migration event");
                        if e.status == want {
                            return Ok(Some(e.at_unix_us));
                        }
                        if e.status == "failed" || e.status == "cancelled" {
                            return Err(hv_err(vm, format!("QEMU's migration {}", e.status)));
                        }
                    }
                    seen = list.len();
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

    /// Restores a domain from its memory image, paused; optionally onto another bridge. Returns
    /// the domain's NIC as it came up (MAC, bridge, tap). The caller has checked that no domain
    /// of that name runs ([`Hypervisor::restore_paused`], before it puts the disks back).
    fn restore_image_paused(
        &self,
        vm: &str,
        image: &Path,
        bridge: Option<&str>,
    ) -> Result<DomainNic, HvError> {
        let path = image
            .to_str()
            .ok_or_else(|| hv_err(vm, "image path is not UTF-8"))?;
        let dxml = match bridge {
            Some(bridge) => {
                let xml = self
                    .conn
                    .save_image_xml_desc(path, sys::VIR_DOMAIN_XML_SECURE)
                    .map_err(|e| hv_err(vm, format!("reading {path}: {e}")))?;
                Some(with_bridge(&xml, bridge))
            }
            None => None,
        };
        self.conn
            .restore_domain_flags(path, dxml.as_deref(), sys::VIR_DOMAIN_SAVE_PAUSED)
            .map_err(|e| hv_err(vm, format!("restoring {path}: {e}")))?;
        first_nic(&self.live_xml(vm)?).map_err(|e| hv_err(vm, e))
    }

    /// Resumes a paused domain through libvirt.
    pub fn resume_domain(&self, vm: &str) -> Result<(), HvError> {
        self.domain(vm)?
            .resume()
            .map_err(|e| hv_err(vm, e.to_string()))
    }

    pub fn destroy_domain(&self, vm: &str) -> Result<(), HvError> {
        match self.conn.lookup_domain_by_name(vm) {
            Ok(dom) if dom.is_active().unwrap_or(false) => {
                dom.destroy().map_err(|e| hv_err(vm, e.to_string()))
            }
            _ => Ok(()),
        }
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

impl Drop for Libvirt {
    fn drop(&mut self) {
        // SAFETY: the id came from registering on this connection, which is still open.
        unsafe {
            sys::virConnectDomainQemuMonitorEventDeregister(self.conn.as_ptr(), self.callback_id);
        }
    }
}

impl Hypervisor for Libvirt {
    fn begin(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
        let name = vm.name.as_str();
        let dom = self.domain(name)?;
        if !self.running(name)? {
            return Err(HvError::new(
                name,
                HvErrorKind::NotRunning,
                "the domain is not running",
            ));
        }
        let xml = dom
            .xml_desc(sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE)
            .map_err(|e| hv_err(name, e.to_string()))?;
        let disks = file_disks(&xml).map_err(|e| hv_err(name, e))?;
        let nic = first_nic(&xml).map_err(|e| hv_err(name, e))?;
        if nic.mac != vm.mac {
            return Err(hv_err(
                name,
                format!("its NIC is {} but the group says {}", nic.mac, vm.mac),
            ));
        }
        let image = image_dir.join(format!("{name}.save"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&image)
            .map_err(|e| hv_err(name, format!("creating {}: {e}", image.display())))?;
        let mut data = xml.into_bytes();
        data.push(0);
        let data_len = data.len() as u32;
        file.write_all(&save_header(SAVE_PARTIAL, data_len))
            .and_then(|()| file.write_all(&data))
            .map_err(|e| hv_err(name, format!("writing {}: {e}", image.display())))?;

        events().by_domain.lock().expect("events lock").remove(name);
        self.started
            .lock()
            .expect("started lock")
            .insert(name.to_owned(), unix_us());
        let status = self.migration_status(name)?;
        if matches!(
            status.as_str(),
            "setup" | "active" | "pre-switchover" | "device" | "postcopy-active"
        ) {
            let _ = std::fs::remove_file(&image);
            return Err(hv_err(name, format!("a migration is already `{status}`")));
        }
        let caps = json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "pause-before-switchover", "state": true},
        ]}});
        // QEMU's default bandwidth cap (32 MiB/s) would make every snapshot slow.
        let params = json!({"execute": "migrate-set-parameters",
            "arguments": {"max-bandwidth": 8u64 << 30}});
        let getfd = json!({"execute": "getfd", "arguments": {"fdname": FD_NAME}});
        let migrate = json!({"execute": "migrate", "arguments": {"uri": format!("fd:{FD_NAME}")}});
        let started = self
            .qmp(name, caps, None)
            .and_then(|_| self.qmp(name, params, None))
            .and_then(|_| self.qmp(name, getfd, Some(file.as_raw_fd())))
            .and_then(|_| self.qmp(name, migrate, None));
        if let Err(e) = started {
            // QEMU may hold the fd already: let it go, with the file.
            let _ = self.qmp(
                name,
                json!({"execute": "closefd", "arguments": {"fdname": FD_NAME}}),
                None,
            );
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        self.jobs.lock().expect("jobs lock").insert(
            name.into(),
            Job {
                image,
                file,
                data_len,
                disks,
                dir: image_dir.to_owned(),
            },
        );
        Ok(())
    }

    fn wait_paused(&self, vm: &VmSpec, timeout: Duration) -> Result<Paused, HvError> {
        let at = self.wait_status(&vm.name, "pre-switchover", timeout)?;
        Ok(Paused {
            hypervisor_unix_us: at,
            seen_unix_us: unix_us(),
        })
    }

    fn complete(&self, vm: &VmSpec, timeout: Duration) -> Result<Vec<PathBuf>, HvError> {
        let name = vm.name.as_str();
        self.qmp(
            name,
            json!({"execute": "migrate-continue", "arguments": {"state": "pre-switchover"}}),
            None,
        )?;
        self.wait_status(name, "completed", timeout)?;
        let mut job = self
            .jobs
            .lock()
            .expect("jobs lock")
            .remove(name)
            .ok_or_else(|| hv_err(name, "no snapshot in progress"))?;
        // The VM is still stopped, and QEMU flushed and let go of its disks when the migration
        // completed: the files are the disks at the snapshot point. Copy them (copy_file_range,
        // which shares extents where the filesystem can).
        let mut images = vec![job.image.clone()];
        if !job.disks.is_empty() {
            let mut copies = Vec::new();
            for (target, source) in &job.disks {
                let copy = job.dir.join(format!("{name}.{target}.disk"));
                std::fs::copy(source, &copy)
                    .and_then(|_| File::open(&copy)?.sync_all())
                    .map_err(|e| {
                        hv_err(
                            name,
                            format!("copying disk {target} ({}): {e}", source.display()),
                        )
                    })?;
                copies.push(DiskCopy {
                    target: target.clone(),
                    source: source.clone(),
                    copy: copy.clone(),
                });
                images.push(copy);
            }
            let sidecar = job.dir.join(format!("{name}.disks.json"));
            let text = serde_json::to_vec_pretty(&copies).expect("disk list serializes");
            std::fs::write(&sidecar, text)
                .and_then(|()| File::open(&sidecar)?.sync_all())
                .map_err(|e| hv_err(name, format!("writing {}: {e}", sidecar.display())))?;
            images.push(sidecar);
        }
        // Only now is the image whole: mark it so (libvirt refuses partial images).
        job.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| job.file.write_all(&save_header(SAVE_MAGIC, job.data_len)))
            .and_then(|()| job.file.sync_all())
            .map_err(|e| hv_err(name, format!("finishing {}: {e}", job.image.display())))?;
        Ok(images)
    }

    fn resume(&self, vm: &VmSpec) -> Result<(), HvError> {
        let name = vm.name.as_str();
        // Right after a migration QEMU may still say "not finalized" for a few ms.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.running(name)? {
                return Ok(());
            }
            match self.qmp(name, json!({"execute": "cont"}), None) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() < deadline && e.detail.contains("not finalized") => {
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn nic(&self, vm: &str) -> Result<(MacAddr, String), HvError> {
        if !self.running(vm)? {
            return Err(HvError::new(
                vm,
                HvErrorKind::NotRunning,
                "the domain is not running",
            ));
        }
        let nic = first_nic(&self.live_xml(vm)?).map_err(|e| hv_err(vm, e))?;
        let tap = nic
            .tap
            .ok_or_else(|| hv_err(vm, "its interface has no host-side device"))?;
        Ok((nic.mac, tap))
    }

    fn restore_paused(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        bridge: Option<&IfName>,
    ) -> Result<String, HvError> {
        let image = images
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "save"))
            .ok_or_else(|| hv_err(&vm.name, "the snapshot has no memory image"))?;
        if let Ok(dom) = self.conn.lookup_domain_by_name(&vm.name)
            && dom.is_active().unwrap_or(false)
        {
            return Err(HvError::new(
                &vm.name,
                HvErrorKind::Running,
                "a domain of that name is running: destroy it before restoring",
            ));
        }
        // The disks go back to where the domain has them, as they were at the snapshot point.
        if let Some(sidecar) = images
            .iter()
            .find(|p| p.to_string_lossy().ends_with(".disks.json"))
        {
            let copies: Vec<DiskCopy> = std::fs::read(sidecar)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_slice(&t).map_err(|e| e.to_string()))
                .map_err(|e| hv_err(&vm.name, format!("{}: {e}", sidecar.display())))?;
            for d in copies {
                std::fs::copy(&d.copy, &d.source).map_err(|e| {
                    hv_err(
                        &vm.name,
                        format!("restoring disk {} to {}: {e}", d.target, d.source.display()),
                    )
                })?;
            }
        }
        let nic = self.restore_image_paused(&vm.name, image, bridge.map(IfName::as_str))?;
        if nic.mac != vm.mac {
            let _ = self.destroy_domain(&vm.name);
            return Err(hv_err(
                &vm.name,
                format!(
                    "restored with MAC {} but the snapshot says {}",
                    nic.mac, vm.mac
                ),
            ));
        }
        nic.tap
            .ok_or_else(|| hv_err(&vm.name, "restored without a host-side device"))
    }

    fn destroy(&self, vm: &VmSpec) -> Result<(), HvError> {
        self.destroy_domain(&vm.name)
    }

    fn discard(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
        discard_local(&vm.name, image_dir).map_err(|e| hv_err(&vm.name, e.to_string()))
    }

    fn cancel(&self, vm: &VmSpec) -> Result<(), HvError> {
        let name = vm.name.as_str();
        let job = self.jobs.lock().expect("jobs lock").remove(name);
        let status = self.migration_status(name)?;
        if matches!(
            status.as_str(),
            "setup" | "active" | "pre-switchover" | "device"
        ) {
            self.qmp(name, json!({"execute": "migrate_cancel"}), None)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && matches!(
                    self.migration_status(name)?.as_str(),
                    "setup" | "active" | "pre-switchover" | "device" | "cancelling"
                )
            {
                thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(job) = job {
            let _ = std::fs::remove_file(job.image);
        }
        // Stopped by our migration (cancelled after completing, or completed but not resumed):
        // run it again. A cancelled migration restarts the vCPUs by itself; a VM paused by
        // someone else is `paused` and is left so.
        let run_state = self.qmp(name, json!({"execute": "query-status"}), None)?;
        match run_state.get("status").and_then(Value::as_str) {
            Some("postmigrate") | Some("finish-migrate") => self.resume(vm),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain><devices>\
        <interface type='bridge'><mac address='52:54:00:77:00:11'/><source bridge='enfbr0'/>\
        <target dev='vnet3'/></interface></devices></domain>";

    #[test]
    fn reads_the_first_nic() {
        let nic = first_nic(XML).unwrap();
        assert_eq!(nic.mac.to_string(), "52:54:00:77:00:11");
        assert_eq!(nic.bridge.as_deref(), Some("enfbr0"));
        assert_eq!(nic.tap.as_deref(), Some("vnet3"));
        assert!(first_nic("<domain/>").is_err());
    }

    #[test]
    fn moves_interfaces_to_another_bridge_and_nothing_else() {
        let moved = with_bridge(XML, "enfbr9");
        assert_eq!(first_nic(&moved).unwrap().bridge.as_deref(), Some("enfbr9"));
        assert_eq!(moved.len(), XML.len());
        assert_eq!(file_disks(XML).unwrap(), vec![]);
        assert_eq!(
            file_disks(
                "<domain><devices><disk type='file' device='disk'><source file='/d/a.img'/>\
                 <target dev='vda'/></disk><disk type='file' device='cdrom'/></devices></domain>"
            )
            .unwrap(),
            vec![("vda".to_owned(), PathBuf::from("/d/a.img"))]
        );
        let refused = file_disks(
            "<domain><devices><disk type='block' device='disk'><source dev='/dev/sdb'/>\
             <target dev='vdb'/></disk></devices></domain>",
        )
        .unwrap_err();
        assert!(
            refused.contains("vdb") && refused.contains("block"),
            "{refused}"
        );
    }

    #[test]
    fn save_header_has_libvirts_layout() {
        let h = save_header(SAVE_MAGIC, 1234);
        assert_eq!(h.len(), 92);
        assert_eq!(&h[..16], b"LibvirtQemudSave");
        assert_eq!(u32::from_ne_bytes(h[16..20].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(h[20..24].try_into().unwrap()), 1234);
        assert_eq!(u32::from_ne_bytes(h[24..28].try_into().unwrap()), 1);
    }
}
