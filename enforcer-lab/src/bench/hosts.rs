//! `enforcer bench hosts`: epochs and held frames across two emulated hosts (two bridges, two
//! agents, a VXLAN-GBP overlay; see `overlay.rs`), driven by the coordinator's `Hosts`.
//!
//! - **Propagation**: after the owner acknowledges an advance, how long until the other
//!   agent's view has it (the coordinator's update over HTTP).
//! - **Learning**: with no update from the coordinator, how long until the other host's view
//!   rises from the color carried by the VM's own frames (a stream of one frame per 100 µs).
//! - **Hold and re-inject across hosts**: frames held on the sender's host while its view of
//!   the remote receiver lags, re-injected across the overlay when the view rises.

use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::HoldTotal;

use crate::{
    bench::hold::{Receiver, blast},
    netns::Lab,
    overlay::{HOST_NAMES, Overlay},
    stats::percentiles,
};
use enforcer::{
    api::client::Client,
    daemon::{self, DaemonConfig, Running},
    datapath::{self, AttachMode, ports::PortSource},
    hold::HoldOptions,
    model::{GroupSpec, VmSpec},
    multihost::Hosts,
    snapshot::EpochControl,
};

const PORT: u16 = 47_600;

async fn agent(bridge: &str, name: &str) -> anyhow::Result<(Running, Client)> {
    let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/enforcer-bench-hosts-{name}"));
    let _ = datapath::teardown(&pin_root);
    let running = daemon::start(DaemonConfig {
        ports: PortSource::Bridge(bridge.to_owned()),
        pin_root,
        attach: AttachMode::Tc,
        listen: crate::api_socket(&format!("bench-hosts-{name}")),
        token: None,
        api_group: None,
        tls: None,
        type3_mode: None,
        hold: Some(HoldOptions {
            device: format!("enfmh{name}"),
            max_bytes: 1 << 30,
            ..Default::default()
        }),
        snapshots: None,
    })
    .await
    .with_context(|| format!("starting agent {name}"))?;
    let client = Client::new(running.addr.to_string(), None);
    Ok((running, client))
}

fn row(out: &mut String, name: &str, v: Vec<f64>) {
    let n = v.len();
    let (p50, p99, max) = percentiles(v);
    let _ = writeln!(out, "  {name:<52} {n:>5} {p50:>9.3} {p99:>9.3} {max:>9.3}");
}

pub async fn hosts(rounds: usize, seconds: f64) -> anyhow::Result<String> {
    let lab = Lab::create_hosts("enfm", &[1, 1]).context("creating the lab")?;
    let overlay = Overlay::create("enfmo", [&lab.bridges[0], &lab.bridges[1]])?;
    let (running_a, a) = agent(&lab.bridges[0], "a").await?;
    let (running_b, b) = agent(&lab.bridges[1], "b").await?;
    let result = measure(&lab, &overlay, &a, &b, rounds, seconds).await;
    running_a.stop().await?;
    running_b.stop().await?;
    for name in HOST_NAMES {
        let _ = datapath::teardown(std::path::Path::new(&format!(
            "/sys/fs/bpf/enforcer-bench-hosts-{name}"
        )));
    }
    drop(overlay);
    result
}

