//! Scenarios that end with a verdict: [`vms`] (the README's main job on real guests, and tier 3
//! with and without enforcement), [`hosts`] (tier 3 across two emulated hosts) and [`netns`]
//! (the quick demo on network-namespace VMs).
pub mod hosts;
pub mod netns;
pub mod vms;
