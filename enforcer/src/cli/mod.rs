//! The command line: `enforcer run` (the agent), `enforcer coordinator`, and the client
//! commands that drive either over its API. The arguments ([`Cli`]) are in `args`, the dispatch in
//! `run` and the tables people read in [`render`]. `anyhow` lives here and in
//! `main` only.
//!
//! May call the daemon roles, the API's client, the hosts file of `multihost`, the datapath's
//! teardown, and the types it prints.
mod args;
pub mod render;
mod run;

pub use args::{
    Cli, Command, CoordinatorArgs, EpochCommand, GroupCommand, RunArgs, SnapshotCommand,
    TlsCommand, VmCommand,
};
pub use render::{manifest as render_manifest, progress as render_progress};
pub use run::run;

/// Logs to stderr, filtered by `RUST_LOG`, else by `default_filter` (`info`, `warn`, ...).
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter))
                // It warns about every kernel attribute newer than itself; nothing to act on.
                .add_directive(
                    "netlink_packet_route=error"
                        .parse()
                        .expect("static directive"),
                ),
        )
        .with_writer(std::io::stderr)
        .init();
}
