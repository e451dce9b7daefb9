"""The systemd unit and sysusers file: valid for systemd, and the settings the appliance relies on."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "mqtt-appliance.service"
SYSUSERS = ROOT / "systemd" / "mqtt-appliance.sysusers"
EXEC_START = "/opt/mqtt-appliance/venv/bin/appliance run --config /etc/mqtt-appliance/appliance.yaml"

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def unit() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def service(key: str) -> str:
    return " ".join(unit()["Service"][key])


@needs_systemd
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path):
    # verify insists that ExecStart's binary exists: point it at this venv's entry point.
    appliance = Path(sys.executable).parent / "appliance"
    assert appliance.exists()
    text = UNIT.read_text()
    assert EXEC_START in text
    (tmp_path / UNIT.name).write_text(text.replace("/opt/mqtt-appliance/venv/bin/appliance", str(appliance)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT.name)], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "mqtt-appliance.service" not in result.stderr, result.stderr  # no warnings about our unit


@needs_systemd
def test_sysusers_creates_the_service_account(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True, timeout=60)
    name, _, uid, gid, _, home, shell = (tmp_path / "etc/passwd").read_text().strip().split(":")
    assert (name, home, shell) == ("mqtt-appliance", "/var/lib/mqtt-appliance", "/usr/sbin/nologin")
    assert int(uid) < 1000 and uid == gid  # a system account with its own group


def test_lifecycle_settings():
    assert service("Type") == "notify"
    assert service("ExecStart") == EXEC_START
    assert service("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert service("WatchdogSec") == "30"
    assert service("Restart") == "on-failure"
    assert service("KillMode") == "mixed"  # the appliance stops its own mosquitto, after its clients
    assert "mosquitto.service" in unit()["Unit"]["Conflicts"]
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_account_and_directories():
    assert service("User") == service("Group") == "mqtt-appliance"
    assert "mqtt-appliance" in SYSUSERS.read_text()
    # StateDirectory= makes /var/lib/mqtt-appliance, the default state_dir, writable under ProtectSystem=strict.
    assert service("StateDirectory") == "mqtt-appliance"
    assert service("ConfigurationDirectory") == "mqtt-appliance"


@pytest.mark.parametrize(("key", "value"), [
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("LockPersonality", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("RestrictNamespaces", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
])
def test_hardening(key: str, value: str):
    assert service(key) == value


def test_system_calls_are_filtered():
    filters = unit()["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service"


def test_unit_parses_as_ini():
    """No duplicate sections or stray lines (configparser is stricter about layout than systemd)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]


def test_the_sysusers_file_says_where_to_install_it_as_the_install_guide_does():
    comment = (ROOT / "systemd" / "mqtt-appliance.sysusers").read_text()
    [installed_as] = re.findall(r"install\s+as\s+(?:#\s*)?(\S+sysusers\.d/\S+?)[,)]", comment)
    assert f"systemd/mqtt-appliance.sysusers {installed_as}" in (ROOT / "docs" / "install.md").read_text()
