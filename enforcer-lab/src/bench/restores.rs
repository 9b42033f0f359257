//! `bench restore`: snapshot → kill → restore cycles of a guest group under traffic, by both
//! cut methods on the same guests: how long a group restore takes (every VM back and running)
//! and how close together the VMs resume, and whether every restored guest comes back alive
//! (its kernel's console is read for a crash). A crashed guest is booted afresh and the group
//! defined again, so the cycles go on.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use enforcer::snapshot::CutMethod;

use crate::{
    demo::vms::{VmDemoOptions, blocking, kill_all, log, with_lab},
    stats::percentiles,
};

#[derive(Default)]
struct Samples {
    restore_ms: Vec<f64>,
    resume_spread_ms: Vec<f64>,
    restored: usize,
    crashed: Vec<String>,
}

/// `count` cycles per method, pre-copy first.
pub async fn bench_restores(opts: VmDemoOptions, count: usize) -> anyhow::Result<String> {
    let lab_opts = opts.lab.clone();
    let samples = with_lab(&opts, async move |lab, client| {
        client.define_group("bench", None, &lab.names()).await?;
        let mut samples: BTreeMap<&'static str, Samples> = BTreeMap::new();
        for method in [CutMethod::PreCopy, CutMethod::Instant] {
            for k in 0..count {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let m = super::committed_snapshot(client, method).await?;
                kill_all(lab).await?;
                let r = client.restore(&m.id, None).await?;
                let s = samples.entry(method.name()).or_default();
                s.restore_ms
                    .push(r.vms.iter().map(|v| v.resumed_ms).fold(0.0, f64::max));
                s.resume_spread_ms.push(r.resume_spread_ms);
                s.restored += r.vms.len();
                let l = lab.clone();
                let alive = blocking(move || Ok(l.wait_talking(Duration::from_secs(20)))).await?;
                let l = lab.clone();
                let crashed: Vec<(usize, String)> = blocking(move || {
                    Ok(l.vms
                        .iter()
                        .enumerate()
                        .filter_map(|(i, vm)| Some((i, format!("{}: {}", vm.name, l.crash(vm)?))))
                        .collect())
                })
                .await?;
                log(format!(
                    "{method} {}/{count}: restored in {:.0} ms, resumed within {:.1} ms{}",
                    k + 1,
                    s.restore_ms.last().copied().unwrap_or_default(),
                    r.resume_spread_ms,
                    if crashed.is_empty() {
                        String::new()
                    } else {
                        format!(", crashed: {crashed:?}")
                    }
                ));
                client.delete_snapshot(&m.id).await?;
                if crashed.is_empty() {
                    alive?;
                    continue;
                }
                // Fresh guests, the group defined again on their new ports.
                s.crashed.extend(crashed.iter().map(|(_, c)| c.clone()));
                client.remove_group("bench").await?;
                let (l, which) = (lab.clone(), crashed);
                blocking(move || {
                    for (i, _) in which {
                        l.reboot(&l.vms[i])?;
                    }
                    Ok(l.wait_talking(Duration::from_secs(90))?)
                })
                .await?;
                client.define_group("bench", None, &lab.names()).await?;
            }
        }
        Ok(samples)
    })
    .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "group restores of {} TCG guests ({} MiB memory, {} MiB of it rewritten every 100 ms) \
         under traffic, {count} per method, pre-copy first",
        lab_opts.vms, lab_opts.memory_mib, lab_opts.dirty_mib
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>9} {:>11} {:>11} {:>9}",
        "method", "restore", "p50 ms", "p99 ms", "spread p50", "spread p99", "crashed"
    );
    for (name, s) in &samples {
        let (r50, r99, _) = percentiles(s.restore_ms.clone());
        let (s50, s99, _) = percentiles(s.resume_spread_ms.clone());
        let _ = writeln!(
            out,
            "  {name:<10} {:>9} {r50:>9.0} {r99:>9.0} {s50:>11.1} {s99:>11.1} {:>5} of {}",
            s.restore_ms.len(),
            s.crashed.len(),
            s.restored
        );
        for c in &s.crashed {
            let _ = writeln!(out, "    crashed after restore: {c}");
        }
    }
    Ok(out)
}
