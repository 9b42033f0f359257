//! `bench snapshot`: group snapshots of real guests under traffic through the HTTP API, by
//! both cut methods side by side on the same guests (pre-copy first, while the disks are still
//! the files the guests booted on, so it copies them whole; then instant, which puts them on
//! overlays), then by what users run today ([`super::baselines`]): per-VM downtime, the group's
//! stop spread, pause → advance, the receivers' no-progress window and the bytes each snapshot
//! wrote, as percentiles; and for each method its last snapshot, the group killed, restored
//! and checked as tier 3 checks it (violations).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use enforcer::{
    api::client::Client,
    snapshot::{CutMethod, Manifest},
};

use super::baselines::{self, BaselineRun};
use crate::{
    demo::vms::{VmDemoOptions, blocking, kill_all, log, run_restored_and_check, with_lab},
    stats::percentiles,
    vms::VmLab,
};

/// One method's samples.
#[derive(Default)]
struct Samples {
    pause_to_advance: Vec<f64>,
    downtime: Vec<f64>,
    stop_spread: Vec<f64>,
    no_progress: Vec<f64>,
    image_complete: Vec<f64>,
    written_mib: Vec<f64>,
    held: Vec<f64>,
    /// The consistency check's violations on the method's last snapshot, restored.
    violations: u64,
}

impl Samples {
    fn add(&mut self, m: &Manifest, written: u64) {
        self.stop_spread.extend(m.stop_spread_ms);
        self.held.push(m.held_frames.unwrap_or(0) as f64);
        self.written_mib.push(written as f64 / f64::from(1 << 20));
        let mut stopped = Vec::new();
        for v in &m.vms {
            let t = &v.timeline;
            self.pause_to_advance.extend(t.pause_to_advance_ms());
            self.downtime.extend(t.downtime_ms());
            if let (Some(p), Some(i)) = (t.paused_ms, t.image_complete_ms) {
                self.image_complete.push(i - p);
            }
            stopped.extend(t.paused_ms.zip(t.resumed_ms));
        }
        if stopped.len() == m.vms.len() {
            self.no_progress.extend(no_progress(&stopped));
        }
    }

    fn add_baseline(&mut self, run: &BaselineRun) {
        self.downtime.extend(&run.downtime_ms);
        self.stop_spread.push(run.stop_spread_ms);
        self.no_progress.extend(no_progress(&run.paused_ms));
        self.written_mib
            .push(run.written as f64 / f64::from(1 << 20));
    }
}

/// Each receiver's no-progress window (ms), from every VM's stop and run-again times on one
/// clock (`stopped[i]` = (stopped, running again)): a receiver gets nothing while it is
/// stopped, nor while all its peers are. The window is the stretch of either that contains the
/// receiver's own stop. Frames a peer sends after its cut to a receiver not yet advanced are
/// held until the receiver advances, which both methods do while the receiver is stopped, so
/// holding never stretches the window.
pub(crate) fn no_progress(stopped: &[(f64, f64)]) -> Vec<f64> {
    stopped
        .iter()
        .enumerate()
        .map(|(j, &(p, r))| {
            let peers = stopped
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != j)
                .map(|(_, s)| *s);
            // When every peer is stopped: from the last one's stop to the first one's run.
            let Some((all_stopped, first_runs)) =
                peers.reduce(|(a, b), (pi, ri)| (a.max(pi), b.min(ri)))
            else {
                return r - p;
            };
            if all_stopped < first_runs && all_stopped <= r && first_runs >= p {
                r.max(first_runs) - p.min(all_stopped)
            } else {
                r - p
            }
        })
        .collect()
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

