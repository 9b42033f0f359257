//! The main job on its embedded default: a demo group of network-namespace VMs on a bridge,
//! the real daemon and HTTP API, sequence-numbered traffic while epochs advance one VM at a
//! time, and a report of what the datapath delivered, dropped and why.

use std::{fmt::Write as _, path::PathBuf, process::Command};

use anyhow::Context as _;
use enforcer_common::HoldTotal;
use enforcer_common::Outcome;

use crate::{
    netns::Lab,
    traffic::{self, Mesh, PhaseResult},
};
use enforcer::{
    api::client::Client,
    daemon::{self, DaemonConfig},
    datapath::{self, AttachMode, ports::PortSource},
};
use enforcer_common::Type3Mode;

pub struct DemoOptions {
    pub vms: usize,
    pub per_pair: u32,
    pub attach: AttachMode,
    pub pin_root: PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            vms: 3,
            per_pair: 20,
            attach: AttachMode::Tc,
            pin_root: "/sys/fs/bpf/enforcer-demo".into(),
        }
    }
}

/// Runs the demo and returns the report; `Err` if anything failed or the invariant was broken.
pub async fn run(opts: DemoOptions) -> anyhow::Result<String> {
    anyhow::ensure!(
        (2..=32).contains(&opts.vms),
        "--vms must be between 2 and 32"
    );
    let mut out = String::new();
    eprintln!(
        "[demo] creating {} VMs (network namespaces) on bridge enfdbr",
        opts.vms
    );
    let lab = Lab::create("enfd", opts.vms).context("creating the demo lab")?;
    let _ = datapath::teardown(&opts.pin_root);
    let result = run_in(&lab, &opts, &mut out).await;
    crate::forget_pin_root(&opts.pin_root);
    drop(lab);
    result.map(|()| out)
}

async fn run_in(lab: &Lab, opts: &DemoOptions, out: &mut String) -> anyhow::Result<()> {
    eprintln!(
        "[demo] starting the daemon (pins under {})",
        opts.pin_root.display()
    );
    let running = daemon::start(DaemonConfig {
        ports: PortSource::Bridge(lab.bridge.clone()),
        pin_root: opts.pin_root.clone(),
        attach: opts.attach,
        listen: crate::api_socket("netns-demo"),
        token: None,
        api_group: None,
        tls: None,
        type3_mode: None,
        hold: Some(enforcer::hold::HoldOptions {
            device: "enfdhold".into(),
            ..Default::default()
        }),
        snapshots: None,
    })
    .await?;
    let client = Client::new(running.addr.to_string(), None);
    let result = drive(lab, opts, &client, out).await;
    running.stop().await?;
    result
}

