//! Benchmarks, each printing ratios measured side by side in one run (`cargo xtask bench …`):
//! the datapath with and without the programs ([`datapath`]), held frames and re-injection
//! ([`hold`]), TCP through a skewed snapshot ([`tcp_skew`]), group snapshots and restores of
//! real guests ([`snapshots`], [`restores`]; against what users run today, [`baselines`]) and
//! the epoch protocol across two emulated hosts ([`hosts`]). [`xdp_tx`] is the AF_XDP traffic
//! generator that keeps the sender from being the bottleneck.

mod baselines;
pub mod channel;
pub mod datapath;
pub mod hold;
pub mod hosts;
pub mod restores;
pub mod snapshots;
pub mod tcp_skew;
mod xdp_tx;

use enforcer::{
    api::client::Client,
    snapshot::{CutMethod, Manifest, SnapshotOutcome},
};

/// A snapshot of the benchmarks' group `bench` by `method`, waited for; an abort is an error
/// (a benchmark of aborted snapshots would measure nothing).
pub(crate) async fn committed_snapshot(
    client: &Client,
    method: CutMethod,
) -> anyhow::Result<Manifest> {
    let started = client.create_snapshot("bench", method).await?;
    let m = client.wait_snapshot(&started.id, |_| {}).await?;
    anyhow::ensure!(
        m.outcome == SnapshotOutcome::Committed,
        "snapshot {} ({method}) aborted: {:?}",
        m.id,
        m.reason
    );
    Ok(m)
}