/// The group just restored (and running): the tier-3 check's violations. Afterwards the guests
/// talk again; after any violation they are booted afresh (out of the group `bench` while they
/// boot, when it is defined: their ports change), since the guests' counters and broken
/// streams would carry it into the next method's check.
async fn check_restored(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    in_group: bool,
) -> anyhow::Result<u64> {
    let l = lab.clone();
    let consistency = blocking(move || run_restored_and_check(&l, Duration::from_secs(2))).await?;
    let violations = consistency.violations();
    let l = lab.clone();
    if violations == 0 {
        blocking(move || Ok(l.broadcast("talk")?)).await?;
        return Ok(0);
    }
    log(format!(
        "restored state, every pair:\n{}booting every guest afresh",
        consistency.render()
    ));
    if in_group {
        client.remove_group("bench").await?;
    }
    blocking(move || {
        // All gone before any boots: a guest that ran on would keep streams to a peer booted
        // afresh, whose counters would then show errors no cut made.
        l.destroy_all();
        for vm in &l.vms {
            l.reboot(vm)?;
        }
        Ok(l.wait_talking(Duration::from_secs(90))?)
    })
    .await?;
    if in_group {
        client.define_group("bench", None, &lab.names()).await?;
    }
    Ok(violations)
}

const LIVE_LOOP: &str = "libvirt live snapshot, one VM after another";
const PAUSE_ALL: &str = "pause all, save each, resume all";

