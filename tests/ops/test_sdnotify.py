"""sd_notify against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import sdnotify


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    sdnotify._claimed.clear()
    yield
    sdnotify._claimed.clear()


def _socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket as systemd would listen on, named in $NOTIFY_SOCKET."""
    if request.param == "path":
        path = str(tmp_path / "notify")
        sock, variable = _socket(path), path
    else:
        name = f"appliance-test-{uuid.uuid4().hex}"
        sock, variable = _socket("\0" + name), "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", variable)
    with sock:
        yield sock


def test_outside_systemd_nothing_is_sent():
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_interval() is None


def test_notify_sends_one_datagram(systemd: socket.socket):
    assert sdnotify.notify("READY=1\nSTATUS=serving MQTT on 0.0.0.0:1883") is True
    assert systemd.recv(4096) == b"READY=1\nSTATUS=serving MQTT on 0.0.0.0:1883"


def test_reloading_carries_the_monotonic_time(systemd: socket.socket):
    sdnotify.notify(sdnotify.reloading())
    first, second = systemd.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("READY=1") is False


def test_relative_or_vsock_addresses_are_ignored(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_claimed_environment_is_hidden_from_children_but_still_used(systemd: socket.socket, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    sdnotify.claim_environment()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert sdnotify.watchdog_interval() == 30.0
    assert sdnotify.notify("STOPPING=1")
    assert systemd.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", None, 30.0),
    ("30000000", "self", 30.0),
    ("30000000", "other", None),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getpid() + 1))
    assert sdnotify.watchdog_interval() == expected


def test_watchdog_is_fed_from_the_event_loop(systemd: socket.socket):
    """Pings arrive while the loop runs the task; cancelling it ends it."""

    async def main() -> list[bytes]:
        feeder = asyncio.create_task(sdnotify.feed_watchdog(0.02))
        loop = asyncio.get_running_loop()
        pings = [await loop.run_in_executor(None, systemd.recv, 4096) for _ in range(3)]
        feeder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await feeder
        return pings

    assert asyncio.run(main()) == [b"WATCHDOG=1"] * 3
