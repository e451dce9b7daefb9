"""Real processes for end-to-end tests: `appliance run` and standalone mosquittos."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tests.helpers import scaled, wait_until

_logs: dict[int, IO[str]] = {}


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768+ on Linux): ports the kernel
    hands out for bind(0) (mosquitto's, metrics') can never collide with one chosen here."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def start_appliance(args: list[str], *, port: int | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    """`python -m appliance run ARGS`; when `port` is given, returns once it listens there.
    Its output goes to a file (a pipe nobody reads could fill and block it): see `output()`."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", *args], cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    _logs[proc.pid] = log
    if port is not None:
        def listening() -> bool:
            assert proc.poll() is None, output(proc)
            return can_connect(port)

        wait_until(listening, timeout=scaled(30), message=f"appliance listening on {port}")
    return proc


def output(proc: subprocess.Popen[str]) -> str:
    """Everything the appliance printed so far."""
    log = _logs[proc.pid]
    log.seek(0)
    return log.read()


@contextmanager
def appliance_process(args: list[str], *, port: int, cwd: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = start_appliance(args, port=port, cwd=cwd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(scaled(20))
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def mosquitto_process(conf: str, directory: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A standalone mosquitto (an "external" broker) with this config text, listening on `port`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen(["mosquitto", "-c", str(directory / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: can_connect(port), message=f"mosquitto on {port}")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
