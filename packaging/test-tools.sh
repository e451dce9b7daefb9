#!/usr/bin/env bash
# The test tools of requirements-test.lock that requirements.lock lacks (pytest and friends), as
# wheels for ARCH (hash-checked), installed into DEST for PYTHONPATH next to an installed package.
#   packaging/test-tools.sh PIP DEST ARCH
set -euo pipefail
pip=$1 dest=$2 arch=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$(dirname "$pip")/python" - requirements.lock requirements-test.lock "$work/tools.txt" <<'PY'
import re, sys
def blocks(path):
    """pip-compile output: one block per pin, from its `name==version` line to the next."""
    out, name = {}, None
    for line in open(path):
        if re.match(r"^[A-Za-z0-9]", line):
            name = re.split(r"[=\s;]", line, maxsplit=1)[0].lower()
            out[name] = []
        if name:
            out[name].append(line)
    return out
runtime, test = blocks(sys.argv[1]), blocks(sys.argv[2])
with open(sys.argv[3], "w") as f:
    for name in sorted(set(test) - set(runtime)):
        f.writelines(line for line in test[name] if not line.lstrip().startswith("#"))
PY
"$(dirname "$0")/wheels.sh" "$pip" "$work/tools.txt" "$arch" "$work/wheels" >/dev/null
platforms=(--platform "manylinux2014_$arch")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
"$pip" install -q --no-index --find-links "$work/wheels" --require-hashes --no-deps --only-binary=:all: \
  "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 --target "$dest" -r "$work/tools.txt"
