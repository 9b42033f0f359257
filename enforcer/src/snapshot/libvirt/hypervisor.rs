//! [`Hypervisor`] for [`Libvirt`]: both methods' steps on one VM (see the parent's header),
//! its restore, and the clean-up of an unfinished snapshot.

use std::{
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tracing::{debug, warn};
use virt::sys;

use super::{
    FD_NAME, Job, Libvirt, RESUME, STOP,
    disks::{
        CAPTURES, COPIES, DiskCapture, DiskCopy, plan_captures, prepare_overlays, read_list,
        remove_made, remove_unused, restore_copies, restore_overlays, snapshot_xml, write_list,
    },
    events, hv_err,
    image::SaveImage,
    xml::{file_disks, first_nic},
};
use crate::{
    model::{IfName, MacAddr, VmSpec},
    sched::Boost,
    snapshot::{
        DomainState,
        backends::{HvError, HvErrorKind, Hypervisor, Paused, unix_us},
        manifest::CutMethod,
        private::copy_private,
        room,
        store::discard_local,
    },
};

/// QEMU's migration states in which a migration is under way.
const UNDER_WAY: [&str; 5] = [
    "setup",
    "active",
    "pre-switchover",
    "device",
    "postcopy-active",
];

impl Libvirt {
    /// The instant method needs QEMU's background snapshot to run the VM again by itself after
    /// saving its device state, as QEMU 6.0–8.2 do even for a VM stopped before the `migrate`.
    /// From 9.0 QEMU leaves such a VM stopped, and nothing says when its device state is saved
    /// (running it earlier would capture memory after the disks): refused, clearly.
    fn check_instant_capable(&self, vm: &str) -> Result<(), HvError> {
        let version = self.qmp(vm, json!({"execute": "query-version"}), None)?;
        let number = |k: &str| version["qemu"][k].as_u64().unwrap_or(0);
        let (major, minor) = (number("major"), number("minor"));
        if !(6..9).contains(&major) {
            return Err(HvError::new(
                vm,
                HvErrorKind::Failed,
                format!(
                    "QEMU {major}.{minor}: the instant method needs QEMU 6.0 to 8.2 (its \
                     background snapshot must run the stopped VM again); use --method pre-copy"
                ),
            ));
        }
        Ok(())
    }

    /// Puts QEMU's migration capabilities back as libvirt expects them: left on, a later
    /// `virsh migrate` would wait in `pre-switchover` forever, or a `virsh save` would run
    /// the VM again by itself (background snapshot).
    fn reset_capabilities(&self, vm: &str) {
        let caps = json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
            {"capability": "pause-before-switchover", "state": false},
            {"capability": "background-snapshot", "state": false},
        ]}});
        if let Err(e) = self.qmp(vm, caps, None) {
            warn!(vm, %e, "putting QEMU's migration capabilities back");
        }
    }

    fn job_field<T>(&self, vm: &str, f: impl FnOnce(&mut Job) -> T) -> Result<T, HvError> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        let job = jobs
            .get_mut(vm)
            .ok_or_else(|| hv_err(vm, "no snapshot in progress"))?;
        Ok(f(job))
    }
}

