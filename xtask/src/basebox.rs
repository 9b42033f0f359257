//! `cargo xtask basebox`: builds the testbed's vagrant-libvirt box offline, from Debian packages
//! only (the configured apt mirror is all these machines can download from).
//!
//! 1. a sparse raw disk with one MBR partition, formatted ext4 through a loop device;
//! 2. `debootstrap --variant=minbase bookworm` straight into it, with systemd, udev,
//!    openssh-server, sudo, ifupdown + DHCP on eth0;
//! 3. in a chroot: the kernel from bookworm-backports (the agent attaches with tcx links, which
//!    need Linux 6.6; bookworm's own kernel is 6.1) and any `--include` packages;
//! 4. the `vagrant` user with HashiCorp's published insecure public key (vagrant swaps it for a
//!    fresh key on the first `vagrant up`), passwordless sudo; SSH host keys and the machine id
//!    are left to the first boot, so that machines made from the box differ;
//! 5. extlinux as the boot loader (no grub-install inside a chroot needed), syslinux's MBR;
//! 6. `qemu-img convert -c` to qcow2, then `box.img` + `metadata.json` + `Vagrantfile` in a tar:
//!    the `.box` that `vagrant box add` takes.
//!
//! Needs root (loop devices, mounts, chroot). Every mount and loop device is released on any
//! exit, including failures.

use std::{
    fs,
    io::{Seek as _, SeekFrom, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};

/// HashiCorp's well-known insecure public key (keys/vagrant.pub in every vagrant release; byte
/// for byte the one in Debian's vagrant 2.3.4 package). Vagrant logs in with the matching
/// private key once and then replaces it with a key of its own (`config.ssh.insert_key`).
const VAGRANT_INSECURE_PUBKEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== vagrant insecure public key";

const SUITE: &str = "bookworm";
const BOX_NAME: &str = "enforcer-debian12";
/// Partition 1 starts at 1 MiB (the usual alignment); sectors before it hold the MBR.
const PART_OFFSET: u64 = 1 << 20;

/// debootstrap's package set on top of minbase: what vagrant and the testbed need to boot, log
/// in and be configured.
const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus", // hostnamectl, which vagrant uses to set the hostname
    "openssh-server",
    "sudo",
    "ifupdown", // vagrant's Debian guest plugin writes /etc/network/interfaces
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "kmod",
    "procps",
    "ca-certificates",
];

/// The box's own Vagrantfile: defaults that any project using the box gets.
const BOX_VAGRANTFILE: &str = r#"# Defaults of the enforcer/debian12 box, built offline by `cargo xtask basebox`.
Vagrant.configure("2") do |config|
  # Needs NFS on the host by default, and rsync in the box for the alternative: off.
  config.vm.synced_folder ".", "/vagrant", disabled: true
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
  end
end
"#;

/// Creates SSH host keys on the first boot (the box ships none, so that every machine made
/// from it has its own); sshd does not start without them.
const HOSTKEYS_UNIT: &str = "[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

pub(crate) struct Options {
    pub out: PathBuf,
    pub mirror: Option<String>,
    pub size_gib: u64,
    pub include: Vec<String>,
}

/// Cleanups run in reverse order on drop: unmounts and loop devices never outlive the build.
#[derive(Default)]
struct Cleanup {
    actions: Vec<(String, Vec<String>)>,
}

impl Cleanup {
    fn push(&mut self, what: &str, argv: &[&str]) {
        self.actions.push((
            what.to_owned(),
            argv.iter().map(|s| (*s).to_owned()).collect(),
        ));
    }

