//! The main job on real VMs: a group of guests talking over TCP and UDP, a group snapshot under
//! that traffic through the HTTP API, the VMs killed, the group restored, and the restored
//! state checked for consistency; the lab and daemon set-up and the check that tier 3
//! ([`super::e2e`]) and the benchmarks share.
//!
//! Each guest also keeps a generation record on its disk and checks it against memory before
//! every write (see `enforcer_guest::disk_matches_memory`): a disk captured at another instant
//! than the memory shows as a mismatch.
//!
//! The check (DESIGN.md invariant 1: no VM remembers receiving what its sender never sent):
//! for every pair i→j, in the restored run,
//! - UDP: no datagram arrives whose seq j already had (`udp_rewinds`): the restored i numbers on
//!   from its image's count, so a message j received but i's image never sent shows up again;
//!   and received(j←i) ≤ sent(i→j);
//! - TCP: the stream resumes (progress after the restore), and once everyone stops sending,
//!   received(j←i) = sent(i→j) with equal running checksums; every message's embedded checksum
//!   matched on the way (`tcp_checksum_errors`, `tcp_seq_errors` = 0). A receiver ahead of its
//!   sender's image breaks this, because the re-sent bytes carry fresh nonces.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_guest::GuestStats;
use serde::Serialize;

use crate::{
    redis::{self, RedisCheck},
    vms::{VmLab, VmLabOptions},
};
use enforcer::{
    agent::SnapshotOptions,
    api::client::Client,
    cli::{render_manifest, render_progress},
    daemon::{self, DaemonConfig, Running},
    datapath::{self, AttachMode, ports::PortSource},
    hold::HoldOptions,
    snapshot::{CutMethod, Manifest, RestoreReport, SnapshotOutcome as Outcome},
};

#[derive(Clone, Debug)]
pub struct VmDemoOptions {
    pub lab: VmLabOptions,
    pub pin_root: PathBuf,
    pub store: PathBuf,
    pub hold_device: String,
    /// Traffic before the snapshot, after it (before the kill), and after the restore.
    pub before: Duration,
    pub after: Duration,
    pub restored: Duration,
    /// Restore onto the lab's second bridge instead of the first.
    pub restore_elsewhere: bool,
    /// How the group snapshot stops and captures the VMs.
    pub method: CutMethod,
}

impl Default for VmDemoOptions {
    fn default() -> Self {
        Self {
            lab: VmLabOptions::default(),
            pin_root: "/sys/fs/bpf/enforcer-vmdemo".into(),
            store: "/var/lib/enforcer/demo-snapshots".into(),
            hold_device: "enfvhold".into(),
            before: Duration::from_secs(1),
            after: Duration::from_secs(1),
            restored: Duration::from_secs(3),
            restore_elsewhere: false,
            method: CutMethod::Instant,
        }
    }
}

/// One direction of one pair, in the restored run.
#[derive(Clone, Debug, Serialize)]
pub struct PairCheck {
    pub from: String,
    pub to: String,
    pub udp_sent: u64,
    pub udp_received: u64,
    pub udp_rewinds: u64,
    /// Datagrams the restored sender counts as sent that the restored receiver never got:
    /// lost in the network, or in flight at the cut and not replayed (invariant 7).
    pub udp_lost: u64,
    pub tcp_sent: u64,
    pub tcp_received: u64,
    pub tcp_errors: u64,
    /// The stream moved after the restore and ended with equal counts and checksums.
    pub tcp_resumed: bool,
    pub violations: u64,
}

/// One VM's disk against its memory, in the restored run.
#[derive(Clone, Debug, Serialize)]
pub struct DiskCheck {
    pub vm: String,
    /// The generation the guest remembered right after the restore, and at the end.
    pub generation_early: u64,
    pub generation_last: u64,
    /// Reads where the disk held another generation than memory allowed.
    pub mismatches: u64,
}