impl Hypervisor for Libvirt {
    fn begin(&self, vm: &VmSpec, image_dir: &Path, method: CutMethod) -> Result<(), HvError> {
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
        if self.jobs.lock().expect("jobs lock").contains_key(name) {
            return Err(hv_err(name, "a snapshot of it is already in progress"));
        }
        let status = self.migration_status(name)?;
        if UNDER_WAY.contains(&status.as_str()) {
            return Err(hv_err(name, format!("a migration is already `{status}`")));
        }
        if method == CutMethod::Instant {
            self.check_instant_capable(name)?;
        }
        if method == CutMethod::PreCopy && xml.starts_with("<domain type='qemu'") {
            // Measured here (docs/design.md, "Facts of the platform"): QEMU's dirty-page
            // tracking under TCG lets a pre-copy image miss writes.
            warn!(
                vm = name,
                "pre-copy of a TCG guest (no KVM): restored guests crashed in 2 of 9 restores \
                 on this platform; the instant method does not rely on dirty-page tracking"
            );
        }
        // Room in the store before anything is written there.
        let memory_kib = dom.max_memory().map_err(|e| hv_err(name, e.to_string()))?;
        let copied: u64 = match method {
            CutMethod::PreCopy => disks
                .iter()
                .map(|d| std::fs::metadata(&d.file).map_or(0, |m| m.blocks() * 512))
                .sum(),
            CutMethod::Instant => 0,
        };
        let what = format!(
            "memory {} MiB{}",
            memory_kib / 1024,
            if copied > 0 {
                format!(", disk copies {} MiB", copied >> 20)
            } else {
                String::new()
            }
        );
        let promise = self.promise(name, image_dir, room::estimate(memory_kib, copied), &what)?;
        let path = image_dir.join(format!("{name}.save"));
        let image = SaveImage::create(&path, &xml)
            .map_err(|e| hv_err(name, format!("creating {}: {e}", path.display())))?;

        events().by_domain.lock().expect("events lock").remove(name);
        self.started
            .lock()
            .expect("started lock")
            .insert(name.to_owned(), unix_us());
        // The two methods' capabilities exclude each other: set both in one call.
        let caps = json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "pause-before-switchover", "state": method == CutMethod::PreCopy},
            {"capability": "background-snapshot", "state": method == CutMethod::Instant},
        ]}});
        // QEMU's default bandwidth cap (32 MiB/s) would make every snapshot slow.
        let params = json!({"execute": "migrate-set-parameters",
            "arguments": {"max-bandwidth": 8u64 << 30}});
        let getfd = json!({"execute": "getfd", "arguments": {"fdname": FD_NAME}});
        let mut started = self
            .qmp(name, caps, None)
            .and_then(|_| self.qmp(name, params, None))
            .and_then(|_| self.qmp(name, getfd, Some(image.file.as_raw_fd())));
        if method == CutMethod::PreCopy {
            started = started.and_then(|_| self.migrate(name));
        }
        if let Err(e) = started {
            // QEMU may hold the fd already: let it go, with the file.
            let _ = self.qmp(
                name,
                json!({"execute": "closefd", "arguments": {"fdname": FD_NAME}}),
                None,
            );
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        // The overlays are named after the snapshot (its directory's name).
        let tag = image_dir
            .file_name()
            .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy().into_owned());
        let captures = match method {
            CutMethod::Instant => plan_captures(name, &disks, &tag),
            CutMethod::PreCopy => Vec::new(),
        };
        if let Err(e) = prepare_overlays(&captures) {
            let _ = self.qmp(
                name,
                json!({"execute": "closefd", "arguments": {"fdname": FD_NAME}}),
                None,
            );
            let _ = std::fs::remove_file(&path);
            return Err(hv_err(name, e));
        }
        self.jobs.lock().expect("jobs lock").insert(
            name.into(),
            Job {
                method,
                dom,
                image,
                disks,
                captures,
                dir: image_dir.to_owned(),
                stopped: false,
                migrated: method == CutMethod::PreCopy,
                qemu_pid: self.qemu_pid(name),
                boost: None,
            },
        );
        promise.keep();
        Ok(())
    }

    fn stop(&self, vm: &VmSpec) -> Result<Paused, HvError> {
        let name = vm.name.as_str();
        let (dom, pid) = self
            .job_field(name, |j| {
                (j.method == CutMethod::Instant).then(|| (j.dom.clone(), j.qemu_pid))
            })?
            .ok_or_else(|| hv_err(name, "its snapshot is not an instant one"))?;
        // Its QEMU gets the CPU first until it runs again (see `Boost`).
        let boost = pid.and_then(Boost::process);
        if boost.is_none() {
            debug!(vm = name, "its QEMU could not be boosted for the stop");
        }
        let before = unix_us();
        dom.suspend()
            .map_err(|e| hv_err(name, format!("stopping it: {e}")))?;
        let seen = unix_us();
        self.job_field(name, |j| {
            j.stopped = true;
            j.boost = boost;
        })?;
        Ok(Paused {
            hypervisor_unix_us: self.event_at(name, STOP, before, Duration::from_millis(50)),
            seen_unix_us: seen,
        })
    }

    fn capture(&self, vm: &VmSpec) -> Result<u64, HvError> {
        let name = vm.name.as_str();
        let (dom, captures) = self.job_field(name, |j| (j.dom.clone(), j.captures.clone()))?;
        let t0 = unix_us();
        if !captures.is_empty() {
            // Atomic: every disk moves to its overlay (made at `begin`), or none does.
            dom.create_snapshot_xml(
                &snapshot_xml(&captures),
                sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                    | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                    | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                    | sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT,
            )
            .map_err(|e| hv_err(name, format!("freezing its disks: {e}")))?;
        }
        let before = unix_us();
        self.migrate(name)?;
        let migrated = unix_us();
        self.job_field(name, |j| j.migrated = true)?;
        // QEMU saves the device state, write-protects memory and runs the VM again by itself
        // (QEMU 7.2's background snapshot); its RESUME event says when.
        let resumed = match self.event_at(name, RESUME, before, Duration::from_secs(5)) {
            Some(at) => at,
            None if self.running(name)? => unix_us(),
            None => {
                return Err(hv_err(
                    name,
                    "QEMU did not run it again after saving its device state",
                ));
            }
        };
        self.job_field(name, |j| {
            j.stopped = false;
            j.boost = None;
        })?;
        debug!(
            vm = name,
            disks_ms = (before - t0) as f64 / 1000.0,
            migrate_ms = (migrated - before) as f64 / 1000.0,
            to_resume_ms = (resumed as f64 - migrated as f64) / 1000.0,
            "captured"
        );
        Ok(resumed)
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
        let method = self.job_field(name, |j| j.method)?;
        if method == CutMethod::PreCopy {
            self.qmp(
                name,
                json!({"execute": "migrate-continue", "arguments": {"state": "pre-switchover"}}),
                None,
            )?;
        }
        self.wait_status(name, "completed", timeout)?;
        let mut job = self
            .jobs
            .lock()
            .expect("jobs lock")
            .remove(name)
            .ok_or_else(|| hv_err(name, "no snapshot in progress"))?;
        // The promise ends with this step, once the disk copies are written too.
        let _promise = self.promise_until_dropped(name);
        let mut images = vec![job.image.path.clone()];
        let list = match method {
            CutMethod::Instant if !job.captures.is_empty() => {
                Some(write_list(&job.dir, name, CAPTURES, &job.captures))
            }
            // The VM is still stopped, and QEMU flushed and let go of its disks when the
            // migration completed: the files are the disks at the snapshot point.
            CutMethod::PreCopy if !job.disks.is_empty() => {
                let mut copies = Vec::new();
                for d in &job.disks {
                    let copy = job.dir.join(format!("{name}.{}.disk", d.target));
                    copy_private(&d.file, &copy).map_err(|e| {
                        hv_err(
                            name,
                            format!("copying disk {} ({}): {e}", d.target, d.file.display()),
                        )
                    })?;
                    copies.push(DiskCopy {
                        target: d.target.clone(),
                        source: d.file.clone(),
                        copy: copy.clone(),
                    });
                    images.push(copy);
                }
                Some(write_list(&job.dir, name, COPIES, &copies))
            }
            _ => None,
        };
        if let Some(list) = list {
            images.push(list.map_err(|e| hv_err(name, e))?);
        }
        // Only now is the image whole.
        job.image
            .finish()
            .map_err(|e| hv_err(name, format!("finishing {}: {e}", job.image.path.display())))?;
        self.reset_capabilities(name);
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

    fn state(&self, vm: &str) -> Result<DomainState, HvError> {
        self.domain_state(vm)
    }

    fn restore_paused(
        &self,
        vm: &VmSpec,
        images: &[PathBuf],
        bridge: Option<&IfName>,
    ) -> Result<String, HvError> {
        let name = vm.name.as_str();
        let image = images
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "save"))
            .ok_or_else(|| hv_err(name, "the snapshot has no memory image"))?;
        let list = |suffix: &str| {
            images
                .iter()
                .find(|p| p.to_string_lossy().ends_with(&format!(".{suffix}")))
        };
        if let Ok(dom) = self.domain(name)
            && dom.is_active().unwrap_or(false)
        {
            return Err(HvError::new(
                name,
                HvErrorKind::Running,
                "a domain of that name is running: destroy it before restoring",
            ));
        }
        // Everything read and checked before anything changes.
        let path = image
            .to_str()
            .ok_or_else(|| hv_err(name, "image path is not UTF-8"))?;
        let saved_xml = self
            .conn(name)?
            .save_image_xml_desc(path, sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| hv_err(name, format!("reading {path}: {e}")))?;
        // The image must be this VM's: libvirt restores whatever domain an image names, so
        // another VM's image would bring that VM up (or fail against it) instead.
        let not_its = |detail: String| HvError::new(name, HvErrorKind::NotItsImage, detail);
        let saved_name = super::domain_name(&saved_xml).map_err(|e| hv_err(name, e))?;
        if saved_name != name {
            return Err(not_its(format!(
                "{path} is an image of domain {saved_name}, not {name}"
            )));
        }
        let saved_mac = super::first_nic(&saved_xml)
            .map_err(|e| hv_err(name, e))?
            .mac;
        if saved_mac != vm.mac {
            return Err(not_its(format!(
                "{path} has a NIC with MAC {saved_mac}, the snapshot says {}",
                vm.mac
            )));
        }
        let captures: Vec<DiskCapture> = list(CAPTURES)
            .map(|p| read_list(p))
            .transpose()
            .map_err(|e| hv_err(name, e))?
            .unwrap_or_default();
        let copies: Vec<DiskCopy> = list(COPIES)
            .map(|p| read_list(p))
            .transpose()
            .map_err(|e| hv_err(name, e))?
            .unwrap_or_default();
        let tag = format!(
            "r{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        );
        // Instant snapshots: a new overlay on each frozen disk. Pre-copy: the copies copied
        // into new files. No disk is ever written over.
        let mut disks = restore_overlays(name, &captures, &tag).map_err(|e| hv_err(name, e))?;
        match restore_copies(name, &copies, &tag) {
            Ok(copied) => disks.extend(copied),
            Err(e) => {
                remove_made(&disks);
                return Err(hv_err(name, e));
            }
        }
        let undo = || remove_made(&disks);
        let xml = match super::for_restore(&saved_xml, bridge.map(IfName::as_str), &disks) {
            Ok(xml) => xml,
            Err(e) => {
                undo();
                return Err(hv_err(name, e));
            }
        };
        let nic = match self.restore_image_paused(name, image, xml) {
            Ok(nic) => nic,
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        if nic.mac != vm.mac {
            let _ = self.destroy_domain(name);
            return Err(hv_err(
                name,
                format!(
                    "restored with MAC {} but the snapshot says {}",
                    nic.mac, vm.mac
                ),
            ));
        }
        nic.tap
            .ok_or_else(|| hv_err(name, "restored without a host-side device"))
    }

    fn destroy(&self, vm: &VmSpec) -> Result<(), HvError> {
        self.destroy_domain(&vm.name)
    }

    fn discard(&self, vm: &VmSpec, image_dir: &Path) -> Result<(), HvError> {
        discard_local(&vm.name, image_dir).map_err(|e| hv_err(&vm.name, e.to_string()))?;
        // Its frozen disks are needed no more unless something else sits on them: merged
        // away or deleted (see `chain`).
        if let Some(store) = image_dir.parent() {
            self.shorten_chains(&vm.name, store);
        }
        Ok(())
    }

    fn cancel(&self, vm: &VmSpec) -> Result<(), HvError> {
        let name = vm.name.as_str();
        let job = self.jobs.lock().expect("jobs lock").remove(name);
        self.release(name);
        let status = self.migration_status(name)?;
        if UNDER_WAY[..4].contains(&status.as_str()) {
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
        } else if job.as_ref().is_some_and(|j| !j.migrated) {
            // Begun but never migrated (an instant snapshot stopped before its capture): QEMU
            // still holds the image's fd.
            let _ = self.qmp(
                name,
                json!({"execute": "closefd", "arguments": {"fdname": FD_NAME}}),
                None,
            );
        }
        let stopped_by_us = job.as_ref().is_some_and(|j| j.stopped);
        if let Some(job) = job {
            let _ = std::fs::remove_file(&job.image.path);
            // Overlays made for a capture that never happened; one the VM runs on stays.
            let in_use: Vec<PathBuf> = self
                .live_xml(name)
                .ok()
                .and_then(|x| file_disks(&x).ok())
                .map(|d| d.into_iter().map(|d| d.file).collect())
                .unwrap_or_else(|| job.captures.iter().map(|c| c.overlay.clone()).collect());
            remove_unused(&job.captures, &in_use);
        }
        // Stopped by this snapshot (an instant one's `stop`; a pre-copy migration cancelled
        // after completing, or completed but not resumed): run it again. A cancelled pre-copy
        // migration restarts the vCPUs by itself; a VM paused by someone else is left so.
        let run_state = self.qmp(name, json!({"execute": "query-status"}), None)?;
        let ran = match run_state.get("status").and_then(Value::as_str) {
            Some("postmigrate") | Some("finish-migrate") => self.resume(vm),
            Some("paused") if stopped_by_us => self.resume(vm),
            _ => Ok(()),
        };
        self.reset_capabilities(name);
        ran
    }
}
