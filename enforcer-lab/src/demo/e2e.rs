//! Tier 3 on real guests (`enforcer-lab e2e`, `cargo xtask e2e`): the enforced run of the
//! main job, a walk along a snapshot chain ([`super::chains`]), a coordinator that dies
//! mid-snapshot and the next one recovering, then the same guests snapshotted one after another
//! without enforcement, where the same check must find violations. The guests also run Redis
//! replication ([`crate::redis`]), whose own protocol checks both restores.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;

use super::vms::{Consistency, VmDemoOptions, blocking, check_restored, enforced, log, with_lab};
use crate::{redis, vms::VmLab};
use enforcer::{
    api::client::Client,
    model::{GroupSpec, VmSpec},
    multihost::AgentEpochs,
    snapshot::{
        Coordinator, CutMethod, EpochControl, HvErrorKind, Hypervisor, SnapshotOutcome as Outcome,
        Timeouts,
        libvirt::{DiskCopy, Libvirt},
    },
};

/// A coordinator that dies mid-snapshot, on real VMs: every VM held by QEMU at its snapshot
/// point, one already advanced, the journal on disk. A new coordinator on the same store must
/// abort it: every VM running, the group back at its epoch, no images. This coordinator runs
/// outside the daemon and drives it over HTTP (as a coordinator of remote agents does).
fn coordinator_crash(
    lab: &VmLab,
    api: &str,
    store: &std::path::Path,
    group: GroupSpec,
    rt: tokio::runtime::Handle,
) -> anyhow::Result<String> {
    let open = || -> anyhow::Result<Coordinator<Libvirt, AgentEpochs>> {
        Ok(Coordinator::open(
            std::sync::Arc::new(Libvirt::open(&lab.uri())?),
            std::sync::Arc::new(AgentEpochs {
                client: Client::new(api, None),
                rt: rt.clone(),
            }),
            store,
            Timeouts::default(),
        )?)
    };
    let _ = std::fs::remove_dir_all(store);
    let c1 = open()?;
    let before = c1.epochs().epoch(&group.vms[0])?;
    let prepared = c1.prepare(&group, CutMethod::PreCopy)?;
    let dir = store.join(&prepared.id);
    for vm in &group.vms {
        c1.hypervisor().begin(vm, &dir, CutMethod::PreCopy)?;
    }
    for vm in &group.vms {
        c1.hypervisor().wait_paused(vm, Duration::from_secs(60))?;
    }
    c1.epochs().advance(&group.vms[0])?;
    let held = lab.vms.iter().filter(|vm| !lab.running(vm)).count();
    anyhow::ensure!(
        held == lab.vms.len(),
        "every VM should be held at its snapshot point, {held} are"
    );
    // The coordinator is gone (its threads, its libvirt connection, its memory).
    drop(prepared);
    drop(c1);
    let c2 = open()?;
    let manifests = c2.list()?;
    let aborted = manifests
        .iter()
        .find(|m| m.group.name == group.name)
        .context("the new coordinator recorded the unfinished snapshot")?;
    let epochs: Vec<u32> = group
        .vms
        .iter()
        .map(|vm| c2.epochs().epoch(vm))
        .collect::<Result<_, _>>()?;
    let running = lab.vms.iter().filter(|vm| lab.running(vm)).count();
    let leftovers: Vec<String> = std::fs::read_dir(store.join(&aborted.id))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json")
        .collect();
    anyhow::ensure!(
        aborted.outcome == Outcome::Aborted
            && running == lab.vms.len()
            && epochs.iter().all(|e| *e == before)
            && leftovers.is_empty()
            && std::fs::read_dir(store.join("journals")).map_or(0, |d| d.count()) == 0,
        "recovery after a coordinator crash: outcome {:?}, {running} running, epochs {epochs:?} \
         (before: {before}), leftovers {leftovers:?}",
        aborted.outcome
    );
    let _ = std::fs::remove_dir_all(store);
    Ok(format!(
        "coordinator crash mid-snapshot ({held} VMs held at their snapshot point, one advanced): \
         the next coordinator aborted it; every VM running, epochs back at {before}, no images"
    ))
}

