//! `bench snapshot`: group snapshots of real guests under traffic through the HTTP API, by
//! both cut methods side by side on the same guests (pre-copy first, while the disks are still
//! the files the guests booted on, so it copies them whole; then instant, which puts them on
//! overlays):
//! per-VM downtime, the group's stop spread, pause → advance, the receivers' disruption, and
//! the bytes each snapshot wrote, as percentiles.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use enforcer::snapshot::{CutMethod, Manifest};

use super::baselines;
use crate::{
    demo::vms::{VmDemoOptions, blocking, log, with_lab},
    stats::percentiles,
};

/// One method's samples.
#[derive(Default)]
struct Samples {
    pause_to_advance: Vec<f64>,
    downtime: Vec<f64>,
    stop_spread: Vec<f64>,
    disruption: Vec<f64>,
    image_complete: Vec<f64>,
    written_mib: Vec<f64>,
    held: Vec<f64>,
}

impl Samples {
    fn add(&mut self, m: &Manifest, written: u64) {
        let last_advance = m
            .vms
            .iter()
            .filter_map(|v| v.timeline.advanced_ms)
            .fold(0.0, f64::max);
        self.stop_spread.extend(m.stop_spread_ms);
        self.held.push(m.held_frames.unwrap_or(0) as f64);
        self.written_mib.push(written as f64 / f64::from(1 << 20));
        for v in &m.vms {
            let t = &v.timeline;
            self.pause_to_advance.extend(t.pause_to_advance_ms());
            self.downtime.extend(t.downtime_ms());
            if let (Some(p), Some(i)) = (t.paused_ms, t.image_complete_ms) {
                self.image_complete.push(i - p);
            }
            // Stopped, or able to run but with frames to/from it possibly held until the last
            // member advances.
            if let (Some(p), Some(r)) = (t.paused_ms, t.resumed_ms) {
                self.disruption.push(r.max(last_advance) - p);
            }
        }
    }
}

/// One row of the report: a sample of [`Samples`].
type Field = fn(&Samples) -> &Vec<f64>;

/// Bytes of a snapshot's files in the store (memory images, disk copies, lists). An instant
/// snapshot's frozen disks are not written at all: they are the files the VMs used.
fn written(m: &Manifest) -> u64 {
    m.vms
        .iter()
        .flat_map(|v| &v.images)
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|md| md.len())
        .sum()
}

