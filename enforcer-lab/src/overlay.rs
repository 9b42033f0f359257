//! Two emulated hosts on this machine, joined the way real hosts are: a VXLAN overlay with
//! Group Based Policy between their bridges (the color of a frame rides in the GBP field).
//!
//! Both bridges, both VXLAN devices and both daemons live in the root namespace, so nothing
//! else needs namespace juggling. Two VXLAN devices with one VNI would clash on one UDP socket,
//! so each device is created in a small "underlay" namespace of its own, the two underlays are
//! joined by a veth, and the device is then moved into the root namespace: its socket stays in
//! the underlay where it was created. The GBP field survives the crossing: the kernel builds
//! the header from the inner frame's mark before the namespace change scrubs it, and sets the
//! mark from the header after the scrub on the way in.

use std::process::Command;

use crate::netns::{LabError, run};
use enforcer::{model::MacAddr, multihost::HostSpec};

/// The two emulated hosts' names, as the VMs on them are qualified (`domain@a`).
pub const HOST_NAMES: [&str; 2] = ["a", "b"];

/// The VXLAN network identifier and UDP port of the emulated overlay.
pub const VNI: &str = "4242";
pub const VXLAN_PORT: &str = "4789";

#[derive(Debug)]
pub struct Overlay {
    /// The overlay port of each host (a VXLAN-GBP device on that host's bridge).
    pub devices: [String; 2],
    underlays: [String; 2],
}

impl Overlay {
    /// Joins `bridges[0]` and `bridges[1]`; names start with `prefix` (1-6 characters).
    pub fn create(prefix: &str, bridges: [&str; 2]) -> Result<Self, LabError> {
        let overlay = Self {
            devices: [format!("{prefix}vx0"), format!("{prefix}vx1")],
            underlays: [format!("{prefix}-u0"), format!("{prefix}-u1")],
        };
        overlay.remove();
        let veth = [format!("{prefix}u0"), format!("{prefix}u1")];
        for ns in &overlay.underlays {
            run(&["netns", "add", ns])?;
            run(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        run(&[
            "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
        ])?;
        for i in 0..2 {
            let ns = &overlay.underlays[i];
            run(&["link", "set", &veth[i], "netns", ns])?;
            // Room for the 50 bytes of encapsulation around a full 1500-byte frame.
            run(&["-n", ns, "link", "set", &veth[i], "mtu", "1600", "up"])?;
            let local = format!("10.214.0.{}/24", i + 1);
            run(&["-n", ns, "addr", "add", &local, "dev", &veth[i]])?;
            overlay.add_device(i, bridges[i])?;
        }
        Ok(overlay)
    }

    /// Host `i`'s VXLAN-GBP device: made in its underlay, moved into the root namespace (ours),
    /// put on the host's bridge.
    fn add_device(&self, i: usize, bridge: &str) -> Result<(), LabError> {
        let (ns, dev) = (&self.underlays[i], &self.devices[i]);
        let local = format!("10.214.0.{}", i + 1);
        let remote = format!("10.214.0.{}", 2 - i);
        run(&[
            "-n", ns, "link", "add", dev, "type", "vxlan", "id", VNI, "local", &local, "remote",
            &remote, "dstport", VXLAN_PORT, "gbp",
        ])?;
        let ours = std::process::id().to_string();
        run(&["-n", ns, "link", "set", dev, "netns", &ours])?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
        run(&["link", "set", dev, "mtu", "1500", "master", bridge, "up"])?;
        Ok(())
    }

    /// Deletes host `i`'s device and makes it again (as an overlay unit restart would): the
    /// same name, a new ifindex.
    pub fn recreate(&self, i: usize, bridge: &str) -> Result<(), LabError> {
        run(&["link", "del", &self.devices[i]])?;
        self.add_device(i, bridge)
    }

    /// Sends one VXLAN-GBP packet to host `to`'s overlay endpoint from the other host's
    /// underlay (any sender on the underlay could): an inner Ethernet frame from `src` to `dst`
    /// whose Group Policy ID says `color` (`enforcer_common::wire`), whatever `src` really
    /// sent. What a forger does (case S5 of the security review).
    pub fn forge(&self, to: usize, src: MacAddr, dst: MacAddr, color: u32) -> Result<(), LabError> {
        let from = 1 - to;
        let vni: u32 = VNI.parse().expect("a number");
        let gpid = enforcer_common::wire::encode(color) as u16;
        let mut packet = vec![0x88, 0x00];
        packet.extend_from_slice(&gpid.to_be_bytes());
        packet.extend_from_slice(&(vni << 8).to_be_bytes());
        packet.extend_from_slice(&dst.0);
        packet.extend_from_slice(&src.0);
        // A local experimental ethertype and a minimum-size payload: the datapath looks at
        // the addresses only.
        packet.extend_from_slice(&[0x88, 0xb5]);
        packet.extend_from_slice(&[0u8; 46]);
        let ns = self.underlays[from].clone();
        let err = |detail: String| LabError::Netns {
            netns: ns.clone(),
            detail,
        };
        let file =
            std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| err(e.to_string()))?;
        let target = format!("10.214.0.{}:{VXLAN_PORT}", to + 1);
        std::thread::spawn(move || -> Result<(), String> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            socket
                .send_to(&packet, &target)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .join()
        .map_err(|_| err("thread panicked".into()))?
        .map_err(err)
    }

    /// The coordinator's hosts for the two emulated hosts, given their agents' API URLs.
    pub fn host_specs(&self, agents: [String; 2]) -> Vec<HostSpec> {
        agents
            .into_iter()
            .zip(&self.devices)
            .zip(HOST_NAMES)
            .map(|((agent, device), name)| HostSpec {
                name: name.into(),
                agent,
                overlay: device.clone(),
            })
            .collect()
    }

    fn remove(&self) {
        for dev in &self.devices {
            let _ = Command::new("ip").args(["link", "del", dev]).output();
        }
        // Deleting an underlay deletes its end of the veth, and with it the other end.
        for ns in &self.underlays {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.remove();
    }
}
