#!/usr/bin/env bash
# Install the docs into a package root (build-deb.sh calls it; tests/ops/test_packaging.py runs it
# alone, as a fast check of the package's doc files):
#   packaging/install-docs.sh ROOT VENV      VENV: where the package's virtualenv is installed
#
# audit.md is installed once: the console's SQL cookbook reads it as package data
# (appliance/console/audit.md, a symlink in the source tree that the wheel carries as a copy), so
# the docs' audit.md is a symlink to that copy. Not the other way round: an image that drops
# /usr/share/doc (dpkg path-exclude) would leave the console without its cookbook.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:?usage: packaging/install-docs.sh ROOT VENV}
venv=${2:?usage: packaging/install-docs.sh ROOT VENV}
doc=$root/usr/share/doc/mqtt-appliance
install -D -m 0644 -t "$doc" docs/*.md README.md
install -D -m 0644 -t "$doc/console" docs/console/*.png  # console.md's screenshots
install -D -m 0644 -t "$doc/deploy" docs/deploy/grafana-dashboard.json docs/deploy/prometheus-alerts.yml
ln -sfn "$venv/lib/python3.11/site-packages/appliance/console/audit.md" "$doc/audit.md"
printf 'mqtt-appliance\nLicense: Apache-2.0\nBundled Python packages: see %s/lib/python3.11/site-packages/*.dist-info\n' "$venv" \
  >"$doc/copyright"