/// The same group snapshotted one VM after another with no enforcement (no epochs advanced)
/// and each disk captured after its memory, killed and restored: violations are expected, and
/// counted.
fn unenforced(lab: &VmLab, dir: &std::path::Path, gap: Duration) -> anyhow::Result<Consistency> {
    let libvirt = Libvirt::open(&lab.uri()).context("opening libvirt")?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let redis = match lab.redis() {
        Some(_) => {
            let before = redis::wait_replicating(lab, Duration::from_secs(60))?;
            Some((before, redis::Writer::start(lab)?))
        }
        None => None,
    };
    let mut images = Vec::new();
    for vm in &lab.vms {
        let spec = VmSpec {
            name: vm.name.clone(),
            mac: vm.mac,
        };
        libvirt.begin(&spec, dir, CutMethod::PreCopy)?;
        libvirt.wait_paused(&spec, Duration::from_secs(60))?;
        let files = libvirt.complete(&spec, Duration::from_secs(60))?;
        libvirt.resume(&spec)?;
        images.push((spec, files));
        std::thread::sleep(gap);
    }
    let redis = redis.map(|(before, writer)| (before, writer.stop()));
    std::thread::sleep(gap);
    // And each disk taken later than its memory, as a snapshot that copied disks after letting
    // the VM run would: the guests' disk checks must notice.
    for (_, files) in &images {
        for list in files
            .iter()
            .filter(|f| f.to_string_lossy().ends_with(".disks.json"))
        {
            let copies: Vec<DiskCopy> = serde_json::from_slice(&std::fs::read(list)?)?;
            for d in copies {
                std::fs::copy(&d.source, &d.copy)?;
            }
        }
    }
    lab.destroy_all();
    // Another VM's image is refused before anything changes (case S4): libvirt would bring up
    // whichever domain an image names.
    if let [(first, files), (second, _), ..] = images.as_slice() {
        match libvirt.restore_paused(second, files, None) {
            Err(e) if e.kind == HvErrorKind::NotItsImage => {
                log(format!(
                    "restoring {}'s image as {}: refused ({e})",
                    first.name, second.name
                ));
            }
            other => anyhow::bail!(
                "restoring {}'s image as {} was not refused as another VM's: {other:?}",
                first.name,
                second.name
            ),
        }
    }
    // (The first VM's own restore below fails if that attempt started it.)
    for (spec, files) in &images {
        libvirt.restore_paused(spec, files, None)?;
    }
    for (spec, _) in &images {
        libvirt.resume(spec)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    check_restored(lab, redis, Duration::from_secs(3))
}

/// Tier 3: the enforced run, then the unenforced one on the same guests.
pub async fn e2e(mut opts: VmDemoOptions) -> anyhow::Result<String> {
    // Restored onto the other bridge: "same or another bridge" shown on real VMs.
    opts.restore_elsewhere = true;
    // Redis replication between the guests: a real application's own check, with and without
    // enforcement.
    opts.lab.redis = true;
    let o = opts.clone();
    let (run, chain, crash, without) = with_lab(&opts, async move |lab, client| {
        let run = enforced(lab, client, &o).await?;
        // A routine upgrade of libvirtd closes the daemon's connection: the snapshots and
        // restores below go through only if the daemon connects again by itself.
        log("restarting libvirtd (as an upgrade would); the daemon keeps running");
        let uri = lab.uri();
        blocking(move || Ok(crate::vms::restart_libvirtd(&uri)?)).await?;
        log("along the chain: a newer snapshot, the older one restored again, a new snapshot");
        let chain = super::chains::older_then_new(lab, client, &o, &run.manifest).await?;
        let group = GroupSpec {
            name: "demo".parse()?,
            id: client
                .groups()
                .await?
                .iter()
                .find(|g| g.name.as_deref() == Some("demo"))
                .map(|g| g.record.group)
                .context("group demo")?,
            vms: lab
                .vms
                .iter()
                .map(|v| VmSpec {
                    name: v.name.clone(),
                    mac: v.mac,
                })
                .collect(),
        };
        let (l, api, store, rt) = (
            lab.clone(),
            client.address().to_owned(),
            o.store.join("crash"),
            tokio::runtime::Handle::current(),
        );
        log("a coordinator dying mid-snapshot, and the next one recovering");
        let crash = blocking(move || coordinator_crash(&l, &api, &store, group, rt)).await?;
        log(&crash);
        // Enforcement off: the VMs leave the datapath (their frames pass unclassified).
        client.remove_group("demo").await?;
        let l = lab.clone();
        let dir = o.store.join("unenforced");
        log("now without enforcement: per-VM snapshots one after another, disks copied late");
        let without = blocking(move || {
            l.broadcast("talk")?;
            std::thread::sleep(Duration::from_secs(1));
            unenforced(&l, &dir, Duration::from_millis(400))
        })
        .await?;
        Ok((run, chain, crash, without))
    })
    .await?;
    let mut out = run.render();
    out.push_str(&chain.1);
    let _ = writeln!(out, "{crash}");
    out.push_str("without enforcement, restored state:\n");
    out.push_str(&without.render());
    let (with_redis, without_redis) = (
        run.consistency
            .redis
            .as_ref()
            .context("Redis's check did not run with enforcement")?,
        without
            .redis
            .as_ref()
            .context("Redis's check did not run without enforcement")?,
    );
    let _ = writeln!(
        out,
        "Redis replication's own check: {} violations with the enforcer ({} partial resyncs \
         accepted), {} without ({} of {} replicas ahead of the primary, {} partial resyncs refused)",
        with_redis.violations(),
        with_redis.resyncs.partial_ok,
        without_redis.violations(),
        without_redis.replicas.iter().filter(|r| r.ahead).count(),
        without_redis.replicas.len(),
        without_redis.resyncs.partial_err
    );
    anyhow::ensure!(
        without_redis.violations() > 0,
        "{out}\nwithout enforcement Redis noticed nothing: its check proves nothing this run"
    );
    let (v, n) = (
        run.consistency.violations() + chain.0.violations,
        without.violations(),
    );
    let lost = run.consistency.udp_lost() + chain.0.udp_lost;
    let _ = writeln!(
        out,
        "consistency: {} violations={v} udp_lost={lost} (without enforcer: {n})",
        if v == 0 { "OK" } else { "BROKEN" }
    );
    anyhow::ensure!(v == 0, "{out}\nthe restored group is inconsistent");
    anyhow::ensure!(
        n > 0,
        "{out}\nwithout enforcement no violation was seen: the check proves nothing this run"
    );
    Ok(out)
}
