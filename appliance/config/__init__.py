"""The appliance's configuration: declared once, with defaults and help, validated as a whole.

A config file is YAML. Relative paths in it are relative to the file's own directory, so a config
and its state dir or schema set can move together. Command-line flags override file values through
`load_config(..., overrides=...)`, and the result is checked again as a whole.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.config.base import (  # noqa: F401 - re-exported: the config's building blocks
    Address, Bytes, Duration, ListenerConfig, ListenerTLSConfig, Seconds, Size, TLSConfig, _address, _Section,
    parse_duration, parse_seconds, parse_size,
)
from appliance.config.console import ConsoleConfig
from appliance.config.upstream import UpstreamConfig
from appliance.yamlsource import LineDict, LineLoader, did_you_mean

DEFAULT_STATE_DIR = Path("/var/lib/mqtt-appliance")


class ConfigError(Exception):
    """A config file that cannot be used: the message names the file and, where known, the line."""


class BrokerConfig(_Section):
    mode: Literal["embedded", "external"] = Field(
        "embedded",
        description="embedded: the appliance starts and supervises its own mosquitto on loopback; "
        "external: front a broker named by host and port.",
    )
    mosquitto_binary: str | None = Field(
        None, description="Path of the mosquitto executable (embedded mode); found on PATH or in /usr/sbin when unset."
    )
    host: str = Field("127.0.0.1", description="External broker host (external mode).")
    port: int | None = Field(None, ge=1, le=65535, description="External broker port (external mode; 1883, or 8883 with TLS).")
    tls: TLSConfig | None = Field(None, description="Connect to the external broker over TLS with these settings.")
    username: str | None = Field(
        None, description="Credentials the proxy presents to the broker in place of each client's own "
        "(clients still authenticate to the appliance).",
    )
    password: str | None = Field(None, description="Password that goes with username.")
    start_timeout: Seconds = Field(10.0, gt=0, description="How long to wait for the embedded mosquitto to accept connections (e.g. 10s).")
    restart_backoff_initial: Seconds = Field(0.2, gt=0, description="First delay before restarting a mosquitto that died (e.g. 200ms).")
    restart_backoff_max: Seconds = Field(10.0, gt=0, description="Longest delay between restarts (e.g. 10s).")
    extra_config: list[str] = Field(
        default_factory=list,
        description="Extra mosquitto.conf lines appended to the generated config (embedded mode).",
    )

    @model_validator(mode="after")
    def _external_needs_port(self) -> BrokerConfig:
        if self.mode == "external" and self.port is None:
            raise ValueError("broker.port is required when broker.mode is external")
        if self.password is not None and self.username is None:
            raise ValueError("broker.password needs broker.username")
        return self


class VerdictRetention(_Section):
    max_age: Duration = Field(timedelta(days=90), description="Verdict rows and events older than this are deleted (e.g. 90d); null: no age limit.")
    max_bytes: Size = Field(2 * 1000**3, description="Oldest verdict rows are deleted beyond this size (e.g. 2GB); null: no size limit.")


class PayloadRetention(_Section):
    max_age: Duration = Field(timedelta(days=7), description="Payloads of accepted messages older than this are dropped (the verdict rows stay).")
    max_bytes: Size = Field(None, description="Oldest accepted payloads are dropped beyond this total size; null: no size limit.")


class QuarantineRetention(_Section):
    max_age: Duration = Field(timedelta(days=30), description="Rejected messages' payloads (the quarantine) older than this are dropped.")
    max_bytes: Size = Field(256 * 1000**2, description="Oldest quarantined payloads are dropped beyond this total size.")


class RetentionConfig(_Section):
    verdicts: VerdictRetention = Field(default_factory=VerdictRetention, description="Verdict rows (and events) in the audit log.")
    payloads: PayloadRetention = Field(default_factory=PayloadRetention, description="Payloads of accepted messages.")
    quarantine: QuarantineRetention = Field(default_factory=QuarantineRetention, description="Payloads of rejected messages: the quarantine.")
    interval: Duration = Field(timedelta(minutes=10), description="How often retention runs in the background.")


class ExportSchedule(_Section):
    to: Path | None = Field(None, description="Export each finished UTC day to this directory as Parquet (hive-partitioned by day); none: no scheduled export.")
    interval: Duration = Field(timedelta(hours=1), description="How often to look for finished days to export.")


class AuditConfig(_Section):
    enabled: bool = Field(True, description="Record every verdict and event in the audit log (STATE_DIR/audit/).")
    record_payloads: bool = Field(True, description="Keep message payloads with their verdicts (needed for quarantine and replay).")
    durable_acks: bool = Field(
        True,
        description="Acknowledge a QoS 1/2 message to its publisher only once its verdict is committed to disk "
        "(survives kill -9 and power loss). false: acknowledge at once, recording stays asynchronous.",
    )
    durability: Literal["power_safe", "os_buffered"] = Field(
        "power_safe",
        description="When a record counts as stored (what durable acks wait for). power_safe: once fdatasync'd "
        "(survives kill -9 and power loss; syncs are batched by sync_window and sync_bytes). os_buffered: once "
        "written to the operating system (survives kill -9, not a power cut: up to sync_interval is lost); "
        "fewer disk writes, lower latency.",
    )
    sync_window: Duration = Field(
        timedelta(milliseconds=20),
        description="power_safe: the longest a record waits for the sync that makes it durable (and its ack for "
        "it). Longer windows batch more records per sync: fewer bytes written on an SD card, later acks. A "
        "publisher whose in-flight window is full is synced at once.",
    )
    sync_bytes: Size = Field(64 * 1024, description="power_safe: sync as soon as this many bytes wait for it.")
    sync_interval: Duration = Field(timedelta(seconds=1), description="os_buffered: how often written records are synced.")
    segment_bytes: Size = Field(16 * 1024 * 1024, description="Message log segments are sealed (and converted to Parquet) at this size.")
    segment_max_age: Duration = Field(
        timedelta(minutes=10), description="... or when their first record is this old, whichever comes first."
    )
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="How long audit data is kept.")
    journal_max_bytes: Size = Field(
        None,
        description="Obsolete (the SQLite journal was replaced by the message log); accepted and ignored.",
    )
    export: ExportSchedule = Field(default_factory=lambda: ExportSchedule(), description="Scheduled Parquet export.")


class MetricsConfig(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics and health endpoints over HTTP.")
    listen: Address = Field(
        Address(host="127.0.0.1", port=9100),
        description="HOST:PORT for /metrics, /healthz and /readyz; 0.0.0.0:9100 lets a Prometheus elsewhere scrape it.",
    )

    _listen = field_validator("listen", mode="before")(_address)


class LimitsConfig(_Section):
    max_packet_size: Bytes = Field(
        1024 * 1024, ge=64, le=268_435_460,
        description="Largest MQTT packet a client may send (e.g. 1MiB); larger ones close that client "
        "(MQTT 5: DISCONNECT 0x95 Packet too large).",
    )
    max_connect_size: Bytes = Field(
        64 * 1024, ge=64, description="Largest first packet (the CONNECT) accepted before the client is known (e.g. 64KiB)."
    )
    connect_timeout: Seconds = Field(10.0, gt=0, description="How long a new connection may take to send its CONNECT (e.g. 10s).")
    max_connections: int = Field(10_000, ge=1, description="Client connections open at once; more are refused.")
    write_buffer_high: Bytes = Field(
        256 * 1024, ge=1024, description="Bytes queued for one peer before the proxy stops reading from the other side (e.g. 256KiB)."
    )
    max_connections_per_address: int = Field(
        1000, ge=0, description="Client connections open at once from one source IP address; more are refused at "
        "accept. 0: no limit.",
    )
    max_inflight: int = Field(
        1000, ge=0, le=65535,
        description="QoS 1/2 messages a client may have unacknowledged; advertised to MQTT 5 clients as Receive "
        "Maximum; a client exceeding it is disconnected (MQTT 5: 0x93 Receive Maximum exceeded). 0: no limit.",
    )
    max_subscriptions: int = Field(
        1000, ge=0, description="Topic filters one client may be subscribed to; more get SUBACK 0x97 Quota exceeded "
        "(3.1.1: 0x80). 0: no limit.",
    )
    message_rate: float = Field(
        0, ge=0, description="PUBLISH packets per second one client may send on average; a faster client is throttled "
        "(the appliance stops reading it for a while; nothing is dropped). 0: no limit.",
    )
    message_burst: int = Field(
        100, ge=1, description="PUBLISH packets a client may send at once before message_rate applies."
    )


class AuthConfig(_Section):
    allow_anonymous: bool | Literal["loopback"] = Field(
        "loopback",
        description="Accept clients without a username (or any username when there is no password_file): true, "
        "false, or loopback (only on listeners bound to a loopback address, as mosquitto 2.0's local-only mode).",
    )
    password_file: Path | None = Field(
        None, description="mosquitto_passwd-compatible password file ($7$ PBKDF2-SHA512 or $6$ SHA-512 hashes); "
        "manage it with `appliance passwd` or mosquitto_passwd.",
    )
    acl_file: Path | None = Field(
        None, description="mosquitto-style ACL file (user/topic/pattern lines, %c and %u); what it does not allow is "
        "denied. None: every client may publish and subscribe to everything.",
    )


class Config(BaseModel):
    """The whole appliance configuration (one YAML file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: Address | None = Field(
        Address(host="127.0.0.1", port=1883),
        description="The plain (non-TLS) listener for MQTT clients, HOST:PORT; null: only the `listeners` list.",
    )
    listeners: list[ListenerConfig] = Field(
        default_factory=list, description="More listeners, each plain or TLS; served in addition to `listen`."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Client authentication and access control.")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Directory for everything the appliance writes.")
    schemas: Path | None = Field(
        None,
        description="Schema set directory (manifest.yaml and its schema files) every PUBLISH is checked "
        "against. Without one, every message is accepted.",
    )
    dry_run: bool = Field(
        False, description="Compute and record every verdict, but deliver every message (try a schema set on live traffic)."
    )
    audit: AuditConfig = Field(default_factory=AuditConfig, description="The audit log (the message log, Parquet, queried with DuckDB) and its retention.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics and health endpoints.")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The broker behind the proxy.")
    upstream: UpstreamConfig = Field(
        default_factory=UpstreamConfig,
        description="Store-and-forward of accepted messages to a cloud broker (off while upstream.url is null).",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-client limits.")
    console: ConsoleConfig = Field(default_factory=ConsoleConfig, description="The web console (`appliance console`, docs/console.md).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text for people, or JSON objects for log shippers (`appliance run --log-format`)."
    )
    reload_on_change: bool = Field(
        True, description="Reload the config and schema set when their files change (SIGHUP always reloads)."
    )
    use_uvloop: bool = Field(True, description="Run on uvloop when it is installed (faster relay).")

    _listen = field_validator("listen", mode="before")(_address)

    def all_listeners(self) -> list[ListenerConfig]:
        """`listen` (a plain listener) first, then `listeners`."""
        first = [ListenerConfig(listen=self.listen)] if self.listen is not None else []
        return first + list(self.listeners)

    @model_validator(mode="after")
    def _listeners_are_distinct(self) -> Config:
        addresses = [str(listener.listen) for listener in self.all_listeners()]
        if not addresses:
            raise ValueError("no listener: set `listen` or `listeners`")
        duplicates = sorted({a for a in addresses if addresses.count(a) > 1 and not a.endswith(":0")})
        if duplicates:
            raise ValueError(f"listeners bound twice: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _forwarding_needs_the_log(self) -> Config:
        if self.upstream.url is not None and not self.audit.enabled:
            raise ValueError("upstream.url needs audit.enabled: the outbox is the unforwarded part of the message log")
        return self


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative paths in the raw YAML relative to the config file's directory."""
    for key in ("state_dir", "schemas"):
        if isinstance(data.get(key), str):
            data[key] = os.path.normpath(base / data[key])
    upstream = data.get("upstream")
    if isinstance(upstream, dict) and isinstance(upstream.get("tls"), dict):
        for key in ("ca_file", "cert_file", "key_file"):
            if isinstance(upstream["tls"].get(key), str):
                upstream["tls"][key] = os.path.normpath(base / upstream["tls"][key])
    audit = data.get("audit")
    if isinstance(audit, dict) and isinstance(audit.get("export"), dict) and isinstance(audit["export"].get("to"), str):
        audit["export"]["to"] = os.path.normpath(base / audit["export"]["to"])
    auth = data.get("auth")
    if isinstance(auth, dict):
        for key in ("password_file", "acl_file"):
            if isinstance(auth.get(key), str):
                auth[key] = os.path.normpath(base / auth[key])
    for listener in data.get("listeners") or []:
        if isinstance(listener, dict) and isinstance(listener.get("tls"), dict):
            for key in ("ca_file", "cert_file", "key_file"):
                if isinstance(listener["tls"].get(key), str):
                    listener["tls"][key] = os.path.normpath(base / listener["tls"][key])
    console = data.get("console")
    if isinstance(console, dict):
        if isinstance(console.get("tls"), dict):
            for key in ("ca_file", "cert_file", "key_file"):
                if isinstance(console["tls"].get(key), str):
                    console["tls"][key] = os.path.normpath(base / console["tls"][key])
        if isinstance(console.get("trial_roots"), list):
            console["trial_roots"] = [os.path.normpath(base / r) if isinstance(r, str) else r for r in console["trial_roots"]]
    broker = data.get("broker")
    if isinstance(broker, dict) and isinstance(broker.get("tls"), dict):
        for key in ("ca_file", "cert_file", "key_file"):
            if isinstance(broker["tls"].get(key), str):
                broker["tls"][key] = os.path.normpath(base / broker["tls"][key])


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _line_of(data: Any, loc: tuple[int | str, ...]) -> int | None:
    """The line in the config file of the deepest key of `loc` that the file has."""
    line, node = getattr(data, "line", None), data
    for part in loc:
        if isinstance(node, LineDict) and part in node:
            line, node = node.line_of(part), node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            line = getattr(node, "line", line)
        else:
            break
    return line


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings class whose keys `loc` names (list indexes skipped), or None."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        sections = [c for c in get_args(annotation) or (annotation,) if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return None
        model = sections[0]
    return model


def _format_validation_error(source: str, error: ValidationError, data: Any = None) -> str:
    """One line per problem: `FILE:LINE: dotted.key: what is wrong` (a did-you-mean for unknown keys)."""
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        loc = item["loc"]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            section = _section_at(loc[:-1])
            message = "unknown setting" + (did_you_mean(loc[-1], section.model_fields) if section else "")
        line = _line_of(data, loc) if data is not None else None
        lines.append(f"  {source}:{line}: {_dotted(loc)}: {message}" if line else f"  {_dotted(loc)}: {message}")
    return "\n".join(lines)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read, resolve and validate a config file; `overrides` (dotted keys) win over the file."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
        try:
            loaded = yaml.load(text, Loader=LineLoader)  # noqa: S506 - a SafeLoader that keeps line numbers
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: YAML syntax error: {exc.problem}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        data = loaded
        _resolve_paths(data, path.parent.resolve())
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc, data)) from exc


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def iter_settings(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every setting as (dotted key, pydantic FieldInfo), sections included: for docs and their test.
    Items of a list of sections appear as `key[].field`."""
    for name, info in model.model_fields.items():
        yield prefix + name, info
        annotation = info.annotation
        suffix = "."
        if get_origin(annotation) is list:
            annotation, suffix = get_args(annotation)[0], "[]."
        for candidate in get_args(annotation) or (annotation,):
            if isinstance(candidate, type) and issubclass(candidate, _Section):
                yield from iter_settings(candidate, f"{prefix}{name}{suffix}")

