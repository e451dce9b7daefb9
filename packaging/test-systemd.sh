#!/usr/bin/env bash
# The package's unit under a real systemd: boot a Debian bookworm root filesystem of the package's
# architecture with systemd-nspawn, install the package, and let packaging/systemd-check.sh start,
# use, reload, upgrade and stop the service there (docs/install.md, "A real systemd").
#   packaging/test-systemd.sh DEB
# An arm64 package on an x86_64 machine boots under qemu-user, where systemd cannot set up
# credentials (every unit with LoadCredential=, its own systemd-sysusers and systemd-tmpfiles
# included, fails with 243/CREDENTIALS "Invalid argument"): there a drop-in resets LoadCredential=
# and the check leaves out the TLS listener whose key is a credential.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "${1:?usage: packaging/test-systemd.sh DEB}")
arch=$(dpkg-deb -f "$deb" Architecture)
[ "$(id -u)" = 0 ] || { echo "needs root (debootstrap, mounts, systemd-nspawn)" >&2; exit 1; }
command -v systemd-nspawn >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-container debootstrap >&2
begin=$(date +%s)
rootfs=$(packaging/rootfs.sh "$arch")
run=$(mktemp -d /var/tmp/mqtt-appliance-systemd.XXXXXX)
root=$run/merged
mkdir -p "$run/upper" "$run/work" "$root"
mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$run/upper,workdir=$run/work" "$root"
cleanup() { umount "$root" 2>/dev/null || umount -l "$root"; rm -rf "$run"; }
trap cleanup EXIT
cp "$deb" packaging/systemd-check.sh "$root/var/tmp/"
# The same package as a newer version, for an upgrade while the service runs.
version=$(dpkg-deb -f "$deb" Version)
dpkg-deb -R "$deb" "$run/repack"
sed -i "s/^Version: .*/Version: ${version}+upgrade/" "$run/repack/DEBIAN/control"
dpkg-deb --build -Zzstd "$run/repack" "$root/var/tmp/newer.deb" >/dev/null
rm -rf "$run/repack"
systemd-nspawn -q -D "$root" --register=no --keep-unit --pipe dpkg -i "/var/tmp/$(basename "$deb")" \
  2> >(grep -v '^Attempted to remove disk file system' >&2)
emulated=
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  packaging/emulation.sh
  emulated=emulated
  mkdir -p "$root/etc/systemd/system/mqtt-appliance.service.d"
  printf '# qemu-user: systemd cannot set up credentials (packaging/test-systemd.sh)\n[Service]\nLoadCredential=\n' \
    >"$root/etc/systemd/system/mqtt-appliance.service.d/emulated.conf"
fi
ports=$(python3 -c 'import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
cat >"$root/etc/systemd/system/mqtt-appliance-check.service" <<UNIT
[Unit]
Description=Check mqtt-appliance.service under systemd
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /var/tmp/systemd-check.sh $ports $emulated
UNIT
ln -s /etc/systemd/system/mqtt-appliance-check.service "$root/etc/systemd/system/default.target.wants/mqtt-appliance-check.service" 2>/dev/null \
  || { mkdir -p "$root/etc/systemd/system/default.target.wants"; ln -s /etc/systemd/system/mqtt-appliance-check.service "$root/etc/systemd/system/default.target.wants/"; }
timeout 600 systemd-nspawn -q -D "$root" --register=no --keep-unit -b >"$run/console.log" 2>&1 || true
cat "$root/var/tmp/systemd-log" 2>/dev/null || true
if ! grep -q '^PASS' "$root/var/tmp/systemd-result" 2>/dev/null; then
  echo "the unit under systemd: $(cat "$root/var/tmp/systemd-result" 2>/dev/null || echo 'no result; console:')" >&2
  tail -30 "$run/console.log" >&2
  exit 1
fi
echo "systemd ($arch${emulated:+, emulated}): $(cat "$root/var/tmp/systemd-result") ($(( $(date +%s) - begin ))s)"
