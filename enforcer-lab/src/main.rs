//! `enforcer-lab`: the lab's commands — the demo (the README's main job), tier 3 end to end,
//! and the benchmarks. `cargo xtask demo|e2e|e2e-hosts|bench` builds it in release mode and runs
//! it. The product binary (`enforcer`) ships none of this.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use enforcer::datapath::AttachMode;
use enforcer_lab::{
    bench,
    demo::{self, netns::DemoOptions, vms::VmDemoOptions},
    vms::DEFAULT_GUEST_DIR,
};

#[derive(Parser, Debug)]
#[command(
    name = "enforcer-lab",
    version,
    about = "enforcer's lab: the demo, tier 3 end to end, and the benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the demo: a group of real VMs talking, a group snapshot under traffic through the
    /// API, the VMs killed, the group restored, and the restored state checked.
    Demo(DemoArgs),
    /// Tier 3: the demo, then the same without enforcement, to show the check catches it.
    E2e(DemoArgs),
    /// Tier 3 across two emulated hosts: agents, an overlay, a coordinator, an agent killed
    /// mid-snapshot, then snapshot → kill → restore → check.
    E2eHosts(DemoArgs),
    /// Benchmarks (use `cargo xtask bench ...`, which builds in release mode first).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Number of VMs in the demo group.
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// The quick variant without QEMU: network-namespace "VMs" whose epochs are advanced one
    /// at a time while numbered messages flow.
    #[arg(long)]
    netns: bool,
    /// (--netns) Messages per sender→receiver pair in each phase.
    #[arg(long, default_value_t = 20)]
    per_pair: u32,
    /// (--netns) Hook that classifies frames.
    #[arg(long, value_enum, default_value = "tc")]
    attach: AttachMode,
    /// Where the guest image is (`cargo xtask guest` builds it).
    #[arg(long, default_value = DEFAULT_GUEST_DIR)]
    guest_dir: PathBuf,
    /// Seconds the restored group runs before the check.
    #[arg(long, default_value_t = 3.0)]
    restored_secs: f64,
}

impl DemoArgs {
    fn vm_options(&self) -> anyhow::Result<VmDemoOptions> {
        anyhow::ensure!(
            (2..=8).contains(&self.vms),
            "--vms must be between 2 and 8 (each guest is a TCG QEMU)"
        );
        anyhow::ensure!(
            self.restored_secs > 0.0 && self.restored_secs <= 600.0,
            "--restored-secs must be in (0, 600]"
        );
        let mut o = VmDemoOptions::default();
        o.lab.vms = self.vms;
        o.lab.guest_dir = self.guest_dir.clone();
        o.restored = Duration::from_secs_f64(self.restored_secs);
        Ok(o)
    }
}

/// The guests of the real-VM benchmarks.
#[derive(Args, Debug)]
struct BenchGuests {
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// Each guest's memory (MiB).
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// Memory each guest rewrites continuously (MiB, every page every 100 ms).
    #[arg(long, default_value_t = 32)]
    dirty_mib: u32,
    #[arg(long, default_value = DEFAULT_GUEST_DIR)]
    guest_dir: PathBuf,
}

