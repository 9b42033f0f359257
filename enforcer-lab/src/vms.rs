//! A group of real VMs on this host: tiny libvirt/QEMU guests (TCG) on a Linux bridge, each
//! running the test application (`enforcer-guest`) that talks to every other guest. Used by the
//! demo, the tier-3 tests and the snapshot benchmark. Domains and the bridge go away on drop.
//!
//! The guest image is built by `cargo xtask guest` (scripts/setup.sh runs it).

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use enforcer_guest::{CONTROL_PORT, GuestStats};
use tracing::debug;
use virt::connect::Connect;

use crate::netns::{LabError, run as ip};
use enforcer::model::MacAddr;

pub const DEFAULT_GUEST_DIR: &str = "/var/lib/enforcer/guest";

#[derive(Debug, thiserror::Error)]
pub enum VmLabError {
    #[error(
        "no guest image in {0} (vmlinuz + initramfs.gz): build it with `cargo xtask guest` (scripts/setup.sh does)"
    )]
    NoGuest(PathBuf),
    #[error("lab prefix {0:?} must be 1-6 lowercase alphanumeric characters")]
    BadPrefix(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error("guest {vm} ({ip}): {detail}")]
    Guest {
        vm: String,
        ip: Ipv4Addr,
        detail: String,
    },
}

#[derive(Clone, Debug)]
pub struct VmLabOptions {
    /// Names: bridge `<prefix>br`, domains `<prefix>-vm<i>`.
    pub prefix: String,
    pub vms: usize,
    /// Third octet of the lab's subnet 10.77.<subnet>.0/24 (host .1, guests .11, .12, ...).
    pub subnet: u8,
    pub guest_dir: PathBuf,
    pub memory_mib: u32,
    /// Each guest's qcow2 disk: its size (GiB) and whether it is allocated and written in full
    /// before boot (a disk full of data) or sparse.
    pub disk_gib: u32,
    pub disk_full: bool,
    /// Memory each guest rewrites continuously (MiB; every page every 100 ms), so a live copy
    /// of its memory has to copy pages again.
    pub dirty_mib: u32,
    /// Each guest sends one TCP and one UDP message to every peer this often.
    pub interval_ms: u32,
    pub uri: String,
    /// This many guests (the last ones) run on the second bridge: a second emulated host,
    /// joined to the first by an overlay (`crate::overlay`).
    pub on_second_bridge: usize,
    /// Redis on every guest: the first one primary, the others its replicas (`crate::redis`).
    pub redis: bool,
}

