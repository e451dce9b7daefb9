"""mosquitto_passwd-compatible password files and the authenticator the proxy asks at CONNECT.

A line is `USER:HASH`. mosquitto 2.0 writes `$7$ITERATIONS$SALT$HASH` (PBKDF2-HMAC-SHA512, 101
iterations, 12-byte salt, base64), mosquitto 1.6 and earlier `$6$SALT$HASH` (one SHA-512 of
password + salt). Both verify here; `hash_password` writes what mosquitto_passwd 2.0.11 writes, so
either tool can maintain the file.

Checking a password runs on the event loop (the `Session` is sans-IO and synchronous). At 101
iterations PBKDF2 costs about 0.1 ms; files with many more iterations would cost milliseconds per
CONNECT, so successful checks are remembered in a small LRU keyed by a keyed digest of the password
(never the password itself), and a reconnecting device pays once.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import secrets
import tempfile
from collections import OrderedDict
from pathlib import Path

from appliance.security.errors import AccessError

# What mosquitto_passwd 2.0.11 writes (checked against the real tool in tests/security).
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
# A hash claiming more iterations than this is refused at load: a failed CONNECT pays the full cost
# on the event loop (~0.4 ms at 1,000 iterations here; mosquitto_passwd writes 101).
MAX_ITERATIONS = 1_000
DIGEST_BYTES = 64  # SHA-512


class PasswordFileError(AccessError):
    """A password file that cannot be used; the message names the file and line."""


def hash_password(password: str | bytes, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """A `$7$` hash as mosquitto_passwd writes it."""
    secret = password.encode() if isinstance(password, str) else password
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _digest(text: str) -> bytes:
    digest = base64.b64decode(text, validate=True)
    if len(digest) != DIGEST_BYTES:  # a short digest would match by chance (1 in 256 for one byte)
        raise ValueError(f"the hash is {len(digest)} bytes, not {DIGEST_BYTES}")
    return digest


def _parse_hash(encoded: str) -> tuple[int | None, bytes, bytes]:
    """(iterations or None for $6$, salt, digest); ValueError when malformed."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            if not 1 <= iterations <= MAX_ITERATIONS:
                raise ValueError(f"iterations {iterations} out of range 1..{MAX_ITERATIONS}")
            return iterations, base64.b64decode(parts[3], validate=True), _digest(parts[4])
        if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            return None, base64.b64decode(parts[2], validate=True), _digest(parts[3])
    except binascii.Error as exc:
        raise ValueError(f"bad base64: {exc}") from None
    raise ValueError("not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) mosquitto_passwd hash")


def verify_password(encoded: str, password: bytes) -> bool:
    try:
        iterations, salt, expected = _parse_hash(encoded)
    except ValueError:
        return False
    if iterations is None:
        actual = hashlib.sha512(password + salt).digest()
    else:
        actual = hashlib.pbkdf2_hmac("sha512", password, salt, iterations, dklen=len(expected) or None)
    return hmac.compare_digest(actual, expected)


_DUMMY_HASH = hash_password(b"no such user")


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, mode 0600; on an error (a full disk) the old file stays
    and no temp file is left behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class PasswordFile:
    """The users and hashes of one file; `load`, change, `save` (atomically, mode 0600)."""

    def __init__(self, entries: dict[str, str] | None = None, path: Path | None = None):
        self.entries: dict[str, str] = dict(entries or {})
        self.path = path

    @classmethod
    def load(cls, path: Path, *, missing_ok: bool = False) -> PasswordFile:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if missing_ok:
                return cls(path=path)
            raise PasswordFileError(f"{path}: no such password file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PasswordFileError(f"{path}: cannot read: {exc}") from exc
        entries: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, encoded = line.partition(":")
            if not sep or not user:
                raise PasswordFileError(f"{path}:{number}: expected USER:HASH")
            try:
                _parse_hash(encoded)
            except ValueError as exc:
                raise PasswordFileError(f"{path}:{number}: user {user!r}: {exc} (hash plain passwords with `appliance passwd`)") from None
            entries[user] = encoded
        return cls(entries, path)

    def set(self, user: str, password: str) -> None:
        if not user or ":" in user:
            raise PasswordFileError(f"invalid user name {user!r} (empty or containing ':')")
        self.entries[user] = hash_password(password)

    def delete(self, user: str) -> bool:
        return self.entries.pop(user, None) is not None

    def text(self) -> str:
        """The file's contents, one `USER:HASH` line per user."""
        return "".join(f"{user}:{encoded}\n" for user, encoded in self.entries.items())

    def save(self, path: Path | None = None) -> None:
        path = path or self.path
        assert path is not None
        write_private(path, self.text())

    def verify(self, user: str, password: bytes) -> bool:
        encoded = self.entries.get(user)
        return encoded is not None and verify_password(encoded, password)


class AuthResult(enum.Enum):
    OK = "ok"
    BAD_CREDENTIALS = "bad user name or password"  # MQTT 5: 0x86; 3.1.1: return code 4
    NOT_AUTHORIZED = "not authorized"  # anonymous while anonymous access is off; 0x87 / 5


class Authenticator:
    """Decides a CONNECT from its username and password (or the TLS identity), as mosquitto would.

    - a client certificate's identity used as the username: accepted (the TLS handshake checked it);
    - no username: accepted only with `allow_anonymous`;
    - a username, with a password file: it must be there and the password must match;
    - a username, without a password file: treated like anonymous.
    """

    def __init__(self, passwords: PasswordFile | None = None, *, allow_anonymous: bool = False, loopback: bool = False,
                 cache_size: int = 1024):
        self.passwords = passwords
        self.allow_anonymous = allow_anonymous
        self.loopback = loopback  # serves a loopback listener (what allow_anonymous: loopback looks at)
        self._cache: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._cache_size = cache_size
        self._key = secrets.token_bytes(32)  # digests in the cache are useless outside this process

    def authenticate(self, username: str | None, password: bytes | None, *, identity: str | None = None) -> AuthResult:
        if identity is not None:
            return AuthResult.OK
        if username is None or self.passwords is None:
            return AuthResult.OK if self.allow_anonymous else AuthResult.NOT_AUTHORIZED
        encoded = self.passwords.entries.get(username)
        if encoded is None or password is None:
            verify_password(_DUMMY_HASH, password or b"")  # same cost as a known user: no username oracle
            return AuthResult.BAD_CREDENTIALS
        key = (username, hmac.digest(self._key, password, "sha256"))
        if self._cache.get(key) == encoded:  # the same hash still in force: skip PBKDF2
            self._cache.move_to_end(key)
            return AuthResult.OK
        if not verify_password(encoded, password):
            return AuthResult.BAD_CREDENTIALS
        self._cache[key] = encoded
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return AuthResult.OK
