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
TMPFILES = ROOT / "systemd" / "mqtt-appliance.tmpfiles"
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


@needs_systemd
def test_tmpfiles_make_the_directories(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True, timeout=60)
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)], check=True, timeout=60)
    uid = int((tmp_path / "etc/passwd").read_text().split(":")[2])
    state = (tmp_path / "var/lib/mqtt-appliance").stat()
    assert (state.st_uid, state.st_mode & 0o777) == (uid, 0o750)
    credentials = (tmp_path / "etc/mqtt-appliance/credentials").stat()
    assert (credentials.st_uid, credentials.st_mode & 0o777) == (0, 0o700)
    config = (tmp_path / "etc/mqtt-appliance").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (0, uid, 0o750)


def test_lifecycle_settings():
    assert service("Type") == "notify"
    assert service("ExecStart") == EXEC_START
    assert service("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert service("WatchdogSec") == "30"
    assert service("Restart") == "on-failure"
    assert service("KillMode") == "mixed"  # the appliance stops its own mosquitto, after its clients
    # Debian's mosquitto may run beside it on another port; the package stops it only on a collision.
    assert "Conflicts" not in unit()["Unit"]
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_waits_for_the_network():
    assert unit()["Unit"]["Wants"] == unit()["Unit"]["After"] == ["network-online.target"]


def test_secrets_come_as_credentials():
    from appliance.credentials import CREDENTIALS_DIR, UNIT_PREFIX

    assert unit()["Service"]["LoadCredential"] == [f"{UNIT_PREFIX.rstrip('_')}:{CREDENTIALS_DIR}"]
    assert f"d {CREDENTIALS_DIR} 0700 root" in " ".join(TMPFILES.read_text().split())


def test_documentation_points_at_installed_files():
    # The Debian package installs docs/*.md under /usr/share/doc/mqtt-appliance (packaging/build-deb.sh).
    for url in unit()["Unit"]["Documentation"]:
        assert url.startswith("file:///usr/share/doc/mqtt-appliance/"), url
        assert (ROOT / "docs" / Path(url).name).is_file(), url


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
