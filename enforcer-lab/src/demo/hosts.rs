//! Tier 3 across hosts: real guests on two emulated hosts. Each host has its own bridge and
//! its own agent (an `enforcer run` daemon with its own pins, buffer, store and libvirt
//! connection); the bridges are joined by a VXLAN-GBP overlay; a coordinator (the code of
//! `enforcer coordinator`) drives both agents over HTTPS with client certificates of a CA made
//! for the run (`enforcer tls`, as `cargo xtask deploy` makes them) and a token. A group spans
//! the hosts.
//!
//! The run: an agent killed and restarted in the middle of a group snapshot (the snapshot
//! aborts, all or nothing, every VM runs on and the epochs stay level across the hosts), then
//! group snapshots under traffic, every VM killed, the group restored from the last one, and
//! the restored state checked pair by pair — including the pairs that cross hosts.

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    demo::vms::{self, Consistency, VmDemoOptions, blocking, first_error, log},
    overlay::{HOST_NAMES, Overlay},
    stats::percentiles,
    vms::VmLab,
};
use enforcer::{
    agent::SnapshotOptions,
    api::{
        Endpoint,
        client::Client,
        pki::{self, Role},
        tls::{ClientTls, TlsFiles},
    },
    cli::render_manifest,
    daemon::{self, CoordinatorConfig, DaemonConfig, Running, RunningCoordinator},
    datapath::{self, AttachMode, ports::PortSource},
    hold::HoldOptions,
    multihost::HostSpec,
    snapshot::SnapshotOutcome as Outcome,
};

/// The bearer token between the coordinator and the agents (they listen on loopback TCP here,
/// the path real hosts take, with TLS and client certificates as well).
const TOKEN: &str = "enforcer-emulated-hosts";

pub(crate) struct Agent {
    name: &'static str,
    bridge: String,
    overlay: String,
    pin_root: PathBuf,
    hold_device: String,
    store: PathBuf,
    uri: String,
    addr: Option<Endpoint>,
    running: Option<Running>,
    /// Its certificate (serving only), and the CA whose clients it admits.
    tls: TlsFiles,
    /// The lab's own client certificate (an operator's), for looking at the agent.
    operator: ClientTls,
}

impl Agent {
    async fn start(&mut self) -> anyhow::Result<()> {
        // Over TCP with a token, as agents on other hosts are reached.
        let listen = self
            .addr
            .clone()
            .unwrap_or_else(|| "127.0.0.1:0".parse().expect("an address"));
        let running = daemon::start(DaemonConfig {
            ports: PortSource::Bridges(vec![self.bridge.clone()]),
            pin_root: self.pin_root.clone(),
            attach: AttachMode::Tc,
            listen,
            token: Some(TOKEN.into()),
            api_group: None,
            tls: Some(self.tls.clone()),
            type3_mode: None,
            hold: Some(HoldOptions {
                device: self.hold_device.clone(),
                ..Default::default()
            }),
            snapshots: Some(SnapshotOptions {
                uri: self.uri.clone(),
                store: self.store.clone(),
                ..SnapshotOptions::default()
            }),
        })
        .await
        .with_context(|| format!("starting agent {}", self.name))?;
        self.addr = Some(running.addr.clone());
        self.running = Some(running);
        Ok(())
    }

    fn url(&self) -> String {
        https(self.addr.as_ref().expect("started"))
    }

    fn client(&self) -> Client {
        Client::with_tls(self.url(), Some(TOKEN.into()), Some(&self.operator))
    }

    fn spec(&self) -> HostSpec {
        HostSpec {
            name: self.name.into(),
            agent: self.url(),
            overlay: self.overlay.clone(),
        }
    }
}

fn https(addr: &Endpoint) -> String {
    addr.to_string().replace("http://", "https://")
}

/// The run's CA and certificates, in `dir`: each agent's (serving only), the coordinator's
/// (serving and the agents' client), and the lab's own (an operator's).
struct Pki {
    agents: Vec<TlsFiles>,
    coordinator: TlsFiles,
    operator: ClientTls,
}