impl DiskCheck {
    /// The guest kept writing its record after the restore, and the disk always matched.
    pub fn ok(&self) -> bool {
        self.mismatches == 0 && self.generation_last > self.generation_early
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Consistency {
    pub pairs: Vec<PairCheck>,
    pub disks: Vec<DiskCheck>,
    /// Restored guests whose kernel crashed (VM, the console's line): a restored image that
    /// does not even run is the worst inconsistency; each counts as one violation.
    pub crashed: Vec<(String, String)>,
    /// Redis replication's own verdict, when the guests run it.
    pub redis: Option<RedisCheck>,
}

impl Consistency {
    /// Datagrams lost over every pair (see [`PairCheck::udp_lost`]).
    pub fn udp_lost(&self) -> u64 {
        self.pairs.iter().map(|p| p.udp_lost).sum()
    }

    pub fn violations(&self) -> u64 {
        self.pairs.iter().map(|p| p.violations).sum::<u64>()
            + self
                .disks
                .iter()
                .map(|d| d.mismatches.max(u64::from(!d.ok())))
                .sum::<u64>()
            + self.crashed.len() as u64
            + self.redis.as_ref().map_or(0, RedisCheck::violations)
    }

    /// The guests that crashed after the restore, when one did (stats unreadable).
    fn crashed(lab: &VmLab) -> Option<Self> {
        // The console is written as the kernel dies; give it a moment.
        std::thread::sleep(Duration::from_secs(1));
        let crashed: Vec<(String, String)> = lab
            .vms
            .iter()
            .filter_map(|vm| Some((vm.name.clone(), lab.crash(vm)?)))
            .collect();
        (!crashed.is_empty()).then_some(Self {
            pairs: Vec::new(),
            disks: Vec::new(),
            crashed,
            redis: None,
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  {:<10} {:<10} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7} {:>8} {:>10}",
            "from",
            "to",
            "udp_sent",
            "udp_recv",
            "rewinds",
            "udp_lost",
            "tcp_sent",
            "tcp_recv",
            "tcp_err",
            "resumed",
            "violations"
        );
        for p in &self.pairs {
            let _ = writeln!(
                out,
                "  {:<10} {:<10} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7} {:>8} {:>10}",
                p.from,
                p.to,
                p.udp_sent,
                p.udp_received,
                p.udp_rewinds,
                p.udp_lost,
                p.tcp_sent,
                p.tcp_received,
                p.tcp_errors,
                if p.tcp_resumed { "yes" } else { "NO" },
                p.violations
            );
        }
        for (vm, line) in &self.crashed {
            let _ = writeln!(out, "  {vm:<10} CRASHED after the restore: {line}");
        }
        for d in &self.disks {
            let _ = writeln!(
                out,
                "  {:<10} disk record generation {} → {}, disk/memory mismatches {}{}",
                d.vm,
                d.generation_early,
                d.generation_last,
                d.mismatches,
                if d.ok() { "" } else { "  NOT OK" }
            );
        }
        if let Some(redis) = &self.redis {
            out.push_str(&redis.render());
        }
        out
    }
}

/// Compares what every receiver has with what its sender sent. `early`: stats taken right
/// after the restore; `last`: after everyone stopped sending and the streams drained.
pub fn check(lab: &VmLab, early: &[GuestStats], last: &[GuestStats]) -> Consistency {
    let mut pairs = Vec::new();
    for (i, from) in lab.vms.iter().enumerate() {
        for (j, to) in lab.vms.iter().enumerate() {
            if i == j {
                continue;
            }
            let (from_ip, to_ip) = (from.ip.to_string(), to.ip.to_string());
            let (Some(sent), Some(recv), Some(recv_early)) = (
                last[i].peer(&to_ip),
                last[j].peer(&from_ip),
                early[j].peer(&from_ip),
            ) else {
                // A pair the guests do not report cannot be shown consistent: count it.
                pairs.push(PairCheck {
                    from: from.name.clone(),
                    to: to.name.clone(),
                    udp_sent: 0,
                    udp_received: 0,
                    udp_rewinds: 0,
                    udp_lost: 0,
                    tcp_sent: 0,
                    tcp_received: 0,
                    tcp_errors: 0,
                    tcp_resumed: false,
                    violations: 1,
                });
                continue;
            };
            let tcp_errors = recv.tcp_seq_errors + recv.tcp_checksum_errors;
            let tcp_resumed = recv.tcp_received > recv_early.tcp_received
                && recv.tcp_received == sent.tcp_sent
                && recv.tcp_received_checksum == sent.tcp_sent_checksum;
            let violations = recv.udp_rewinds
                + recv.udp_received.saturating_sub(sent.udp_sent)
                + tcp_errors
                + u64::from(!tcp_resumed);
            pairs.push(PairCheck {
                from: from.name.clone(),
                to: to.name.clone(),
                udp_sent: sent.udp_sent,
                udp_received: recv.udp_received,
                udp_rewinds: recv.udp_rewinds,
                udp_lost: sent
                    .udp_sent
                    .saturating_sub(recv.udp_received)
                    .saturating_sub(lab.lost_before(i, j)),
                tcp_sent: sent.tcp_sent,
                tcp_received: recv.tcp_received,
                tcp_errors,
                tcp_resumed,
                violations,
            });
        }
    }
    let disks = lab
        .vms
        .iter()
        .enumerate()
        .map(|(i, vm)| DiskCheck {
            vm: vm.name.clone(),
            generation_early: early[i].disk_generation,
            generation_last: last[i].disk_generation,
            mismatches: last[i].disk_mismatches,
        })
        .collect();
    Consistency {
        pairs,
        disks,
        crashed: Vec::new(),
        redis: None,
    }
}

/// Runs the restored group for a while, then stops the senders, lets the streams drain and
/// checks.
pub(crate) fn run_restored_and_check(
    lab: &VmLab,
    restored_for: Duration,
) -> anyhow::Result<Consistency> {
    std::thread::sleep(Duration::from_millis(300));
    let early = match lab.all_stats() {
        Ok(stats) => stats,
        Err(e) => {
            return Consistency::crashed(lab)
                .ok_or(e)
                .context("guest stats after the restore");
        }
    };
    std::thread::sleep(restored_for);
    if let Err(e) = lab.broadcast("quiet") {
        return Consistency::crashed(lab)
            .ok_or(e)
            .context("stopping the senders");
    }
    // Drained when every stream is back in step (TCP retransmits can take a while after a
    // loss), or at the deadline: then what is left is reported.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let last = match lab.all_stats() {
            Ok(stats) => stats,
            Err(e) => return Consistency::crashed(lab).ok_or(e).context("guest stats"),
        };
        let consistency = check(lab, &early, &last);
        if consistency.pairs.iter().all(|p| p.tcp_resumed) || Instant::now() > deadline {
            return Ok(consistency);
        }
    }
}