impl Default for VmLabOptions {
    fn default() -> Self {
        Self {
            prefix: "enfv".into(),
            vms: 3,
            subnet: 1,
            guest_dir: DEFAULT_GUEST_DIR.into(),
            memory_mib: 256,
            disk_gib: 1,
            disk_full: false,
            dirty_mib: 32,
            interval_ms: 10,
            uri: enforcer::snapshot::libvirt::DEFAULT_URI.into(),
            on_second_bridge: 0,
            redis: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GuestVm {
    /// The libvirt domain name.
    pub name: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// The bridge it was booted on.
    pub bridge: String,
}

pub struct VmLab {
    pub bridge: String,
    /// A second bridge (no address until [`VmLab::move_host_to`]): restores can go there.
    pub other_bridge: String,
    pub host_ip: Ipv4Addr,
    pub vms: Vec<GuestVm>,
    pub console_dir: PathBuf,
    /// The lab's own connection to libvirtd, opened again after libvirtd restarted.
    conn: std::sync::Mutex<Connect>,
    opts: VmLabOptions,
    /// UDP datagrams each pair (sender, receiver index) had lost when last noted (at boot:
    /// sent before the receiver listened): see [`VmLab::note_loss_baseline`].
    loss_baseline: std::sync::Mutex<std::collections::HashMap<(usize, usize), u64>>,
}

impl VmLab {
    /// Creates the bridge and boots the guests (not waiting for them: see
    /// [`VmLab::wait_talking`]).
    pub fn start(opts: VmLabOptions) -> Result<Self, VmLabError> {
        let p = &opts.prefix;
        if p.is_empty()
            || p.len() > 6
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(VmLabError::BadPrefix(p.clone()));
        }
        for f in ["vmlinuz", "initramfs.gz"] {
            if !opts.guest_dir.join(f).is_file() {
                return Err(VmLabError::NoGuest(opts.guest_dir.clone()));
            }
        }
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&opts.uri)).map_err(|e| {
            VmLabError::Libvirt(format!(
                "connecting to {}: {e} (is libvirtd running? scripts/setup.sh starts it)",
                opts.uri
            ))
        })?;
        let bridge = format!("{p}br");
        let host_ip = Ipv4Addr::new(10, 77, opts.subnet, 1);
        let console_dir = PathBuf::from(format!("/var/lib/enforcer/vms/{p}"));
        let _ = std::fs::create_dir_all(&console_dir);
        let first_remote = opts.vms.saturating_sub(opts.on_second_bridge);
        let vms = (0..opts.vms)
            .map(|i| GuestVm {
                name: format!("{p}-vm{}", i + 1),
                mac: MacAddr([0x52, 0x54, 0x00, 0x77, opts.subnet, 11 + i as u8]),
                ip: Ipv4Addr::new(10, 77, opts.subnet, 11 + i as u8),
                bridge: if i < first_remote {
                    bridge.clone()
                } else {
                    format!("{p}br2")
                },
            })
            .collect();
        let lab = VmLab {
            other_bridge: format!("{p}br2"),
            bridge,
            host_ip,
            vms,
            console_dir,
            conn: std::sync::Mutex::new(conn),
            opts,
            loss_baseline: std::sync::Mutex::new(std::collections::HashMap::new()),
        };
        // Leftovers of a run that was killed.
        lab.destroy_all();
        for b in [&lab.bridge, &lab.other_bridge] {
            let _ = ip(&["link", "del", b]);
            ip(&["link", "add", b, "type", "bridge"])?;
            ip(&["link", "set", b, "up"])?;
        }
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &lab.bridge])?;
        for vm in &lab.vms {
            lab.boot(vm)?;
        }
        Ok(lab)
    }

    fn domain_xml(&self, vm: &GuestVm) -> String {
        let peers: Vec<String> = self.vms.iter().map(|v| v.ip.to_string()).collect();
        let o = &self.opts;
        // TCG (no usable KVM here). As users run guests: virtio-net with its default offloads,
        // a qcow2 disk (1 GiB, sparse) where the guest keeps its generation record (memory and
        // disk are checked against each other after a restore).
        format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel>
    <initrd>{dir}/initramfs.gz</initrd>
    <cmdline>console=ttyS0 quiet enforcer.ip={ip} enforcer.peers={peers} enforcer.interval_ms={interval} enforcer.dirty_mib={dirty}{redis}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>",
            name = vm.name,
            mem = o.memory_mib,
            dir = o.guest_dir.display(),
            ip = vm.ip,
            peers = peers.join(","),
            interval = o.interval_ms,
            dirty = o.dirty_mib,
            redis = match (o.redis, self.vms.first()) {
                (true, Some(primary)) if primary.name == vm.name => " enforcer.redis=primary".into(),
                (true, Some(primary)) => format!(" enforcer.redis=replica:{}", primary.ip),
                _ => String::new(),
            },
            bridge = vm.bridge,
            mac = vm.mac,
            console = self.console(vm).display(),
            disk = self.disk(vm).display(),
        )
    }

    /// Where a guest's serial console is written.
    pub fn console(&self, vm: &GuestVm) -> PathBuf {
        self.console_dir.join(format!("{}.console", vm.name))
    }

    /// A guest's disk as booted (qcow2; 1 GiB, sparse, by default). After an instant snapshot the guest
    /// runs on an overlay of it (see [`VmLab::active_disk`]).
    pub fn disk(&self, vm: &GuestVm) -> PathBuf {
        self.console_dir.join(format!("{}.qcow2", vm.name))
    }

    /// The file a running guest's `vda` is on now.
    pub fn active_disk(&self, vm: &GuestVm) -> Result<PathBuf, VmLabError> {
        let xml = self
            .conn()
            .lookup_domain_by_name(&vm.name)
            .and_then(|d| d.xml_desc(0))
            .map_err(|e| VmLabError::Libvirt(format!("{}: {e}", vm.name)))?;
        enforcer::snapshot::libvirt::file_disks(&xml)
            .map_err(VmLabError::Libvirt)?
            .into_iter()
            .find(|d| d.target == "vda")
            .map(|d| d.file)
            .ok_or_else(|| VmLabError::Libvirt(format!("{} has no vda", vm.name)))
    }

    /// Every disk file of a guest: as booted, and the overlays snapshots and restores put it on.
    pub fn disk_files(&self, vm: &GuestVm) -> Vec<PathBuf> {
        let prefix = format!("{}.", vm.name);
        std::fs::read_dir(&self.console_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().is_some_and(|n| {
                            let n = n.to_string_lossy();
                            n.starts_with(&prefix) && n.ends_with(".qcow2")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn boot(&self, vm: &GuestVm) -> Result<(), VmLabError> {
        debug!(vm = vm.name, "booting");
        for old in self.disk_files(vm) {
            let _ = std::fs::remove_file(old);
        }
        let disk = self.disk(vm);
        let disk = disk.to_string_lossy();
        let size = format!("{}G", self.opts.disk_gib);
        let prealloc = if self.opts.disk_full {
            "preallocation=full"
        } else {
            "preallocation=off"
        };
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", prealloc, &disk, &size])
            .output()
            .map_err(|e| VmLabError::Command {
                command: format!("qemu-img create {disk}"),
                stderr: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(VmLabError::Command {
                command: format!("qemu-img create {disk}"),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        self.conn()
            .create_domain_xml(&self.domain_xml(vm), 0)
            .map(|_| ())
            .map_err(|e| VmLabError::Libvirt(format!("starting {}: {e}", vm.name)))
    }

    /// Boots a guest afresh (a new disk), destroying what runs under its name.
    pub fn reboot(&self, vm: &GuestVm) -> Result<(), VmLabError> {
        if let Ok(dom) = self.conn().lookup_domain_by_name(&vm.name)
            && dom.is_active().unwrap_or(false)
        {
            let _ = dom.destroy();
        }
        self.boot(vm)
    }

    /// What the guest's console says of a crashed kernel (its first such line), if it does.
    pub fn crash(&self, vm: &GuestVm) -> Option<String> {
        const SIGNS: [&str; 6] = [
            "Kernel panic",
            "kernel BUG",
            "BUG:",
            "double fault",
            "general protection fault",
            "corruption",
        ];
        std::fs::read_to_string(self.console(vm))
            .ok()?
            .lines()
            .find(|l| SIGNS.iter().any(|s| l.contains(s)))
            .map(str::to_owned)
    }

    /// Moves the host's address (its way to the guests' control ports) to `bridge`, for guests
    /// restored there.
    pub fn move_host_to(&self, bridge: &str) -> Result<(), VmLabError> {
        let addr = format!("{}/24", self.host_ip);
        for b in [&self.bridge, &self.other_bridge] {
            let _ = ip(&["addr", "del", &addr, "dev", b]);
        }
        Ok(ip(&["addr", "add", &addr, "dev", bridge])?)
    }

    /// Destroys every guest of the lab (they are transient: destroyed is gone).
    pub fn destroy_all(&self) {
        for vm in &self.vms {
            if let Ok(dom) = self.conn().lookup_domain_by_name(&vm.name)
                && dom.is_active().unwrap_or(false)
            {
                let _ = dom.destroy();
            }
        }
    }

    /// Pauses (`true`) or resumes a guest through libvirt.
    pub fn set_paused(&self, vm: &GuestVm, paused: bool) -> Result<(), VmLabError> {
        let dom = self
            .conn()
            .lookup_domain_by_name(&vm.name)
            .map_err(|e| VmLabError::Libvirt(format!("{}: {e}", vm.name)))?;
        if paused { dom.suspend() } else { dom.resume() }
            .map_err(|e| VmLabError::Libvirt(format!("{}: {e}", vm.name)))
    }

    /// Whether a guest is running (not paused, not gone).
    pub fn running(&self, vm: &GuestVm) -> bool {
        self.conn()
            .lookup_domain_by_name(&vm.name)
            .and_then(|d| d.state())
            .is_ok_and(|(state, _)| {
                matches!(
                    Result::<_, _>::from(state),
                    Ok(virt::domain::DomainState::Running)
                )
            })
    }

    pub fn names(&self) -> Vec<String> {
        self.vms.iter().map(|v| v.name.clone()).collect()
    }

    /// Sends one control command to a guest and returns its JSON line.
    pub fn control(&self, vm: &GuestVm, command: &str) -> Result<String, VmLabError> {
        let err = |detail: String| VmLabError::Guest {
            vm: vm.name.clone(),
            ip: vm.ip,
            detail,
        };
        let addr = SocketAddr::from((vm.ip, CONTROL_PORT));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .map_err(|e| err(format!("control port: {e}")))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| err(e.to_string()))?;
        writeln!(s, "{command}").map_err(|e| err(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| err(format!("reading the reply: {e}")))?;
        Ok(line)
    }

    pub fn stats(&self, vm: &GuestVm) -> Result<GuestStats, VmLabError> {
        let line = self.control(vm, "stats")?;
        serde_json::from_str(&line).map_err(|e| VmLabError::Guest {
            vm: vm.name.clone(),
            ip: vm.ip,
            detail: format!("stats {line:?}: {e}"),
        })
    }

    pub fn all_stats(&self) -> Result<Vec<GuestStats>, VmLabError> {
        self.vms.iter().map(|vm| self.stats(vm)).collect()
    }

    /// Waits until every guest has TCP streams to all its peers and has heard from each of
    /// them over UDP and TCP.
    pub fn wait_talking(&self, timeout: Duration) -> Result<(), VmLabError> {
        let deadline = Instant::now() + timeout;
        for vm in &self.vms {
            loop {
                let ready = self.stats(vm).is_ok_and(|s| {
                    s.peers.len() + 1 == self.vms.len()
                        && s.peers
                            .iter()
                            .all(|p| p.tcp_connects > 0 && p.udp_received > 0 && p.tcp_received > 0)
                });
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    let console = std::fs::read_to_string(self.console(vm)).unwrap_or_default();
                    let tail: Vec<&str> = console.lines().rev().take(5).collect();
                    return Err(VmLabError::Guest {
                        vm: vm.name.clone(),
                        ip: vm.ip,
                        detail: format!(
                            "not talking to all peers after {timeout:?}; console ends: {:?}",
                            tail.into_iter().rev().collect::<Vec<_>>()
                        ),
                    });
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// Notes what each pair has lost so far (at boot: datagrams sent before the receiver
    /// listened), with nothing in flight: every guest is quieted, the streams drain, the
    /// counters are read, and they talk again. An image taken after it carries those counts,
    /// so what a restored pair lost is its gap beyond them ([`VmLab::lost_before`]). Noted at
    /// boot, and again before a snapshot whose restore is to be checked on its own.
    pub fn note_loss_baseline(&self) -> Result<(), VmLabError> {
        self.broadcast("quiet")?;
        thread::sleep(Duration::from_secs(1));
        let mut loss = std::collections::HashMap::new();
        let stats: Vec<_> = self
            .vms
            .iter()
            .map(|vm| self.stats(vm))
            .collect::<Result<_, _>>()?;
        for (i, from) in self.vms.iter().enumerate() {
            for (j, to) in self.vms.iter().enumerate() {
                let (Some(sent), Some(recv)) = (
                    stats[i].peer(&to.ip.to_string()),
                    stats[j].peer(&from.ip.to_string()),
                ) else {
                    continue;
                };
                loss.insert((i, j), sent.udp_sent.saturating_sub(recv.udp_received));
            }
        }
        *self.loss_baseline.lock().expect("loss baseline lock") = loss;
        self.broadcast("talk")
    }

    /// The datagrams pair (`from`, `to`) had lost at the last [`VmLab::note_loss_baseline`]
    /// (0 before).
    pub fn lost_before(&self, from: usize, to: usize) -> u64 {
        self.loss_baseline
            .lock()
            .expect("loss baseline lock")
            .get(&(from, to))
            .copied()
            .unwrap_or(0)
    }

    /// Tells every guest to stop (`quiet`) or start (`talk`) sending.
    pub fn broadcast(&self, command: &str) -> Result<(), VmLabError> {
        for vm in &self.vms {
            self.control(vm, command)?;
        }
        Ok(())
    }

    /// The libvirt URI the guests run under.
    pub fn uri(&self) -> String {
        self.opts.uri.clone()
    }

    /// The connection, opened again if libvirtd closed it (restarted): the lab outlives a
    /// libvirtd restart as the daemon does.
    fn conn(&self) -> Connect {
        let mut conn = self.conn.lock().expect("lab connection lock");
        // The lab runs no event loop of its own, so a closed connection shows only when a
        // call fails: ask libvirtd something cheap.
        let alive = conn.is_alive().unwrap_or(false) && conn.lib_version().is_ok();
        if !alive && let Ok(fresh) = Connect::open(Some(&self.opts.uri)) {
            *conn = fresh;
        }
        conn.clone()
    }

    pub fn guest_dir(&self) -> &Path {
        &self.opts.guest_dir
    }

    /// The Redis primary and its replicas, when the guests run Redis.
    pub fn redis(&self) -> Option<(&GuestVm, &[GuestVm])> {
        self.opts.redis.then(|| self.vms.split_first()).flatten()
    }
}

/// Where `scripts/setup.sh` keeps the pid of the libvirtd it started (no systemd).
const LIBVIRTD_PID: &str = "/run/enforcer-libvirtd.pid";

/// Restarts libvirtd as an upgrade would: the guests run on (QEMU does not depend on it), and
/// every client connection is closed. The libvirtd `scripts/setup.sh` started is stopped and
/// started again the same way; one systemd runs is restarted by systemd.
pub fn restart_libvirtd(uri: &str) -> Result<(), LabError> {
    let fail = |detail: String| LabError::Netns {
        netns: "libvirtd".into(),
        detail,
    };
    let ours = std::fs::read_to_string(LIBVIRTD_PID)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
    if let Some(pid) = ours {
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| fail(format!("stopping libvirtd ({pid}): {e}")))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if std::time::Instant::now() > deadline {
                return Err(fail(format!("libvirtd ({pid}) did not stop in 30 s")));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let started = std::process::Command::new("libvirtd")
            .args(["-d", "--pid-file", LIBVIRTD_PID])
            .status()
            .map_err(|e| fail(format!("starting libvirtd: {e}")))?;
        if !started.success() {
            return Err(fail(format!("libvirtd -d: {started}")));
        }
    } else {
        let restarted = std::process::Command::new("systemctl")
            .args(["restart", "libvirtd"])
            .status()
            .map_err(|e| fail(format!("systemctl restart libvirtd: {e}")))?;
        if !restarted.success() {
            return Err(fail(format!("systemctl restart libvirtd: {restarted}")));
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while Connect::open(Some(uri)).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(fail(
                "libvirtd does not answer 30 s after its restart".into(),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

impl Drop for VmLab {
    fn drop(&mut self) {
        self.destroy_all();
        let _ = ip(&["link", "del", &self.bridge]);
        let _ = ip(&["link", "del", &self.other_bridge]);
        for vm in &self.vms {
            for file in self.disk_files(vm) {
                let _ = std::fs::remove_file(file);
            }
        }
    }
}
