#!/usr/bin/env bash
# A Debian bookworm root filesystem for ARCH (default arm64), built once with debootstrap and cached
# outside the repository (docs/install.md, "Proven on arm64"). Prints its path.
#   packaging/rootfs.sh [ARCH]
#   ROOTFS_CACHE   where to keep it (default /var/cache/mqtt-appliance)
#   DEBIAN_MIRROR  (default: Debian's own)
# Needs root and debootstrap; for arm64 on x86_64, qemu-user registered with binfmt_misc
# (packaging/emulation.sh).
set -euo pipefail
arch=${1:-arm64}
cache=${ROOTFS_CACHE:-/var/cache/mqtt-appliance}
mirror=${DEBIAN_MIRROR:-}  # empty: debootstrap's default mirror
base=$cache/rootfs-$arch
# What a Raspberry Pi OS Lite image has that the appliance and its smoke test use. The package's own
# Depends (mosquitto, python3) are in here too, so installing it needs no network.
include=python3,mosquitto,mosquitto-clients,ca-certificates,openssl,procps,systemd,systemd-sysv,dbus,iproute2,netbase
stamp=$base/.mqtt-appliance-rootfs-$(echo "$include" | cksum | cut -d' ' -f1)
if [ -e "$stamp" ]; then
  echo "$base"
  exit 0
fi
mkdir -p "$cache"
work=$cache/rootfs-$arch.partial
rm -rf "$work"
echo "debootstrap bookworm $arch into $work (3-5 minutes)" >&2
debootstrap --arch="$arch" --variant=minbase --include="$include" bookworm "$work" ${mirror:+"$mirror"} >&2 \
  || { echo "debootstrap failed; see $work/debootstrap/debootstrap.log" >&2; exit 1; }
# What a real image has: a hosts file with localhost, and no services started by package scripts.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tgateway\n' >"$work/etc/hosts"
echo gateway >"$work/etc/hostname"
printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
chmod 0755 "$work/usr/sbin/policy-rc.d"
rm -rf "$base"
mv "$work" "$base"
touch "$stamp"
echo "$base"
