#!/usr/bin/env bash
# Build the Debian package for one architecture from this checkout (docs/install.md):
#   packaging/build-deb.sh ARCH            ARCH: arm64 or amd64; writes dist/mqtt-appliance_<ver>_<ARCH>.deb
# Environment: PIP (default .venv/bin/pip), DEB_VERSION (default <pyproject version>-1), OUT (dist).
#
# The package holds a virtualenv in /opt/mqtt-appliance/venv for Debian's python3 (3.11): the
# appliance's wheel plus every pin of requirements.lock as a wheel for the target architecture,
# checked against the lock's hashes (pip install --platform ... --only-binary=:all:: nothing is
# compiled, so an x86_64 machine builds the arm64 package). Bytecode is compiled here (CPython 3.11's
# .pyc format is the same in every 3.11.x): the service, under ProtectSystem=strict, could not write it.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: packaging/build-deb.sh arm64|amd64}
case "$arch" in
  arm64) machine=aarch64 ;;
  amd64) machine=x86_64 ;;
  *) echo "unknown architecture $arch (arm64 or amd64)" >&2; exit 2 ;;
esac
pip=${PIP:-.venv/bin/pip}
python=$(dirname "$pip")/python
upstream=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
version=${DEB_VERSION:-$upstream-1}
out=${OUT:-dist}
build=build/deb/$arch
root=$build/root
venv=/opt/mqtt-appliance/venv
site=$root$venv/lib/python3.11/site-packages

rm -rf "$build"
mkdir -p "$build/wheel" "$out"
# The appliance itself: a pure-Python wheel.
"$pip" wheel -q --no-deps -w "$build/wheel" .
wheel=$(ls "$build"/wheel/mqtt_governance_appliance-*.whl)

# The dependencies for the target architecture, from the lock only (hash-checked), then the app.
packaging/wheels.sh "$pip" requirements.lock "$machine" "$build/wheels"
platforms=(--platform "manylinux2014_$machine")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$machine"); done
"$pip" install -q --no-index --find-links "$build/wheels" --require-hashes --no-deps --only-binary=:all: \
  "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
  --target "$site" -r requirements.lock
# Console scripts pip writes are for this machine's interpreter; the package has its own two below.
rm -rf "$site/bin"
"$pip" install -q --no-index --no-deps --target "$site" "$wheel"
rm -rf "$site/bin"

# A virtualenv around them for Debian's python3, as `python3 -m venv` would lay it out.
mkdir -p "$root$venv/bin"
ln -s /usr/bin/python3 "$root$venv/bin/python3"
ln -s python3 "$root$venv/bin/python"
ln -s lib "$root$venv/lib64"
printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11\n' >"$root$venv/pyvenv.cfg"
for script in appliance:appliance.cli replay:replay.cli; do
  name=${script%%:*} module=${script#*:}
  printf '#!%s/bin/python3\nimport sys\nfrom %s import main\nsys.exit(main())\n' "$venv" "$module" >"$root$venv/bin/$name"
  chmod 0755 "$root$venv/bin/$name"
done
"$python" -m compileall -q -j0 "$site" >/dev/null

# systemd: unit, account and directories where systemd looks for a package's files.
install -D -m 0644 systemd/mqtt-appliance.service "$root/usr/lib/systemd/system/mqtt-appliance.service"
install -D -m 0644 systemd/mqtt-appliance-console.service "$root/usr/lib/systemd/system/mqtt-appliance-console.service"
install -D -m 0644 systemd/mqtt-appliance.sysusers "$root/usr/lib/sysusers.d/mqtt-appliance.conf"
install -D -m 0644 systemd/mqtt-appliance.tmpfiles "$root/usr/lib/tmpfiles.d/mqtt-appliance.conf"
# The config and the demo schema set (conffiles: local edits survive upgrades).
install -D -m 0644 packaging/debian/appliance.yaml "$root/etc/mqtt-appliance/appliance.yaml"
mkdir -p "$root/etc/mqtt-appliance/schemas"
cp -r schemas/v1/. "$root/etc/mqtt-appliance/schemas/"
install -d -m 0700 "$root/etc/mqtt-appliance/credentials"
# Commands on PATH, docs where Documentation= points, examples.
mkdir -p "$root/usr/bin"
ln -s "$venv/bin/appliance" "$root/usr/bin/appliance"
ln -s "$venv/bin/replay" "$root/usr/bin/replay"
packaging/install-docs.sh "$root" "$venv"  # audit.md once: the docs' copy links to the console's
[ -f "$site/appliance/console/audit.md" ] && [ ! -L "$site/appliance/console/audit.md" ] \
  || { echo "the wheel carries no appliance/console/audit.md (the docs' audit.md links to it)" >&2; exit 1; }
mkdir -p "$root/usr/share/mqtt-appliance/schemas"
cp -r schemas/v1 schemas/v2 "$root/usr/share/mqtt-appliance/schemas/"
install -D -m 0644 packaging/debian/mosquitto_collision.py "$root/usr/lib/mqtt-appliance/mosquitto_collision.py"

# Control files.
mkdir -p "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" packaging/debian/control.in >"$root/DEBIAN/control"
(cd "$root" && find etc -type f | sed 's|^|/|' | sort) >"$root/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"
find "$root" -type d -exec chmod g-w,o-w {} +
chmod 0700 "$root/etc/mqtt-appliance/credentials"

deb=$out/mqtt-appliance_${version}_$arch.deb
dpkg-deb --build --root-owner-group -Zxz "$root" "$deb" >/dev/null
echo "$deb ($(du -h "$deb" | cut -f1), $((size / 1024)) MB installed)"
