//! `cargo xtask guest`: builds the tiny guest offline, from packages the registries serve.
//!
//! - the kernel: Debian's `linux-image-amd64` dependency, unpacked with `dpkg-deb -x`;
//! - an initramfs (newc cpio made by busybox's applet, gzip-compressed) holding busybox, the
//!   virtio modules (Debian builds them as modules), an `/init` that brings up `eth0` from the
//!   kernel command line, our static test application `enforcer-guest`, and Redis (Debian's
//!   `redis-tools` build with the shared libraries it links, as the host has them): a program
//!   not written here whose replication protocol checks a restore (`enforcer.redis=` on the
//!   kernel command line starts it as primary or replica).
//!
//! Writes `vmlinuz` and `initramfs.gz` into the output directory (default
//! `/var/lib/enforcer/guest`, where `enforcer-lab demo` looks).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Loaded in this order (each needs the ones before).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

const INIT: &str = r#"#!/bin/busybox sh
# enforcer's guest: bring up eth0 from the kernel command line and run the test application.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "init: insmod $m failed"; done
ip=""; peers=""; interval=10; dirty=0; redis=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    enforcer.ip=*) ip="${arg#*=}" ;;
    enforcer.peers=*) peers="${arg#*=}" ;;
    enforcer.interval_ms=*) interval="${arg#*=}" ;;
    enforcer.dirty_mib=*) dirty="${arg#*=}" ;;
    enforcer.redis=*) redis="${arg#*=}" ;;
  esac
done
ip link set lo up
ip link set eth0 up
ip addr add "$ip/24" dev eth0
echo "init: eth0 $ip up, peers $peers"
# Redis in memory only (no RDB, no AOF): its state is the VM's memory, as the snapshot takes it.
# Replicas sync without the diskless delay, so a full resync starts at once.
case "$redis" in
  primary) /bin/redis-server --port 6379 --protected-mode no --save '' --appendonly no \
      --dir /tmp --logfile /tmp/redis.log --daemonize yes ;;
  replica:*) /bin/redis-server --port 6379 --protected-mode no --save '' --appendonly no \
      --dir /tmp --logfile /tmp/redis.log --daemonize yes --repl-diskless-sync-delay 0 \
      --replicaof "${redis#replica:}" 6379 ;;
  "") ;;
  *) echo "init: unknown enforcer.redis=$redis" ;;
esac
disk=""
[ -b /dev/vda ] && disk="--disk /dev/vda"
while true; do
  /enforcer-guest --ip "$ip" --peers "$peers" --interval-ms "$interval" --dirty-mib "$dirty" $disk
  echo "init: enforcer-guest exited ($?), restarting"
  sleep 1
done
"#;

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the static test application; returns its path.
fn build_app(root: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = "x86_64-unknown-linux-gnu";
    // Static (glibc's static libraries are in libc6-dev), so the initramfs needs no libc. The
    // flag goes to the target only: with an explicit --target, build scripts stay dynamic.
    run(Command::new(cargo)
        .current_dir(root)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "enforcer-guest",
            "--target",
            target,
        ]))?;
    Ok(root
        .join("target")
        .join(target)
        .join("release/enforcer-guest"))
}

/// The kernel package `linux-image-amd64` currently depends on.
fn kernel_package() -> anyhow::Result<String> {
    let depends = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    Ok(depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .context("apt-cache depends linux-image-amd64 names no kernel package")?
        .to_owned())
}

