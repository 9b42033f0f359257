//! The hold device: a veth pair `<name>` → `<name>p` in no bridge, which the port programs
//! redirect held frames into and whose far end the buffer's socket reads. Made with `ip` and
//! `ethtool`, removed on drop.

use std::process::Command as Process;

use super::config::{HOLD_ALIAS, HoldError};
use crate::datapath::ifindex_of;

/// The veth pair held frames are redirected into; removed on drop.
pub(crate) struct HoldDevice {
    pub(crate) name: String,
    pub(crate) socket_side: String,
    pub(crate) ifindex: u32,
}

fn run(program: &str, args: &[&str]) -> Result<(), HoldError> {
    let command = || format!("{program} {}", args.join(" "));
    let out = Process::new(program)
        .args(args)
        .output()
        .map_err(|e| HoldError::Command {
            command: command(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HoldError::Command {
            command: command(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        })
    }
}

fn ip(args: &[&str]) -> Result<(), HoldError> {
    run("ip", args)
}

/// The largest MTU of a veth: a frame of any MTU a port may have passes the hold device with
/// its hold header (case F2), and GSO super-frames pass whatever the MTU. (The port program
/// can give a frame that is not a super-frame room for its header up to about 16 KB, the most
/// the kernel lets a tc program grow one to: 9000-byte jumbo frames fit; beyond, a Type-3 frame
/// is dropped and counted `no_headroom`.)
const HOLD_MTU: &str = "65535";

/// Segmentation the hold device leaves to the kernel, in software, before a frame enters it:
/// the GSO types a virtio-net header cannot describe (tunnels, SCTP, fragment lists), so the
/// buffer's socket gets every held frame with its offload state intact rather than losing the
/// few it could not describe.
const SEGMENT_IN_SOFTWARE: [&str; 8] = [
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
    "tx-gre-segmentation",
    "tx-gre-csum-segmentation",
    "tx-ipxip4-segmentation",
    "tx-ipxip6-segmentation",
    "tx-sctp-segmentation",
    "tx-gso-list",
];

impl HoldDevice {
    pub(crate) fn create(name: &str) -> Result<Self, HoldError> {
        if name.is_empty() || name.len() > 14 {
            return Err(HoldError::BadName(name.into()));
        }
        let socket_side = format!("{name}p");
        // A device left by a daemon that died is stale: replace it. Only ours, though (case
        // S19 of the security review: `--hold-device br0` deleted the VM bridge).
        let sys = |dev: &str, what: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{dev}/{what}"))
                .map(|s| s.trim().to_owned())
        };
        if let Ok(alias) = sys(name, "ifalias") {
            // Ours: the alias, or (a daemon of an older version) a veth paired with `<name>p`.
            let paired = matches!(
                (sys(name, "iflink"), sys(&socket_side, "ifindex")),
                (Ok(peer), Ok(index)) if peer == index
            );
            if alias != HOLD_ALIAS && !paired {
                return Err(HoldError::NotOurs(name.into()));
            }
            let _ = Process::new("ip").args(["link", "del", name]).output();
        }
        ip(&[
            "link",
            "add",
            name,
            "mtu",
            HOLD_MTU,
            "type",
            "veth",
            "peer",
            "name",
            &socket_side,
            "mtu",
            HOLD_MTU,
        ])?;
        ip(&["link", "set", name, "alias", HOLD_ALIAS])?;
        for dev in [name, socket_side.as_str()] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
        }
        let mut features = vec!["-K", name];
        for feature in SEGMENT_IN_SOFTWARE {
            features.extend([feature, "off"]);
        }
        run("ethtool", &features)?;
        // GRO on the socket side turns on the veth's NAPI, without which it refuses frames
        // redirected to it from XDP (the port program in `xdp` mode). Held frames are of the
        // hold EtherType, which GRO leaves alone.
        run("ethtool", &["-K", &socket_side, "gro", "on"])?;
        for dev in [name, socket_side.as_str()] {
            ip(&["link", "set", dev, "up"])?;
        }
        let ifindex = ifindex_of(name)?;
        Ok(Self {
            name: name.into(),
            socket_side,
            ifindex,
        })
    }
}

impl Drop for HoldDevice {
    fn drop(&mut self) {
        let _ = Process::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}
