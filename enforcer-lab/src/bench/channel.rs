//! `bench channel`: the channel state (invariant 7) on real guests under traffic. Each cycle
//! takes a group snapshot, then restores it twice — first leaving its channel state out (as
//! without recording), then replaying it — and runs and checks each restored group pair by
//! pair. By both cut methods on the same guests: the frames in flight at the cut each snapshot
//! recorded, and the UDP datagrams the restored groups lost with and without them. On one host
//! (one agent), or on two emulated hosts driven by the coordinator of several hosts (each
//! member's channel state recorded and replayed by its own agent).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use enforcer::{api::client::Client, snapshot::CutMethod};

use crate::{
    demo::{
        hosts as multi,
        vms::{
            Consistency, VmDemoOptions, blocking, kill_all, log, run_restored_and_check, with_lab,
        },
    },
    stats::percentiles,
    vms::VmLab,
};

/// One method's cycles. Units: `recorded` frames per snapshot; `replayed` frames summed over
/// checked restores; `lost_*` UDP datagrams summed over checked restores.
#[derive(Default)]
struct Samples {
    recorded: Vec<f64>,
    /// The frames the manifests say their recordings may miss (`lost_at_most`, summed).
    may_miss: u64,
    stop_spread_ms: Vec<f64>,
    replayed: u64,
    /// Restores "with" their channel state where a member's replay failed (logged): their
    /// losses count as with it, so this says why "lost with" may not be 0.
    replay_failed: usize,
    lost_with: u64,
    lost_without: u64,
    violations: u64,
    /// Restores whose guests crashed (not checked; the guests booted afresh).
    crashed: usize,
    checked: usize,
}

/// A restored group run and checked.
struct Restored {
    consistency: Consistency,
    /// Frames replayed into its members (summed over VMs).
    replayed: u64,
    /// Members whose replay failed, with why (`manifest`'s `replay_error`).
    replay_errors: Vec<String>,
}

/// Kills the group, restores `id` (its channel state replayed or not), runs it and checks it.
/// `None` when a restored guest crashed: every guest is booted afresh and the group defined
/// again by `define`.
async fn restore_and_check(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    define: &impl AsyncFn() -> anyhow::Result<()>,
    id: &str,
    replay: bool,
) -> anyhow::Result<Option<Restored>> {
    kill_all(lab).await?;
    let r = client.restore_with(id, None, replay).await?;
    let replayed = r.vms.iter().filter_map(|v| v.replayed).sum();
    let replay_errors = r
        .vms
        .iter()
        .filter_map(|v| Some(format!("{}: {}", v.name, v.replay_error.as_deref()?)))
        .collect();
    let l = lab.clone();
    let checked = blocking(move || run_restored_and_check(&l, Duration::from_secs(2))).await;
    let down = match checked {
        Ok(consistency) if consistency.crashed.is_empty() => {
            return Ok(Some(Restored {
                consistency,
                replayed,
                replay_errors,
            }));
        }
        Ok(c) => format!("crashed: {:?}", c.crashed),
        // A restored TCG guest that hangs rather than crashes does not answer at all.
        Err(e) => format!("did not answer: {e:#}"),
    };
    // Every guest booted afresh: one guest's counters starting again beside its peers' would
    // read as violations and losses in every later check.
    log(format!(
        "restored guests {down}; booting every guest afresh"
    ));
    client.remove_group("bench").await?;
    let l = lab.clone();
    blocking(move || {
        for vm in &l.vms {
            l.reboot(vm)?;
        }
        l.wait_talking(Duration::from_secs(90))?;
        Ok(l.note_loss_baseline()?)
    })
    .await?;
    define().await?;
    Ok(None)
}

/// `count` cycles per method, instant first; with `on_hosts`, the group on two emulated hosts
/// (its last guest on the second), driven by the coordinator of several hosts. Returns the
/// table [`render`] prints.
pub async fn bench_channel(
    opts: VmDemoOptions,
    count: usize,
    on_hosts: bool,
) -> anyhow::Result<String> {
    let lab_opts = opts.lab.clone();
    let samples = if on_hosts {
        multi::with_hosts(opts, async |lab, agents, _, client, _, host_of| {
            let define = async || multi::define_group(lab, agents, client, host_of, "bench").await;
            define().await?;
            cycles(lab, client, &define, count).await
        })
        .await?
    } else {
        with_lab(&opts, async move |lab, client| {
            let define = async || {
                client.define_group("bench", None, &lab.names()).await?;
                Ok(())
            };
            define().await?;
            cycles(lab, client, &define, count).await
        })
        .await?
    };
    Ok(render(&samples, &lab_opts, count, on_hosts))
}

