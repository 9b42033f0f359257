//! The command line's arguments (clap derive): the commands, their options and defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use enforcer_common::Type3Mode;

use crate::{
    api::{DEFAULT_COORDINATOR_SOCKET, DEFAULT_SOCKET, Endpoint, client::DEFAULT_API},
    datapath::{AttachMode, DEFAULT_PIN_ROOT},
    model::{GroupName, IfName, MacAddr, SnapshotId},
    snapshot::{CutMethod, libvirt::DEFAULT_URI},
};

#[derive(Parser, Debug)]
#[command(
    name = "enforcer",
    version,
    about = "Causally consistent live snapshots of VM groups, enforced in the kernel datapath"
)]
pub struct Cli {
    /// The daemon's API, for the client commands: its unix socket (`unix:/path`) or URL.
    #[arg(long, global = true, env = "ENFORCER_API", default_value = DEFAULT_API)]
    pub api: String,
    /// File holding the bearer token for a TCP API (never the token itself on the command
    /// line, where `ps` shows it to every account); mode 0600 or stricter. Without it the
    /// token comes from ENFORCER_TOKEN, if set.
    #[arg(long, global = true, env = "ENFORCER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS (between hosts): this process's certificate (PEM). A daemon serving TCP presents
    /// it and requires clients' certificates of --tls-ca (mutual TLS); the coordinator and the
    /// client commands present it to `https://` APIs.
    #[arg(
        long,
        global = true,
        env = "ENFORCER_TLS_CERT",
        requires_all = ["tls_key", "tls_ca"]
    )]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of --tls-cert (PEM, mode 0600 or stricter).
    #[arg(long, global = true, env = "ENFORCER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA (PEM) whose certificates are trusted: the clients' of a daemon, the
    /// servers' for the coordinator and the client commands. Nothing else is trusted.
    #[arg(long, global = true, env = "ENFORCER_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
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
    /// A deployment's TLS certificates: a CA, and the certificates it signs for agents, the
    /// coordinator and operators (what --tls-cert/--tls-key/--tls-ca take).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// What the buffer daemon holds now, and what it did with held frames.
    Holds {
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Abort a group's snapshot: members above EPOCH go back to it; held frames are delivered.
    Abort {
        /// The datapath group id (a number, as `enforcer groups` shows it).
        #[arg(long)]
        group: u32,
        /// The epoch the group goes back to.
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
        mode: Option<Type3Mode>,
    },
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
    /// Where to serve the API: a unix socket (`unix:/path`), owned by root and --api-group,
    /// mode 0660; or `ip:port` (TCP), which requires client certificates (--tls-cert,
    /// --tls-key, --tls-ca) or a token (--token-file), or both.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub listen: Endpoint,
    /// Group whose members may use the API socket besides root (default: root only).
    #[arg(long)]
    pub api_group: Option<String>,
    /// Hook that classifies frames on the VM ports.
    #[arg(long, value_enum, default_value = "tc")]
    pub attach: AttachMode,
    /// Set the Type-3 mode at start (default: keep the pinned setting; `buffer` when new).
    #[arg(long, value_enum)]
    pub mode: Option<Type3Mode>,
    /// Do not run the buffer daemon (then `buffer` mode drops Type-3 frames, counted).
    #[arg(long)]
    pub no_buffer: bool,
    /// Name of the hold device (veth pair `<name>`/`<name>p`) the buffer daemon creates.
    #[arg(long, default_value = "enfhold")]
    pub hold_device: String,
    /// Memory bound for held frames and recorded channel state, in MiB; beyond it the newest
    /// frame is dropped (counted).
    #[arg(long, default_value_t = 64)]
    pub hold_max_mib: usize,
    /// libvirt connection for group snapshots.
    #[arg(long, default_value = DEFAULT_URI)]
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
    /// Where to serve the API: a unix socket (`unix:/path`), owned by root and --api-group,
    /// mode 0660; or `ip:port` (TCP), which requires client certificates (--tls-cert,
    /// --tls-key, --tls-ca) or a token (--token-file), or both. The same credentials reach
    /// the agents.
    #[arg(long, default_value = DEFAULT_COORDINATOR_SOCKET)]
    pub listen: Endpoint,
    /// Group whose members may use the API socket besides root (default: root only).
    #[arg(long)]
    pub api_group: Option<String>,
    /// Manifests, journals and groups (images stay on the hosts that run the VMs).
    #[arg(long, default_value = "/var/lib/enforcer/coordinator")]
    pub store: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Define a group of running libvirt domains; registers their VMs in the datapath.
    Define {
        /// The group's name (1-64 of [A-Za-z0-9_-]).
        name: GroupName,
        /// Domains (libvirt names), at least one; `domain@host` for a coordinator of several
        /// hosts.
        #[arg(required = true)]
        domains: Vec<String>,
        /// Datapath group id (default: the lowest unused).
        #[arg(long)]
        id: Option<u32>,
    },
    /// Remove a group: its VMs leave the datapath; its snapshots stay.
    Rm {
        /// The group's name.
        name: GroupName,
    },
}

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Make the deployment's CA in a directory (ca.crt, ca.key; refused if one is there).
    Ca {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a certificate with the CA in --dir: <name>.crt and <name>.key (0600) there.
    Cert {
        #[arg(long)]
        dir: PathBuf,
        /// The file name and the certificate's common name (e.g. the host's name).
        #[arg(long)]
        name: String,
        /// agent: serves only; coordinator: serves and is the agents' client; operator:
        /// client only.
        #[arg(long, value_enum)]
        role: crate::api::pki::Role,
        /// An address the holder is reached at (IP or DNS name; repeatable). Clients check
        /// a server's certificate against the address they dialled.
        #[arg(long = "address")]
        addresses: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a causally consistent snapshot of a group.
    Create {
        /// The group's name (as defined with `enforcer group define`).
        #[arg(long)]
        group: GroupName,
        /// Follow it to the end, printing each VM's progress.
        #[arg(long)]
        wait: bool,
        /// How to stop and capture the VMs: `instant` (every VM stopped at one instant, disks
        /// and memory captured at O(1) downtime) or `pre-copy` (each VM stopped when its live
        /// copy converges, disks copied; for VMs whose memory cannot be write-tracked).
        #[arg(long, default_value_t = CutMethod::Instant)]
        method: CutMethod,
    },
    /// List snapshots (newest last).
    Ls {
        /// Only this group's (by name).
        #[arg(long)]
        group: Option<GroupName>,
    },
    /// One snapshot: outcome, images and each VM's timeline.
    Show {
        /// The snapshot's id (as `enforcer snapshot ls` shows it).
        id: SnapshotId,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore every VM of a committed snapshot together (the VMs must not be running).
    Restore {
        /// The snapshot's id.
        id: SnapshotId,
        /// Put the restored VMs on this bridge instead of their own.
        #[arg(long)]
        bridge: Option<IfName>,
        /// Leave out the frames in flight at the cut (the snapshot's channel state): the
        /// restored group loses them. For comparison and diagnosis.
        #[arg(long)]
        skip_channel_state: bool,
    },
    /// Delete a snapshot's images and manifest.
    Rm {
        /// The snapshot's id.
        id: SnapshotId,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Register a VM: its MAC, group and host-side port.
    Add {
        /// The VM's MAC (02:00:00:00:00:01).
        #[arg(long)]
        mac: MacAddr,
        /// The datapath group id (0-1023), a number.
        #[arg(long)]
        group: u32,
        /// The VM's host-side interface (its tap or veth on the bridge).
        #[arg(long)]
        port: IfName,
        /// Starting epoch (default: the group's current epoch).
        #[arg(long)]
        epoch: Option<u32>,
    },
    /// Unregister a VM.
    Rm {
        /// The VM's MAC.
        mac: MacAddr,
    },
    /// List registered VMs.
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum EpochCommand {
    /// Show one VM's epoch, or every VM's.
    Get {
        /// The VM's MAC (omit: every VM).
        mac: Option<MacAddr>,
    },
    /// Set a VM's epoch (never backwards).
    Set {
        /// The VM's MAC.
        mac: MacAddr,
        /// Its new epoch.
        epoch: u32,
    },
    /// Move a VM to its next epoch.
    Advance {
        /// The VM's MAC.
        mac: MacAddr,
    },
}

impl Cli {
    /// The daemon roles log what they do; the client commands only what goes wrong.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Run(_) | Command::Coordinator(_) => "info",
            _ => "warn",
        }
    }
}