/// Redis's check first when the guests run it (`redis`: the primary's counters before the
/// snapshot and the writes made), then the guests' own; a guest that crashed after the restore
/// is reported as such whichever check met it.
pub(crate) fn check_restored(
    lab: &VmLab,
    redis: Option<(redis::SyncCounts, u64)>,
    restored_for: Duration,
) -> anyhow::Result<Consistency> {
    let redis = match redis
        .map(|(before, writes)| {
            log("Redis's check: replication offsets, then every replica reconnected");
            redis::check_after_restore(lab, before, writes)
        })
        .transpose()
    {
        Ok(redis) => redis,
        Err(e) => {
            return Consistency::crashed(lab)
                .ok_or(e)
                .context("Redis's check after the restore");
        }
    };
    let mut consistency = run_restored_and_check(lab, restored_for)?;
    consistency.redis = redis;
    Ok(consistency)
}

pub(crate) fn log(msg: impl AsRef<str>) {
    eprintln!("[vm-demo] {}", msg.as_ref());
}

/// Everything a run with enforcement produced.
pub struct EnforcedRun {
    pub manifest: Manifest,
    pub restore: RestoreReport,
    pub consistency: Consistency,
}

impl EnforcedRun {
    pub fn render(&self) -> String {
        let mut out = render_manifest(&self.manifest);
        let _ = writeln!(
            out,
            "restored {} VMs, resumed within {:.1} ms of each other",
            self.restore.vms.len(),
            self.restore.resume_spread_ms
        );
        for vm in &self.restore.vms {
            let _ = writeln!(
                out,
                "  {:<16} on {:<8} restored (paused) at {:>7.1} ms, resumed at {:>7.1} ms, {} \
                 in-flight frames replayed{}",
                vm.name,
                vm.port,
                vm.restored_ms,
                vm.resumed_ms,
                vm.replayed.unwrap_or(0),
                vm.replay_error
                    .as_deref()
                    .map(|e| format!(" (NOT replayed: {e})"))
                    .unwrap_or_default()
            );
        }
        out.push_str("restored state, every pair:\n");
        out.push_str(&self.consistency.render());
        out
    }
}

/// The daemon for a demo lab: attached to the lab's bridge, buffer on, snapshots on.
async fn start_daemon(lab: &VmLab, opts: &VmDemoOptions) -> anyhow::Result<Running> {
    let _ = datapath::teardown(&opts.pin_root);
    let _ = std::fs::remove_dir_all(&opts.store);
    Ok(daemon::start(DaemonConfig {
        ports: PortSource::Bridges(vec![lab.bridge.clone(), lab.other_bridge.clone()]),
        pin_root: opts.pin_root.clone(),
        attach: AttachMode::Tc,
        listen: crate::api_socket(&opts.lab.prefix),
        token: None,
        api_group: None,
        tls: None,
        type3_mode: None,
        hold: Some(HoldOptions {
            device: opts.hold_device.clone(),
            ..Default::default()
        }),
        snapshots: Some(SnapshotOptions {
            uri: opts.lab.uri.clone(),
            store: opts.store.clone(),
            ..SnapshotOptions::default()
        }),
    })
    .await?)
}

