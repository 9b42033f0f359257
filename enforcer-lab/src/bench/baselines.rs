//! What users run today instead, on the same guests, for `bench snapshot`:
//! - **libvirt's live snapshot of each VM, one after another** (`virsh snapshot-create-as
//!   --live --memspec … --diskspec …` in a loop): libvirt copies memory live, pauses the VM,
//!   switches its disks to overlays and resumes it;
//! - **pause all, save each, resume all**: every VM suspended, each one's memory and disks
//!   saved by libvirt (an external snapshot of the paused VM), then every VM resumed.
//!
//! No enforcement either way. A VM's downtime is how long libvirt reports it paused (its state
//! read every millisecond from a thread of its own); the group's stop spread runs from the
//! first VM's pause to the last one's. Each run's images can be restored ([`restore`]) for the
//! same consistency check as the product's snapshots: libvirt's memory file is a save image,
//! and each disk as of the snapshot is the file its new overlay sits on.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use virt::{
    connect::Connect,
    domain::{Domain, DomainState},
    sys,
};

use crate::vms::VmLab;
use enforcer::{
    model::VmSpec,
    snapshot::{
        Hypervisor as _,
        libvirt::{DiskCapture, Libvirt, file_disks, snapshot_disks_xml},
    },
};

/// One group snapshot by a baseline.
pub(crate) struct BaselineRun {
    /// Each VM's pause and resume (ms since the run began), in the lab's order.
    pub(crate) paused_ms: Vec<(f64, f64)>,
    pub(crate) downtime_ms: Vec<f64>,
    pub(crate) stop_spread_ms: f64,
    /// The memory images' bytes (the disks' new overlays start empty).
    pub(crate) written: u64,
    /// Per VM, in the lab's order: its memory image and the list of its disks as of the
    /// snapshot, as [`enforcer::snapshot::libvirt::Libvirt`] restores them.
    pub(crate) images: Vec<Vec<PathBuf>>,
}

/// libvirt's external snapshot of memory and every file disk (new overlays named
/// `<vm>.libvirt-<tag>.<target>.qcow2` beside the disks, which the lab removes), and the files
/// that restore it: the memory image and a list of the frozen disks under those overlays.
fn snapshot_xml(
    dom: &Domain,
    vm: &str,
    dir: &Path,
    tag: &str,
) -> anyhow::Result<(String, Vec<PathBuf>)> {
    let disks = file_disks(&dom.xml_desc(0)?).map_err(|e| anyhow::anyhow!("{vm}: {e}"))?;
    let captures: Vec<DiskCapture> = disks
        .into_iter()
        .map(|d| DiskCapture {
            overlay: d
                .file
                .with_file_name(format!("{vm}.libvirt-{tag}.{}.qcow2", d.target)),
            target: d.target,
            frozen: d.file,
            format: d.format,
        })
        .collect();
    let disks = snapshot_disks_xml(&captures);
    let (memory, list) = (
        dir.join(format!("{vm}.{tag}.save")),
        dir.join(format!("{vm}.{tag}.overlays.json")),
    );
    std::fs::write(&list, serde_json::to_vec(&captures)?)?;
    Ok((
        format!(
            "<domainsnapshot><memory snapshot='external' file='{}'/>{disks}</domainsnapshot>",
            memory.display()
        ),
        vec![memory, list],
    ))
}

