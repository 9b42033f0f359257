#!/usr/bin/env bash
# Installs everything enforcer needs on a fresh Debian 12 machine, idempotently:
# apt packages (LLVM 22 for bpf-linker, bpftool, iproute2, iperf3), the nightly rust-src
# component and bpf-linker. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and the demo needs CAP_BPF/CAP_NET_ADMIN)" >&2
  exit 1
fi

APT_PACKAGES=(
  llvm-22-dev libpolly-22-dev clang-22 lld-22   # bpf-linker's LLVM
  bpftool iproute2 iperf3 ethtool pkg-config    # inspection, netns/veth/bridge, offloads, benchmark
  nftables                                      # tests: held frames meet the bridge's nft rules
  qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev  # real VMs (TCG)
  busybox-static redis-tools                    # the guest's initramfs (redis: a real application's check)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# qemu-img (snapshot overlays, restores, chain merges) comes with qemu-utils, installed below
# pinned to qemu-system-x86's version: its absence alone must trigger the install too.
qemu_utils=present
dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -q 'install ok installed' || qemu_utils=missing
if [ ${#missing[@]} -gt 0 ] || [ "$qemu_utils" = missing ]; then
  log "installing apt packages: ${missing[*]} qemu-utils"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # A newer qemu-utils (backports) conflicts with Debian 12's qemu-system-x86: take the one that
  # matches qemu-system-x86, which may be a downgrade.
  qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" \
    "qemu-utils=$qemu_version"
else
  log "apt packages present"
fi

# Cargo home may not be on PATH in a non-login shell.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v rustup >/dev/null || { echo "rustup not found: install Rust (rustup) first" >&2; exit 1; }

# The style gates of .ci/run.
for component in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$component"; then
    log "adding $component"
    rustup component add "$component"
  fi
done

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly (needed for -Z build-std=core on bpfel-unknown-none)"
  rustup component add rust-src --toolchain nightly
else
  log "nightly rust-src present"
fi

BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked --no-default-features --features llvm-22
else
  log "bpf-linker $BPF_LINKER_VERSION present"
fi

# bpffs is where the datapath pins its programs and maps.
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
# libvirt without systemd: QEMU runs as root with no sandboxing layers this machine lacks
# (cgroup controllers, mount namespaces, security drivers); guests are TCG (no usable KVM).
getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home libvirt-qemu
QEMU_CONF=/etc/libvirt/qemu.conf
if ! grep -q 'managed by enforcer v2' "$QEMU_CONF" 2>/dev/null; then
  log "writing $QEMU_CONF and libvirtd.conf"
  mkdir -p /etc/libvirt
  cat >"$QEMU_CONF" <<'CONF'
# managed by enforcer v2 (scripts/setup.sh)
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
# QEMU logs to files directly: no virtlogd daemon to run.
stdio_handler = "file"
CONF
  printf '# managed by enforcer\nauth_unix_rw = "none"\n' >/etc/libvirt/libvirtd.conf
fi
LIBVIRTD_PID=/run/enforcer-libvirtd.pid
if ! { [ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1; }; then
  log "starting libvirtd"
  mkdir -p /var/log/libvirt /var/lib/libvirt /run/libvirt
  libvirtd -d --pid-file "$LIBVIRTD_PID"
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.1; done
  virsh -c qemu:///system version >/dev/null
else
  log "libvirtd running"
fi

# The guest the demo and the real-VM tests boot: a Debian kernel, a busybox initramfs and our
# static test application (rebuilt every time: it takes seconds and follows the source).
log "building the guest image (cargo xtask guest)"
cargo xtask guest

log "set-up complete"
