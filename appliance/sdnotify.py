"""systemd's sd_notify protocol, without a dependency.

Under `Type=notify` systemd passes a datagram socket in `$NOTIFY_SOCKET` (a path, or an abstract
socket name starting with `@`) and, with `WatchdogSec=`, the watchdog period in `$WATCHDOG_USEC`
(for the process in `$WATCHDOG_PID`, when set). The service sends newline-separated `KEY=value`
lines: `READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=...`, `WATCHDOG=1`.

Outside systemd there is no `$NOTIFY_SOCKET` and every call here is a no-op returning False, so the
appliance calls these unconditionally.

The watchdog is fed from the event loop on purpose (`feed_watchdog`): a loop stuck in a blocking
call stops the pings, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# The variables once `claim_environment()` took them out of os.environ.
_claimed: dict[str, str] = {}


def _get(name: str) -> str | None:
    return os.environ.get(name) or _claimed.get(name)


def claim_environment() -> None:
    """Take systemd's variables out of os.environ (sd_notify's `unset_environment`), so that child
    processes do not inherit them: mosquitto speaks sd_notify itself, and its READY=1 from another
    PID would be refused and logged by systemd. `notify()` and `watchdog_interval()` still see them."""
    for name in _VARIABLES:
        value = os.environ.pop(name, None)
        if value:
            _claimed[name] = value


def _address() -> str | None:
    path = _get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace
    if path.startswith("/"):
        return path
    return None  # e.g. vsock: addresses (systemd in a VM's host); not used on a gateway


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to systemd; True if it was sent."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", _get("NOTIFY_SOCKET"), exc)
        return False
    return True


def reloading() -> str:
    """The RELOADING=1 message; systemd >= 253 (Type=notify-reload) also wants the monotonic time."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """The watchdog period in seconds systemd asks for (`WatchdogSec=`), or None when it asks none
    (or asks another process: `$WATCHDOG_PID`)."""
    usec = _get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = _get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None
    return value / 1_000_000 if value > 0 else None


async def feed_watchdog(interval: float) -> None:
    """Send WATCHDOG=1 every `interval / 2` seconds until cancelled (run it as a task on the
    appliance's event loop)."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval / 2)
