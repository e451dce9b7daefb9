"""The local admin interface: a unix socket in the state dir (mode 0600), one JSON request per
connection, one JSON answer. `appliance audit ...` and `appliance quarantine ...` use it to reach
the running appliance, because a second process cannot open the DuckDB file the appliance writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "admin.sock"
MAX_REQUEST = 1024 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AdminError(Exception):
    """The request was understood but failed; the message is for the user."""


class AdminUnavailable(Exception):
    """No appliance answers on this state dir's admin socket."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class AdminServer:
    def __init__(self, path: Path, handlers: dict[str, Handler], *, refusals: tuple[type[Exception], ...] = ()):
        """`refusals`: the handlers' own exceptions that mean "understood, but no" (their message
        goes to the user as an AdminError's would); any other exception is an internal error."""
        self.path = path
        self._handlers = handlers
        self._refusals: tuple[type[Exception], ...] = (AdminError, *refusals)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is created 0600: only the appliance's user
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            answer = await self._answer(line, _peer(writer))
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.debug("admin connection failed: %s", exc)
        finally:
            writer.close()

    async def _answer(self, line: bytes, peer: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            request = json.loads(line)
            handler = self._handlers.get(request.get("op", ""))
            request["_peer"] = peer  # who asked, from the kernel: for the audit log, not from the request
        except (ValueError, AttributeError):
            return {"ok": False, "error": "not a JSON request"}
        if handler is None:
            return {"ok": False, "error": f"unknown operation {request.get('op')!r}; known: {sorted(self._handlers)}"}
        try:
            return {"ok": True, **await handler(request)}
        except self._refusals as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - report, keep serving; the appliance must not fall over
            log.exception("admin operation %s failed", request.get("op"))
            return {"ok": False, "error": f"internal error: {exc}"}


def _peer(writer: asyncio.StreamWriter) -> dict[str, Any] | None:
    """The connecting process's pid, uid and user name (SO_PEERCRED), or None where unavailable."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (AttributeError, OSError):
        return None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {"user": user, "uid": uid, "pid": pid}


def call(state_dir: Path, op: str, *, timeout: float = 120.0, **arguments: Any) -> dict[str, Any]:
    """Send one request to the appliance running on `state_dir`; AdminError when it says no."""
    path = socket_path(state_dir)
    if not path.exists():
        raise AdminUnavailable(f"no appliance is running with state dir {state_dir} ({path} does not exist)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise AdminUnavailable(f"no appliance answers on {path} ({exc.strerror})") from exc
        sock.sendall(json.dumps({"op": op, **arguments}, default=str).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    answer: dict[str, Any] = json.loads(b"".join(chunks))
    if not answer.get("ok"):
        raise AdminError(answer.get("error", "the appliance refused the request"))
    return answer
