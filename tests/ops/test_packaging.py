"""The Debian package's pieces that run on the gateway: the check that decides whether Debian's
mosquitto service collides with the appliance, and the packaged config. (`make deb` and
`make test-arm64` build and install the package itself.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "packaging" / "debian"
SCRIPT = DEBIAN / "mosquitto_collision.py"


def collision_module():
    spec = importlib.util.spec_from_file_location("mosquitto_collision", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mosquitto_without_listeners_uses_1883(tmp_path):
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("pid_file /run/mosquitto/mosquitto.pid\npersistence true\n")
    assert collision_module().mosquitto_ports(conf) == {1883}


def test_listeners_in_included_files_count(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "lan.conf").write_text("listener 1884 0.0.0.0  # the LAN\nallow_anonymous true\n")
    (tmp_path / "conf.d" / "tls.conf").write_text("listener 8883\n# listener 9999\n")
    (tmp_path / "conf.d" / "notes.txt").write_text("listener 7777\n")  # not a .conf: mosquitto ignores it
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"include_dir {tmp_path / 'conf.d'}\n")
    assert collision_module().mosquitto_ports(conf) == {1884, 8883}


def run(config: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(config), str(conf)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("mosquitto", "appliance_listen", "collides"), [
    ("", "0.0.0.0:1883", True),                # both on their defaults: the packaged case
    ("listener 1884\n", "0.0.0.0:1883", False),
    ("", "127.0.0.1:1885", False),
    ("listener 8883\n", "127.0.0.1:1883", False),
])
def test_collision_exit_codes(tmp_path, mosquitto, appliance_listen, collides):
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(mosquitto)
    config = tmp_path / "appliance.yaml"
    config.write_text(f"listen: {appliance_listen}\nstate_dir: state\n")
    result = run(config, conf)
    assert result.returncode == (0 if collides else 1), result.stderr
    assert ("both listen on port 1883" in result.stdout) == collides


def test_an_unreadable_config_leaves_mosquitto_alone(tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text("listen: [oops\n")
    result = run(config, tmp_path / "none.conf")
    assert result.returncode == 2 and "left as it is" in result.stderr


def test_the_packaged_config_is_valid_and_collides_with_debian_defaults(tmp_path):
    config = load_config(DEBIAN / "appliance.yaml")
    assert str(config.state_dir) == "/var/lib/mqtt-appliance" and str(config.schemas) == "/etc/mqtt-appliance/schemas"
    assert str(config.metrics.listen) == "127.0.0.1:9100"
    assert run(DEBIAN / "appliance.yaml", tmp_path / "default.conf").returncode == 0


def test_control_depends_on_debians_python_311_and_mosquitto():
    control = (DEBIAN / "control.in").read_text()
    depends = next(line for line in control.splitlines() if line.startswith("Depends:"))
    # The wheels are for CPython 3.11's ABI: Debian 13's python3 (3.13) cannot load them.
    assert "python3 (>= 3.11)" in depends and "python3 (<< 3.12)" in depends and "mosquitto" in depends


VENV = "/opt/mqtt-appliance/venv"  # packaging/build-deb.sh


def test_the_package_installs_audit_md_once(tmp_path: Path) -> None:
    """The docs the package installs (packaging/install-docs.sh, as build-deb.sh runs it), beside
    the wheel's package data as pip lays it out: one audit.md file (the console's cookbook), and
    the docs' audit.md a link to it; every screenshot console.md shows is there."""
    from appliance.console import cookbook

    root = tmp_path / "root"
    subprocess.run([str(ROOT / "packaging" / "install-docs.sh"), str(root), VENV], check=True, timeout=60)
    packaged = f"{VENV}/lib/python3.11/site-packages/appliance/console/{cookbook.PACKAGED}"
    (root / packaged.lstrip("/")).parent.mkdir(parents=True)
    (root / packaged.lstrip("/")).write_bytes((ROOT / "docs" / "audit.md").read_bytes())  # the wheel's copy

    doc = root / "usr" / "share" / "doc" / "mqtt-appliance"
    assert (doc / "audit.md").is_symlink() and str((doc / "audit.md").readlink()) == packaged
    copies = [p for p in root.rglob("audit.md") if p.is_file() and not p.is_symlink()]
    assert copies == [root / packaged.lstrip("/")]
    installed = sorted(p.name for p in doc.glob("*.md"))
    assert installed == sorted([p.name for p in (ROOT / "docs").glob("*.md")] + ["README.md"])
    shown = __import__("re").findall(r"\]\((console/[^)]*\.png)\)", (doc / "console.md").read_text())
    assert shown and all((doc / image).stat().st_size for image in shown)
    build = (ROOT / "packaging" / "build-deb.sh").read_text()
    assert 'packaging/install-docs.sh "$root" "$venv"' in build and "docs/*.md" not in build
    assert f'venv={VENV}' in build
