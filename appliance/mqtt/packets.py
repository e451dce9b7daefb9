"""MQTT control packets as frozen, slotted dataclasses.

Constructors validate what a single packet can know about itself and raise
``LocalProtocolError`` on misuse. Rules that depend on the protocol version
(e.g. properties only exist in MQTT 5) are checked by the writer, except for
``Connect`` which carries its own version.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Union

from .errors import LocalProtocolError
from .properties import Properties, PropertyId, WILL
from .topics import is_shared, topic_filter_problem, topic_name_problem

__all__ = [
    "ProtocolVersion", "PacketType", "Packet", "Connect", "Will", "Connack", "Publish", "Puback",
    "Pubrec", "Pubrel", "Pubcomp", "Subscribe", "Subscription", "Suback", "Unsubscribe",
    "Unsuback", "Pingreq", "Pingresp", "Disconnect", "Auth",
]


class ProtocolVersion(IntEnum):
    """The protocol level byte of CONNECT."""

    MQTT_3_1 = 3  # protocol name "MQIsdp"
    MQTT_3_1_1 = 4
    MQTT_5 = 5

    @property
    def protocol_name(self) -> str:
        return "MQIsdp" if self == ProtocolVersion.MQTT_3_1 else "MQTT"


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


_EMPTY = Properties.EMPTY


def _check_properties(props: object) -> None:
    if type(props) is not Properties:
        raise LocalProtocolError(f"properties must be a Properties object, got {props!r}")


def _check_u8(name: str, value: object) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"{name} must be an int in 0..255, got {value!r}")


def _check_packet_id(packet_id: object) -> None:
    if not isinstance(packet_id, int) or not 0 < packet_id <= 0xFFFF:
        raise LocalProtocolError(f"packet_id must be an int in 1..65535, got {packet_id!r}")


def _check_qos(qos: object) -> None:
    if qos not in (0, 1, 2) or isinstance(qos, bool):
        raise LocalProtocolError(f"qos must be 0, 1 or 2, got {qos!r}")


def _check_topic_name(topic: object, properties: Properties) -> None:
    if type(topic) is not str:
        raise LocalProtocolError(f"topic must be a str, got {topic!r}")
    if not topic:
        if PropertyId.TOPIC_ALIAS not in properties:
            raise LocalProtocolError("an empty topic needs a TOPIC_ALIAS property (MQTT 5)")
        return
    problem = topic_name_problem(topic)
    if problem:
        raise LocalProtocolError(problem)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_properties(self.properties)
        if not self.topic:
            raise LocalProtocolError("will topic must not be empty")
        _check_topic_name(self.topic, self.properties)
        if not isinstance(self.payload, bytes):
            raise LocalProtocolError("will payload must be bytes")
        _check_qos(self.qos)
        self.properties.check_allowed(WILL, "will properties")


@dataclass(frozen=True, slots=True)
class Connect:
    packet_type: ClassVar[PacketType] = PacketType.CONNECT
    client_id: str
    protocol_version: ProtocolVersion = ProtocolVersion.MQTT_3_1_1
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "protocol_version", ProtocolVersion(self.protocol_version))
        except ValueError:
            raise LocalProtocolError(f"unknown protocol version {self.protocol_version!r}") from None
        _check_properties(self.properties)
        if not isinstance(self.client_id, str):
            raise LocalProtocolError("client_id must be a str")
        if not isinstance(self.keepalive, int) or not 0 <= self.keepalive <= 0xFFFF:
            raise LocalProtocolError(f"keepalive must be in 0..65535, got {self.keepalive!r}")
        if self.username is not None and not isinstance(self.username, str):
            raise LocalProtocolError("username must be a str or None")
        if self.password is not None and not isinstance(self.password, bytes):
            raise LocalProtocolError("password must be bytes or None")
        if self.will is not None and not isinstance(self.will, Will):
            raise LocalProtocolError("will must be a Will or None")
        if self.protocol_version < ProtocolVersion.MQTT_5:
            if self.password is not None and self.username is None:
                raise LocalProtocolError("MQTT 3.1.1 does not allow a password without a username")
            if self.properties or (self.will is not None and self.will.properties):
                raise LocalProtocolError("properties need MQTT 5")
        self.properties.check_allowed(PacketType.CONNECT, "CONNECT")


@dataclass(frozen=True, slots=True)
class Connack:
    packet_type: ClassVar[PacketType] = PacketType.CONNACK
    session_present: bool = False
    reason_code: int = 0  # a ConnectReturnCode (0..5) in MQTT 3.1.1
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_u8("reason_code", self.reason_code)
        if self.session_present and self.reason_code:
            raise LocalProtocolError("a refused connection has no session present")
        _check_properties(self.properties)
        self.properties.check_allowed(PacketType.CONNACK, "CONNACK")


@dataclass(frozen=True, slots=True)
class Publish:
    packet_type: ClassVar[PacketType] = PacketType.PUBLISH
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        properties = self.properties
        if type(properties) is not Properties:
            _check_properties(properties)
        _check_topic_name(self.topic, properties)
        if type(self.payload) is not bytes:
            raise LocalProtocolError(f"payload must be bytes, got {type(self.payload).__name__}")
        qos = self.qos
        if qos:
            _check_qos(qos)
            _check_packet_id(self.packet_id)
        else:
            if qos != 0:
                _check_qos(qos)
            if self.packet_id is not None:
                raise LocalProtocolError("a QoS 0 PUBLISH has no packet_id")
            if self.dup:
                raise LocalProtocolError("a QoS 0 PUBLISH cannot be a duplicate")
        if properties.items:
            properties.check_allowed(PacketType.PUBLISH, "PUBLISH")


@dataclass(frozen=True, slots=True)
class _Ack:
    packet_id: int
    reason_code: int = 0
    properties: Properties = _EMPTY

    packet_type: ClassVar[PacketType]

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        _check_u8("reason_code", self.reason_code)
        _check_properties(self.properties)
        self.properties.check_allowed(self.packet_type, self.packet_type.name)


@dataclass(frozen=True, slots=True)
class Puback(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBACK


@dataclass(frozen=True, slots=True)
class Pubrec(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBREC


@dataclass(frozen=True, slots=True)
class Pubrel(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBREL


@dataclass(frozen=True, slots=True)
class Pubcomp(_Ack):
    packet_type: ClassVar[PacketType] = PacketType.PUBCOMP


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.topic_filter, str):
            raise LocalProtocolError("topic_filter must be a str")
        problem = topic_filter_problem(self.topic_filter)
        if problem:
            raise LocalProtocolError(problem)
        _check_qos(self.qos)
        if self.retain_handling not in (0, 1, 2):
            raise LocalProtocolError(f"retain_handling must be 0, 1 or 2, got {self.retain_handling!r}")
        if self.no_local and is_shared(self.topic_filter):
            raise LocalProtocolError("no_local is not allowed on a shared subscription")


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_type: ClassVar[PacketType] = PacketType.SUBSCRIBE
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        _check_properties(self.properties)
        object.__setattr__(self, "subscriptions", tuple(self.subscriptions))
        if not self.subscriptions:
            raise LocalProtocolError("SUBSCRIBE needs at least one subscription")
        if not all(isinstance(s, Subscription) for s in self.subscriptions):
            raise LocalProtocolError("subscriptions must be Subscription objects")
        self.properties.check_allowed(PacketType.SUBSCRIBE, "SUBSCRIBE")


def _check_reason_codes(codes: tuple[int, ...]) -> None:
    for code in codes:
        _check_u8("reason code", code)


@dataclass(frozen=True, slots=True)
class Suback:
    packet_type: ClassVar[PacketType] = PacketType.SUBACK
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        _check_properties(self.properties)
        object.__setattr__(self, "reason_codes", tuple(self.reason_codes))
        if not self.reason_codes:
            raise LocalProtocolError("SUBACK needs at least one reason code")
        _check_reason_codes(self.reason_codes)
        self.properties.check_allowed(PacketType.SUBACK, "SUBACK")


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_type: ClassVar[PacketType] = PacketType.UNSUBSCRIBE
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        _check_properties(self.properties)
        if isinstance(self.topic_filters, str):
            raise LocalProtocolError("topic_filters must be a tuple of str, not a str")
        object.__setattr__(self, "topic_filters", tuple(self.topic_filters))
        if not self.topic_filters:
            raise LocalProtocolError("UNSUBSCRIBE needs at least one topic filter")
        for topic_filter in self.topic_filters:
            problem = topic_filter_problem(topic_filter) if isinstance(topic_filter, str) else "not a str"
            if problem:
                raise LocalProtocolError(problem)
        self.properties.check_allowed(PacketType.UNSUBSCRIBE, "UNSUBSCRIBE")


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_type: ClassVar[PacketType] = PacketType.UNSUBACK
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # always empty in MQTT 3.1.1
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id)
        _check_properties(self.properties)
        object.__setattr__(self, "reason_codes", tuple(self.reason_codes))
        _check_reason_codes(self.reason_codes)
        self.properties.check_allowed(PacketType.UNSUBACK, "UNSUBACK")


@dataclass(frozen=True, slots=True)
class Pingreq:
    packet_type: ClassVar[PacketType] = PacketType.PINGREQ


@dataclass(frozen=True, slots=True)
class Pingresp:
    packet_type: ClassVar[PacketType] = PacketType.PINGRESP


@dataclass(frozen=True, slots=True)
class Disconnect:
    packet_type: ClassVar[PacketType] = PacketType.DISCONNECT
    reason_code: int = 0
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_u8("reason_code", self.reason_code)
        _check_properties(self.properties)
        self.properties.check_allowed(PacketType.DISCONNECT, "DISCONNECT")


@dataclass(frozen=True, slots=True)
class Auth:
    """MQTT 5 only."""

    packet_type: ClassVar[PacketType] = PacketType.AUTH
    reason_code: int = 0
    properties: Properties = _EMPTY

    def __post_init__(self) -> None:
        _check_u8("reason_code", self.reason_code)
        _check_properties(self.properties)
        self.properties.check_allowed(PacketType.AUTH, "AUTH")


Packet = Union[Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Suback,
               Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect, Auth]