    /// Runs the newest action now (the normal path), reporting failure.
    fn pop(&mut self) -> anyhow::Result<()> {
        if let Some((what, argv)) = self.actions.pop() {
            run(Command::new(&argv[0]).args(&argv[1..])).with_context(|| what.clone())?;
        }
        Ok(())
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some((what, argv)) = self.actions.pop() {
            // On the error path: best effort, a lazy unmount as a fallback for a busy one.
            let ok = Command::new(&argv[0])
                .args(&argv[1..])
                .status()
                .is_ok_and(|s| s.success());
            if !ok && argv[0] == "umount" {
                let _ = Command::new("umount").arg("-l").args(&argv[1..]).status();
            }
            if !ok {
                eprintln!("basebox: cleanup `{what}` ({}) failed", argv.join(" "));
            }
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs quietly; on failure the error carries the command's last output lines.
fn run_quiet(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let mut text = stdout.clone();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        bail!("{cmd:?} failed ({}):\n{tail}", out.status);
    }
    Ok(stdout)
}

struct Steps {
    started: Instant,
    step: Instant,
}

impl Steps {
    fn begin(&mut self, what: &str) {
        self.step = Instant::now();
        println!("basebox: {what} …");
    }

    fn done(&self, detail: &str) {
        println!(
            "basebox:   done in {:.0} s{}{detail} (total {:.0} s)",
            self.step.elapsed().as_secs_f64(),
            if detail.is_empty() { "" } else { ", " },
            self.started.elapsed().as_secs_f64()
        );
    }
}

pub(crate) fn build(opts: &Options) -> anyhow::Result<()> {
    let mut steps = Steps {
        started: Instant::now(),
        step: Instant::now(),
    };
    ensure!(
        is_root()?,
        "basebox needs root (loop devices, mounts, chroot)"
    );
    ensure!(
        (2..=1024).contains(&opts.size_gib),
        "--size-gib must be 2..=1024"
    );
    let mirror = match &opts.mirror {
        Some(m) => m.trim_end_matches('/').to_owned(),
        None => default_mirror(),
    };
    println!("basebox: mirror {mirror}, suite {SUITE}");

    steps.begin("host tools (debootstrap, sfdisk, extlinux, qemu-img)");
    ensure_host_tools()?;
    steps.done("");

    fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let work = opts.out.join("work");
    if work.exists() {
        // A previous run that died hard (SIGKILL) may have left its mount behind.
        let root = work.join("root");
        if is_mountpoint(&root) {
            bail!(
                "{} is still mounted from an earlier run: `umount -R {}` and detach its loop \
                 device (`losetup -j {}`) first",
                root.display(),
                root.display(),
                work.join("disk.raw").display()
            );
        }
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let root = work.join("root");
    fs::create_dir_all(&root)?;
    let raw = work.join("disk.raw");
    let mut cleanup = Cleanup::default();

    // 1. Disk, partition, file system.
    steps.begin(&format!(
        "{} GiB sparse disk, MBR partition, ext4",
        opts.size_gib
    ));
    let size = opts.size_gib << 30;
    fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", raw.display()))?;
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = sfdisk.spawn().context("running sfdisk")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"label: dos\nstart=2048, type=83, bootable\n")?;
    let status = child.wait()?;
    ensure!(
        status.success(),
        "sfdisk {} failed ({status})",
        raw.display()
    );
    // A loop device over the partition alone (offset + size limit) instead of partition scanning:
    // containers often have no udev to create /dev/loopNpM.
    let loopdev = run_quiet(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(format!("--offset={PART_OFFSET}"))
            .arg(format!("--sizelimit={}", size - PART_OFFSET))
            .arg(&raw),
    )?
    .trim()
    .to_owned();
    ensure!(
        loopdev.starts_with("/dev/loop"),
        "losetup printed {loopdev:?}"
    );
    cleanup.push("detaching the loop device", &["losetup", "-d", &loopdev]);
    // No 64bit feature: syslinux's ext4 reader predates it, and an 8 GiB file system does not
    // need it.
    run_quiet(Command::new("mkfs.ext4").args([
        "-q",
        "-F",
        "-L",
        "enforcer-root",
        "-O",
        "^64bit",
        &loopdev,
    ]))?;
    let uuid = run_quiet(Command::new("blkid").args(["-s", "UUID", "-o", "value", &loopdev]))?
        .trim()
        .to_owned();
    ensure!(!uuid.is_empty(), "blkid found no UUID on {loopdev}");
    let root_s = root.to_string_lossy().into_owned();
    run(Command::new("mount").args([&loopdev, &root_s]))?;
    cleanup.push("unmounting the image", &["umount", &root_s]);
    steps.done(&format!("{loopdev}, UUID {uuid}"));

    // 2. debootstrap.
    steps.begin("debootstrap (minbase + systemd, sshd, sudo, ifupdown)");
    let log = opts.out.join("debootstrap.log");
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--arch=amd64", "--variant=minbase"])
        .arg(format!("--include={}", BASE_PACKAGES.join(",")))
        .args([SUITE, &root_s, &mirror]);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running debootstrap")?;
    fs::write(
        &log,
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    )?;
    if !out.status.success() {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        bail!(
            "debootstrap failed ({}); log: {}\n{}",
            out.status,
            log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    steps.done(&format!("log {}", log.display()));

    // 3. Configuration, then the kernel and extra packages in a chroot.
    steps.begin("configure: apt sources, fstab, network, vagrant user, sudo, sshd");
    configure(&root, &mirror, &uuid)?;
    steps.done("");

    steps.begin(&format!(
        "chroot: linux-image-amd64 from {SUITE}-backports{}",
        if opts.include.is_empty() {
            String::new()
        } else {
            format!(", {}", opts.include.join(" "))
        }
    ));
    let mut chroot_mounts = Cleanup::default();
    for (fs_type, dir) in [("proc", "proc"), ("sysfs", "sys")] {
        let target = root.join(dir).to_string_lossy().into_owned();
        run(Command::new("mount").args(["-t", fs_type, fs_type, &target]))?;
        chroot_mounts.push(&format!("unmounting {target}"), &["umount", &target]);
    }
    let dev = root.join("dev").to_string_lossy().into_owned();
    run(Command::new("mount").args(["--bind", "/dev", &dev]))?;
    chroot_mounts.push(&format!("unmounting {dev}"), &["umount", &dev]);
    // No service may start inside the chroot.
    write(
        &root.join("usr/sbin/policy-rc.d"),
        "#!/bin/sh\nexit 101\n",
        0o755,
    )?;
    let script = format!(
        "set -e\n\
         export DEBIAN_FRONTEND=noninteractive\n\
         apt-get update -q\n\
         apt-get install -y -q --no-install-recommends -t {SUITE}-backports linux-image-amd64\n\
         {}\
         apt-get clean\n",
        if opts.include.is_empty() {
            String::new()
        } else {
            format!(
                "apt-get install -y -q --no-install-recommends {}\n",
                opts.include.join(" ")
            )
        }
    );
    let chroot_log = opts.out.join("chroot.log");
    let out = Command::new("chroot")
        .arg(&root)
        .args(["/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .context("running chroot")?;
    fs::write(
        &chroot_log,
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    )?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = text.lines().collect();
        bail!(
            "installing the kernel in the chroot failed ({}); log: {}\n{}",
            out.status,
            chroot_log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    fs::remove_file(root.join("usr/sbin/policy-rc.d"))?;
    while !chroot_mounts.actions.is_empty() {
        chroot_mounts.pop()?;
    }
    let kernel = fs::read_link(root.join("vmlinuz"))
        .map(|p| p.display().to_string())
        .context("the kernel package made no /vmlinuz link")?;
    ensure!(
        root.join("initrd.img").exists(),
        "the kernel package made no /initrd.img"
    );
    steps.done(&format!("/vmlinuz → {kernel}"));

    // 4. Boot loader.
    steps.begin("boot loader: extlinux + syslinux MBR");
    finish_image(&root)?;
    let extlinux_dir = root.join("boot/extlinux");
    fs::create_dir_all(&extlinux_dir)?;
    // /vmlinuz and /initrd.img are the links Debian's kernel packages keep pointing at the
    // newest kernel, so kernel upgrades inside a machine need no boot loader update.
    // net.ifnames=0: the first NIC is eth0, as /etc/network/interfaces says.
    write(
        &extlinux_dir.join("extlinux.conf"),
        &format!(
            "DEFAULT debian\nPROMPT 0\nTIMEOUT 1\n\nLABEL debian\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  \
             APPEND root=UUID={uuid} ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8\n"
        ),
        0o644,
    )?;
    run_quiet(Command::new("extlinux").arg("--install").arg(&extlinux_dir))?;
    // Blocks of deleted files (debootstrap's downloaded packages, apt's lists) still hold their
    // old bytes in the raw file, and qemu-img would copy them; a trim through the loop device
    // punches them out of the file.
    run_quiet(Command::new("fstrim").arg(&root))?;
    cleanup.pop()?; // unmount
    cleanup.pop()?; // loop device
    let mbr = ["/usr/lib/EXTLINUX/mbr.bin", "/usr/lib/syslinux/mbr/mbr.bin"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("syslinux's mbr.bin not found (package extlinux / syslinux-common)")?;
    let code = fs::read(mbr)?;
    ensure!(
        code.len() <= 440,
        "{} is larger than 440 bytes",
        mbr.display()
    );
    // Only the boot code: bytes 440.. hold the disk signature and the partition table.
    let mut disk = fs::OpenOptions::new().write(true).open(&raw)?;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&code)?;
    disk.sync_all()?;
    steps.done("");

    // 5. qcow2 and the box.
    steps.begin("qemu-img convert -c -O qcow2");
    let img = opts.out.join("box.img");
    run_quiet(
        Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&img),
    )?;
    let img_size = fs::metadata(&img)?.len();
    steps.done(&format!("{} MiB", img_size >> 20));

    steps.begin("box: box.img + metadata.json + Vagrantfile");
    write(
        &opts.out.join("metadata.json"),
        &format!(
            "{{\"provider\": \"libvirt\", \"format\": \"qcow2\", \"virtual_size\": {}}}\n",
            opts.size_gib
        ),
        0o644,
    )?;
    write(&opts.out.join("Vagrantfile"), BOX_VAGRANTFILE, 0o644)?;
    let boxfile = opts.out.join(format!("{BOX_NAME}.box"));
    // Plain tar: the qcow2 inside is already compressed.
    run_quiet(
        Command::new("tar")
            .arg("-cf")
            .arg(&boxfile)
            .arg("-C")
            .arg(&opts.out)
            .args(["metadata.json", "Vagrantfile", "box.img"]),
    )?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    let box_size = fs::metadata(&boxfile)?.len();
    steps.done(&format!("{} MiB", box_size >> 20));

    println!(
        "basebox: {} ({} MiB, virtual size {} GiB, kernel {kernel}) in {:.0} s\n\
         basebox: add it with\n  vagrant box add --force --name enforcer/debian12 {}",
        boxfile.display(),
        box_size >> 20,
        opts.size_gib,
        steps.started.elapsed().as_secs_f64(),
        boxfile.display()
    );
    Ok(())
}

fn configure(root: &Path, mirror: &str, uuid: &str) -> anyhow::Result<()> {
    // Security updates live beside the main archive on Debian's mirrors (…/debian-security).
    let security = format!("{mirror}-security");
    write(
        &root.join("etc/apt/sources.list"),
        &format!(
            "deb {mirror} {SUITE} main\n\
             deb {mirror} {SUITE}-updates main\n\
             deb {mirror} {SUITE}-backports main\n\
             deb {security} {SUITE}-security main\n"
        ),
        0o644,
    )?;
    write(
        &root.join("etc/fstab"),
        &format!("UUID={uuid} / ext4 errors=remount-ro 0 1\nbpf /sys/fs/bpf bpf defaults 0 0\n"),
        0o644,
    )?;
    write(&root.join("etc/hostname"), "enforcer\n", 0o644)?;
    write(
        &root.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.1.1 enforcer\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    // Vagrant adds its private networks to this file (between #VAGRANT-BEGIN/END markers).
    write(
        &root.join("etc/network/interfaces"),
        "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n\
         allow-hotplug eth0\niface eth0 inet dhcp\n",
        0o644,
    )?;
    write(
        &root.join("etc/sudoers.d/vagrant"),
        "vagrant ALL=(ALL) NOPASSWD:ALL\n",
        0o440,
    )?;
    // No reverse DNS lookups of clients: without a resolver they stall every login.
    write(
        &root.join("etc/ssh/sshd_config.d/vagrant.conf"),
        "UseDNS no\n",
        0o644,
    )?;

    let chroot = |args: &[&str]| -> anyhow::Result<String> {
        run_quiet(Command::new("chroot").arg(root).args(args))
    };
    chroot(&[
        "useradd",
        "--create-home",
        "--shell",
        "/bin/bash",
        "--user-group",
        "vagrant",
    ])?;
    // The conventional password of vagrant boxes, for the console.
    let mut child = Command::new("chroot")
        .arg(root)
        .arg("chpasswd")
        .stdin(Stdio::piped())
        .spawn()
        .context("running chpasswd")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"vagrant:vagrant\n")?;
    ensure!(child.wait()?.success(), "chpasswd failed");
    let ssh_dir = root.join("home/vagrant/.ssh");
    fs::create_dir_all(&ssh_dir)?;
    fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700))?;
    write(
        &ssh_dir.join("authorized_keys"),
        &format!("{VAGRANT_INSECURE_PUBKEY}\n"),
        0o600,
    )?;
    chroot(&["chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"])?;

    write(
        &root.join("etc/systemd/system/ssh-hostkeys.service"),
        HOSTKEYS_UNIT,
        0o644,
    )?;
    chroot(&["systemctl", "enable", "ssh-hostkeys.service"])?;
    Ok(())
}

/// Removes what must differ per machine or is only build-time state.
fn finish_image(root: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(root.join("etc/ssh"))? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ssh_host_"))
        {
            fs::remove_file(&path)?;
        }
    }
    // An empty machine-id makes systemd generate one on the first boot.
    write(&root.join("etc/machine-id"), "", 0o444)?;
    let _ = fs::remove_file(root.join("var/lib/dbus/machine-id"));
    // debootstrap copied the build host's resolver; dhclient writes the machine's own.
    let _ = fs::remove_file(root.join("etc/resolv.conf"));
    write(&root.join("etc/resolv.conf"), "", 0o644)?;
    // Package lists are large and stale by the time the box is used; provision.sh updates them.
    let lists = root.join("var/lib/apt/lists");
    for entry in fs::read_dir(&lists)? {
        let path = entry?.path();
        if path.is_file() {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn is_root() -> anyhow::Result<bool> {
    let status = fs::read_to_string("/proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0"))
}

fn is_mountpoint(path: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the tools that are missing (all in Debian).
fn ensure_host_tools() -> anyhow::Result<()> {
    let wanted = [
        ("debootstrap", "/usr/sbin/debootstrap", "debootstrap"),
        ("sfdisk", "/usr/sbin/sfdisk", "fdisk"),
        ("extlinux", "/usr/bin/extlinux", "extlinux"),
        ("mbr.bin", "/usr/lib/EXTLINUX/mbr.bin", "extlinux"),
        ("qemu-img", "/usr/bin/qemu-img", "qemu-utils"),
    ];
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, path, _)| !Path::new(path).exists())
        .map(|(_, _, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    println!("basebox: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing the host tools (try `apt-get update` first)")
}

/// The Debian archive apt on this machine uses (its bookworm suite, not security), else
/// deb.debian.org.
fn default_mirror() -> String {
    let mut texts = Vec::new();
    for path in ["/etc/apt/sources.list"] {
        if let Ok(t) = fs::read_to_string(path) {
            texts.push(t);
        }
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let name = p.to_string_lossy();
            if (name.ends_with(".list") || name.ends_with(".sources"))
                && let Ok(t) = fs::read_to_string(&p)
            {
                texts.push(t);
            }
        }
    }
    texts
        .iter()
        .find_map(|t| mirror_in(t))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The URI serving suite `bookworm` in a one-line (`deb URI bookworm …`) or deb822 sources file.
fn mirror_in(text: &str) -> Option<String> {
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"deb") {
            // Skip `[options]`.
            let rest: Vec<&str> = words[1..]
                .iter()
                .copied()
                .skip_while(|w| w.starts_with('['))
                .filter(|w| !w.ends_with(']'))
                .collect();
            if rest.len() >= 2 && rest[1] == SUITE {
                return Some(rest[0].trim_end_matches('/').to_owned());
            }
        }
    }
    // deb822: stanzas separated by blank lines.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_owned())
            })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == SUITE)
            && let Some(uri) = uris.split_whitespace().next()
        {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors() {
        let deb822 = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let list = "deb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_in(list).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in("deb http://x/debian-security bookworm-security main"),
            None
        );
    }
}
