//! What users run today instead, on the same guests, for `bench snapshot`:
//! - **libvirt's live snapshot of each VM, one after another** (`virsh snapshot-create-as
//!   --live --memspec … --diskspec …` in a loop): libvirt copies memory live, pauses the VM,
//!   switches its disks to overlays and resumes it;
//! - **pause all, save each, resume all**: every VM suspended, each one's memory and disks
//!   saved by libvirt (an external snapshot of the paused VM), then every VM resumed.
//!
//! No enforcement either way. A VM's downtime is how long libvirt reports it paused (its state
//! read every millisecond from a thread of its own); the group's stop spread runs from the
//! first VM's pause to the last one's.

use std::{
    path::Path,
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

/// One group snapshot by a baseline: per-VM downtime, and the spread of the pauses (ms).
pub(crate) struct BaselineRun {
    pub(crate) downtime_ms: Vec<f64>,
    pub(crate) stop_spread_ms: f64,
}

/// libvirt's external snapshot of memory and every file disk (new overlays named
/// `<vm>.libvirt-<tag>.<target>.qcow2` beside the disks, which the lab removes).
fn snapshot_xml(dom: &Domain, vm: &str, dir: &Path, tag: &str) -> anyhow::Result<String> {
    let disks = enforcer::snapshot::libvirt::file_disks(&dom.xml_desc(0)?)
        .map_err(|e| anyhow::anyhow!("{vm}: {e}"))?;
    let disks: String = disks
        .iter()
        .map(|d| {
            let overlay = d
                .file
                .with_file_name(format!("{vm}.libvirt-{tag}.{}.qcow2", d.target));
            format!(
                "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
                d.target,
                overlay.display()
            )
        })
        .collect();
    Ok(format!(
        "<domainsnapshot><memory snapshot='external' file='{}'/><disks>{disks}</disks></domainsnapshot>",
        dir.join(format!("{vm}.{tag}.mem")).display()
    ))
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
    for vm in &lab.vms {
        let dom = conn.lookup_domain_by_name(&vm.name)?;
        let xml = snapshot_xml(&dom, &vm.name, dir, tag)?;
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
    let saved: anyhow::Result<()> = lab.vms.iter().zip(&doms).try_for_each(|(vm, dom)| {
        let xml = snapshot_xml(dom, &vm.name, dir, tag)?;
        dom.create_snapshot_xml(&xml, sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
            .map_err(|e| anyhow::anyhow!("{}: saving it: {e}", vm.name))?;
        Ok(())
    });
    let mut downtime_ms = Vec::new();
    for (dom, at) in doms.iter().zip(&paused_at) {
        // Every VM runs again, also when a save failed.
        let resumed = dom.resume();
        downtime_ms.push(ms() - at);
        resumed?;
    }
    saved?;
    Ok(BaselineRun {
        downtime_ms,
        stop_spread_ms: spread(paused_at.iter().copied()),
    })
}

fn spread(at: impl Iterator<Item = f64>) -> f64 {
    let at: Vec<f64> = at.collect();
    let first = at.iter().copied().fold(f64::MAX, f64::min);
    at.iter().copied().fold(first, f64::max) - first
}
