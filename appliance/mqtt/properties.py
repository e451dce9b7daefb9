"""MQTT 5 properties: identifiers, wire types, where each may appear, and codec.

A ``Properties`` object is an immutable sequence of ``(PropertyId, value)``
pairs in wire order. Values are ``int`` (byte, two/four byte and variable byte
integers), ``str`` (UTF-8 strings), ``bytes`` (binary data) and ``(str, str)``
for ``USER_PROPERTY``, the only property (with ``SUBSCRIPTION_IDENTIFIER`` in
PUBLISH) that may repeat.

Where a property may appear is keyed by the MQTT packet type number, plus
``WILL`` (0, a number no packet uses) for the will properties inside CONNECT.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Iterable, Iterator

from .errors import LocalProtocolError, RemoteProtocolError
from .reason_codes import ReasonCode
from .wire import (
    encode_binary, encode_str, encode_varint, read_binary, read_str, read_u16, read_u32,
    read_varint, MAX_VARINT,
)

__all__ = ["PropertyId", "Properties", "WILL", "decode_properties", "encode_properties"]


class PropertyId(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


P = PropertyId
WILL = 0
# Packet type numbers (MQTT §2.1.2), spelled out to keep this module free of packets.py.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH = 8, 9, 10, 11, 14, 15

# Wire types.
BYTE, U16, U32, VARINT, STR, BIN, PAIR = range(7)

_MESSAGE = frozenset({PUBLISH, WILL})
_REASON = frozenset({CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH})
_EVERYWHERE = frozenset({WILL, CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP,
                         SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH})

# id -> (wire type, contexts where allowed)
SPEC: dict[PropertyId, tuple[int, frozenset[int]]] = {
    P.PAYLOAD_FORMAT_INDICATOR: (BYTE, _MESSAGE),
    P.MESSAGE_EXPIRY_INTERVAL: (U32, _MESSAGE),
    P.CONTENT_TYPE: (STR, _MESSAGE),
    P.RESPONSE_TOPIC: (STR, _MESSAGE),
    P.CORRELATION_DATA: (BIN, _MESSAGE),
    P.SUBSCRIPTION_IDENTIFIER: (VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    P.SESSION_EXPIRY_INTERVAL: (U32, frozenset({CONNECT, CONNACK, DISCONNECT})),
    P.ASSIGNED_CLIENT_IDENTIFIER: (STR, frozenset({CONNACK})),
    P.SERVER_KEEP_ALIVE: (U16, frozenset({CONNACK})),
    P.AUTHENTICATION_METHOD: (STR, frozenset({CONNECT, CONNACK, AUTH})),
    P.AUTHENTICATION_DATA: (BIN, frozenset({CONNECT, CONNACK, AUTH})),
    P.REQUEST_PROBLEM_INFORMATION: (BYTE, frozenset({CONNECT})),
    P.WILL_DELAY_INTERVAL: (U32, frozenset({WILL})),
    P.REQUEST_RESPONSE_INFORMATION: (BYTE, frozenset({CONNECT})),
    P.RESPONSE_INFORMATION: (STR, frozenset({CONNACK})),
    P.SERVER_REFERENCE: (STR, frozenset({CONNACK, DISCONNECT})),
    P.REASON_STRING: (STR, _REASON),
    P.RECEIVE_MAXIMUM: (U16, frozenset({CONNECT, CONNACK})),
    P.TOPIC_ALIAS_MAXIMUM: (U16, frozenset({CONNECT, CONNACK})),
    P.TOPIC_ALIAS: (U16, frozenset({PUBLISH})),
    P.MAXIMUM_QOS: (BYTE, frozenset({CONNACK})),
    P.RETAIN_AVAILABLE: (BYTE, frozenset({CONNACK})),
    P.USER_PROPERTY: (PAIR, _EVERYWHERE),
    P.MAXIMUM_PACKET_SIZE: (U32, frozenset({CONNECT, CONNACK})),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: (BYTE, frozenset({CONNACK})),
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (BYTE, frozenset({CONNACK})),
    P.SHARED_SUBSCRIPTION_AVAILABLE: (BYTE, frozenset({CONNACK})),
}

# Integer properties whose legal range is narrower than their wire type.
_BOOLEANS = (P.PAYLOAD_FORMAT_INDICATOR, P.REQUEST_PROBLEM_INFORMATION,
             P.REQUEST_RESPONSE_INFORMATION, P.MAXIMUM_QOS, P.RETAIN_AVAILABLE,
             P.WILDCARD_SUBSCRIPTION_AVAILABLE, P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
             P.SHARED_SUBSCRIPTION_AVAILABLE)
RANGES: dict[PropertyId, tuple[int, int]] = {pid: (0, 1) for pid in _BOOLEANS}
RANGES.update({
    P.SUBSCRIPTION_IDENTIFIER: (1, MAX_VARINT),
    P.RECEIVE_MAXIMUM: (1, 0xFFFF),
    P.MAXIMUM_PACKET_SIZE: (1, 0xFFFFFFFF),
    P.TOPIC_ALIAS: (1, 0xFFFF),
})
_WIRE_RANGE = {BYTE: (0, 0xFF), U16: (0, 0xFFFF), U32: (0, 0xFFFFFFFF), VARINT: (0, MAX_VARINT)}
_USER_PROPERTY = P.USER_PROPERTY
_BY_VALUE: dict[int, PropertyId] = {int(pid): pid for pid in PropertyId}


def _repeatable(pid: int, context: int) -> bool:
    return pid == P.USER_PROPERTY or (pid == P.SUBSCRIPTION_IDENTIFIER and context == PUBLISH)


def _value_problem(pid: PropertyId, value: object) -> str | None:
    wire_type = SPEC[pid][0]
    if wire_type == STR:
        return None if isinstance(value, str) else "needs a str"
    if wire_type == BIN:
        return None if isinstance(value, bytes) else "needs bytes"
    if wire_type == PAIR:
        ok = (isinstance(value, tuple) and len(value) == 2
              and isinstance(value[0], str) and isinstance(value[1], str))
        return None if ok else "needs a (str, str) tuple"
    if not isinstance(value, int) or isinstance(value, bool):
        return "needs an int"
    lo, hi = RANGES.get(pid) or _WIRE_RANGE[wire_type]
    return None if lo <= value <= hi else f"must be in {lo}..{hi}"


@dataclass(frozen=True, slots=True)
class Properties:
    items: tuple[tuple[PropertyId, object], ...] = ()

    EMPTY: ClassVar[Properties]

    def __post_init__(self) -> None:
        if not isinstance(self.items, tuple):
            raise LocalProtocolError("Properties.items must be a tuple of (PropertyId, value)")
        seen = set()
        items = []
        for item in self.items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise LocalProtocolError(f"property item {item!r} is not a (PropertyId, value) pair")
            pid, value = item
            try:
                pid = PropertyId(pid)
            except ValueError:
                raise LocalProtocolError(f"unknown property id {pid!r}") from None
            problem = _value_problem(pid, value)
            if problem:
                raise LocalProtocolError(f"{pid.name} {problem}, got {value!r}")
            if pid in seen and not _repeatable(pid, PUBLISH):
                raise LocalProtocolError(f"{pid.name} may appear only once")
            seen.add(pid)
            items.append((pid, value))
        object.__setattr__(self, "items", tuple(items))

    @classmethod
    def _trusted(cls, items: tuple[tuple[PropertyId, object], ...]) -> Properties:
        """Skip validation: for the decoder, which has already checked every item."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "items", items)
        return obj

    @classmethod
    def user(cls, pairs: Iterable[tuple[str, str]]) -> Properties:
        """Only USER_PROPERTY items, checked for what they can get wrong: the cheap way to build
        properties for every message (the forwarder's message-id, client-id and schema)."""
        items = []
        for pair in pairs:
            name, value = pair
            if type(name) is not str or type(value) is not str:
                raise LocalProtocolError(f"USER_PROPERTY needs a (str, str) tuple, got {pair!r}")
            items.append((_USER_PROPERTY, (name, value)))
        return cls._trusted(tuple(items))

    def get(self, pid: PropertyId, default: object = None) -> object:
        for key, value in self.items:
            if key == pid:
                return value
        return default

    def get_all(self, pid: PropertyId) -> tuple[object, ...]:
        return tuple(value for key, value in self.items if key == pid)

    @property
    def user_properties(self) -> tuple[tuple[str, str], ...]:
        return tuple(v for k, v in self.items if k == P.USER_PROPERTY)  # type: ignore[misc]

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[tuple[PropertyId, object]]:
        return iter(self.items)

    def __contains__(self, pid: object) -> bool:
        return any(key == pid for key, _ in self.items)

    def with_(self, pid: PropertyId, value: object) -> Properties:
        """Add a property; a non-repeatable one replaces the old value in place."""
        pid = PropertyId(pid)
        if _repeatable(pid, PUBLISH) or pid not in self:
            return Properties(self.items + ((pid, value),))
        return Properties(tuple((k, value if k == pid else v) for k, v in self.items))

    def without(self, pid: PropertyId) -> Properties:
        return Properties._trusted(tuple(item for item in self.items if item[0] != pid))

    def check_allowed(self, context: int, where: str) -> None:
        """Raise LocalProtocolError unless every property may be sent in ``context``."""
        for pid, _ in self.items:
            if pid is not _USER_PROPERTY:
                break
        else:
            return  # only user properties: allowed everywhere, any number of times
        seen = set()
        for pid, _ in self.items:
            if context not in SPEC[pid][1]:
                raise LocalProtocolError(f"{pid.name} is not allowed in {where}")
            if pid in seen and not _repeatable(pid, context):
                raise LocalProtocolError(f"{pid.name} may appear only once in {where}")
            seen.add(pid)


