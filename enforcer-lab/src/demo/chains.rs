//! Tier 3's walk along a snapshot chain on real guests: a newer snapshot taken under traffic,
//! then the **older** one restored (a second time: its frozen disks must still be as they were),
//! then a new snapshot of the group restored from the older one, taken under traffic and
//! restored in its turn; then snapshots deleted along the chain, their disks merged away by
//! live block commit and pull. Each restored group is checked pair by pair and disk against
//! memory.
//! (Pre-copy images are restored and checked by the run without enforcement, and by
//! `bench restore`; a restored TCG guest's kernel crashed once after a pre-copy restore here,
//! see docs/design.md.)

use std::{fmt::Write as _, time::Duration};

use enforcer::{
    api::client::Client,
    snapshot::{CutMethod, Manifest},
};

use super::vms::{VmDemoOptions, blocking, kill_all, log, run_restored_and_check, wait_committed};
use crate::vms::VmLab;

/// Kills the group, restores `id` (onto the lab's other bridge when the options say so), runs
/// it and checks it. Returns its violations, and a line for the report.
async fn restore_and_check(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    opts: &VmDemoOptions,
    id: &str,
    what: &str,
) -> anyhow::Result<(Checked, String)> {
    kill_all(lab).await?;
    let bridge = opts.restore_elsewhere.then(|| lab.other_bridge.clone());
    let restore = client.restore(id, bridge.as_deref()).await?;
    let (l, restored_for) = (lab.clone(), opts.restored);
    let consistency = blocking(move || run_restored_and_check(&l, restored_for)).await?;
    let (v, lost) = (consistency.violations(), consistency.udp_lost());
    let replayed: u64 = restore.vms.iter().filter_map(|r| r.replayed).sum();
    let line = format!(
        "{what}: {id} restored (resumed within {:.1} ms of each other, {replayed} in-flight \
         frames replayed), {v} violations, {lost} UDP datagrams lost",
        restore.resume_spread_ms
    );
    log(&line);
    if v > 0 || lost > 0 {
        log(consistency.render());
    }
    Ok((
        Checked {
            violations: v,
            udp_lost: lost,
        },
        line,
    ))
}

/// What the restored runs of a walk showed, summed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Checked {
    pub(crate) violations: u64,
    pub(crate) udp_lost: u64,
}

impl std::ops::Add for Checked {
    type Output = Checked;
    fn add(self, o: Checked) -> Checked {
        Checked {
            violations: self.violations + o.violations,
            udp_lost: self.udp_lost + o.udp_lost,
        }
    }
}

/// Starts the guests talking again, waits, and takes a snapshot under that traffic.
async fn snapshot_under_traffic(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    opts: &VmDemoOptions,
    method: CutMethod,
) -> anyhow::Result<Manifest> {
    let l = lab.clone();
    blocking(move || Ok(l.broadcast("talk")?)).await?;
    tokio::time::sleep(opts.before).await;
    let started = client.create_snapshot("demo", method).await?;
    log(format!("snapshot {} under traffic ({method}):", started.id));
    let m = wait_committed(client, &started.id).await?;
    tokio::time::sleep(opts.after).await;
    Ok(m)
}

/// The walk, on a group restored from `older` and quiet again. Returns the violations and
/// datagrams lost, summed over its restored runs, and the report's lines.
pub(crate) async fn older_then_new(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    opts: &VmDemoOptions,
    older: &Manifest,
) -> anyhow::Result<(Checked, String)> {
    let mut out = String::new();
    let newer = snapshot_under_traffic(lab, client, opts, opts.method).await?;
    let (v1, line) = restore_and_check(
        lab,
        client,
        opts,
        older.id.as_str(),
        &format!("the older snapshot again, after {}", newer.id),
    )
    .await?;
    let _ = writeln!(out, "{line}");
    let third = snapshot_under_traffic(lab, client, opts, opts.method).await?;
    let (v2, line) = restore_and_check(
        lab,
        client,
        opts,
        third.id.as_str(),
        "a snapshot of the group restored from the older one",
    )
    .await?;
    let _ = writeln!(out, "{line}");
    let (v3, line) = delete_along(lab, client, opts, [older, &newer, &third]).await?;
    let _ = writeln!(out, "{line}");
    Ok((v1 + v2 + v3, out))
}

/// Deleting along the chain, on the group restored from `third` of `[older, newer, third]`:
/// two more snapshots (s4, s5); s4 deleted (its frozen disk a link in the running chain, under
/// s5's: merged by a live block commit), then `newer` (its disk on a dead branch: deleted),
/// then `third` (merged again); s5, whose disk moved twice, restored and checked; then every
/// other snapshot deleted (the last link pulled into the running disk). In the end each guest
/// has its own disk and one overlay, and still runs consistently.
async fn delete_along(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    opts: &VmDemoOptions,
    [older, newer, third]: [&Manifest; 3],
) -> anyhow::Result<(Checked, String)> {
    let s4 = snapshot_under_traffic(lab, client, opts, opts.method).await?;
    let s5 = snapshot_under_traffic(lab, client, opts, opts.method).await?;
    for m in [&s4, newer, third] {
        client.delete_snapshot(m.id.as_str()).await?;
    }
    let (v1, _) = restore_and_check(
        lab,
        client,
        opts,
        s5.id.as_str(),
        "after deleting the snapshots around it",
    )
    .await?;
    for m in [older, &s5] {
        client.delete_snapshot(m.id.as_str()).await?;
    }
    // Still running and consistent after the last merge (a live block pull under traffic).
    let l = lab.clone();
    let after = blocking(move || {
        l.broadcast("talk")?;
        run_restored_and_check(&l, Duration::from_secs(2))
    })
    .await?;
    let l = lab.clone();
    let files = blocking(move || {
        Ok(l.vms
            .iter()
            .map(|vm| l.disk_files(vm).len())
            .collect::<Vec<usize>>())
    })
    .await?;
    anyhow::ensure!(
        files.iter().all(|n| *n == 2),
        "after deleting every snapshot each guest should have its disk and one overlay: {files:?}"
    );
    let v = v1.violations + after.violations();
    let line = format!(
        "every snapshot deleted along the chain (merged by live block commit and pull): each \
         guest on its own disk plus one overlay, {v} violations"
    );
    log(&line);
    Ok((
        Checked {
            violations: v,
            udp_lost: v1.udp_lost,
        },
        line,
    ))
}
