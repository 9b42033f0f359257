#!/bin/bash
# enforcer-net: this hypervisor host's VM bridge and its VXLAN-GBP overlay to the other hosts.
#
# Run by enforcer-net.service before the agent; values come from /etc/enforcer/net.env (or the
# file given as $1), written by `cargo xtask deploy`:
#   NET_LOCAL_IP   this host's address on the underlay (the private network), required
#   NET_PEERS      the other hypervisor hosts' underlay addresses, space-separated
#   NET_BRIDGE     the VM bridge the agent attaches to (enfbr0)
#   NET_VXLAN      the overlay device, a port of that bridge (enfvx0)
#   NET_VNI, NET_DSTPORT, NET_MTU  (4242, 4789, 1450)
#
# Idempotent: the bridge is created once and never deleted (the VMs' taps hang on it); the
# VXLAN device is recreated so that changed peers or addresses take effect (the agent follows
# ports that come and go).
set -euo pipefail

conf=${1:-/etc/enforcer/net.env}
if [ -r "$conf" ]; then
  # shellcheck disable=SC1090
  . "$conf"
fi

die() { echo "enforcer-net: $*" >&2; exit 1; }

: "${NET_LOCAL_IP:?NET_LOCAL_IP is not set (in $conf)}"
bridge=${NET_BRIDGE:-enfbr0}
vxlan=${NET_VXLAN:-enfvx0}
vni=${NET_VNI:-4242}
dstport=${NET_DSTPORT:-4789}
# VXLAN adds 50 bytes (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14) to every frame, so
# on a 1500-byte underlay the overlay, the bridge and the guests' NICs must stay at 1450.
mtu=${NET_MTU:-1450}
peers=${NET_PEERS:-}

# The underlay address is configured by the distribution's networking (vagrant's private
# network, or the operator's); it may come up a little after us.
for _ in $(seq 1 30); do
  if ip -o -4 addr show | grep -q " inet ${NET_LOCAL_IP}/"; then
    break
  fi
  sleep 1
done
ip -o -4 addr show | grep -q " inet ${NET_LOCAL_IP}/" ||
  die "no interface has the underlay address ${NET_LOCAL_IP} after 30 s (check the private network)"

if ! ip link show dev "$bridge" >/dev/null 2>&1; then
  ip link add "$bridge" type bridge
fi
# An explicit MTU pins the bridge at the overlay's size: libvirt gives new taps the bridge's
# MTU, and a bridge whose MTU was set by hand is not raised again by a 1500-byte port.
ip link set dev "$bridge" mtu "$mtu"
ip link set dev "$bridge" up

if ip link show dev "$vxlan" >/dev/null 2>&1; then
  ip link del dev "$vxlan"
fi
# gbp: the VXLAN header carries the Group Policy ID, which the kernel fills from skb->mark on
# transmit and copies into skb->mark on receive: the frame's color travels in it.
# Learning stays on: remote MACs are learnt from received frames, and unknown destinations are
# flooded to every peer through the all-zeros FDB entries below (head-end replication).
ip link add "$vxlan" type vxlan id "$vni" dstport "$dstport" local "$NET_LOCAL_IP" gbp
ip link set dev "$vxlan" mtu "$mtu"
for peer in $peers; do
  [ "$peer" = "$NET_LOCAL_IP" ] && continue
  bridge fdb append 00:00:00:00:00:00 dev "$vxlan" dst "$peer"
done
ip link set dev "$vxlan" master "$bridge"
ip link set dev "$vxlan" up

# Source filtering (case S5 of the security review): the VXLAN socket takes packets from any
# address on any local interface, and a packet's Group Policy ID is a frame's color. Only the
# peers may send to the overlay's port; anything else is dropped before the VXLAN device sees
# it. (The agents also drop colors above what the coordinator announced: docs/security.md.)
peer_set=""
for peer in $peers; do
  [ "$peer" = "$NET_LOCAL_IP" ] && continue
  peer_set+="${peer_set:+, }$peer"
done
if [ -n "$peer_set" ]; then
  overlay_rule="udp dport $dstport ip saddr != { $peer_set } counter drop"
else
  overlay_rule="udp dport $dstport counter drop"
fi
nft -f - <<NFT
table inet enforcer_overlay
delete table inet enforcer_overlay
table inet enforcer_overlay {
  chain input {
    type filter hook input priority -10; policy accept;
    $overlay_rule
  }
}
NFT

echo "enforcer-net: $bridge up (mtu $mtu), $vxlan vni $vni local $NET_LOCAL_IP gbp, peers: ${peers:-none}; udp $dstport from peers only"
