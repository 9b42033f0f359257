//! `cargo xtask <task>`: orchestration that needs more than one cargo invocation.
//!
//! - `cargo xtask bench datapath [args]`: builds the lab (`enforcer-lab`, over the product) in
//!   release mode, then runs its benchmark (benchmarks need optimised code on the userspace
//!   side too).
//! - `cargo xtask demo [args]`: the same for the demo.
//! - `cargo xtask e2e`: tier 3 on real VMs, with and without enforcement.
//! - `cargo xtask e2e-hosts`: tier 3 across two emulated hosts (agents, overlay, coordinator).
//! - `cargo xtask guest [--out DIR]`: builds the guest kernel + initramfs (see `guest.rs`).
//! - `cargo xtask basebox [--out DIR] [--mirror URL]`: builds the testbed's vagrant-libvirt box
//!   offline from Debian packages (see `basebox.rs`).
//! - `cargo xtask deploy [...]`: installs enforcer on the testbed's hosts over SSH (see
//!   `deploy.rs`, docs/testbed.md).

mod basebox;
mod deploy;
mod guest;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run a benchmark (`datapath`), printing ratios measured side by side.
    Bench {
        /// Which benchmark, followed by its options (see `enforcer-lab bench datapath --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Build the guest image (kernel + initramfs with the test application).
    Guest {
        #[arg(long, default_value = "/var/lib/enforcer/guest")]
        out: std::path::PathBuf,
    },
    /// Tier 3 across two emulated hosts: an agent per host, a VXLAN-GBP overlay, a
    /// coordinator; an agent killed mid-snapshot; snapshot → destroy → restore → check.
    E2eHosts {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Tier 3 on real VMs: snapshot under load → destroy → restore → check, with and without
    /// enforcement (release build).
    E2e {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the demo (release build).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the testbed's vagrant-libvirt box (Debian 12) offline from Debian packages (root).
    Basebox {
        /// Where box.img, metadata.json, Vagrantfile and enforcer-debian12.box go.
        #[arg(long, default_value = "/var/lib/enforcer/box")]
        out: std::path::PathBuf,
        /// Debian mirror (default: the one apt on this machine uses for bookworm).
        #[arg(long)]
        mirror: Option<String>,
        /// Virtual disk size.
        #[arg(long, default_value_t = 8)]
        size_gib: u64,
        /// Extra packages to bake in (repeatable or comma-separated), e.g. the hypervisors'
        /// libvirt-daemon-system,qemu-system-x86,bpftool, so that provisioning needs no mirror.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
    },
    /// Install enforcer on the testbed (coord + hv1, hv2, ...) over SSH and start it.
    Deploy {
        /// ssh-config naming the hosts `coord` and `hv1`, `hv2`, ... (default: `vagrant
        /// ssh-config` run in vagrant/).
        #[arg(long)]
        ssh_config: Option<std::path::PathBuf>,
        /// The enforcer binary to install (default: `cargo build --release -p enforcer`).
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
        /// File with the API bearer token for the agents and the coordinator; made (32 random
        /// bytes, hex, mode 0600) when missing. Never printed, never on a command line.
        #[arg(long, default_value = "target/deploy/enforcer.token")]
        token_file: std::path::PathBuf,
        /// The deployment's CA and certificates (TLS between the hosts, made with `enforcer
        /// tls`): the CA is made once and kept here; each host's certificate is issued again
        /// at every deploy, and `operator.crt`/`.key` are yours for the coordinator's API.
        #[arg(long, default_value = "target/deploy/tls")]
        tls_dir: std::path::PathBuf,
        /// Print the commands instead of running them.
        #[arg(long)]
        dry_run: bool,
        /// The hosts' private network: coord is .10 in it, hvN is .(10+N).
        #[arg(long, default_value = "192.168.56.0/24")]
        net: String,
        /// A host's address on the private network, overriding the --net convention
        /// (NAME=IP, repeatable).
        #[arg(long, value_name = "NAME=IP")]
        host_ip: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (sub, args) = match cli.task {
        Task::Guest { out } => return guest::build(&root, &out),
        Task::Basebox {
            out,
            mirror,
            size_gib,
            include,
        } => {
            return basebox::build(&basebox::Options {
                out,
                mirror,
                size_gib,
                include,
            });
        }
        Task::Deploy {
            ssh_config,
            binary,
            token_file,
            tls_dir,
            dry_run,
            net,
            host_ip,
        } => {
            return deploy::run(
                &root,
                deploy::Options {
                    ssh_config,
                    binary,
                    token_file: root.join(token_file),
                    tls_dir: root.join(tls_dir),
                    dry_run,
                    net,
                    host_ips: host_ip,
                },
            );
        }
        Task::Bench { args } => ("bench", args),
        Task::Demo { args } => ("demo", args),
        Task::E2e { args } => ("e2e", args),
        Task::E2eHosts { args } => ("e2e-hosts", args),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--package", "enforcer-lab"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let binary = root.join("target/release/enforcer-lab");
    let status = Command::new(&binary)
        .arg(sub)
        .args(&args)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("enforcer-lab {sub} failed ({status})");
    }
    Ok(())
}
