"""Starting, waiting for and stopping the benchmark's child processes.

Brokers and appliances get SIGTERM when the benchmark dies, even by kill -9 (PR_SET_PDEATHSIG).
Exits are awaited through a pidfd, so the moment a subscriber exits is known to the microsecond
without polling.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any


class BenchError(Exception):
    """The benchmark could not set a scenario up; the message says why."""


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_service(args: Sequence[str], *, log: Path) -> subprocess.Popen[bytes]:
    """A long-lived process (broker, appliance) with its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            # The benchmark starts no threads, so preexec_fn cannot deadlock here.
            preexec_fn=_die_with_parent, start_new_session=True,  # noqa: PLW1509
        )


def spawn_client(args: Sequence[str], *, stdin: IO[Any] | int = subprocess.DEVNULL,
                 stdout: IO[Any] | int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    # No preexec_fn: it would force a slow fork() of this process, and the publisher's start is
    # inside the timed interval.
    return subprocess.Popen(list(args), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Block until `process` exits (True) or `timeout` seconds pass (False)."""
    if process.poll() is not None:
        return True
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return process.poll() is not None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        ready = poller.poll(max(0, int(timeout * 1000)))
    finally:
        os.close(fd)
    return bool(ready) and process.wait(timeout=5) is not None


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    if not wait_exit(process, timeout):
        process.kill()
        process.wait()


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str,
               alive: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll `predicate` until it holds; BenchError on timeout or if `alive` exits first."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not predicate():
        if alive is not None and alive.poll() is not None:
            detail = f": {log.read_text(errors='replace').strip()[-500:]}" if log and log.exists() else ""
            raise BenchError(f"{what}: process exited with status {alive.returncode}{detail}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: timed out after {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