/// `count` snapshot cycles per method of group `bench` (the lab's guests, defined by
/// `define`), each snapshot restored without and with its channel state; keyed by
/// [`CutMethod::name`].
async fn cycles(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    define: &impl AsyncFn() -> anyhow::Result<()>,
    count: usize,
) -> anyhow::Result<BTreeMap<&'static str, Samples>> {
    let mut samples: BTreeMap<&'static str, Samples> = BTreeMap::new();
    for method in [CutMethod::Instant, CutMethod::PreCopy] {
        for k in 0..count {
            // Each cycle on its own: what the group lost so far is the baseline.
            let l = lab.clone();
            blocking(move || Ok(l.note_loss_baseline()?)).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let m = super::committed_snapshot(client, method).await?;
            let recorded = m.channel_state.as_ref().map_or(0, |c| c.frames());
            let may_miss: u64 = m
                .channel_state
                .as_ref()
                .map_or(0, |c| c.receivers.values().map(|r| r.lost_at_most).sum());
            let without = restore_and_check(lab, client, define, m.id.as_str(), false).await?;
            // After a crash the guests were booted afresh: the cycle's baseline is gone.
            let with = match &without {
                Some(_) => restore_and_check(lab, client, define, m.id.as_str(), true).await?,
                None => None,
            };
            client.delete_snapshot(m.id.as_str()).await?;
            let s = samples.entry(method.name()).or_default();
            s.recorded.push(recorded as f64);
            s.may_miss += may_miss;
            s.stop_spread_ms.extend(m.stop_spread_ms);
            let line = match (without, with) {
                (Some(without), Some(with)) => {
                    let (a, b) = (&without.consistency, &with.consistency);
                    for (what, c) in [("without", a), ("with", b)] {
                        if c.violations() > 0 {
                            log(format!(
                                "restored {what} its channel state:\n{}",
                                c.render()
                            ));
                        }
                    }
                    if !with.replay_errors.is_empty() {
                        log(format!(
                            "channel state NOT replayed into: {}",
                            with.replay_errors.join("; ")
                        ));
                        s.replay_failed += 1;
                    }
                    s.checked += 1;
                    s.replayed += with.replayed;
                    s.lost_without += a.udp_lost();
                    s.lost_with += b.udp_lost();
                    s.violations += a.violations() + b.violations();
                    format!(
                        "{recorded} frames recorded (may miss {may_miss}), {} replayed; UDP \
                         lost: {} without them, {} with them; violations {}",
                        with.replayed,
                        a.udp_lost(),
                        b.udp_lost(),
                        a.violations() + b.violations()
                    )
                }
                _ => {
                    s.crashed += 1;
                    "a restored guest crashed: not checked".to_owned()
                }
            };
            log(format!(
                "{method} {}/{count} (VMs stopped within {:.1} ms): {line}",
                k + 1,
                m.stop_spread_ms.unwrap_or_default()
            ));
        }
    }
    Ok(samples)
}

/// The table of the samples, and the line with the total.
fn render(
    samples: &BTreeMap<&'static str, Samples>,
    lab_opts: &crate::vms::VmLabOptions,
    count: usize,
    on_hosts: bool,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "channel state of {} TCG guests{} under traffic (UDP and TCP to every peer every {} ms), \
         {count} snapshots per method, each restored without and with its channel state",
        lab_opts.vms,
        if on_hosts {
            " on two emulated hosts (the last on the second, a coordinator over mutual TLS)"
        } else {
            ""
        },
        lab_opts.interval_ms
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>7} {:>11} {:>13} {:>13} {:>9} {:>9} {:>13} {:>12} {:>9} {:>10} {:>8}",
        "method",
        "checked",
        "spread p50",
        "recorded p50",
        "recorded max",
        "may miss",
        "replayed",
        "replay failed",
        "lost without",
        "lost with",
        "violations",
        "crashed"
    );
    let (mut lost_with, mut lost_without, mut restores) = (0, 0, 0);
    for (name, s) in samples {
        let (sp50, _, _) = percentiles(s.stop_spread_ms.clone());
        let (r50, _, rmax) = percentiles(s.recorded.clone());
        let _ = writeln!(
            out,
            "  {name:<10} {:>7} {sp50:>11.1} {r50:>13.0} {rmax:>13.0} {:>9} {:>9} {:>13} {:>12} {:>9} {:>10} {:>8}",
            s.checked,
            s.may_miss,
            s.replayed,
            s.replay_failed,
            s.lost_without,
            s.lost_with,
            s.violations,
            s.crashed
        );
        lost_with += s.lost_with;
        lost_without += s.lost_without;
        restores += s.checked;
    }
    let _ = writeln!(
        out,
        "channel state: udp_lost={lost_with} over {restores} restores with it replayed \
         (without: {lost_without})"
    );
    out
}