/// Downloads (once) and unpacks Debian's current kernel package; returns the unpacked tree.
fn kernel_tree(cache: &Path) -> anyhow::Result<PathBuf> {
    let mut package = kernel_package()?;
    let tree = cache.join(&package);
    if tree.join("boot").is_dir() {
        return Ok(tree);
    }
    fs::create_dir_all(cache)?;
    eprintln!("[guest] downloading {package}");
    let download = |package: &str| {
        run(Command::new("apt-get")
            .current_dir(cache)
            .args(["download", "-q", package]))
    };
    if download(&package).is_err() {
        // Package lists older than the mirror name a kernel it no longer serves (set-up only
        // refreshes them when it installs something): refresh, ask again, retry once.
        eprintln!("[guest] download failed; refreshing the package lists");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        package = kernel_package()?;
        download(&package)?;
    }
    let tree = cache.join(&package);
    let deb = fs::read_dir(cache)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                cache.display()
            )
        })?;
    let partial = cache.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &tree)?;
    let _ = fs::remove_file(deb);
    Ok(tree)
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().and_then(|n| n.to_str()) == Some(name) {
            return Some(path);
        }
    }
    None
}

pub(crate) fn build(root: &Path, out: &Path) -> anyhow::Result<()> {
    let app = build_app(root)?;
    let cache = root.join("target/guest-cache");
    let kernel = kernel_tree(&cache)?;
    let vmlinuz = fs::read_dir(kernel.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;

    let staging = cache.join("initramfs");
    let _ = fs::remove_dir_all(&staging);
    for dir in ["bin", "dev", "proc", "sys", "lib/modules", "tmp"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    let busybox = which_busybox()?;
    fs::copy(&busybox, staging.join("bin/busybox"))?;
    for m in MODULES {
        let ko = find_file(&kernel.join("lib/modules"), &format!("{m}.ko"))
            .with_context(|| format!("module {m}.ko is not in the kernel package"))?;
        fs::copy(ko, staging.join(format!("lib/modules/{m}.ko")))?;
    }
    fs::copy(&app, staging.join("enforcer-guest"))?;
    add_redis(&staging)?;
    fs::write(
        staging.join("init"),
        INIT.replace("@MODULES@", &MODULES.join(" ")),
    )?;
    fs::set_permissions(staging.join("init"), fs::Permissions::from_mode(0o755))?;

    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let initramfs = out.join("initramfs.gz");
    // busybox's cpio reads the file list on stdin; there is no cpio binary on these machines.
    let tmp = out.join("initramfs.gz.tmp");
    run(Command::new("sh")
        .current_dir(&staging)
        .arg("-c")
        .arg(format!(
            "find . | '{}' cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
            busybox.display(),
            tmp.display()
        )))?;
    fs::rename(&tmp, &initramfs)?;
    fs::copy(&vmlinuz, out.join("vmlinuz"))?;
    eprintln!(
        "[guest] {} + {} ({} KiB) in {}",
        vmlinuz.file_name().unwrap_or_default().to_string_lossy(),
        initramfs.file_name().unwrap_or_default().to_string_lossy(),
        fs::metadata(&initramfs)?.len() / 1024,
        out.display()
    );
    Ok(())
}

/// Debian's Redis server (one binary, `redis-check-rdb`, that serves as `redis-server` by its
/// name) and every shared library `ldd` says it loads, at the same paths, with the loader.
fn add_redis(staging: &Path) -> anyhow::Result<()> {
    const REDIS: &str = "/usr/bin/redis-check-rdb";
    if !Path::new(REDIS).is_file() {
        bail!("{REDIS} not found: apt-get install redis-tools (scripts/setup.sh does)");
    }
    fs::copy(REDIS, staging.join("bin/redis-server"))?;
    let libs = output(Command::new("ldd").arg(REDIS))?;
    for lib in shared_libraries(&libs) {
        let to = staging.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir)?;
        }
        // Through symlinks: the file itself, under the name the binary asks for.
        fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    Ok(())
}

/// The absolute paths in `ldd`'s output (`name => /path (addr)` and the loader's `/path (addr)`).
fn shared_libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=> ").map_or(l, |(_, p)| p);
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn which_busybox() -> anyhow::Result<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("busybox not found: apt-get install busybox-static (scripts/setup.sh does)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_libraries_reads_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ff06469c000)\n\
                   \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007ff064320000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007ff06469e000)\n";
        assert_eq!(
            shared_libraries(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libm.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
