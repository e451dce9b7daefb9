#!/usr/bin/env bash
# Make this x86_64 machine run arm64 binaries: the tools `make test-arm64` needs (from apt when
# missing: debootstrap, qemu-user-static, binfmt-support, systemd-nspawn) and qemu-aarch64
# registered with binfmt_misc, mounting binfmt_misc first where it is not (containers).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "make test-arm64 needs root (debootstrap, mounts, systemd-nspawn)" >&2; exit 1; }
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing with apt: ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
if [ ! -e "$entry" ] || ! grep -q '^enabled' "$entry"; then
  update-binfmts --enable qemu-aarch64 >&2 || update-binfmts --import qemu-aarch64 >&2
fi
# F (fix binary): the interpreter is opened now, so it works inside the arm64 root filesystem too.
grep -q '^enabled' "$entry" && grep -q '^flags: .*F' "$entry" \
  || { echo "qemu-aarch64 is not registered with binfmt_misc (flag F): $(cat "$entry" 2>&1)" >&2; exit 1; }