async fn measure(
    lab: &Lab,
    overlay: &Overlay,
    a: &Client,
    b: &Client,
    rounds: usize,
    seconds: f64,
) -> anyhow::Result<String> {
    let hosts = Hosts::new(
        overlay.host_specs([a.address().into(), b.address().into()]),
        None,
        tokio::runtime::Handle::current(),
    );
    let vm = |i: usize| VmSpec {
        name: format!("{}@{}", lab.vms[i].name, HOST_NAMES[i]),
        mac: lab.vms[i].mac,
    };
    for i in 0..2 {
        let (h, spec, port) = (hosts.clone(), vm(i), lab.vms[i].port.clone());
        tokio::task::spawn_blocking(move || h.register(&spec, 1, &port, Some(0)))
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    let (vm1, vm2) = (lab.vms[0].mac, lab.vms[1].mac);
    // Views accept colors only up to what the coordinator announced (the forged-color bound);
    // this bench advances the VMs many times outside snapshots, so it announces every epoch it
    // will reach, once, up front (a snapshot announces its own, one at a time).
    let group = GroupSpec {
        name: "bench".parse()?,
        id: 1,
        vms: (0..2).map(vm).collect(),
    };
    let (h, g) = (hosts.clone(), group.clone());
    let ceiling = u32::try_from(rounds * 3 + 10)?;
    tokio::task::spawn_blocking(move || h.announce(&g, ceiling))
        .await?
        .map_err(anyhow::Error::msg)?;

    // 1. Propagation: owner first, then the other agent, through the coordinator.
    let mut owner_ack = Vec::new();
    for r in 0..rounds {
        let (h, spec) = (hosts.clone(), vm(r % 2));
        let t = Instant::now();
        tokio::task::spawn_blocking(move || h.advance(&spec))
            .await?
            .map_err(anyhow::Error::msg)?;
        owner_ack.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let propagation = hosts.take_propagation_ms();
    anyhow::ensure!(
        propagation.len() == rounds,
        "{} of {rounds} updates acknowledged",
        propagation.len()
    );

    // 2. Learning from frames: vm1 streams to vm2; vm1 advances on its own host only (the
    // coordinator's update to B is withheld) and B's view of vm1 rises from the frames.
    let tx = lab.udp_socket(0, PORT)?;
    let rx = lab.udp_socket(1, PORT)?;
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    crate::netns::force_rcvbuf(&rx, 1 << 30)?;
    let dst = SocketAddrV4::new(lab.vms[1].ip, PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (tx, stop) = (tx.try_clone()?, stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = tx.send_to(&[0u8; 16], dst);
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    let drain = Receiver::start(rx.try_clone()?);
    let mut learn = Vec::new();
    let learned_before = b.health().await?.learned_epochs;
    for _ in 0..rounds.min(100) {
        // vm2 first, through the coordinator: A's view of it must allow vm1's frames through.
        let (h, spec) = (hosts.clone(), vm(1));
        let e2 = tokio::task::spawn_blocking(move || h.advance(&spec))
            .await?
            .map_err(anyhow::Error::msg)?;
        while a.vm(vm2).await?.epoch < e2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let e1 = a.advance(vm1).await?.epoch;
        let t = Instant::now();
        while b.vm(vm1).await?.epoch < e1 {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(5),
                "B never learned vm1's epoch"
            );
        }
        learn.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = stream.join();
    drain.finish(Duration::from_millis(200));
    let learned = b.health().await?.learned_epochs - learned_before;

    // 3. Held across hosts: vm1 advances on its host; A's view of vm2 lags, so A holds every
    // frame; then vm2 advances through the coordinator and A re-injects across the overlay.
    let e1 = a.advance(vm1).await?.epoch;
    let counter = Receiver::start(rx.try_clone()?);
    let (sent, blast_secs) = blast(&tx, dst, e1, seconds);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = a.holds().await?;
    let early = counter.count();
    let release = Instant::now();
    let (h, spec) = (hosts.clone(), vm(1));
    tokio::task::spawn_blocking(move || h.advance(&spec))
        .await?
        .map_err(anyhow::Error::msg)?;
    let mut report = a.holds().await?;
    while report.held_frames > 0 && release.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        report = a.holds().await?;
    }
    let reinject_secs = release.elapsed().as_secs_f64();
    let got = counter.finish_after(sent, Duration::from_secs(10));
    let held = before.held_frames;
    let reinjected = report.total(HoldTotal::Reinjected) - before.total(HoldTotal::Reinjected);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "epochs across 2 emulated hosts (bridge + agent each, VXLAN-GBP overlay), {rounds} advances"
    );
    let _ = writeln!(
        out,
        "  {:<52} {:>5} {:>9} {:>9} {:>9}",
        "(ms)", "n", "p50", "p99", "max"
    );
    row(
        &mut out,
        "advance acknowledged by the owner (coordinator → agent)",
        owner_ack,
    );
    row(
        &mut out,
        "owner's ack → other host's view raised (coordinator)",
        propagation,
    );
    row(
        &mut out,
        "owner's advance → other host's view raised from frames",
        learn,
    );
    let _ = writeln!(out, "  views raised from frames' colors on B: {learned}");
    let _ = writeln!(
        out,
        "held across hosts: sent {sent} in {blast_secs:.2} s, held on the sender's host {held} ({:.0} pps), delivered before the receiver's view rose: {early}",
        held as f64 / blast_secs
    );
    let _ = writeln!(
        out,
        "re-injected across the overlay: {reinjected} in {reinject_secs:.3} s ({:.0} pps) from the coordinator's update; received {}, lost {}, reordered {}",
        reinjected as f64 / reinject_secs,
        got.count,
        sent.saturating_sub(got.count),
        got.reordered
    );
    let _ = writeln!(
        out,
        "sender host's buffer totals: {:?}; kernel: {:?}",
        report.totals, report.kernel
    );
    let on_b = b.holds().await?;
    let _ = writeln!(
        out,
        "receiver host's buffer (frames held there for order behind its own release): {:?}; kernel: {:?}",
        on_b.totals, on_b.kernel
    );
    anyhow::ensure!(
        early == 0,
        "{early} held frames reached the receiver before its view rose"
    );
    Ok(out)
}