fn memory_bytes(images: &[Vec<PathBuf>]) -> u64 {
    images
        .iter()
        .flatten()
        .filter(|p| p.extension().is_some_and(|e| e == "save"))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Kills the group and restores it from a baseline's images (paused, then every VM resumed),
/// onto the bridges it ran on.
pub(crate) fn restore(lab: &VmLab, run: &BaselineRun) -> anyhow::Result<()> {
    let libvirt = Libvirt::open(&lab.uri())?;
    lab.destroy_all();
    let specs: Vec<VmSpec> = lab
        .vms
        .iter()
        .map(|v| VmSpec {
            name: v.name.clone(),
            mac: v.mac,
        })
        .collect();
    for (spec, files) in specs.iter().zip(&run.images) {
        libvirt.restore_paused(spec, files, None)?;
    }
    for spec in &specs {
        libvirt.resume(spec)?;
    }
    Ok(())
}

/// Reads a domain's state every millisecond until stopped; returns when it was first and last
/// seen paused (since `origin`).
struct PauseWatch {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Option<(f64, f64)>>,
}

impl PauseWatch {
    fn start(uri: &str, vm: &str, origin: Instant) -> anyhow::Result<Self> {
        let conn = Connect::open(Some(uri))?;
        let dom = conn.lookup_domain_by_name(vm)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let _conn = conn;
            let mut seen: Option<(f64, f64)> = None;
            while !flag.load(Ordering::SeqCst) {
                if let Ok((state, _)) = dom.state()
                    && matches!(Result::<_, _>::from(state), Ok(DomainState::Paused))
                {
                    let at = origin.elapsed().as_secs_f64() * 1000.0;
                    seen = Some(seen.map_or((at, at), |(first, _)| (first, at)));
                }
                thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        Ok(Self { stop, thread })
    }

    fn finish(self) -> Option<(f64, f64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().ok().flatten()
    }
}

/// libvirt's live snapshot of each VM, one after another.
pub(crate) fn per_vm_live_loop(lab: &VmLab, dir: &Path, tag: &str) -> anyhow::Result<BaselineRun> {
    let conn = Connect::open(Some(&lab.uri()))?;
    let origin = Instant::now();
    let mut pauses = Vec::new();
    let mut images = Vec::new();
    for vm in &lab.vms {
        let dom = conn.lookup_domain_by_name(&vm.name)?;
        let (xml, files) = snapshot_xml(&dom, &vm.name, dir, tag)?;
        images.push(files);
        let watch = PauseWatch::start(&lab.uri(), &vm.name, origin)?;
        let made = dom.create_snapshot_xml(
            &xml,
            sys::VIR_DOMAIN_SNAPSHOT_CREATE_LIVE | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
        );
        let seen = watch.finish();
        made.map_err(|e| anyhow::anyhow!("{}: libvirt's live snapshot: {e}", vm.name))?;
        // A pause shorter than the watch's period may go unseen: then it counts as 1 ms.
        pauses.push(seen.unwrap_or_else(|| {
            let at = origin.elapsed().as_secs_f64() * 1000.0;
            (at - 1.0, at)
        }));
    }
    Ok(BaselineRun {
        downtime_ms: pauses.iter().map(|(a, b)| b - a + 1.0).collect(),
        stop_spread_ms: spread(pauses.iter().map(|p| p.0)),
        paused_ms: pauses.iter().map(|(a, b)| (*a, b + 1.0)).collect(),
        written: memory_bytes(&images),
        images,
    })
}

/// Every VM paused, each one's memory and disks saved, every VM resumed.
pub(crate) fn pause_all_save_resume(
    lab: &VmLab,
    dir: &Path,
    tag: &str,
) -> anyhow::Result<BaselineRun> {
    let conn = Connect::open(Some(&lab.uri()))?;
    let doms: Vec<Domain> = lab
        .vms
        .iter()
        .map(|vm| conn.lookup_domain_by_name(&vm.name))
        .collect::<Result<_, _>>()?;
    let origin = Instant::now();
    let ms = || origin.elapsed().as_secs_f64() * 1000.0;
    let mut paused_at = Vec::new();
    for dom in &doms {
        dom.suspend()?;
        paused_at.push(ms());
    }
    let mut images = Vec::new();
    let saved: anyhow::Result<()> = lab.vms.iter().zip(&doms).try_for_each(|(vm, dom)| {
        let (xml, files) = snapshot_xml(dom, &vm.name, dir, tag)?;
        images.push(files);
        dom.create_snapshot_xml(&xml, sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
            .map_err(|e| anyhow::anyhow!("{}: saving it: {e}", vm.name))?;
        Ok(())
    });
    let mut resumed_at = Vec::new();
    for dom in &doms {
        // Every VM runs again, also when a save failed.
        let resumed = dom.resume();
        resumed_at.push(ms());
        resumed?;
    }
    saved?;
    Ok(BaselineRun {
        downtime_ms: paused_at
            .iter()
            .zip(&resumed_at)
            .map(|(p, r)| r - p)
            .collect(),
        stop_spread_ms: spread(paused_at.iter().copied()),
        paused_ms: paused_at.into_iter().zip(resumed_at).collect(),
        written: memory_bytes(&images),
        images,
    })
}

fn spread(at: impl Iterator<Item = f64>) -> f64 {
    let at: Vec<f64> = at.collect();
    let first = at.iter().copied().fold(f64::MAX, f64::min);
    at.iter().copied().fold(first, f64::max) - first
}
