//! enforcer: causally consistent live snapshots of VM groups, enforced in the kernel datapath.
//!
//! One module per concern: [`datapath`] (load, pin, attach, maps), [`epochs`] (VM registry and
//! epoch rules), [`ports`] (VM port discovery over rtnetlink), [`daemon`] (`enforcer run`),
//! [`api`] + [`client`] (HTTP/JSON), [`metrics`] (Prometheus), [`lab`] (network-namespace
//! "VMs" for the demo, tests and benchmarks), [`demo`] and [`cli`]. Snapshots of real VMs:
//! [`coordinator`] (the transaction, restore, store), [`libvirt`] (the hypervisor backend),
//! [`snapshots`] (the coordinator inside the daemon), [`vmlab`] (guests for the demo and tier
//! 3) and [`vmdemo`] (the main job and its consistency check).
pub mod agent_epochs;
pub mod api;
pub mod bench;
pub mod bench_hosts;
pub mod checksum;
pub mod cli;
pub mod client;
pub mod coordinator;
pub mod daemon;
pub mod datapath;
pub mod demo;
pub mod epochs;
pub mod hold;
pub mod hosts;
pub mod lab;
pub mod learn;
pub mod libvirt;
pub mod mac;
pub mod metrics;
pub mod overlay;
pub mod ports;
pub mod snapshots;
pub mod traffic;
pub mod vmdemo;
pub mod vmhosts;
pub mod vmlab;
