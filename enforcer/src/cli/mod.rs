//! The command line: `enforcer run` (the agent), `enforcer coordinator`, and the client
//! commands that drive either over its API. The arguments ([`Cli`]) are in `args`, the dispatch in
//! `run` and the tables people read in [`render`]. `anyhow` lives here and in
//! `main` only.
//!
//! May call the daemon roles, the API's client and the types it prints.
mod args;
pub mod render;
mod run;

pub use args::{
    Cli, Command, CoordinatorArgs, EpochCommand, GroupCommand, RunArgs, SnapshotCommand, VmCommand,
};
pub use render::{manifest as render_manifest, progress as render_progress};
pub use run::run;
