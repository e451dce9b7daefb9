#!/usr/bin/env bash
# Every pin of a lock file has a CPython 3.11 wheel for Linux on aarch64 and on x86_64 (glibc 2.36:
# Debian bookworm, Raspberry Pi OS), and the wheels match the lock's hashes.
#   packaging/check-wheels.sh PIP LOCKFILE [DEST]   DEST keeps the wheels (DEST/aarch64, DEST/x86_64)
set -euo pipefail
pip=$1 lock=$2 dest=${3:-}
keep=$dest
[ -n "$dest" ] || dest=$(mktemp -d)
for arch in aarch64 x86_64; do
  "$(dirname "$0")/wheels.sh" "$pip" "$lock" "$arch" "$dest/$arch" >/dev/null
  echo "$arch: $(ls "$dest/$arch" | wc -l) wheels for $(grep -c '^[a-zA-Z0-9]' "$lock") pins"
done
[ -n "$keep" ] || rm -rf "$dest"