fn make_pki(dir: &std::path::Path) -> anyhow::Result<Pki> {
    let _ = std::fs::remove_dir_all(dir);
    let ca = pki::new_ca(dir)?;
    let local = ["127.0.0.1".to_owned()];
    let files = |name: &str, role| -> anyhow::Result<TlsFiles> {
        let (cert, key) = pki::issue(dir, name, role, &local)?;
        Ok(TlsFiles {
            cert,
            key,
            ca: ca.clone(),
        })
    };
    let agents = HOST_NAMES
        .iter()
        .map(|name| files(&format!("agent-{name}"), Role::Agent))
        .collect::<anyhow::Result<_>>()?;
    let coordinator = files("coordinator", Role::Coordinator)?;
    let op = files("operator", Role::Operator)?;
    Ok(Pki {
        agents,
        coordinator,
        operator: ClientTls::from_files(&op)?,
    })
}

/// What a run across hosts measured.
pub struct HostsRun {
    pub report: String,
    pub consistency: Consistency,
}

/// The scenario on a lab whose last `opts.lab.on_second_bridge` guests run on host `b`.
/// `snapshots`: group snapshots under traffic before the kill (the last one is restored).
pub async fn run(opts: VmDemoOptions, snapshots: usize) -> anyhow::Result<HostsRun> {
    with_hosts(
        opts,
        async |lab, agents, coordinator, client, opts, host_of| {
            scenario(lab, agents, coordinator, client, opts, snapshots, host_of).await
        },
    )
    .await
}

/// Boots the lab on two emulated hosts (its last `opts.lab.on_second_bridge` guests, at least
/// one, on host `b`), each with its agent, joined by the overlay, and the coordinator of both
/// over mutual TLS with a token; runs `body` once the guests talk (their loss baseline noted)
/// with the lab, the agents, the coordinator, its client, the options and which host a
/// bridge is; tears everything down however it ends.
pub(crate) async fn with_hosts<T>(
    mut opts: VmDemoOptions,
    body: impl AsyncFnOnce(
        &Arc<VmLab>,
        &mut [Agent],
        &RunningCoordinator,
        &Client,
        &VmDemoOptions,
        &dyn Fn(&str) -> &'static str,
    ) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if opts.lab.on_second_bridge == 0 {
        opts.lab.on_second_bridge = 1;
    }
    let p = opts.lab.prefix.clone();
    let _ = std::fs::remove_dir_all(&opts.store);
    let host_of = |bridge: &str| HOST_NAMES[usize::from(bridge != format!("{p}br"))];
    log(format!(
        "booting {} guests (QEMU/TCG via libvirt): {} on host a (bridge {p}br), {} on host b (bridge {p}br2)",
        opts.lab.vms,
        opts.lab.vms - opts.lab.on_second_bridge,
        opts.lab.on_second_bridge
    ));
    let lab_opts = opts.lab.clone();
    let lab = Arc::new(blocking(move || Ok(VmLab::start(lab_opts)?)).await?);
    // Filled once the lab is up; torn down below however the run ends.
    let mut agents: Vec<Agent> = Vec::new();
    let mut overlay = None;
    let result = async {
        let o = Overlay::create(&format!("{p}o"), [&lab.bridge, &lab.other_bridge])
            .context("the VXLAN-GBP overlay between the hosts")?;
        let pki = make_pki(&opts.store.join("pki")).context("the run's certificates")?;
        agents = HOST_NAMES
            .into_iter()
            .enumerate()
            .map(|(i, name)| Agent {
                name,
                bridge: [&lab.bridge, &lab.other_bridge][i].clone(),
                overlay: o.devices[i].clone(),
                pin_root: PathBuf::from(format!("{}-{name}", opts.pin_root.display())),
                hold_device: format!("{}{name}", opts.hold_device),
                store: opts.store.join(format!("agent-{name}")),
                uri: opts.lab.uri.clone(),
                addr: None,
                running: None,
                tls: pki.agents[i].clone(),
                operator: pki.operator.clone(),
            })
            .collect();
        overlay = Some(o);
        for agent in &mut agents {
            let _ = datapath::teardown(&agent.pin_root);
            agent.start().await?;
        }
        let coordinator = daemon::start_coordinator(CoordinatorConfig {
            hosts: agents.iter().map(Agent::spec).collect(),
            listen: "127.0.0.1:0".parse()?,
            token: Some(TOKEN.into()),
            api_group: None,
            tls: Some(pki.coordinator.clone()),
            store: opts.store.join("coordinator"),
            timeouts: Default::default(),
        })
        .await
        .context("starting the coordinator")?;
        let client = Client::with_tls(
            https(&coordinator.addr),
            Some(TOKEN.into()),
            Some(&pki.operator),
        );
        let l = lab.clone();
        let boot = Instant::now();
        let ready = blocking(move || {
            l.wait_talking(Duration::from_secs(120))?;
            Ok(l.note_loss_baseline()?)
        })
        .await;
        let result = match ready {
            Ok(()) => {
                log(format!(
                    "guests up and talking across the overlay after {:.1} s",
                    boot.elapsed().as_secs_f64()
                ));
                body(&lab, &mut agents, &coordinator, &client, &opts, &host_of).await
            }
            Err(e) => Err(e),
        };
        first_error(result, coordinator.stop().await)
    }
    .await;
    for agent in &mut agents {
        if let Some(running) = agent.running.take() {
            let _ = running.stop().await;
        }
        crate::forget_pin_root(&agent.pin_root);
    }
    drop(overlay);
    let _ = blocking(move || {
        drop(lab);
        Ok(())
    })
    .await;
    let _ = std::fs::remove_dir_all(&opts.store);
    result
}

