"""Who may use the console: logins against the appliance's password file, roles from the `console:`
section, sessions, CSRF tokens and the login rate limit. No I/O besides reading the password file;
the web layer (web.py) turns these answers into cookies and status codes."""

from __future__ import annotations

import contextlib
import enum
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import Config, is_loopback
from appliance.config.console import ConsoleConfig
from appliance.security import PasswordFile, PasswordFileError, hash_password
from appliance.security.passwords import verify_password

_DUMMY_HASH = hash_password(secrets.token_bytes(16))


class Role(enum.StrEnum):
    OPERATOR = "operator"
    VIEWER = "viewer"


class ConsoleSetupError(Exception):
    """The console cannot start with this config; the message says what to change."""


def check_setup(config: Config, console: ConsoleConfig) -> bool:
    """Raises ConsoleSetupError for a bind the console refuses; returns True when users must log in
    (False: loopback without users, where everyone who reaches the port may look but not act)."""
    users = bool(console.operators or console.viewers)
    if users and config.auth.password_file is None:
        raise ConsoleSetupError(
            "console.operators/viewers name users, but auth.password_file is not set: the console logs users "
            "in with the appliance's password file")
    if users:
        assert config.auth.password_file is not None
        try:
            PasswordFile.load(config.auth.password_file)
        except PasswordFileError as exc:
            raise ConsoleSetupError(f"auth.password_file: {exc}") from exc
    if is_loopback(console.listen.host):
        return users
    if console.tls is None:
        raise ConsoleSetupError(
            f"console.listen {console.listen} is not a loopback address: set console.tls (HTTPS) to serve the "
            "console on the network, or listen on 127.0.0.1 and reach it through an SSH tunnel")
    if not users:
        raise ConsoleSetupError(
            f"console.listen {console.listen} is not a loopback address: list at least one user of "
            "auth.password_file in console.operators or console.viewers")
    return True


class Users:
    """The password file is read again at each login, so `appliance passwd` takes effect at once."""

    def __init__(self, password_file: Path | None, console: ConsoleConfig):
        self._file = password_file
        self._roles = {**{u: Role.VIEWER for u in console.viewers}, **{u: Role.OPERATOR for u in console.operators}}

    def authenticate(self, user: str, password: str) -> Role | None:
        role = self._roles.get(user)
        if role is None or self._file is None:
            verify_password(_DUMMY_HASH, password.encode())  # the same cost: timing tells no names
            return None
        try:
            passwords = PasswordFile.load(self._file)
        except PasswordFileError:
            return None
        return role if passwords.verify(user, password.encode()) else None


@dataclass
class Session:
    user: str
    role: Role
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_seen: float = 0.0

    @property
    def may_act(self) -> bool:
        return self.role is Role.OPERATOR

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Sessions:
    """In memory: a restart of the console logs everybody out. Sessions idle for longer than `idle`
    are swept at each login and, at most once every SWEEP_EVERY seconds, at a lookup: those of users
    who never come back do not stay in memory."""

    SWEEP_EVERY = 60.0

    def __init__(self, idle: float, *, clock: Callable[[], float] = time.monotonic):
        self._idle = idle
        self._clock = clock
        self._by_token: dict[str, Session] = {}
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._by_token)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for token in [t for t, s in self._by_token.items() if now - s.last_seen > self._idle]:
            del self._by_token[token]

    def create(self, user: str, role: Role) -> tuple[str, Session]:
        now = self._clock()
        self._sweep(now)
        token = secrets.token_urlsafe(32)
        session = Session(user, role, last_seen=now)
        self._by_token[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        now = self._clock()
        if now - self._swept >= self.SWEEP_EVERY:
            self._sweep(now)
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        if now - session.last_seen > self._idle:
            del self._by_token[token]
            return None
        session.last_seen = now
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)


class LoginLimiter:
    """At most `attempts` failed logins per user name and per client address in `window` seconds.

    An attempt counts before its password is checked (`reserve`) and is taken back when it proves
    right (`succeeded`): logins sent together, which all wait for the slow hash at once, cannot
    each pass the test before the first failure is recorded. Called on the event loop only (no
    await between the test and the count)."""

    def __init__(self, attempts: int, window: float, *, clock: Callable[[], float] = time.monotonic):
        self._attempts = attempts
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    @staticmethod
    def _keys(user: str, address: str) -> tuple[str, str]:
        return f"u:{user}", f"a:{address}"

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        horizon = self._clock() - self._window
        while times and times[0] < horizon:
            times.popleft()
        return times

    def allowed(self, user: str, address: str) -> bool:
        return all(len(self._recent(key)) < self._attempts for key in self._keys(user, address))

    def reserve(self, user: str, address: str) -> float | None:
        """Count one attempt, as a failure until `succeeded` takes it back; None (nothing counted)
        when the user name or the address has used up its attempts."""
        if not self.allowed(user, address):
            return None
        stamp = self._clock()
        for key in self._keys(user, address):
            self._recent(key).append(stamp)
        if len(self._failures) > 10_000:  # many names or addresses: forget those with nothing recent
            for key in [k for k, v in self._failures.items() if not self._recent(k)]:
                del self._failures[key]
        return stamp

    def succeeded(self, user: str, address: str, stamp: float) -> None:
        """The reserved attempt was right: it is not a failure."""
        for key in self._keys(user, address):
            times = self._failures.get(key)
            if times is not None:
                with contextlib.suppress(ValueError):  # already out of the window
                    times.remove(stamp)
