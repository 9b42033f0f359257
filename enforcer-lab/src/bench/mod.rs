//! Benchmarks, each printing ratios measured side by side in one run (`cargo xtask bench …`):
//! the datapath with and without the programs ([`datapath`]), held frames and re-injection
//! ([`hold`]), TCP through a skewed snapshot ([`tcp_skew`]), group snapshots and restores of
//! real guests ([`snapshots`], [`restores`]; against what users run today, [`baselines`]) and
//! the epoch protocol across two emulated hosts ([`hosts`]).

mod baselines;
pub mod datapath;
pub mod hold;
pub mod hosts;
pub mod restores;
pub mod snapshots;
pub mod tcp_skew;
