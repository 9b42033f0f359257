//! The hold device: a veth pair `<name>` → `<name>p` in no bridge, which the port programs
//! redirect held frames into and whose far end feeds the AF_XDP socket. Made with `ip`,
//! removed on drop.

use std::process::Command as Process;

use enforcer_common::MAX_HELD_FRAME;

use super::config::{HOLD_ALIAS, HoldError};
use crate::datapath::ifindex_of;

/// The veth pair held frames are redirected into; removed on drop.
pub(crate) struct HoldDevice {
    pub(crate) name: String,
    pub(crate) socket_side: String,
    pub(crate) ifindex: u32,
}

fn ip(args: &[&str]) -> Result<(), HoldError> {
    let out = Process::new("ip")
        .args(args)
        .output()
        .map_err(|e| HoldError::Ip {
            args: args.join(" "),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HoldError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        })
    }
}

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
        // One queue each way: the AF_XDP socket serves queue 0. The largest MTU XDP allows on
        // a veth: a held frame, its hold header in front, may be as long as MAX_HELD_FRAME (at
        // 1500 a full-sized frame with its header would not pass the veth).
        let mtu = (MAX_HELD_FRAME - 14).to_string();
        ip(&[
            "link",
            "add",
            name,
            "mtu",
            &mtu,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
            "type",
            "veth",
            "peer",
            "name",
            &socket_side,
            "mtu",
            &mtu,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
        ])?;
        ip(&["link", "set", name, "alias", HOLD_ALIAS])?;
        for dev in [name, socket_side.as_str()] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
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
