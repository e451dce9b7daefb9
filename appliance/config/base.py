"""Building blocks of the configuration, shared by every section: addresses, durations, sizes, TLS.

Separate from the package's `__init__` (which assembles the whole config) so that sections in their
own modules (`upstream.py`) can build on them. The config package imports no runtime code: only
pydantic, yaml and the leaf modules `appliance.yamlsource` and `appliance.credentials`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

class Address(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str
    port: int = Field(ge=0, le=65535)

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse `HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all interfaces)."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        return cls(host=host or "0.0.0.0", port=int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _address(value: Any) -> Any:
    return Address.parse(value) if isinstance(value, str) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_KEY_CREDENTIAL = ("Read key_file from this systemd credential instead (e.g. upstream-tls-key: the file "
                   "/etc/mqtt-appliance/credentials/upstream-tls-key, passed in with LoadCredential=; docs/install.md).")


def _key_from_credential(data: Any) -> Any:
    """key_credential → key_file: the credential's file (a TLS key is read by path, not as text)."""
    if isinstance(data, dict) and data.get("key_credential") is not None:
        from appliance.credentials import credential_path

        if data.get("key_file") is not None:
            raise ValueError("give key_file or key_credential, not both")
        data = {**data, "key_file": credential_path(str(data["key_credential"]))}
    return data


class TLSConfig(_Section):
    ca_file: Path | None = Field(None, description="CA bundle that signs the broker's certificate; system CAs when unset.")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(None, description="Private key (PEM) of cert_file.")
    key_credential: str | None = Field(None, description=_KEY_CREDENTIAL)
    verify_hostname: bool = Field(True, description="Check that the broker's certificate names the host.")

    _key = model_validator(mode="before")(_key_from_credential)


class ListenerTLSConfig(_Section):
    cert_file: Path = Field(description="Server certificate (PEM, with its chain) this listener presents.")
    key_file: Path = Field(description="Private key (PEM) of cert_file.")
    key_credential: str | None = Field(None, description=_KEY_CREDENTIAL)
    ca_file: Path | None = Field(None, description="CA bundle that signs client certificates (needed to verify them).")
    require_client_certificate: bool = Field(
        False, description="Refuse TLS clients without a certificate signed by ca_file (mutual TLS)."
    )
    use_identity_as_username: Literal["cn", "san", "none"] = Field(
        "none",
        description="cn or san: the client certificate's common name (or first subjectAltName) is the client's "
        "username for ACLs and the audit log, and no password is needed; none: the CONNECT's own username counts.",
    )

    _key = model_validator(mode="before")(_key_from_credential)

    @model_validator(mode="after")
    def _identity_needs_a_certificate(self) -> ListenerTLSConfig:
        if self.use_identity_as_username != "none" and not self.require_client_certificate:
            raise ValueError("use_identity_as_username needs require_client_certificate: true")
        if self.require_client_certificate and self.ca_file is None:
            raise ValueError("require_client_certificate needs ca_file (the CA that signs client certificates)")
        return self


class ListenerConfig(_Section):
    listen: Address = Field(description="HOST:PORT this listener binds ([::]:8883 for IPv6).")
    tls: ListenerTLSConfig | None = Field(None, description="Serve MQTT over TLS with these settings; none: plain TCP.")
    transport: Literal["tcp", "websockets"] = Field(
        "tcp", description="tcp: MQTT over TCP; websockets: MQTT over WebSockets (ws://, or wss:// with tls), "
        "subprotocol mqtt, binary frames.",
    )
    path: str | None = Field(None, description="websockets: the HTTP path clients connect to (default /mqtt).")
    allowed_origins: list[str] | None = Field(
        None, description="websockets: the web origins (https://host[:port]) whose pages may connect; a handshake "
        "with another Origin header gets HTTP 403 (one without, from a non-browser client, passes). None: any.",
    )

    _listen = field_validator("listen", mode="before")(_address)

    @model_validator(mode="after")
    def _path_is_for_websockets(self) -> ListenerConfig:
        if self.path is not None:
            if self.transport != "websockets":
                raise ValueError("path needs transport: websockets")
            if not self.path.startswith("/") or "?" in self.path or any(c.isspace() for c in self.path):
                raise ValueError(f"path must be an HTTP path like /mqtt, got {self.path!r}")
        if self.allowed_origins is not None:
            if self.transport != "websockets":
                raise ValueError("allowed_origins needs transport: websockets")
            for origin in self.allowed_origins:
                if not re.fullmatch(r"https?://[^/\s?#]+", origin):
                    raise ValueError(f"allowed_origins: expected an origin like https://console.example.com (scheme, host, "
                                     f"optional port, no path), got {origin!r}")
        return self

    @property
    def websocket_path(self) -> str | None:
        """The HTTP path of a WebSocket listener; None for a TCP one."""
        return (self.path or "/mqtt") if self.transport == "websockets" else None


# One parser for every duration and one for every size in the config (docs/configuration.md, "Units").
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_duration(value: Any) -> timedelta | None:
    """'90d', '12h', '30m', '45s', '250ms', '2w' or a number of seconds."""
    if value is None or isinstance(value, timedelta):
        return value
    match = _DURATION.match(str(value)) if not isinstance(value, bool) else None
    if not match:
        raise ValueError(f"expected a duration like 90d, 12h, 30m, 45s or 250ms (a plain number is seconds), got {value!r}")
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"])


def parse_seconds(value: Any) -> float | None:
    """A duration (see parse_duration) as a number of seconds."""
    duration = parse_duration(value)
    return None if duration is None else duration.total_seconds()


def parse_size(value: Any) -> int | None:
    """'2GB', '256MiB', '512KiB', '1024' (bytes), as pydantic's ByteSize reads them (KB = 1000 B,
    KiB = 1024 B, any case)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    match = _SIZE.match(str(value)) if not isinstance(value, bool) else None
    if not match:
        raise ValueError(f"expected a size like 2GB, 256MB, 512KiB or 1024 (bytes), got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


Duration = Annotated[timedelta | None, BeforeValidator(parse_duration)]  # null allowed: no limit
Size = Annotated[int | None, BeforeValidator(parse_size)]  # null allowed: no limit
Seconds = Annotated[float, BeforeValidator(parse_seconds)]
WholeSeconds = Annotated[int, BeforeValidator(parse_seconds)]
Bytes = Annotated[int, BeforeValidator(parse_size)]