/// The lab's guests as the coordinator names them (`domain@host`).
fn domains(lab: &VmLab, host_of: &dyn Fn(&str) -> &'static str) -> Vec<String> {
    lab.vms
        .iter()
        .map(|v| format!("{}@{}", v.name, host_of(&v.bridge)))
        .collect()
}

/// Defines the lab's guests as group `name` on the coordinator, and checks every agent has its
/// own VMs exact and the others as views on its overlay port.
pub(crate) async fn define_group(
    lab: &VmLab,
    agents: &[Agent],
    client: &Client,
    host_of: &dyn Fn(&str) -> &'static str,
    name: &str,
) -> anyhow::Result<()> {
    let domains = domains(lab, host_of);
    let group = client
        .define_group(name, None, &domains)
        .await
        .context("defining the group")?;
    log(format!(
        "group {} (id {}): {}",
        group.name,
        group.id,
        domains.join(", ")
    ));
    for agent in agents {
        let vms = agent.client().vms().await?;
        for v in &lab.vms {
            let own = host_of(&v.bridge) == agent.name;
            anyhow::ensure!(
                vms.iter().any(|r| r.mac == v.mac && r.remote != own),
                "agent {}: {} should be {}: {vms:?}",
                agent.name,
                v.name,
                if own { "its own" } else { "a view" }
            );
        }
    }
    Ok(())
}