/// `enforcer-lab bench snapshot`: `count` group snapshots per method of a guest group under
/// traffic, pre-copy first.
pub async fn bench_snapshots(
    opts: VmDemoOptions,
    count: usize,
    gap: Duration,
) -> anyhow::Result<String> {
    let lab = opts.lab.clone();
    let store = opts.store.clone();
    let samples = with_lab(&opts, async move |lab, client| {
        client.define_group("bench", None, &lab.names()).await?;
        let mut samples: BTreeMap<&'static str, Samples> = BTreeMap::new();
        let order = [CutMethod::PreCopy, CutMethod::Instant];
        for k in 0..count * order.len() {
            let method = order[k / count];
            tokio::time::sleep(gap).await;
            let m = super::committed_snapshot(client, method).await?;
            log(format!(
                "snapshot {}/{}: {} ({method}, stop spread {:.1} ms)",
                k + 1,
                count * order.len(),
                m.id,
                m.stop_spread_ms.unwrap_or(f64::NAN)
            ));
            let bytes = written(&m);
            // Only the timings are kept: the images are large.
            client.delete_snapshot(&m.id).await?;
            samples.entry(method.name()).or_default().add(&m, bytes);
        }
        // What users run today, on the same guests, after ours.
        let dir = store.join("baselines");
        let mut baselines: [(&str, Vec<f64>, Vec<f64>); 2] = [
            (
                "libvirt live snapshot, one VM after another",
                vec![],
                vec![],
            ),
            ("pause all, save each, resume all", vec![], vec![]),
        ];
        for k in 0..count * 2 {
            tokio::time::sleep(gap).await;
            let (l, d, which) = (lab.clone(), dir.clone(), k / count);
            let run = blocking(move || {
                std::fs::create_dir_all(&d)?;
                let tag = format!("b{k}");
                let run = match which {
                    0 => baselines::per_vm_live_loop(&l, &d, &tag),
                    _ => baselines::pause_all_save_resume(&l, &d, &tag),
                };
                let _ = std::fs::remove_dir_all(&d);
                run
            })
            .await?;
            log(format!(
                "{} {}/{count}: downtime {:?} ms, stop spread {:.1} ms",
                baselines[which].0,
                k % count + 1,
                run.downtime_ms
                    .iter()
                    .map(|d| d.round())
                    .collect::<Vec<_>>(),
                run.stop_spread_ms
            ));
            baselines[which].1.extend(run.downtime_ms);
            baselines[which].2.push(run.stop_spread_ms);
        }
        Ok((samples, baselines))
    })
    .await?;
    let (samples, baselines) = samples;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "group snapshots of {} TCG guests ({} MiB memory, {} MiB of it rewritten every 100 ms, \
         {} GiB qcow2 disk{}) under traffic (10 ms message interval per pair), {count} per \
         method, pre-copy first",
        lab.vms,
        lab.memory_mib,
        lab.dirty_mib,
        lab.disk_gib,
        if lab.disk_full {
            " full of data"
        } else {
            ", sparse"
        }
    );
    let _ = writeln!(
        out,
        "  {:<48} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "(ms unless stated)", "inst p50", "inst p99", "inst max", "pre p50", "pre p99", "pre max"
    );
    let get = |name: &str| samples.get(name).expect("every method ran");
    let (inst, pre) = (
        get(CutMethod::Instant.name()),
        get(CutMethod::PreCopy.name()),
    );
    let rows: [(&str, Field); 7] = [
        ("downtime per VM (stopped → running again)", |s| {
            &s.downtime
        }),
        ("group stop spread (first stop → last stop)", |s| {
            &s.stop_spread
        }),
        ("stop → map updated (QEMU's STOP timestamp)", |s| {
            &s.pause_to_advance
        }),
        ("disruption (stopped → last member advanced)", |s| {
            &s.disruption
        }),
        ("stop → image complete", |s| &s.image_complete),
        ("written per snapshot (MiB)", |s| &s.written_mib),
        ("frames held per snapshot (count)", |s| &s.held),
    ];
    let mut p99 = BTreeMap::new();
    for (name, field) in rows {
        let (a50, a99, amax) = percentiles(field(inst).clone());
        let (b50, b99, bmax) = percentiles(field(pre).clone());
        p99.insert(name, (a99, b99));
        let _ = writeln!(
            out,
            "  {name:<48} {a50:>9.2} {a99:>9.2} {amax:>9.2} {b50:>9.2} {b99:>9.2} {bmax:>9.2}"
        );
    }
    let _ = writeln!(
        out,
        "references: GENI-VIOLIN VM downtime < 200 ms, 28 ms per flow-table update; VNsnap group disruption 0.8 s for 4 VMs"
    );
    let _ = writeln!(
        out,
        "  baselines (no enforcement; a VM's pause as libvirt reports it, read every ms): {:>9} {:>9} {:>9}",
        "p50", "p99", "max"
    );
    let mut baseline_p99 = Vec::new();
    for (name, downtime, spreads) in &baselines {
        for (what, v) in [
            ("downtime per VM", downtime),
            ("group stop spread", spreads),
        ] {
            let (p50, p99, max) = percentiles(v.clone());
            baseline_p99.push(p99);
            let _ = writeln!(
                out,
                "    {name}: {what:<18} {p50:>9.1} {p99:>9.1} {max:>9.1}"
            );
        }
    }
    let down = p99["downtime per VM (stopped → running again)"];
    let spread = p99["group stop spread (first stop → last stop)"];
    let _ = writeln!(
        out,
        "pre-copy: downtime p99 {:.1} ms, stop spread p99 {:.1} ms",
        down.1, spread.1
    );
    let _ = writeln!(
        out,
        "instant cut: downtime p99 {:.1} ms ({} GiB disk, {} MiB memory), stop spread p99 {:.2} ms, pause-all baseline {:.1} ms, per-VM live loop stop spread p99 {:.1} ms",
        down.0, lab.disk_gib, lab.memory_mib, spread.0, baseline_p99[2], baseline_p99[1]
    );
    Ok(out)
}