/// Follows a snapshot to its end, logging each VM's step; an error unless it committed.
pub(crate) async fn wait_committed(client: &Client, id: &str) -> anyhow::Result<Manifest> {
    let m = client
        .wait_snapshot(id, |m| log(format!("  {}", render_progress(m))))
        .await?;
    anyhow::ensure!(
        m.outcome == Outcome::Committed,
        "the snapshot aborted: {}",
        m.reason.clone().unwrap_or_default()
    );
    Ok(m)
}

/// Destroys every guest of the group (off the async workers: libvirt calls).
pub(crate) async fn kill_all(lab: &std::sync::Arc<VmLab>) -> anyhow::Result<()> {
    log("killing every VM of the group");
    let l = lab.clone();
    blocking(move || {
        l.destroy_all();
        Ok(())
    })
    .await
}

/// `result` unless only stopping what served it (`stopped`) failed: a failed run keeps its own
/// error (the stop's is logged), a run that finished fails with the stop's.
pub(crate) fn first_error<T, S, E>(
    result: anyhow::Result<T>,
    stopped: Result<S, E>,
) -> anyhow::Result<T>
where
    E: Into<anyhow::Error>,
{
    match (result, stopped) {
        (Ok(v), Ok(_)) => Ok(v),
        (Ok(_), Err(e)) => Err(e.into().context("stopping after the run")),
        (Err(e), stopped) => {
            if let Err(s) = stopped {
                log(format!(
                    "stopping after the failed run failed too: {:#}",
                    s.into()
                ));
            }
            Err(e)
        }
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Snapshot under traffic through the API → kill → restore through the API → check.
pub(crate) async fn enforced(
    lab: &std::sync::Arc<VmLab>,
    client: &Client,
    opts: &VmDemoOptions,
) -> anyhow::Result<EnforcedRun> {
    let group = client
        .define_group("demo", None, &lab.names())
        .await
        .context("defining the group")?;
    log(format!(
        "group {} (id {}): {}",
        group.name,
        group.id,
        lab.names().join(", ")
    ));
    // The API's contract on the way: an unknown domain is a 404, a busy group a 409.
    let unknown = client
        .define_group("nosuch", None, &["enforcer-no-such-domain".to_owned()])
        .await;
    anyhow::ensure!(
        unknown.as_ref().err().and_then(|e| e.status()) == Some(reqwest::StatusCode::NOT_FOUND),
        "defining a group of an unknown domain should be a 404, got {unknown:?}"
    );
    // The abort path on real VMs: with one member paused (it cannot be snapshotted live), the
    // whole group aborts, and every other VM is left running at its old epoch.
    let last = lab.vms.last().expect("a lab has VMs").clone();
    let l = lab.clone();
    let paused = last.clone();
    blocking(move || Ok(l.set_paused(&paused, true)?)).await?;
    let attempt = client.create_snapshot("demo", opts.method).await?;
    let aborted = client.wait_snapshot(&attempt.id, |_| {}).await?;
    let l = lab.clone();
    let paused = last.clone();
    let left_paused = blocking(move || {
        let left_paused = !l.running(&paused);
        l.set_paused(&paused, false)?;
        Ok(left_paused)
    })
    .await?;
    anyhow::ensure!(
        left_paused,
        "the abort must leave the VM someone else paused as it was"
    );
    anyhow::ensure!(
        aborted.outcome == Outcome::Aborted
            && aborted
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("not running")),
        "a snapshot with {} paused should abort: {aborted:?}",
        last.name
    );
    let epochs: Vec<u32> = client.vms().await?.iter().map(|v| v.epoch).collect();
    let l = lab.clone();
    let all_running = blocking(move || Ok(l.vms.iter().all(|vm| l.running(vm)))).await?;
    anyhow::ensure!(
        all_running
            && epochs.iter().all(|e| *e == 0)
            && aborted.vms.iter().all(|v| v.images.is_empty()),
        "after the abort every VM runs at epoch 0 with no images (running: {all_running}, epochs: {epochs:?})"
    );
    log(format!(
        "abort path: a snapshot with {} paused aborted ({}); every VM running, epochs back at 0, no images",
        last.name,
        aborted.reason.clone().unwrap_or_default()
    ));
    // Redis's replication, when the guests run it, carries the host's writes through the cut.
    let l = lab.clone();
    let redis = blocking(move || {
        if l.redis().is_none() {
            return Ok(None);
        }
        let before = redis::wait_replicating(&l, Duration::from_secs(60))?;
        Ok(Some((before, redis::Writer::start(&l)?)))
    })
    .await?;
    tokio::time::sleep(opts.before).await;
    let started = client.create_snapshot("demo", opts.method).await?;
    log(format!(
        "snapshot {} under traffic ({} cut):",
        started.id, opts.method
    ));
    let second = client.create_snapshot("demo", opts.method).await;
    anyhow::ensure!(
        second.as_ref().err().and_then(|e| e.status()) == Some(reqwest::StatusCode::CONFLICT),
        "a second snapshot of a busy group should be a 409, got {second:?}"
    );
    let manifest = wait_committed(client, &started.id).await?;
    tokio::time::sleep(opts.after).await;
    let redis = redis.map(|(before, writer)| (before, writer.stop()));
    kill_all(lab).await?;
    let bridge = if opts.restore_elsewhere {
        let (l, b) = (lab.clone(), lab.other_bridge.clone());
        blocking(move || Ok(l.move_host_to(&b)?)).await?;
        Some(lab.other_bridge.clone())
    } else {
        None
    };
    log(format!(
        "restoring the group from the snapshot{}",
        bridge
            .as_deref()
            .map(|b| format!(" onto bridge {b}"))
            .unwrap_or_default()
    ));
    let restore = client.restore(&manifest.id, bridge.as_deref()).await?;
    if let Some(bridge) = &bridge {
        for vm in &restore.vms {
            let master = std::fs::read_link(format!("/sys/class/net/{}/master", vm.port))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            anyhow::ensure!(
                master.as_deref() == Some(bridge.as_str()),
                "{} was restored with port {} on {master:?}, not {bridge}",
                vm.name,
                vm.port
            );
        }
    }
    log(format!(
        "running the restored group for {:?}, then draining",
        opts.restored
    ));
    let (l, restored_for) = (lab.clone(), opts.restored);
    let consistency = blocking(move || check_restored(&l, redis, restored_for)).await?;
    Ok(EnforcedRun {
        manifest,
        restore,
        consistency,
    })
}

/// Boots the lab and the daemon, runs `body`, and cleans everything up whatever happens
/// (domains, bridges, pins and the snapshot store).
pub(crate) async fn with_lab<T>(
    opts: &VmDemoOptions,
    body: impl AsyncFnOnce(&std::sync::Arc<VmLab>, &Client) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    log(format!(
        "booting {} guests (QEMU/TCG via libvirt) on bridge {}br",
        opts.lab.vms, opts.lab.prefix
    ));
    let lab_opts = opts.lab.clone();
    let lab = std::sync::Arc::new(blocking(move || Ok(VmLab::start(lab_opts)?)).await?);
    let result = async {
        let running = start_daemon(&lab, opts)
            .await
            .context("starting the daemon")?;
        let client = Client::new(running.addr.to_string(), None);
        let l = lab.clone();
        let boot = Instant::now();
        let ready = blocking(move || {
            l.wait_talking(Duration::from_secs(90))?;
            Ok(l.note_loss_baseline()?)
        })
        .await;
        let result = match ready {
            Ok(()) => {
                log(format!(
                    "guests up and talking to each other after {:.1} s",
                    boot.elapsed().as_secs_f64()
                ));
                body(&lab, &client).await
            }
            Err(e) => Err(e),
        };
        first_error(result, running.stop().await)
    }
    .await;
    // The last reference, dropped off the async workers: its Drop destroys the domains (libvirt
    // calls) and the bridges.
    let _ = blocking(move || {
        drop(lab);
        Ok(())
    })
    .await;
    crate::forget_pin_root(&opts.pin_root);
    // The snapshots' images go too, also when the body failed (they are large).
    let _ = std::fs::remove_dir_all(&opts.store);
    result
}

/// The README's main job on real VMs.
pub async fn demo(opts: VmDemoOptions) -> anyhow::Result<String> {
    let o = opts.clone();
    let run = with_lab(&opts, async move |lab, client| {
        enforced(lab, client, &o).await
    })
    .await?;
    let mut out = run.render();
    let v = run.consistency.violations();
    let _ = writeln!(
        out,
        "consistency: {} violations={v}",
        if v == 0 { "OK" } else { "BROKEN" }
    );
    anyhow::ensure!(v == 0, "{out}\nthe restored group is inconsistent");
    Ok(out)
}
