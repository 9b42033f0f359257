//! `cargo xtask <task>`: orchestration that needs more than one cargo invocation.
//!
//! - `cargo xtask bench datapath [args]`: builds `enforcer` in release mode, then runs its
//!   benchmark (benchmarks need optimised code on the userspace side too).
//! - `cargo xtask demo [args]`: the same for the demo.
//! - `cargo xtask e2e`: tier 3 on real VMs, with and without enforcement.
//! - `cargo xtask guest [--out DIR]`: builds the guest kernel + initramfs (see `guest.rs`).

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
        /// Which benchmark, followed by its options (see `enforcer bench datapath --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Build the guest image (kernel + initramfs with the test application).
    Guest {
        #[arg(long, default_value = "/var/lib/enforcer/guest")]
        out: std::path::PathBuf,
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (sub, args) = match cli.task {
        Task::Guest { out } => return guest::build(&root, &out),
        Task::Bench { args } => ("bench", args),
        Task::Demo { args } => ("demo", args),
        Task::E2e { args } => ("e2e", args),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--package", "enforcer"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let binary = root.join("target/release/enforcer");
    let status = Command::new(&binary)
        .arg(sub)
        .args(&args)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("enforcer {sub} failed ({status})");
    }
    Ok(())
}
