"""A real appliance (`appliance run`, its own mosquitto) and a real console (`appliance console`) as
processes, with a password file of one operator and one viewer, and a schema set in a temp dir
that tests may change (release needs a message the set in force now accepts)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from appliance import admin
from appliance.security import PasswordFile
from tests.helpers import scaled, wait_until
from tests.processes import appliance_process, can_connect, free_port

REPO = Path(__file__).resolve().parents[2]
OPERATOR, OPERATOR_PASSWORD = "olga", "operator-pw-1"
VIEWER, VIEWER_PASSWORD = "vic", "viewer-pw-2"
STRICT_MAXIMUM = 50  # the temperature schema's maximum while the tests start: 70 °C is rejected


@dataclass
class Setup:
    root: Path
    config: Path
    state_dir: Path
    schemas: Path
    candidates: Path
    mqtt_port: int
    console_port: int
    appliance: subprocess.Popen[str] | None = None
    console: subprocess.Popen[str] | None = None
    console_log: IO[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"

    def set_maximum(self, maximum: int) -> None:
        """Change the temperature schema in force and reload the appliance (the console reads it too)."""
        path = self.schemas / "temperature.json"
        schema = json.loads(path.read_text())
        schema["properties"]["temperature"]["maximum"] = maximum
        path.write_text(json.dumps(schema, indent=2))
        admin.call(self.state_dir, "reload", timeout=30)

    def console_output(self) -> str:
        assert self.console_log is not None
        self.console_log.seek(0)
        return self.console_log.read()


def write_setup(root: Path, **console: object) -> Setup:
    schemas = root / "sets" / "active"
    shutil.copytree(REPO / "schemas" / "v1", schemas)
    candidates = root / "sets" / "candidates"
    shutil.copytree(REPO / "schemas" / "v2", candidates / "v2")
    setup = Setup(root, root / "appliance.yaml", root / "state", schemas, candidates, free_port(), free_port())
    temperature = json.loads((schemas / "temperature.json").read_text())
    temperature["properties"]["temperature"]["maximum"] = STRICT_MAXIMUM
    (schemas / "temperature.json").write_text(json.dumps(temperature, indent=2))
    passwords = PasswordFile()
    passwords.set(OPERATOR, OPERATOR_PASSWORD)
    passwords.set(VIEWER, VIEWER_PASSWORD)
    passwords.save(root / "passwd")
    section = {"listen": f"127.0.0.1:{setup.console_port}", "operators": [OPERATOR], "viewers": [VIEWER],
               "trial_roots": [str(candidates)], **console}
    config = {
        "listen": f"127.0.0.1:{setup.mqtt_port}", "state_dir": str(setup.state_dir), "schemas": str(schemas),
        "metrics": {"enabled": False}, "reload_on_change": False,
        # Clients connect without a user (loopback); the password file is the console's users.
        "auth": {"password_file": str(root / "passwd"), "allow_anonymous": True},
        "audit": {"durability": "os_buffered"},
        "console": section,
    }
    setup.config.write_text(json.dumps(config))
    return setup


def start_console(setup: Setup, *extra: str) -> subprocess.Popen[str]:
    log = tempfile.TemporaryFile(mode="w+")
    setup.console_log = log
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "console", "--config", str(setup.config), *extra],
                            stdout=log, stderr=subprocess.STDOUT, text=True)

    def listening() -> bool:
        assert proc.poll() is None, setup.console_output()
        return can_connect(setup.console_port)

    wait_until(listening, timeout=scaled(30), message="console listening")
    return proc


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(scaled(20))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def running() -> Iterator[Setup]:
    """One appliance and one console for a module's tests (they start in seconds, not milliseconds)."""
    root = Path(tempfile.mkdtemp(prefix="console-test-"))
    setup = write_setup(root)
    try:
        with appliance_process(["--config", str(setup.config)], port=setup.mqtt_port) as proc:
            setup.appliance = proc
            wait_until(lambda: admin.socket_path(setup.state_dir).exists(), message="admin socket")
            setup.console = start_console(setup)
            try:
                yield setup
            finally:
                stop(setup.console)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Browser:
    """A plain HTTP client with a cookie jar (http.client: what a script or curl would send)."""

    def __init__(self, port: int):
        self.port = port
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    def request(self, method: str, path: str, body: dict[str, str | list[str]] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = {"Accept": "text/html", **(headers or {})}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = None
        if body is not None:
            data = urllib.parse.urlencode(body, doseq=True).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                self.set_cookie_headers.append(value)
                cookie, _, _ = value.partition(";")
                key, _, val = cookie.partition("=")
                if val and "Max-Age=0" not in value and 'expires=Thu, 01 Jan 1970' not in value:
                    self.cookies[key.strip()] = val.strip()
                else:
                    self.cookies.pop(key.strip(), None)
        connection.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text

    def get(self, path: str, **headers: str) -> tuple[int, str]:
        status, _, text = self.request("GET", path, headers=headers)
        return status, text

    def login(self, user: str, password: str) -> int:
        status, _, _ = self.request("POST", "/login", {"user": user, "password": password, "next": "/"})
        return status

    def csrf(self) -> str:
        status, text = self.get("/")
        assert status == 200, text
        match = re.search(r'"X-CSRF-Token": "([^"]+)"', text)
        assert match, text
        return match.group(1)

    def post(self, path: str, body: dict[str, str | list[str]], *, csrf: str | None = None,
             origin: str | None = None) -> tuple[int, str]:
        headers = {"HX-Request": "true"}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        if origin is not None:
            headers["Origin"] = origin
        status, _, text = self.request("POST", path, body, headers)
        return status, text
