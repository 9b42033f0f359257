//! A lab of "VMs" on this host: each VM is a network namespace whose `eth0` is one end of a
//! veth pair; the other end is the VM's port on a Linux bridge, exactly where a VM's tap would
//! be. Used by the demo, the tier-2 tests and the benchmarks. Everything is removed on drop.
//!
//! IPv6 is off inside the VMs and neighbours are static, so the only frames on the wire are the
//! ones the caller sends: counters can be checked exactly.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    thread,
};

use nix::sched::{CloneFlags, setns};
use tracing::debug;

use enforcer::model::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` (install iproute2): {0}")]
    Spawn(std::io::Error),
    #[error("lab prefix {0:?} must be 1-6 alphanumeric characters (interface names are short)")]
    BadPrefix(String),
    #[error("entering namespace {netns}: {detail}")]
    Netns { netns: String, detail: String },
    #[error("socket in {netns}: {source}")]
    Socket {
        netns: String,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct LabVm {
    /// Short name shown in reports (`vm1`, `vm2`, ...).
    pub name: String,
    pub netns: String,
    /// Host side of the veth: the VM's switch port.
    pub port: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// Index of the emulated host (bridge) the VM is on.
    pub host: usize,
}

#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    /// The first host's bridge.
    pub bridge: String,
    /// One bridge per emulated host (`<prefix>br`, `<prefix>br1`, ...).
    pub bridges: Vec<String>,
    pub vms: Vec<LabVm>,
}

/// Runs `ip` with these arguments (also used by [`crate::vmlab`]).
pub(crate) fn run(args: &[&str]) -> Result<(), LabError> {
    debug!(?args, "ip");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(LabError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

impl Lab {
    /// Creates a bridge `<prefix>br` and `n` VMs `<prefix>-vm<i>` with ports `<prefix>p<i>`.
    pub fn create(prefix: &str, n: usize) -> Result<Lab, LabError> {
        Self::create_hosts(prefix, &[n])
    }

    /// VMs spread over emulated hosts: `per_host[h]` VMs on host `h`'s bridge, numbered on
    /// from one host to the next. Every VM knows every other's address (one L2 segment once
    /// the bridges are joined, see [`crate::overlay`]).
    pub fn create_hosts(prefix: &str, per_host: &[usize]) -> Result<Lab, LabError> {
        let n: usize = per_host.iter().sum();
        if prefix.is_empty()
            || prefix.len() > 6
            || !prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(LabError::BadPrefix(prefix.to_owned()));
        }
        let bridges: Vec<String> = (0..per_host.len())
            .map(|h| match h {
                0 => format!("{prefix}br"),
                h => format!("{prefix}br{h}"),
            })
            .collect();
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            bridge: bridges[0].clone(),
            bridges,
            vms: Vec::new(),
        };
        // A leftover lab of the same prefix (a killed run) would make every step fail.
        lab.remove_leftovers(n);
        for bridge in &lab.bridges {
            run(&["link", "add", bridge, "type", "bridge"])?;
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6"),
                "1",
            );
            run(&["link", "set", bridge, "up"])?;
        }
        let hosts: Vec<usize> = per_host
            .iter()
            .enumerate()
            .flat_map(|(h, count)| std::iter::repeat_n(h, *count))
            .collect();
        for i in 1..=n {
            let host = hosts[i - 1];
            let vm = LabVm {
                host,
                name: format!("vm{i}"),
                netns: format!("{prefix}-vm{i}"),
                port: format!("{prefix}p{i}"),
                mac: MacAddr([0x02, 0x00, 0x5e, 0x10, 0x00, i as u8]),
                ip: Ipv4Addr::new(10, 213, 0, i as u8),
            };
            lab.vms.push(vm.clone());
            run(&["netns", "add", &vm.netns])?;
            let ns = |args: &[&str]| {
                let mut full = vec!["-n", vm.netns.as_str()];
                full.extend_from_slice(args);
                run(&full)
            };
            // IPv6 off before any interface comes up: no router/neighbour solicitations.
            Command::new("ip")
                .args(["netns", "exec", &vm.netns, "sysctl", "-qw"])
                .args([
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ])
                .status()
                .map_err(LabError::Spawn)?;
            run(&[
                "link", "add", &vm.port, "type", "veth", "peer", "name", "eth0", "netns", &vm.netns,
            ])?;
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", vm.port),
                "1",
            );
            run(&["link", "set", &vm.port, "master", &lab.bridges[host], "up"])?;
            ns(&["link", "set", "eth0", "address", &vm.mac.to_string()])?;
            ns(&["addr", "add", &format!("{}/24", vm.ip), "dev", "eth0"])?;
            ns(&["link", "set", "eth0", "up"])?;
            ns(&["link", "set", "lo", "up"])?;
        }
        for vm in &lab.vms {
            for peer in lab.vms.iter().filter(|p| p.name != vm.name) {
                run(&[
                    "-n",
                    &vm.netns,
                    "neigh",
                    "replace",
                    &peer.ip.to_string(),
                    "lladdr",
                    &peer.mac.to_string(),
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ])?;
            }
        }
        Ok(lab)
    }

    fn remove_leftovers(&self, n: usize) {
        for bridge in &self.bridges {
            let _ = Command::new("ip").args(["link", "del", bridge]).output();
        }
        for i in 1..=n.max(16) {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{}-vm{i}", self.prefix)])
                .output();
        }
    }

    /// Runs `f` on a thread inside the VM's network namespace; sockets it creates stay in that
    /// namespace wherever they are used afterwards.
    pub fn in_vm<T: Send + 'static>(
        &self,
        vm: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, LabError> {
        let netns = self.vms[vm].netns.clone();
        let err = |detail: String| LabError::Netns {
            netns: netns.clone(),
            detail,
        };
        let file = File::open(format!("/run/netns/{netns}")).map_err(|e| err(e.to_string()))?;
        let handle = thread::spawn(move || -> Result<T, String> {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| err("thread panicked".into()))?
            .map_err(err)
    }

    /// A UDP socket bound to `port` on the VM's address, inside its namespace.
    pub fn udp_socket(&self, vm: usize, port: u16) -> Result<UdpSocket, LabError> {
        let addr = SocketAddrV4::new(self.vms[vm].ip, port);
        let netns = self.vms[vm].netns.clone();
        self.in_vm(vm, move || UdpSocket::bind(addr))?
            .map_err(|source| LabError::Socket { netns, source })
    }

    /// Runs a command inside the VM's namespace (`ip netns exec`).
    pub fn command(&self, vm: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.vms[vm].netns, program]);
        cmd
    }

    /// Sets the MTU of every link of the lab: bridges, ports and the VMs' `eth0` (jumbo
    /// frames: 9000).
    pub fn set_mtu(&self, mtu: u32) -> Result<(), LabError> {
        let mtu = mtu.to_string();
        for vm in &self.vms {
            run(&["link", "set", &vm.port, "mtu", &mtu])?;
            run(&["-n", &vm.netns, "link", "set", "eth0", "mtu", &mtu])?;
        }
        for bridge in &self.bridges {
            run(&["link", "set", bridge, "mtu", &mtu])?;
        }
        Ok(())
    }

    /// A raw socket on the VM's `eth0`, inside its namespace: whole Ethernet frames out, and
    /// every frame in as it was on the wire (see [`crate::raw::RawSocket`]).
    pub fn raw_socket(&self, vm: usize) -> Result<crate::raw::RawSocket, LabError> {
        let netns = self.vms[vm].netns.clone();
        self.in_vm(vm, crate::raw::RawSocket::on_eth0)?
            .map_err(|source| LabError::Socket { netns, source })
    }

    pub fn ports(&self) -> Vec<String> {
        self.vms.iter().map(|vm| vm.port.clone()).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the port on the bridge.
        for vm in &self.vms {
            let _ = Command::new("ip")
                .args(["netns", "del", &vm.netns])
                .output();
        }
        for bridge in &self.bridges {
            let _ = Command::new("ip").args(["link", "del", bridge]).output();
        }
    }
}

/// Gives a socket a receive buffer of `bytes`, beyond `net.core.rmem_max` (needs root): for
/// receivers that must not drop a burst of re-injected frames while their thread is descheduled.
pub fn force_rcvbuf(socket: &UdpSocket, bytes: libc::c_int) -> std::io::Result<()> {
    set_int(socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
}

/// Sends from `socket` with UDP segmentation offload (`UDP_SEGMENT`, Linux 4.18): one send of
/// several `segment`-byte datagrams leaves as one GSO super-frame at the kernel's default
/// offloads, as a guest's bulk UDP does.
pub fn udp_segment(socket: &UdpSocket, segment: libc::c_int) -> std::io::Result<()> {
    const UDP_SEGMENT: libc::c_int = 103;
    set_int(socket, libc::SOL_UDP, UDP_SEGMENT, segment)
}

fn set_int(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt with a c_int option value of the size passed, which outlives the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
