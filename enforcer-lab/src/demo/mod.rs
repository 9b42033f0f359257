//! Scenarios that end with a verdict: [`vms`] (the README's main job on real guests), [`e2e`]
//! (tier 3 on them, with and without enforcement), [`hosts`] (tier 3 across two emulated hosts) and [`netns`]
//! (the quick demo on network-namespace VMs); [`chains`] walks a snapshot chain in tier 3.
mod chains;
pub mod e2e;
pub mod hosts;
pub mod netns;
pub mod vms;