async fn drive(
    lab: &Lab,
    opts: &DemoOptions,
    client: &Client,
    out: &mut String,
) -> anyhow::Result<()> {
    client.set_mode(Type3Mode::Drop).await?;
    for vm in &lab.vms {
        client.register_vm(vm.mac, 1, &vm.port, Some(0)).await?;
    }
    let ports = client.ports().await?;
    writeln!(
        out,
        "enforcer demo: group 1 = {} VMs on bridge {}, program on every port ({:?}); first Type-3 mode drop, then buffer",
        lab.vms.len(),
        lab.bridge,
        opts.attach
    )?;
    for vm in &lab.vms {
        let ifindex = ports
            .iter()
            .find(|p| p.name == vm.port)
            .map(|p| p.ifindex)
            .unwrap_or(0);
        writeln!(
            out,
            "  {:<4} mac {} ip {:<11} port {} (ifindex {ifindex})",
            vm.name, vm.mac, vm.ip, vm.port
        )?;
    }

    let mesh = Mesh::new(lab)?;
    // Advance in an order that is not the VMs' order: the last VM first.
    let order: Vec<usize> = (0..lab.vms.len()).rev().collect();
    let names: Vec<String> = lab.vms.iter().map(|vm| vm.name.clone()).collect();
    eprintln!(
        "[demo] exchanging {} numbered messages per pair, advancing epochs one VM at a time",
        opts.per_pair
    );
    let phases = traffic::run_phases(&mesh, &order, opts.per_pair, &names, |vm| {
        let mac = lab.vms[vm].mac;
        async move {
            client
                .advance(mac)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await?;
    for phase in &phases {
        report_phase(out, phase, &names)?;
    }

    let stats = client.stats().await?;
    writeln!(out, "\ndatapath counters per port (frames):")?;
    let shown = [
        Outcome::Type1,
        Outcome::Type2,
        Outcome::Type3Dropped,
        Outcome::HeldForOrder,
        Outcome::OutsideGroup,
        Outcome::ForeignSource,
        Outcome::Malformed,
    ];
    write!(out, "  {:<10}", "port")?;
    for o in shown {
        write!(out, " {:>14}", o.name())?;
    }
    writeln!(out)?;
    for s in &stats {
        write!(out, "  {:<10}", s.port.as_deref().unwrap_or("?"))?;
        for o in shown {
            write!(out, " {:>14}", s.frames(o))?;
        }
        writeln!(out)?;
    }

    let sent: u32 = phases.iter().flat_map(|p| &p.pairs).map(|p| p.sent).sum();
    let delivered: u32 = phases
        .iter()
        .flat_map(|p| &p.pairs)
        .map(|p| p.delivered)
        .sum();
    let violations: u32 = phases
        .iter()
        .flat_map(|p| &p.pairs)
        .map(|p| p.type3_delivered)
        .sum();
    let expected_type3: u32 = phases
        .iter()
        .flat_map(|p| &p.pairs)
        .filter(|p| p.color > p.receiver_epoch)
        .map(|p| p.sent)
        .sum();
    let counted: u64 = stats.iter().map(|s| s.total_frames()).sum();
    let dropped: u64 = stats.iter().map(|s| s.frames(Outcome::Type3Dropped)).sum();
    writeln!(
        out,
        "\nsent {sent}, delivered {delivered}, Type-3 dropped by the datapath {dropped} (expected {expected_type3}), frames counted {counted}"
    )?;

    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(opts.pin_root.join("epochs"))
        .output();
    match dump {
        Ok(o) if o.status.success() => {
            writeln!(
                out,
                "\n$ bpftool map dump pinned {}/epochs   (first entry)",
                opts.pin_root.display()
            )?;
            let text = String::from_utf8_lossy(&o.stdout);
            for line in text.lines().skip_while(|l| !l.contains('{')).take(12) {
                writeln!(out, "  {line}")?;
            }
        }
        _ => writeln!(
            out,
            "\n(bpftool not available: install it with scripts/setup.sh to inspect the maps)"
        )?,
    }

    let held_ok = buffer_part(lab, client, &mesh, &names, opts.per_pair, out).await?;

    let ok = violations == 0
        && dropped == u64::from(expected_type3)
        && u64::from(sent) == counted
        && delivered + expected_type3 == sent
        && held_ok;
    writeln!(
        out,
        "\ninvariant 1 (no Type-3 frame delivered to a pre-snapshot receiver): {}",
        if violations == 0 {
            "OK".to_owned()
        } else {
            format!("VIOLATED ({violations} frames)")
        }
    )?;
    writeln!(
        out,
        "every frame accounted (delivered + dropped = sent = counted; held = re-injected in order): {}",
        if ok { "OK" } else { "MISMATCH" }
    )?;
    anyhow::ensure!(ok, "the demo found a problem:\n{out}");
    Ok(())
}

/// Mode `buffer`: the last VM takes the next snapshot and sends to every peer; its frames are
/// held until each peer advances, then delivered in order. Returns whether all of it held.
async fn buffer_part(
    lab: &Lab,
    client: &Client,
    mesh: &Mesh,
    names: &[String],
    per_pair: u32,
    out: &mut String,
) -> anyhow::Result<bool> {
    client.set_mode(Type3Mode::Buffer).await?;
    let last = lab.vms.len() - 1;
    let sender = client.advance(lab.vms[last].mac).await?;
    writeln!(
        out,
        "\nmode buffer (the default): {} takes snapshot {} and sends {per_pair} numbered messages to every peer",
        names[last], sender.epoch
    )?;
    for to in 0..last {
        for seq in 0..per_pair {
            mesh.send(traffic::Message {
                from: last as u16,
                to: to as u16,
                seq,
                color: sender.epoch,
            })?;
        }
    }
    let early = mesh.collect(
        std::time::Duration::from_millis(150),
        std::time::Duration::from_secs(2),
    );
    let holds = client.holds().await?;
    let early_total: usize = early.iter().map(Vec::len).sum();
    writeln!(
        out,
        "  before any peer advanced: delivered {early_total}, held by the buffer {}",
        holds.held_frames
    )?;
    let mut ok = early_total == 0 && holds.held_frames == u64::from(per_pair) * last as u64;
    for to in 0..last {
        client.advance(lab.vms[to].mac).await?;
        let got = mesh.collect(
            std::time::Duration::from_millis(150),
            std::time::Duration::from_secs(5),
        );
        let from_last: Vec<u32> = got[to]
            .iter()
            .filter(|m| m.from as usize == last)
            .map(|m| m.seq)
            .collect();
        let in_order = from_last == (0..per_pair).collect::<Vec<_>>();
        let others: usize = got
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != to)
            .map(|(_, g)| g.len())
            .sum();
        ok &= in_order && others == 0;
        writeln!(
            out,
            "  {} advanced: it got {} held messages from {}{}, the others got {}",
            names[to],
            from_last.len(),
            names[last],
            if in_order {
                " (all, in order)"
            } else {
                " (NOT all in order)"
            },
            others
        )?;
    }
    let holds = client.holds().await?;
    writeln!(
        out,
        "  buffer totals: received {}, re-injected {}, dropped {}; held now {}",
        holds.total(HoldTotal::Received),
        holds.total(HoldTotal::Reinjected),
        holds.total(HoldTotal::DroppedBound)
            + holds.total(HoldTotal::LostRing)
            + holds.total(HoldTotal::InjectFailed),
        holds.held_frames
    )?;
    Ok(ok && holds.held_frames == 0)
}

fn report_phase(out: &mut String, phase: &PhaseResult, names: &[String]) -> std::fmt::Result {
    let epochs: Vec<String> = phase
        .epochs
        .iter()
        .zip(names)
        .map(|(e, n)| format!("{n}={e}"))
        .collect();
    writeln!(
        out,
        "\nphase: {}   [epochs {}]",
        phase.title,
        epochs.join(" ")
    )?;
    for p in &phase.pairs {
        let kind = match traffic_type(p.color, p.receiver_epoch) {
            "Type-3" => "Type-3 -> dropped",
            other => other,
        };
        writeln!(
            out,
            "  {:>4} -> {:<4} color {} -> epoch {}  {:<18} sent {:>3}  delivered {:>3}{}",
            names[p.from],
            names[p.to],
            p.color,
            p.receiver_epoch,
            kind,
            p.sent,
            p.delivered,
            if p.type3_delivered > 0 {
                "  VIOLATION"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

fn traffic_type(color: u32, epoch: u32) -> &'static str {
    match enforcer_common::classify(color, epoch) {
        enforcer_common::FrameType::Type1 => "Type-1",
        enforcer_common::FrameType::Type2 => "Type-2",
        enforcer_common::FrameType::Type3 => "Type-3",
    }
}