Properties.EMPTY = Properties()
_EMPTY = Properties.EMPTY


def decode_properties(buf: bytes, pos: int, end: int, context: int) -> tuple[Properties, int]:
    """Read a property length and the properties after it, from ``buf[pos:end]``."""
    length, pos = read_varint(buf, pos, end)
    if not length:
        return _EMPTY, pos
    stop = pos + length
    if stop > end:
        raise RemoteProtocolError("property length runs past the end of the packet")
    items = []
    seen = 0  # bit set of non-repeatable ids already read
    while pos < stop:
        pid = _BY_VALUE.get(buf[pos])
        if pid is None:
            raise RemoteProtocolError(f"unknown property id 0x{buf[pos]:02x}")
        pos += 1
        wire_type, contexts = SPEC[pid]
        if context not in contexts:
            raise RemoteProtocolError(
                f"{pid.name} is not allowed here", ReasonCode.PROTOCOL_ERROR)
        if not _repeatable(pid, context):
            bit = 1 << pid
            if seen & bit:
                raise RemoteProtocolError(
                    f"{pid.name} appears twice", ReasonCode.PROTOCOL_ERROR)
            seen |= bit
        value: object
        if wire_type == BYTE:
            if pos >= stop:
                raise RemoteProtocolError("truncated byte property")
            value = buf[pos]
            pos += 1
        elif wire_type == U16:
            value, pos = read_u16(buf, pos, stop)
        elif wire_type == U32:
            value, pos = read_u32(buf, pos, stop)
        elif wire_type == STR:
            value, pos = read_str(buf, pos, stop)
        elif wire_type == PAIR:
            key, pos = read_str(buf, pos, stop)
            val, pos = read_str(buf, pos, stop)
            value = (key, val)
        elif wire_type == BIN:
            value, pos = read_binary(buf, pos, stop)
        else:
            value, pos = read_varint(buf, pos, stop)
        limits = RANGES.get(pid)
        if limits is not None and not (limits[0] <= value <= limits[1]):  # type: ignore[operator]
            code = ReasonCode.TOPIC_ALIAS_INVALID if pid == P.TOPIC_ALIAS else ReasonCode.PROTOCOL_ERROR
            raise RemoteProtocolError(f"{pid.name} value {value!r} out of range", code)
        items.append((pid, value))
    return Properties._trusted(tuple(items)), pos


