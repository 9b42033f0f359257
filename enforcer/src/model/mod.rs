//! Plain values the rest of the product shares, with no I/O: Ethernet addresses ([`mac`]), the
//! names and ids people and the API give things, each validated once where it is made
//! ([`names`]), and what a group is ([`group`]). May call nothing else of the product.
pub mod group;
pub mod mac;
pub mod names;

pub use group::{GroupSpec, VmSpec};
pub use mac::MacAddr;
pub use names::{GroupName, IfName, NameError, SnapshotId};
