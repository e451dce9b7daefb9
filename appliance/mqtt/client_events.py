"""What the client core (client.py) makes of the server's bytes: events, and the limits its CONNACK set.

Events are frozen, slotted dataclasses, one per thing that can happen on a client connection; the
caller reacts to each (``Published``: a message is through; ``PublishReceived``: send the PUBREL...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .packets import ProtocolVersion, Publish
from .properties import Properties, PropertyId
from .reason_codes import ConnectReturnCode, ReasonCode

__all__ = [
    "ServerLimits", "Event", "Connected", "ConnectionRefused", "Published", "PublishReceived",
    "Subscribed", "Unsubscribed", "MessageReceived", "ReleaseReceived", "PingResponse",
    "Disconnected", "reason_name",
]

_MQTT_5 = ProtocolVersion.MQTT_5
_EMPTY = Properties.EMPTY
_PID_LIMIT = 0xFFFF


def reason_name(code: int, version: ProtocolVersion = _MQTT_5, *, connack: bool = False) -> str:
    """A reason code in words: "not authorized (0x87)"; a 3.1.1 CONNACK return code by its name."""
    if connack and version != _MQTT_5:
        try:
            return ConnectReturnCode(code).name.replace("_", " ").lower()
        except ValueError:
            return f"return code {code}"
    try:
        return f"{ReasonCode(code).name.replace('_', ' ').lower()} (0x{code:02x})"
    except ValueError:
        return f"0x{code:02x}"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the server's CONNACK announced (MQTT 5); ``None``/defaults where it said nothing (3.1.1)."""

    receive_maximum: int | None = None  # its window of unacknowledged QoS 1/2 PUBLISHes
    maximum_qos: int = 2
    retain_available: bool = True
    maximum_packet_size: int | None = None
    server_keepalive: int | None = None  # replaces the keepalive we asked for
    assigned_client_id: str | None = None
    session_expiry_interval: int | None = None  # the server's, replacing ours

    @property
    def window(self) -> int:
        return self.receive_maximum if self.receive_maximum is not None else _PID_LIMIT

    @classmethod
    def from_connack(cls, properties: Properties) -> ServerLimits:
        get = properties.get
        maximum = get(PropertyId.RECEIVE_MAXIMUM)
        qos = get(PropertyId.MAXIMUM_QOS)
        size = get(PropertyId.MAXIMUM_PACKET_SIZE)
        keepalive = get(PropertyId.SERVER_KEEP_ALIVE)
        assigned = get(PropertyId.ASSIGNED_CLIENT_IDENTIFIER)
        expiry = get(PropertyId.SESSION_EXPIRY_INTERVAL)
        return cls(
            receive_maximum=maximum if isinstance(maximum, int) else None,
            maximum_qos=qos if isinstance(qos, int) else 2,
            retain_available=get(PropertyId.RETAIN_AVAILABLE) != 0,
            maximum_packet_size=size if isinstance(size, int) else None,
            server_keepalive=keepalive if isinstance(keepalive, int) else None,
            assigned_client_id=assigned if isinstance(assigned, str) else None,
            session_expiry_interval=expiry if isinstance(expiry, int) else None,
        )


@dataclass(frozen=True, slots=True)
class Connected:
    """The CONNACK accepted the connection."""

    session_present: bool
    limits: ServerLimits
    properties: Properties = _EMPTY


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    """The CONNACK refused the connection; the client is closed."""

    reason_code: int
    reason: str  # the code in words
    properties: Properties = _EMPTY


@dataclass(frozen=True, slots=True)
class Published:
    """An outgoing QoS 1 or 2 PUBLISH is over: its PUBACK or PUBCOMP came (or a PUBREC refused it).
    MQTT 5: a reason code of 0x80 or more is an answer, but "no" (e.g. 0x87 not authorized)."""

    packet_id: int
    reason_code: int = 0

    @property
    def refused(self) -> bool:
        return self.reason_code >= 0x80


@dataclass(frozen=True, slots=True)
class PublishReceived:
    """PUBREC for an outgoing QoS 2 PUBLISH: send ``release(packet_id)``."""

    packet_id: int
    reason_code: int = 0


@dataclass(frozen=True, slots=True)
class Subscribed:
    packet_id: int
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # MQTT 5 only


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A PUBLISH from the server. QoS 1 or 2: answer with ``acknowledge(publish.packet_id)``.
    ``duplicate``: a QoS 2 message whose PUBREL has not come yet, sent again (do not deliver it twice)."""

    publish: Publish
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseReceived:
    """PUBREL for an incoming QoS 2 message: send ``complete(packet_id)``."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class PingResponse:
    pass


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The server sent DISCONNECT (MQTT 5 says why); the client is closed."""

    reason_code: int
    reason: str
    properties: Properties = _EMPTY


Event = Union[Connected, ConnectionRefused, Published, PublishReceived, Subscribed, Unsubscribed,
              MessageReceived, ReleaseReceived, PingResponse, Disconnected]