def encode_properties(props: Properties) -> bytes:
    """Property length + properties. The caller has checked ``props`` for its context."""
    if not props.items:
        return b"\x00"
    out = bytearray()
    for pid, value in props.items:
        wire_type = SPEC[pid][0]
        out.append(pid)
        if wire_type == BYTE:
            out.append(value)  # type: ignore[arg-type]
        elif wire_type == U16:
            out += value.to_bytes(2, "big")  # type: ignore[attr-defined]
        elif wire_type == U32:
            out += value.to_bytes(4, "big")  # type: ignore[attr-defined]
        elif wire_type == STR:
            out += encode_str(value)  # type: ignore[arg-type]
        elif wire_type == PAIR:
            # Inline for the common case (user properties on every forwarded message); encode_str
            # raises for what it would refuse.
            for text in value:  # type: ignore[attr-defined]
                try:
                    data = text.encode()
                except UnicodeEncodeError:
                    data = encode_str(text)
                if "\x00" in text or len(data) > 0xFFFF:
                    encode_str(text)
                out += len(data).to_bytes(2, "big")
                out += data
        elif wire_type == BIN:
            out += encode_binary(value)  # type: ignore[arg-type]
        else:
            out += encode_varint(value)  # type: ignore[arg-type]
    return encode_varint(len(out)) + out
