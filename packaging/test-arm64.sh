#!/usr/bin/env bash
# `make test-arm64`: the arm64 package, proven on arm64 under emulation (docs/install.md).
#   packaging/test-arm64.sh DEB [FULL]
# 1. a Debian bookworm arm64 root filesystem (packaging/rootfs.sh, cached and reused), run
#    with qemu-user through binfmt_misc (packaging/emulation.sh), each time on a throw-away overlay;
# 2. dpkg -i of the package, then packaging/smoke.sh;
# 3. dpkg -i of the same package as a newer version over it: config edits and state survive, and the
#    smoke test passes again;
# 4. the codec, governance and replay tests (FULL=1: the whole suite; TESTS="PATHS": those) on the installed package, with
#    the test tools from requirements-test.lock as aarch64 wheels.
# APPLIANCE_TIMEOUT_SCALE (default 8) multiplies the timeouts that emulation makes too short.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "${1:?usage: packaging/test-arm64.sh DEB [FULL]}")
full=${2:-}
pip=${PIP:-.venv/bin/pip}
scale=${APPLIANCE_TIMEOUT_SCALE:-8}
begin=$(date +%s)
say() { printf '\n### %s (%ss)\n' "$*" "$(( $(date +%s) - begin ))"; }

packaging/emulation.sh
say "root filesystem"
rootfs=$(packaging/rootfs.sh arm64)
run=$(mktemp -d /var/tmp/mqtt-appliance-arm64.XXXXXX)
root=$run/merged
mkdir -p "$run/upper" "$run/work" "$root"
mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$run/upper,workdir=$run/work" "$root"
cleanup() { umount "$root" 2>/dev/null || umount -l "$root"; rm -rf "$run"; }
trap cleanup EXIT
inside() {  # run a command in the arm64 root filesystem (systemd-nspawn: /proc, /dev, host network)
  systemd-nspawn -q -D "$root" --register=no --keep-unit --pipe --chdir=/var/tmp \
    --setenv=APPLIANCE_TIMEOUT_SCALE="$scale" "$@" 2> >(grep -v '^Attempted to remove disk file system' >&2)
}
cp "$deb" packaging/smoke.sh "$root/var/tmp/"

say "install $(basename "$deb")"
inside dpkg -i "/var/tmp/$(basename "$deb")"
say "smoke test"
smoke_begin=$(date +%s)
inside bash /var/tmp/smoke.sh
smoke_s=$(( $(date +%s) - smoke_begin ))

say "upgrade: the same package as a newer version over it"
version=$(dpkg-deb -f "$deb" Version)
newer=$run/mqtt-appliance_${version}+upgrade_arm64.deb
dpkg-deb -R "$deb" "$run/repack"
sed -i "s/^Version: .*/Version: ${version}+upgrade/" "$run/repack/DEBIAN/control"
dpkg-deb --build -Zzstd "$run/repack" "$newer" >/dev/null
rm -rf "$run/repack"
cp "$newer" "$root/var/tmp/"
count='SELECT count(*) AS n FROM decisions'
before_config=$(md5sum <"$root/etc/mqtt-appliance/appliance.yaml")
before_audit=$(inside appliance audit sql --config /etc/mqtt-appliance/appliance.yaml --format csv "$count" | grep -E "^[0-9]+$")
inside dpkg -i "/var/tmp/$(basename "$newer")"
[ "$(inside dpkg-query -W -f '${Version}' mqtt-appliance)" = "${version}+upgrade" ] || { echo "upgrade did not install" >&2; exit 1; }
[ "$(md5sum <"$root/etc/mqtt-appliance/appliance.yaml")" = "$before_config" ] \
  || { echo "the upgrade changed the edited config" >&2; exit 1; }
after_audit=$(inside appliance audit sql --config /etc/mqtt-appliance/appliance.yaml --format csv "$count" | grep -E "^[0-9]+$")
[ "$after_audit" = "$before_audit" ] && [ "$after_audit" -ge 2 ] \
  || { echo "audit log before/after the upgrade: $before_audit/$after_audit decisions" >&2; exit 1; }
echo "config kept, audit log kept ($after_audit decisions)"
inside bash /var/tmp/smoke.sh

say "tests on the installed package"
testdeps=$run/testdeps
packaging/test-tools.sh "$pip" "$testdeps" aarch64
mv "$testdeps" "$root/var/tmp/testdeps"
mkdir -p "$root/var/tmp/src"
# Everything but the sources, whose place takes the package installed in /opt/mqtt-appliance/venv
# (symbolic links to it): the tests import and read what the package installed.
tar -C . --anchored --exclude=./appliance --exclude=./replay --exclude=./.venv --exclude=./.git \
  --exclude=./build --exclude=./dist --exclude=./.state --exclude='*/__pycache__' -cf - . | tar -C "$root/var/tmp/src" -xf -
for package in appliance replay; do
  ln -s "/opt/mqtt-appliance/venv/lib/python3.11/site-packages/$package" "$root/var/tmp/src/$package"
done
if [ -n "${TESTS:-}" ]; then read -ra targets <<<"$TESTS"    # make test-arm64 TESTS="tests/audit/test_seal.py ..."
elif [ -n "$full" ]; then targets=(tests); else targets=(tests/mqtt tests/governance tests/replay); fi
tests_begin=$(date +%s)
inside --chdir=/var/tmp/src --setenv=PYTHONPATH=/var/tmp/testdeps \
  /opt/mqtt-appliance/venv/bin/python -m pytest -q -p no:cacheprovider --timeout=$(( 120 * scale )) "${targets[@]}"
tests_s=$(( $(date +%s) - tests_begin ))
say "arm64: package installed, smoke test ${smoke_s}s, upgrade kept config and state, ${targets[*]} passed in ${tests_s}s"
