"""The `upstream:` section: where accepted messages are forwarded, and how much of the message log
may wait unforwarded while the uplink is down."""

from __future__ import annotations

import socket
import string
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from appliance.credentials import read_credential
from appliance.settings import Duration, Size, TLSConfig, WholeSeconds, _Section

TEMPLATE_FIELDS = frozenset({"topic", "gateway_id", "client_id"})
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}


class OutboxBounds(_Section):
    max_bytes: Size = Field(
        512 * 1000**2,
        description="Most bytes of unforwarded messages in the message log (record header and body, "
        "e.g. 512MB); null: no size bound. The log directory holds more (records not forwarded: see docs/forwarding.md).",
    )
    max_messages: int | None = Field(1_000_000, ge=1, description="Most messages the outbox holds; null: no count bound.")
    max_age: Duration = Field(
        timedelta(days=7),
        description="Messages older than this are dropped (TTL), whatever the policy (e.g. 7d); null: keep forever.",
    )
    policy: Literal["drop_oldest", "reject_new"] = Field(
        "drop_oldest",
        description="When max_bytes or max_messages is reached: drop_oldest skips the oldest messages "
        "(each drop is reported); reject_new keeps them and the appliance refuses new messages "
        "(MQTT 5 publishers get 0x97 Quota exceeded).",
    )


class UpstreamConfig(_Section):
    url: str | None = Field(
        None,
        description="Cloud broker: mqtt://host[:port] (1883) or mqtts://host[:port] (8883); MQTT over WebSockets: "
        "ws://host[:port]/path (80) or wss://host[:port]/path (443); null: forwarding off.",
    )
    client_id: str | None = Field(
        None, description="Client id at the cloud broker (AWS IoT: the thing name); default: appliance-<gateway_id>."
    )
    protocol: Literal[4, 5] = Field(5, description="MQTT protocol level: 4 (3.1.1) or 5 (adds user properties).")
    keepalive: WholeSeconds = Field(30, ge=5, le=65535, description="MQTT keepalive towards the cloud broker (e.g. 30s; whole seconds).")
    username: str | None = Field(None, description="Username at the cloud broker.")
    password: str | None = Field(None, description="Password that goes with username.")
    password_credential: str | None = Field(
        None, description="Read the password from this systemd credential instead (e.g. upstream-password: the file "
        "/etc/mqtt-appliance/credentials/upstream-password, passed in with LoadCredential=; docs/install.md).",
    )
    tls: TLSConfig | None = Field(
        None, description="CA, client certificate and key for mqtts:// and wss:// (mutual TLS); system CAs when unset."
    )
    topic_template: str = Field(
        "{topic}",
        description="Topic at the cloud broker, built from {topic}, {gateway_id} and {client_id} "
        "(e.g. gateways/{gateway_id}/{topic}).",
    )
    gateway_id: str = Field(
        default_factory=socket.gethostname, description="This appliance's name in topic_template; default: the hostname."
    )
    qos: Literal[0, 1] = Field(
        1,
        description="QoS of forwarded messages. 1: a message leaves the outbox when the cloud broker's "
        "PUBACK arrives; 0: when it was written to the socket (may be lost).",
    )
    retain: bool = Field(True, description="Forward the publisher's retain flag (false: never retain upstream).")
    window: int = Field(100, ge=1, le=65535, description="Messages in flight (sent, not yet acknowledged) at most.")
    ack_timeout: Duration = Field(
        timedelta(seconds=30),
        description="A connection whose oldest in-flight message (or CONNACK) waits longer than this is torn down and reopened.",
    )
    backoff_initial: Duration = Field(timedelta(seconds=0.5), description="First delay before reconnecting.")
    backoff_max: Duration = Field(timedelta(seconds=60), description="Longest delay between reconnects (exponential, with jitter).")
    outbox: OutboxBounds = Field(default_factory=OutboxBounds, description="Bounds of the outbox while the uplink is down.")

    @model_validator(mode="before")
    @classmethod
    def _password_from_credential(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("password_credential") is not None:
            if data.get("password") is not None:
                raise ValueError("give upstream.password or upstream.password_credential, not both")
            data = {**data, "password": read_credential(str(data["password_credential"]))}
        return data

    @model_validator(mode="after")
    def _check(self) -> UpstreamConfig:
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
                raise ValueError(f"upstream.url must look like mqtt://host:1883, mqtts://host:8883 or wss://host/mqtt, got {self.url!r}")
            parts.port  # noqa: B018 - raises ValueError on a bad port
            if self.tls is not None and parts.scheme not in ("mqtts", "wss"):
                raise ValueError("upstream.tls needs an mqtts:// or wss:// url")
            if parts.fragment:
                raise ValueError(f"upstream.url: a #fragment means nothing here, got {self.url!r}")
        if self.password is not None and self.username is None:
            raise ValueError("upstream.password needs upstream.username")
        if self.tls is not None and self.tls.key_file is not None and self.tls.cert_file is None:
            raise ValueError("upstream.tls.key_file needs upstream.tls.cert_file")
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(self.topic_template) if name is not None}
        except ValueError as exc:
            raise ValueError(f"upstream.topic_template: {exc}") from None
        if unknown := used - TEMPLATE_FIELDS:
            raise ValueError(f"upstream.topic_template: unknown field(s) {sorted(unknown)}; use {sorted(TEMPLATE_FIELDS)}")
        for name in ("ack_timeout", "backoff_initial", "backoff_max"):
            value = getattr(self, name)
            if value is None or value <= timedelta(0):
                raise ValueError(f"upstream.{name} must be a positive duration")
        return self

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def host(self) -> str:
        assert self.url is not None
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        assert self.url is not None
        parts = urlsplit(self.url)
        return parts.port or _DEFAULT_PORTS[parts.scheme]

    @property
    def uses_tls(self) -> bool:
        return self.url is not None and urlsplit(self.url).scheme in ("mqtts", "wss")

    @property
    def websocket_url(self) -> str | None:
        """The URL of a ws:// or wss:// uplink (MQTT over WebSockets); None for mqtt(s)://."""
        if self.url is None or urlsplit(self.url).scheme not in ("ws", "wss"):
            return None
        return self.url

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"appliance-{self.gateway_id}"
