#!/usr/bin/env bash
# Installs everything enforcer needs on a fresh Debian 12 machine, idempotently:
# apt packages (LLVM 22 for bpf-linker, bpftool, iproute2, iperf3), the nightly rust-src
# component and bpf-linker. Safe to run again: each step is skipped when already done.
set -euo pipefail

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and the demo needs CAP_BPF/CAP_NET_ADMIN)" >&2
  exit 1
fi

APT_PACKAGES=(
  llvm-22-dev libpolly-22-dev clang-22 lld-22   # bpf-linker's LLVM
  bpftool iproute2 iperf3 ethtool pkg-config    # inspection, netns/veth/bridge, offloads, benchmark
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "apt packages present"
fi

# Cargo home may not be on PATH in a non-login shell.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v rustup >/dev/null || { echo "rustup not found: install Rust (rustup) first" >&2; exit 1; }

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
log "set-up complete"