async fn scenario(
    lab: &Arc<VmLab>,
    agents: &mut [Agent],
    coordinator: &RunningCoordinator,
    client: &Client,
    opts: &VmDemoOptions,
    snapshots: usize,
    host_of: &dyn Fn(&str) -> &'static str,
) -> anyhow::Result<HostsRun> {
    let mut out = String::new();
    define_group(lab, agents, client, host_of, "hosts").await?;

    // An agent killed and restarted in the middle of a group snapshot.
    let victim = agents.len() - 1;
    let started = client.create_snapshot("hosts", opts.method).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = client.snapshot(&started.id).await?;
        let busy = m
            .vms
            .iter()
            .any(|v| v.step != enforcer::snapshot::Step::Pending);
        if busy || m.outcome != Outcome::Running || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    log(format!(
        "killing agent {} mid-snapshot ({}), restarting it 1 s later",
        agents[victim].name, started.id
    ));
    agents[victim]
        .running
        .take()
        .context("the agent runs")?
        .crash()
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    agents[victim].start().await?;
    let aborted = client.wait_snapshot(&started.id, |_| {}).await?;
    anyhow::ensure!(
        aborted.outcome == Outcome::Aborted,
        "a snapshot whose agent died should abort: {aborted:?}"
    );
    let l = lab.clone();
    let all_running = blocking(move || Ok(l.vms.iter().all(|vm| l.running(vm)))).await?;
    let mut epochs = Vec::new();
    for agent in agents.iter() {
        epochs.extend(agent.client().vms().await?.iter().map(|v| v.epoch));
    }
    anyhow::ensure!(
        all_running && epochs.iter().all(|e| *e == epochs[0]),
        "after the abort every VM runs and every host has one epoch for the group (running: {all_running}, epochs {epochs:?})"
    );
    let _ = writeln!(
        out,
        "agent {} killed mid-snapshot: {} aborted ({}); every VM running, every host at epoch {} (forward, never back)",
        agents[victim].name,
        aborted.id,
        aborted.reason.clone().unwrap_or_default(),
        epochs[0]
    );
    log(out.lines().last().unwrap_or_default());
    // Frames the dead agent's buffer held died with it (to a member shut before its cut:
    // every frame to it from its group), counted by its next daemon. That is the crash's
    // loss, in the running group; the restored groups below are checked from here on.
    let lost_restart = agents[victim]
        .client()
        .holds()
        .await?
        .total(enforcer_common::HoldTotal::LostRestart);
    let l = lab.clone();
    let lost_so_far = blocking(move || {
        l.note_loss_baseline()?;
        let n = l.vms.len();
        Ok((0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| l.lost_before(i, j))
            .sum::<u64>())
    })
    .await?;
    let _ = writeln!(
        out,
        "UDP datagrams the running group lost so far, the kill included: {lost_so_far} (frames \
         agent {}'s next daemon counted lost with the last: {lost_restart})",
        agents[victim].name
    );
    log(out.lines().last().unwrap_or_default());

    // Snapshots under traffic; view updates timed from here (not the retries across the kill).
    let mut last = None;
    let learned_before = learned(agents).await;
    let hosts = &coordinator.state.hosts;
    let settle = Instant::now() + Duration::from_secs(30);
    while hosts.updates_in_flight() > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hosts.take_propagation_ms();
    for k in 0..snapshots {
        tokio::time::sleep(opts.before).await;
        let started = client.create_snapshot("hosts", opts.method).await?;
        log(format!(
            "snapshot {}/{snapshots} {} under traffic:",
            k + 1,
            started.id
        ));
        let m = vms::wait_committed(client, &started.id).await?;
        if let Some(previous) = last.replace(m) {
            client.delete_snapshot(&previous.id).await?;
        }
    }
    let manifest = last.context("at least one snapshot")?;
    out.push_str(&render_manifest(&manifest));
    let propagation = coordinator.state.hosts.take_propagation_ms();
    let (p50, p99, max) = percentiles(propagation.clone());
    let _ = writeln!(
        out,
        "views raised on the other host after each advance: {} updates, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms from the owner's acknowledgement; {} raised earlier from a frame's color (a VM sends nothing new before it resumes, long after the update)",
        propagation.len(),
        learned(agents).await - learned_before
    );

    tokio::time::sleep(opts.after).await;
    vms::kill_all(lab).await?;
    log("restoring the group, each VM on its own host");
    let restore = client.restore(&manifest.id, None).await?;
    let _ = writeln!(
        out,
        "restored {} VMs on their hosts, resumed within {:.1} ms of each other",
        restore.vms.len(),
        restore.resume_spread_ms
    );
    let (l, restored_for) = (lab.clone(), opts.restored);
    let consistency = blocking(move || vms::run_restored_and_check(&l, restored_for)).await?;
    out.push_str("restored state, every pair (vm3 is on the other host):\n");
    out.push_str(&consistency.render());
    let v = consistency.violations();
    let _ = writeln!(
        out,
        "consistency across hosts: {} violations={v} udp_lost={}",
        if v == 0 { "OK" } else { "BROKEN" },
        consistency.udp_lost()
    );
    Ok(HostsRun {
        report: out,
        consistency,
    })
}

async fn learned(agents: &[Agent]) -> u64 {
    let mut n = 0;
    for agent in agents {
        if let Ok(h) = agent.client().health().await {
            n += h.learned_epochs;
        }
    }
    n
}

/// Tier 3 across hosts (`enforcer e2e-hosts`, `cargo xtask e2e-hosts`).
pub async fn e2e(opts: VmDemoOptions) -> anyhow::Result<String> {
    let run = run(opts, 2).await?;
    anyhow::ensure!(
        run.consistency.violations() == 0,
        "{}\nthe restored group is inconsistent",
        run.report
    );
    Ok(run.report)
}
