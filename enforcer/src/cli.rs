//! Command line: `enforcer run` (the daemon), `enforcer demo`, and the API client commands.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use enforcer_common::Outcome;

use crate::{
    api::ModeName,
    client::{Client, DEFAULT_API},
    daemon::{self, DaemonConfig},
    datapath::{self, AttachMode, DEFAULT_PIN_ROOT},
    demo::{self, DemoOptions},
    mac::MacAddr,
    ports::PortSource,
    snapshots::SnapshotOptions,
};

#[derive(Parser, Debug)]
#[command(
    name = "enforcer",
    version,
    about = "Causally consistent live snapshots of VM groups, enforced in the kernel datapath"
)]
pub struct Cli {
    /// The daemon's API (for the client commands).
    #[arg(long, global = true, env = "ENFORCER_API", default_value = DEFAULT_API)]
    pub api: String,
    /// Bearer token for the API.
    #[arg(long, global = true, env = "ENFORCER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: attach to every VM port, follow ports, serve the API.
    Run(RunArgs),
    /// Coordinate group snapshots across several hosts: drives the agent (`enforcer run`) of
    /// each host over HTTP. Groups name their VMs `domain@host`.
    Coordinator(CoordinatorArgs),
    /// Run the demo: a group of real VMs talking, a group snapshot under traffic through the
    /// API, the VMs killed, the group restored, and the restored state checked.
    Demo(DemoArgs),
    /// Tier 3: the demo, then the same without enforcement, to show the check catches it.
    #[command(hide = true)]
    E2e(DemoArgs),
    /// Tier 3 across two emulated hosts: agents, an overlay, a coordinator, an agent killed
    /// mid-snapshot, then snapshot → kill → restore → check.
    #[command(hide = true)]
    E2eHosts(DemoArgs),
    /// Register, list and remove VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Read and move epochs.
    #[command(subcommand)]
    Epoch(EpochCommand),
    /// List groups with their epochs (and their domains, for groups defined over libvirt).
    Groups,
    /// Define or remove a group of libvirt domains.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Group snapshots: create, list, show, restore, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// List the ports the datapath is attached to.
    Ports,
    /// What the buffer daemon holds now, and what it did with held frames.
    Holds {
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Abort a group's snapshot: members above EPOCH go back to it; held frames are delivered.
    Abort {
        #[arg(long)]
        group: u32,
        #[arg(long)]
        epoch: u32,
    },
    /// Per-port counters: what the datapath delivered, dropped and why.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show or set what happens to Type-3 frames.
    Mode {
        /// New mode; omit to show the current one.
        #[arg(value_enum)]
        mode: Option<ModeArg>,
    },
    /// Benchmarks (use `cargo xtask bench ...`, which builds in release mode first).
    #[command(subcommand, hide = true)]
    Bench(BenchCommand),
    /// Remove everything pinned under the pin root: detaches the programs, frees the maps.
    Teardown {
        #[arg(long, default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Attach to every member of this bridge, following members as they come and go
    /// (repeatable: several bridges).
    #[arg(long, conflicts_with = "port", required_unless_present = "port")]
    pub bridge: Vec<String>,
    /// Attach to exactly these interfaces (repeatable).
    #[arg(long)]
    pub port: Vec<String>,
    /// Where programs' links and maps are pinned (bpffs).
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// API address. Anything but loopback requires --token.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Hook that classifies frames on the VM ports.
    #[arg(long, value_enum, default_value = "tc")]
    pub attach: AttachMode,
    /// Set the Type-3 mode at start (default: keep the pinned setting; `buffer` when new).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Do not run the buffer daemon (then `buffer` mode drops Type-3 frames, counted).
    #[arg(long)]
    pub no_buffer: bool,
    /// Name of the hold device (veth pair `<name>`/`<name>p`) the buffer daemon creates.
    #[arg(long, default_value = "enfhold")]
    pub hold_device: String,
    /// Memory bound for held frames, in MiB; beyond it the newest frame is dropped (counted).
    #[arg(long, default_value_t = 64)]
    pub hold_max_mib: usize,
    /// libvirt connection for group snapshots.
    #[arg(long, default_value = crate::libvirt::DEFAULT_URI)]
    pub libvirt_uri: String,
    /// Snapshot store: images, manifests, the journal and the groups.
    #[arg(long, default_value = "/var/lib/enforcer/snapshots")]
    pub store: PathBuf,
    /// Run without libvirt: no group snapshots (their endpoints answer 503).
    #[arg(long)]
    pub no_libvirt: bool,
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// The hosts: a JSON array of {"name", "agent" (the agent's API URL), "overlay" (the
    /// agent's VXLAN-GBP port on its bridge)}.
    #[arg(long)]
    pub hosts: PathBuf,
    /// API address. Anything but loopback requires --token (which the agents also require).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Manifests, journals and groups (images stay on the hosts that run the VMs).
    #[arg(long, default_value = "/var/lib/enforcer/coordinator")]
    pub store: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Define a group of running libvirt domains; registers their VMs in the datapath.
    Define {
        name: String,
        /// Domains (libvirt names), at least one; `domain@host` for a coordinator of several
        /// hosts.
        #[arg(required = true)]
        domains: Vec<String>,
        /// Datapath group id (default: the lowest unused).
        #[arg(long)]
        id: Option<u32>,
    },
    /// Remove a group: its VMs leave the datapath; its snapshots stay.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a causally consistent snapshot of a group.
    Create {
        #[arg(long)]
        group: String,
        /// Follow it to the end, printing each VM's progress.
        #[arg(long)]
        wait: bool,
    },
    /// List snapshots (newest last).
    Ls {
        #[arg(long)]
        group: Option<String>,
    },
    /// One snapshot: outcome, images and each VM's timeline.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Restore every VM of a committed snapshot together (the VMs must not be running).
    Restore {
        id: String,
        /// Put the restored VMs on this bridge instead of their own.
        #[arg(long)]
        bridge: Option<String>,
    },
    /// Delete a snapshot's images and manifest.
    Rm { id: String },
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of VMs in the demo group.
    #[arg(long, default_value_t = 3)]
    pub vms: usize,
    /// The quick variant without QEMU: network-namespace "VMs" whose epochs are advanced one
    /// at a time while numbered messages flow.
    #[arg(long)]
    pub netns: bool,
    /// (--netns) Messages per sender→receiver pair in each phase.
    #[arg(long, default_value_t = 20)]
    pub per_pair: u32,
    /// (--netns) Hook that classifies frames.
    #[arg(long, value_enum, default_value = "tc")]
    pub attach: AttachMode,
    /// Where the guest image is (`cargo xtask guest` builds it).
    #[arg(long, default_value = crate::vmlab::DEFAULT_GUEST_DIR)]
    pub guest_dir: PathBuf,
    /// Seconds the restored group runs before the check.
    #[arg(long, default_value_t = 3.0)]
    pub restored_secs: f64,
}

impl DemoArgs {
    fn vm_options(&self) -> anyhow::Result<crate::vmdemo::VmDemoOptions> {
        anyhow::ensure!(
            (2..=8).contains(&self.vms),
            "--vms must be between 2 and 8 (each guest is a TCG QEMU)"
        );
        anyhow::ensure!(
            self.restored_secs > 0.0 && self.restored_secs <= 600.0,
            "--restored-secs must be in (0, 600]"
        );
        let mut o = crate::vmdemo::VmDemoOptions::default();
        o.lab.vms = self.vms;
        o.lab.guest_dir = self.guest_dir.clone();
        o.restored = std::time::Duration::from_secs_f64(self.restored_secs);
        Ok(o)
    }
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Group snapshots of real guests under traffic: pause→advance latency, downtime,
    /// disruption (percentiles).
    Snapshot {
        #[arg(long, default_value_t = 4)]
        vms: usize,
        #[arg(long, default_value_t = 10)]
        count: usize,
        #[arg(long, default_value = crate::vmlab::DEFAULT_GUEST_DIR)]
        guest_dir: PathBuf,
    },
    /// TCP through a snapshot with skew: no-progress period, drop vs buffer (GENI-VIOLIN Fig. 6).
    TcpSkew {
        /// Skews to run, in seconds (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        skews: Vec<f64>,
        /// Where to write the figure (SVG).
        #[arg(long, default_value = "docs/tcp-skew.svg")]
        figure: PathBuf,
    },
    /// Held frames per second and re-injection, side by side with the plain path.
    Hold {
        /// Length of the blast, in seconds.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Across two emulated hosts: view propagation and learning latency, held frames
    /// re-injected across the overlay.
    Hosts {
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        /// Length of the held blast, in seconds.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// Veth path without / with the tc program / with the XDP program, side by side.
    Datapath {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Length of each measurement, in seconds.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Register a VM: its MAC, group and host-side port.
    Add {
        #[arg(long)]
        mac: MacAddr,
        #[arg(long)]
        group: u32,
        #[arg(long)]
        port: String,
        /// Starting epoch (default: the group's current epoch).
        #[arg(long)]
        epoch: Option<u32>,
    },
    /// Unregister a VM.
    Rm { mac: MacAddr },
    /// List registered VMs.
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum EpochCommand {
    /// Show one VM's epoch, or every VM's.
    Get { mac: Option<MacAddr> },
    /// Set a VM's epoch (never backwards).
    Set { mac: MacAddr, epoch: u32 },
    /// Move a VM to its next epoch.
    Advance { mac: MacAddr },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModeArg {
    Buffer,
    Drop,
    Monitor,
}

impl From<ModeArg> for ModeName {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Buffer => ModeName::Buffer,
            ModeArg::Drop => ModeName::Drop,
            ModeArg::Monitor => ModeName::Monitor,
        }
    }
}

impl Cli {
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Run(_) => "info",
            _ => "warn",
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(cli))
}

async fn run_async(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.api, cli.token.clone());
    match cli.command {
        Command::Run(args) => {
            let ports = if args.bridge.is_empty() {
                PortSource::Named(args.port)
            } else {
                PortSource::Bridges(args.bridge)
            };
            let running = daemon::start(DaemonConfig {
                ports,
                pin_root: args.pin_root,
                attach: args.attach,
                listen: args.listen,
                token: cli.token,
                type3_mode: args.mode.map(|m| ModeName::from(m).into()),
                hold: (!args.no_buffer).then_some(crate::hold::HoldOptions {
                    device: args.hold_device,
                    max_bytes: args.hold_max_mib << 20,
                }),
                snapshots: (!args.no_libvirt).then(|| SnapshotOptions {
                    uri: args.libvirt_uri,
                    store: args.store,
                    ..SnapshotOptions::default()
                }),
            })
            .await?;
            running.wait_for_signal().await?;
        }
        Command::Coordinator(args) => {
            let hosts = crate::hosts::load(&args.hosts)?;
            let running = daemon::start_coordinator(daemon::CoordinatorConfig {
                hosts,
                listen: args.listen,
                token: cli.token,
                store: args.store,
                timeouts: crate::coordinator::Timeouts::default(),
            })
            .await?;
            running.wait_for_signal().await?;
        }
        Command::Demo(args) if args.netns => {
            let report = demo::run(DemoOptions {
                vms: args.vms,
                per_pair: args.per_pair,
                attach: args.attach,
                ..DemoOptions::default()
            })
            .await?;
            println!("{report}");
        }
        Command::Demo(args) => {
            println!("{}", crate::vmdemo::demo(args.vm_options()?).await?);
        }
        Command::E2e(args) => {
            println!("{}", crate::vmdemo::e2e(args.vm_options()?).await?);
        }
        Command::E2eHosts(args) => {
            println!("{}", crate::vmhosts::e2e(args.vm_options()?).await?);
        }
        Command::Vm(VmCommand::Add {
            mac,
            group,
            port,
            epoch,
        }) => {
            let vm = client.register_vm(mac, group, &port, epoch).await?;
            println!(
                "registered {} in group {} at epoch {} (ifindex {})",
                vm.mac, vm.group, vm.epoch, vm.ifindex
            );
        }
        Command::Vm(VmCommand::Rm { mac }) => {
            let vm = client.unregister_vm(mac).await?;
            println!("unregistered {}", vm.mac);
        }
        Command::Vm(VmCommand::Ls) | Command::Epoch(EpochCommand::Get { mac: None }) => {
            let vms = client.vms().await?;
            println!(
                "{:<19} {:>6} {:>6} {:>8}",
                "MAC", "GROUP", "EPOCH", "IFINDEX"
            );
            for vm in vms {
                println!(
                    "{:<19} {:>6} {:>6} {:>8}",
                    vm.mac, vm.group, vm.epoch, vm.ifindex
                );
            }
        }
        Command::Epoch(EpochCommand::Get { mac: Some(mac) }) => {
            println!("{}", client.vm(mac).await?.epoch);
        }
        Command::Epoch(EpochCommand::Set { mac, epoch }) => {
            let vm = client.set_epoch(mac, epoch).await?;
            println!("{} at epoch {}", vm.mac, vm.epoch);
        }
        Command::Epoch(EpochCommand::Advance { mac }) => {
            let vm = client.advance(mac).await?;
            println!("{} at epoch {}", vm.mac, vm.epoch);
        }
        Command::Groups => {
            let groups = client.groups().await?;
            println!(
                "{:>6} {:<12} {:>8} {:>10} {:>10}  DOMAINS",
                "GROUP", "NAME", "MEMBERS", "MIN_EPOCH", "MAX_EPOCH"
            );
            for g in groups {
                println!(
                    "{:>6} {:<12} {:>8} {:>10} {:>10}  {}",
                    g.record.group,
                    g.name.as_deref().unwrap_or("-"),
                    g.record.members,
                    g.record.min_epoch,
                    g.record.max_epoch,
                    g.domains.join(" ")
                );
            }
        }
        Command::Group(GroupCommand::Define { name, domains, id }) => {
            let g = client.define_group(&name, id, &domains).await?;
            println!("group {} (id {}) defined:", g.name, g.id);
            for vm in &g.vms {
                println!("  {:<20} {}", vm.name, vm.mac);
            }
        }
        Command::Group(GroupCommand::Rm { name }) => {
            let g = client.remove_group(&name).await?;
            println!(
                "group {} removed ({} VMs left the datapath)",
                g.name,
                g.vms.len()
            );
        }
        Command::Snapshot(SnapshotCommand::Create { group, wait }) => {
            let started = client.create_snapshot(&group).await?;
            println!("snapshot {} of group {group} started", started.id);
            if wait {
                let m = client
                    .wait_snapshot(&started.id, |m| {
                        println!("  {}", crate::coordinator::render_progress(m))
                    })
                    .await?;
                print!("{}", crate::coordinator::render_manifest(&m));
                anyhow::ensure!(
                    m.outcome == crate::coordinator::Outcome::Committed,
                    "snapshot {} aborted",
                    m.id
                );
            }
        }
        Command::Snapshot(SnapshotCommand::Ls { group }) => {
            println!("{:<36} {:<10} {:>6} {:>4}", "ID", "OUTCOME", "EPOCH", "VMS");
            for m in client.snapshots(group.as_deref()).await? {
                println!(
                    "{:<36} {:<10} {:>6} {:>4}",
                    m.id,
                    format!("{:?}", m.outcome).to_lowercase(),
                    m.epoch,
                    m.vms.len()
                );
            }
        }
        Command::Snapshot(SnapshotCommand::Show { id, json }) => {
            let m = client.snapshot(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{}", crate::coordinator::render_manifest(&m));
            }
        }
        Command::Snapshot(SnapshotCommand::Restore { id, bridge }) => {
            let r = client.restore(&id, bridge.as_deref()).await?;
            println!(
                "restored {} (group {}, epoch {}):",
                r.snapshot, r.group, r.epoch
            );
            for vm in &r.vms {
                println!(
                    "  {:<20} {} on {:<8} restored at {:>8.1} ms, resumed at {:>8.1} ms",
                    vm.name, vm.mac, vm.port, vm.restored_ms, vm.resumed_ms
                );
            }
            println!("  all resumed within {:.1} ms", r.resume_spread_ms);
        }
        Command::Snapshot(SnapshotCommand::Rm { id }) => {
            let m = client.delete_snapshot(&id).await?;
            println!("deleted {}", m.id);
        }
        Command::Ports => {
            for p in client.ports().await? {
                println!("{:>8} {}", p.ifindex, p.name);
            }
        }
        Command::Stats { json } => {
            let stats = client.stats().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{:<12} {:<19}", "PORT", "VM");
                for o in Outcome::ALL {
                    print!(" {:>16}", o.name());
                }
                println!();
                for s in stats {
                    print!(
                        "{:<12} {:<19}",
                        s.port.clone().unwrap_or_else(|| format!("#{}", s.ifindex)),
                        s.vm.map(|m| m.to_string()).unwrap_or_else(|| "-".into())
                    );
                    for o in Outcome::ALL {
                        print!(" {:>16}", s.frames(o));
                    }
                    println!();
                }
                // The buffer's part, when one runs.
                if let Ok(report) = client.holds().await {
                    println!(
                        "\nheld now: {} frames, {} bytes",
                        report.held_frames, report.held_bytes
                    );
                    for q in &report.queues {
                        println!(
                            "  {:<28} {:>8} frames {:>10} bytes  oldest {} ms",
                            q.queue, q.frames, q.bytes, q.oldest_ms
                        );
                    }
                }
            }
        }
        Command::Holds { json } => {
            let report = client.holds().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "held now: {} frames, {} bytes (bound {} bytes)",
                    report.held_frames, report.held_bytes, report.max_bytes
                );
                for q in &report.queues {
                    println!(
                        "  {:<28} {:>8} frames {:>10} bytes  oldest {:>6} ms  dropped(bound) {}{}",
                        q.queue,
                        q.frames,
                        q.bytes,
                        q.oldest_ms,
                        q.dropped_bound,
                        if q.draining { "  draining" } else { "" }
                    );
                }
                let totals: Vec<String> = report
                    .totals
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                println!("totals: {}", totals.join(", "));
                let kernel: Vec<String> = report
                    .kernel
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                println!("lost in the kernel: {}", kernel.join(", "));
                if report.hold_time_count > 0 {
                    println!(
                        "mean hold time: {:.1} ms over {} frames",
                        1000.0 * report.hold_time_sum_seconds / report.hold_time_count as f64,
                        report.hold_time_count
                    );
                }
            }
        }
        Command::Abort { group, epoch } => {
            let vms = client.abort(group, epoch).await?;
            println!(
                "group {group} back at epoch {epoch} ({} VMs rolled back); held frames delivered",
                vms.len()
            );
        }
        Command::Mode { mode: None } => {
            println!("{}", client.config().await?.type3_mode);
        }
        Command::Mode { mode: Some(mode) } => {
            println!("{}", client.set_mode(mode.into()).await?.type3_mode);
        }
        Command::Bench(BenchCommand::TcpSkew { skews, figure }) => {
            anyhow::ensure!(
                !skews.is_empty() && skews.iter().all(|s| *s > 0.0 && *s <= 30.0),
                "--skews must be between 0 and 30 s"
            );
            println!("{}", crate::bench::tcp_skew(&skews, &figure).await?);
        }
        Command::Bench(BenchCommand::Snapshot {
            vms,
            count,
            guest_dir,
        }) => {
            anyhow::ensure!((2..=8).contains(&vms), "--vms must be between 2 and 8");
            anyhow::ensure!(
                (1..=1000).contains(&count),
                "--count must be between 1 and 1000"
            );
            let mut o = crate::vmdemo::VmDemoOptions::default();
            o.lab.vms = vms;
            o.lab.prefix = "enfb".into();
            o.lab.subnet = 4;
            o.lab.guest_dir = guest_dir;
            o.pin_root = "/sys/fs/bpf/enforcer-bench".into();
            o.store = "/var/lib/enforcer/bench-snapshots".into();
            o.hold_device = "enfbhold".into();
            let report =
                crate::vmdemo::bench_snapshots(o, count, std::time::Duration::from_millis(500))
                    .await?;
            println!("{report}");
        }
        Command::Bench(BenchCommand::Hold { seconds }) => {
            anyhow::ensure!(seconds > 0.0, "--seconds must be positive");
            println!("{}", crate::bench::hold(seconds).await?);
        }
        Command::Bench(BenchCommand::Hosts { rounds, seconds }) => {
            anyhow::ensure!(
                rounds >= 2 && seconds > 0.0,
                "--rounds must be at least 2 and --seconds positive"
            );
            println!("{}", crate::bench_hosts::hosts(rounds, seconds).await?);
        }
        Command::Bench(BenchCommand::Datapath { rounds, seconds }) => {
            anyhow::ensure!(
                rounds >= 1 && seconds > 0.0,
                "--rounds must be at least 1 and --seconds positive"
            );
            let report = tokio::task::spawn_blocking(move || {
                crate::bench::datapath(&crate::bench::DatapathBenchOptions { rounds, seconds })
            })
            .await??;
            println!("{report}");
        }
        Command::Teardown { pin_root } => {
            if datapath::teardown(&pin_root)
                .with_context(|| format!("removing {}", pin_root.display()))?
            {
                println!(
                    "removed {} (programs detached, maps freed)",
                    pin_root.display()
                );
            } else {
                println!("nothing pinned at {}", pin_root.display());
            }
        }
    }
    Ok(())
}