/// `enforcer-lab bench snapshot`: `count` group snapshots per method of a guest group under
/// traffic, pre-copy first, then instant, then the baselines.
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
        for method in [CutMethod::PreCopy, CutMethod::Instant] {
            let s = samples.entry(method.name()).or_default();
            for k in 0..count {
                tokio::time::sleep(gap).await;
                let m = super::committed_snapshot(client, method).await?;
                log(format!(
                    "{method} snapshot {}/{count}: {} (stop spread {:.1} ms)",
                    k + 1,
                    m.id,
                    m.stop_spread_ms.unwrap_or(f64::NAN)
                ));
                s.add(&m, written(&m));
                if k + 1 == count {
                    // The last one restored and checked, as tier 3 does.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    kill_all(lab).await?;
                    client.restore(&m.id, None).await?;
                    s.violations = check_restored(lab, client, true).await?;
                    log(format!(
                        "{method}: {} restored, {} violations",
                        m.id, s.violations
                    ));
                }
                // Only the timings are kept: the images are large.
                client.delete_snapshot(&m.id).await?;
            }
        }
        // What users run today, on the same guests, after ours. No enforcement: the VMs leave
        // the datapath (their frames pass unclassified, whatever port a restore gives them).
        client.remove_group("bench").await?;
        let dir = store.join("baselines");
        for (which, name) in [LIVE_LOOP, PAUSE_ALL].into_iter().enumerate() {
            for k in 0..count {
                tokio::time::sleep(gap).await;
                let (l, d, last) = (lab.clone(), dir.clone(), k + 1 == count);
                let run = blocking(move || {
                    std::fs::create_dir_all(&d)?;
                    let tag = format!("b{which}{k}");
                    let run = match which {
                        0 => baselines::per_vm_live_loop(&l, &d, &tag),
                        _ => baselines::pause_all_save_resume(&l, &d, &tag),
                    };
                    let restored = match &run {
                        Ok(run) if last => {
                            std::thread::sleep(Duration::from_secs(1));
                            baselines::restore(&l, run)
                        }
                        _ => Ok(()),
                    };
                    let _ = std::fs::remove_dir_all(&d);
                    restored?;
                    run
                })
                .await?;
                let violations = if last {
                    check_restored(lab, client, false).await?
                } else {
                    0
                };
                log(format!(
                    "{name} {}/{count}: downtime {:?} ms, stop spread {:.1} ms{}",
                    k + 1,
                    run.downtime_ms
                        .iter()
                        .map(|d| d.round())
                        .collect::<Vec<_>>(),
                    run.stop_spread_ms,
                    if last {
                        format!(", restored: {violations} violations")
                    } else {
                        String::new()
                    }
                ));
                let s = samples.entry(name).or_default();
                s.add_baseline(&run);
                s.violations += violations;
            }
        }
        Ok(samples)
    })
    .await?;
    let memory = if lab.memory_mib.is_multiple_of(1024) {
        format!("{} GiB", lab.memory_mib / 1024)
    } else {
        format!("{} MiB", lab.memory_mib)
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "group snapshots of {} TCG guests ({memory} memory, {} MiB of it rewritten every 100 ms, \
         {} GiB qcow2 disk{}) under traffic (10 ms message interval per pair), {count} per \
         method, pre-copy first",
        lab.vms,
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
        ("receiver no-progress window", |s| &s.no_progress),
        ("stop → image complete", |s| &s.image_complete),
        ("written per snapshot (MiB)", |s| &s.written_mib),
        ("frames held per snapshot (count)", |s| &s.held),
    ];
    for (name, field) in rows {
        let (a50, a99, amax) = percentiles(field(inst).clone());
        let (b50, b99, bmax) = percentiles(field(pre).clone());
        let _ = writeln!(
            out,
            "  {name:<48} {a50:>9.2} {a99:>9.2} {amax:>9.2} {b50:>9.2} {b99:>9.2} {bmax:>9.2}"
        );
    }
    let _ = writeln!(
        out,
        "side by side (ms; no-progress: a receiver stopped, or all its peers stopped; \
         violations: the last snapshot restored and checked as tier 3 checks it):"
    );
    let _ = writeln!(
        out,
        "  {:<44} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "method",
        "down p50",
        "down p99",
        "sprd p50",
        "sprd p99",
        "stll p50",
        "stll p99",
        "MiB p50",
        "violations"
    );
    let p99 = |v: &Vec<f64>| percentiles(v.clone()).1;
    for (name, label) in [
        (CutMethod::Instant.name(), "instant cut (ours)"),
        (CutMethod::PreCopy.name(), "pre-copy (ours)"),
        (LIVE_LOOP, LIVE_LOOP),
        (PAUSE_ALL, PAUSE_ALL),
    ] {
        let s = get(name);
        let (d50, d99, _) = percentiles(s.downtime.clone());
        let (s50, s99, _) = percentiles(s.stop_spread.clone());
        let (n50, n99, _) = percentiles(s.no_progress.clone());
        let (w50, _, _) = percentiles(s.written_mib.clone());
        let _ = writeln!(
            out,
            "  {label:<44} {d50:>8.1} {d99:>8.1} {s50:>8.2} {s99:>8.2} {n50:>8.1} {n99:>8.1} {w50:>8.0} {:>10}",
            s.violations
        );
    }
    let _ = writeln!(
        out,
        "references: GENI-VIOLIN VM downtime < 200 ms, 28 ms per flow-table update; VNsnap group disruption 0.8 s for 4 VMs"
    );
    let _ = writeln!(
        out,
        "pre-copy: downtime p99 {:.1} ms, stop spread p99 {:.1} ms; instant cut: receiver no-progress p99 {:.1} ms",
        p99(&pre.downtime),
        p99(&pre.stop_spread),
        p99(&inst.no_progress)
    );
    let _ = writeln!(
        out,
        "instant cut: downtime p99 {:.1} ms ({} GiB disk, {memory} memory), stop spread p99 {:.2} ms, pause-all baseline {:.1} ms, per-VM loop violations {}",
        p99(&inst.downtime),
        lab.disk_gib,
        p99(&inst.stop_spread),
        p99(&get(PAUSE_ALL).downtime),
        get(LIVE_LOOP).violations
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::no_progress;

    #[test]
    fn no_progress_covers_the_receivers_stop_and_the_peers_common_one() {
        // Instant cut: VM 0 runs again first, but its peers are stopped until 60.
        assert_eq!(
            no_progress(&[(0.0, 50.0), (1.0, 60.0), (2.0, 70.0)]),
            [60.0, 59.0, 69.0]
        );
        // One VM after another: only each one's own stop.
        assert_eq!(
            no_progress(&[(0.0, 100.0), (500.0, 600.0), (1000.0, 1100.0)]),
            [100.0, 100.0, 100.0]
        );
        // Pause all: from the last pause of its peers (or its own, if earlier) to the first
        // peer running again (or itself, if later).
        assert_eq!(
            no_progress(&[(0.0, 800.0), (1.0, 801.0), (2.0, 802.0)]),
            [801.0, 800.0, 801.0]
        );
        assert_eq!(no_progress(&[(5.0, 9.0)]), [4.0]);
    }
}
