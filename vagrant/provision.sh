#!/bin/bash
# Prepares a host of enforcer's testbed for its role. Run as root:
#
#   provision.sh coordinator|hypervisor [FILES_DIR]
#
# - installs the Debian packages the role needs, only those missing (so a box that already has
#   them, see `cargo xtask basebox --include`, provisions without a mirror);
# - mounts bpffs at /sys/fs/bpf, persistently (fstab);
# - creates /etc/enforcer and /var/lib/enforcer;
# - with FILES_DIR (a copy of vagrant/files): installs net-up.sh and the role's systemd units,
#   without enabling them: that needs the binary and the configuration, which
#   `cargo xtask deploy` installs (it runs this script too, so any SSH host can be used).
#
# Idempotent: run it as often as you like.
set -euo pipefail

usage() { echo "usage: $0 coordinator|hypervisor [FILES_DIR]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
role=$1
files=${2:-}
[ "$(id -u)" = 0 ] || { echo "provision.sh: must run as root" >&2; exit 1; }

# Everyone: the tools the docs use against the API.
packages=(curl jq iproute2 ca-certificates)
case "$role" in
  coordinator)
    # The enforcer binary links libvirt (libvirt.so.0, libvirt-qemu.so.0), even when it only
    # coordinates.
    packages+=(libvirt0)
    units=(enforcer-coordinator.service)
    ;;
  hypervisor)
    # libvirt + QEMU for the VMs (software emulation is enough: nested virtualisation is not
    # assumed), bpftool to inspect the pinned maps, nftables for the overlay's source filter.
    packages+=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils bpftool nftables)
    units=(enforcer-net.service enforcer-agent.service)
    ;;
  *) usage ;;
esac

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "provision: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # No recommends: they would bring desktop bits for QEMU and a second libvirt network stack.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "provision: packages present (${packages[*]})"
fi

# bpffs: where the agent pins its maps and links. systemd mounts it on Debian; the fstab line
# makes it explicit and covers hosts where nothing else mounts it.
if ! grep -qsE '^[^#[:space:]]+[[:space:]]+/sys/fs/bpf[[:space:]]' /etc/fstab; then
  echo 'bpf /sys/fs/bpf bpf defaults 0 0' >>/etc/fstab
fi
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

install -d -m 0755 /etc/enforcer /var/lib/enforcer

if [ "$role" = hypervisor ]; then
  kernel=$(uname -r)
  major=${kernel%%.*}
  minor=${kernel#*.}
  minor=${minor%%.*}
  # The agent attaches with tcx links (kernel >= 6.6); Debian 12's own kernel is 6.1, the box
  # built by `cargo xtask basebox` carries bookworm-backports' kernel.
  if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 6 ]; }; then
    echo "provision: WARNING: kernel $kernel is older than 6.6; the agent's tcx attach needs 6.6+" \
      "(install linux-image-amd64 from bookworm-backports and reboot)" >&2
  fi
fi

if [ -n "$files" ]; then
  [ -d "$files" ] || { echo "provision.sh: $files is not a directory" >&2; exit 1; }
  if [ "$role" = hypervisor ]; then
    install -D -m 0755 "$files/net-up.sh" /usr/local/lib/enforcer/net-up.sh
  fi
  for unit in "${units[@]}"; do
    install -m 0644 "$files/$unit" "/etc/systemd/system/$unit"
  done
  systemctl daemon-reload
  echo "provision: installed ${units[*]} (enabled by cargo xtask deploy)"
fi
echo "provision: $role ready"
