#!/usr/bin/env bash
# Download the wheels of a lock file for one Linux architecture into DEST, checked against the lock's
# hashes, without building anything (--only-binary): a pin without such a wheel fails here.
#   packaging/wheels.sh PIP LOCKFILE ARCH DEST     ARCH: aarch64 or x86_64
set -euo pipefail
pip=$1 lock=$2 arch=$3 dest=$4
# pip does not widen a manylinux_2_X platform to older glibc versions itself: name each one, up to
# bookworm's glibc 2.36.
platforms=(--platform "manylinux2014_$arch")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
mkdir -p "$dest"
"$pip" download -q --no-deps --require-hashes --only-binary=:all: "${platforms[@]}" \
  --python-version 3.11 --implementation cp --abi cp311 -r "$lock" -d "$dest"