impl BenchGuests {
    /// The demo's options with these guests, checked, under the benchmark's own names
    /// (`prefix`, subnet, pins, store, hold device), apart from the demo's and the tests'.
    fn vm_options(&self, prefix: &str, subnet: u8, name: &str) -> anyhow::Result<VmDemoOptions> {
        anyhow::ensure!((2..=8).contains(&self.vms), "--vms must be between 2 and 8");
        anyhow::ensure!(
            (128..=8192).contains(&self.memory_mib) && self.dirty_mib < self.memory_mib / 2,
            "--memory-mib must be in 128..=8192 and --dirty-mib under half of it"
        );
        let mut o = VmDemoOptions::default();
        o.lab.vms = self.vms;
        o.lab.memory_mib = self.memory_mib;
        o.lab.dirty_mib = self.dirty_mib;
        o.lab.guest_dir = self.guest_dir.clone();
        o.lab.prefix = prefix.into();
        o.lab.subnet = subnet;
        o.pin_root = format!("/sys/fs/bpf/enforcer-{name}").into();
        o.store = format!("/var/lib/enforcer/{name}s").into();
        o.hold_device = format!("{prefix}hold");
        Ok(o)
    }
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Group snapshots of real guests under traffic by both methods, then by libvirt's live
    /// snapshot loop and pause-all/save/resume: downtime, stop spread, stop→advance latency,
    /// disruption, bytes written (percentiles).
    Snapshot {
        #[command(flatten)]
        guests: BenchGuests,
        /// Snapshots per method (pre-copy first, then instant, then the baselines).
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Each guest's qcow2 disk (GiB).
        #[arg(long, default_value_t = 1)]
        disk_gib: u32,
        /// Write every block of the disks before boot (a disk full of data), not sparse.
        #[arg(long)]
        disk_full: bool,
    },
    /// Snapshot → kill → restore cycles of real guests under traffic, by both methods: restore
    /// time, resume spread, and restored guests that crashed.
    Restore {
        #[command(flatten)]
        guests: BenchGuests,
        /// Cycles per method.
        #[arg(long, default_value_t = 5)]
        count: usize,
    },
    /// The channel state on real guests under traffic, by both methods: frames in flight at
    /// the cut recorded per snapshot, and UDP datagrams the restored group lost with and
    /// without replaying them (each snapshot restored both ways).
    Channel {
        #[command(flatten)]
        guests: BenchGuests,
        /// Snapshots per method.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// The group on two emulated hosts (its last guest on the second, each host with its
        /// own agent, joined by a VXLAN-GBP overlay), driven by the coordinator of several
        /// hosts: each member's channel state recorded and replayed by its own agent.
        #[arg(long)]
        hosts: bool,
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    enforcer::cli::init_logging("warn");
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) if args.netns => {
            let report = demo::netns::run(DemoOptions {
                vms: args.vms,
                per_pair: args.per_pair,
                attach: args.attach,
                ..DemoOptions::default()
            })
            .await?;
            println!("{report}");
        }
        Command::Demo(args) => println!("{}", demo::vms::demo(args.vm_options()?).await?),
        Command::E2e(args) => println!("{}", demo::e2e::e2e(args.vm_options()?).await?),
        Command::E2eHosts(args) => println!("{}", demo::hosts::e2e(args.vm_options()?).await?),
        Command::Bench(BenchCommand::TcpSkew { skews, figure }) => {
            anyhow::ensure!(
                !skews.is_empty() && skews.iter().all(|s| *s > 0.0 && *s <= 30.0),
                "--skews must be between 0 and 30 s"
            );
            println!("{}", bench::tcp_skew::tcp_skew(&skews, &figure).await?);
        }
        Command::Bench(BenchCommand::Snapshot {
            guests,
            count,
            disk_gib,
            disk_full,
        }) => {
            anyhow::ensure!(
                (1..=1000).contains(&count) && (1..=64).contains(&disk_gib),
                "--count must be in 1..=1000 and --disk-gib in 1..=64"
            );
            let mut o = guests.vm_options("enfb", 4, "bench-snapshot")?;
            o.lab.disk_gib = disk_gib;
            o.lab.disk_full = disk_full;
            let report =
                bench::snapshots::bench_snapshots(o, count, Duration::from_millis(500)).await?;
            println!("{report}");
        }
        Command::Bench(BenchCommand::Restore { guests, count }) => {
            anyhow::ensure!((1..=200).contains(&count), "--count must be in 1..=200");
            let o = guests.vm_options("enfr", 6, "bench-restore")?;
            println!("{}", bench::restores::bench_restores(o, count).await?);
        }
        Command::Bench(BenchCommand::Channel {
            guests,
            count,
            hosts,
        }) => {
            anyhow::ensure!((1..=200).contains(&count), "--count must be in 1..=200");
            let o = guests.vm_options("enfc", 7, "bench-channel")?;
            println!("{}", bench::channel::bench_channel(o, count, hosts).await?);
        }
        Command::Bench(BenchCommand::Hold { seconds }) => {
            anyhow::ensure!(seconds > 0.0, "--seconds must be positive");
            println!("{}", bench::hold::hold(seconds).await?);
        }
        Command::Bench(BenchCommand::Hosts { rounds, seconds }) => {
            anyhow::ensure!(
                rounds >= 2 && seconds > 0.0,
                "--rounds must be at least 2 and --seconds positive"
            );
            println!("{}", bench::hosts::hosts(rounds, seconds).await?);
        }
        Command::Bench(BenchCommand::Datapath { rounds, seconds }) => {
            anyhow::ensure!(
                rounds >= 1 && seconds > 0.0,
                "--rounds must be at least 1 and --seconds positive"
            );
            let report = tokio::task::spawn_blocking(move || {
                bench::datapath::datapath(&bench::datapath::DatapathBenchOptions {
                    rounds,
                    seconds,
                })
            })
            .await??;
            println!("{report}");
        }
    }
    Ok(())
}
