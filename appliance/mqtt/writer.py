"""Packets to bytes. Always the shortest valid form of each packet.

Version rules the packet objects cannot know on their own are checked here:
properties, reason codes and subscription options beyond QoS need MQTT 5.
"""

from __future__ import annotations

from typing import Callable

from .errors import LocalProtocolError
from .packets import (
    Auth, Connack, Connect, Disconnect, Packet, Pingreq, Pingresp, ProtocolVersion,
    Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Unsuback, Unsubscribe,
)
from .properties import Properties, encode_properties
from .wire import encode_binary, encode_str, encode_varint

__all__ = ["encode_packet", "encode_publish", "encode_publish_fields"]

_MQTT_5 = ProtocolVersion.MQTT_5


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def _v3_properties(properties: Properties, what: str) -> None:
    if properties.items:
        raise LocalProtocolError(f"{what} properties need MQTT 5")


def encode_publish(packet: Publish, version: ProtocolVersion) -> bytes:
    return encode_publish_fields(packet.topic, packet.payload, packet.qos, packet.retain, packet.dup,
                                 packet.packet_id, packet.properties, version)


def encode_publish_fields(topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int | None,
                          properties: Properties, version: ProtocolVersion) -> bytes:
    """A PUBLISH from its fields, for a sender that has checked them (as ``Publish`` would) and
    need not build the packet object: the client core, per message."""
    data = topic.encode("utf-8")
    if len(data) > 0xFFFF:
        raise LocalProtocolError("topic longer than 65535 bytes")
    first_byte = 0x30 | (qos << 1) | retain | (dup << 3)
    parts = [len(data).to_bytes(2, "big"), data]
    if qos:
        parts.append(packet_id.to_bytes(2, "big"))  # type: ignore[union-attr]
    if version == _MQTT_5:
        parts.append(encode_properties(properties))
    else:
        _v3_properties(properties, "PUBLISH")
        if not data:
            raise LocalProtocolError("MQTT 3.1.1 has no empty topics (topic aliases need MQTT 5)")
    parts.append(payload)
    body = b"".join(parts)
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def _encode_connect(packet: Connect, version: ProtocolVersion) -> bytes:
    level = packet.protocol_version
    v5 = level == _MQTT_5
    will = packet.will
    flags = (packet.clean_start << 1)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (will.retain << 5)
    if packet.password is not None:
        flags |= 0x40
    if packet.username is not None:
        flags |= 0x80
    parts = [encode_str(level.protocol_name), bytes((level, flags)), _u16(packet.keepalive)]
    if v5:
        parts.append(encode_properties(packet.properties))
    parts.append(encode_str(packet.client_id))
    if will is not None:
        if v5:
            parts.append(encode_properties(will.properties))
        parts.append(encode_str(will.topic))
        parts.append(encode_binary(will.payload))
    if packet.username is not None:
        parts.append(encode_str(packet.username))
    if packet.password is not None:
        parts.append(encode_binary(packet.password))
    return _frame(0x10, b"".join(parts))


def _encode_connack(packet: Connack, version: ProtocolVersion) -> bytes:
    body = bytes((packet.session_present, packet.reason_code))
    if version == _MQTT_5:
        body += encode_properties(packet.properties)
    else:
        _v3_properties(packet.properties, "CONNACK")
    return _frame(0x20, body)


def _ack_encoder(first_byte: int) -> Callable[[Packet, ProtocolVersion], bytes]:
    def encode(packet: Packet, version: ProtocolVersion) -> bytes:
        body = _u16(packet.packet_id)  # type: ignore[union-attr, arg-type]  # an ack: its packet_id is an int
        code = packet.reason_code  # type: ignore[union-attr]
        properties = packet.properties  # type: ignore[union-attr]
        if version == _MQTT_5:
            if properties.items:
                body += bytes((code,)) + encode_properties(properties)
            elif code:
                body += bytes((code,))
        elif code or properties.items:
            raise LocalProtocolError(f"{packet.packet_type.name} reason codes need MQTT 5")
        return _frame(first_byte, body)

    return encode


def _encode_subscribe(packet: Subscribe, version: ProtocolVersion) -> bytes:
    v5 = version == _MQTT_5
    parts = [_u16(packet.packet_id)]
    if v5:
        parts.append(encode_properties(packet.properties))
    else:
        _v3_properties(packet.properties, "SUBSCRIBE")
    for sub in packet.subscriptions:
        options = sub.qos | (sub.no_local << 2) | (sub.retain_as_published << 3) | (
            sub.retain_handling << 4)
        if options > 3 and not v5:
            raise LocalProtocolError("subscription options beyond QoS need MQTT 5")
        parts.append(encode_str(sub.topic_filter))
        parts.append(bytes((options,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(packet: Suback, version: ProtocolVersion) -> bytes:
    parts = [_u16(packet.packet_id)]
    if version == _MQTT_5:
        parts.append(encode_properties(packet.properties))
    else:
        _v3_properties(packet.properties, "SUBACK")
    parts.append(bytes(packet.reason_codes))
    return _frame(0x90, b"".join(parts))


def _encode_unsubscribe(packet: Unsubscribe, version: ProtocolVersion) -> bytes:
    parts = [_u16(packet.packet_id)]
    if version == _MQTT_5:
        parts.append(encode_properties(packet.properties))
    else:
        _v3_properties(packet.properties, "UNSUBSCRIBE")
    parts.extend(encode_str(topic_filter) for topic_filter in packet.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(packet: Unsuback, version: ProtocolVersion) -> bytes:
    body = _u16(packet.packet_id)
    if version == _MQTT_5:
        if not packet.reason_codes:
            raise LocalProtocolError("an MQTT 5 UNSUBACK needs one reason code per topic filter")
        body += encode_properties(packet.properties) + bytes(packet.reason_codes)
    elif packet.reason_codes or packet.properties.items:
        raise LocalProtocolError("UNSUBACK reason codes and properties need MQTT 5")
    return _frame(0xB0, body)


def _reason_encoder(first_byte: int) -> Callable[[Packet, ProtocolVersion], bytes]:
    def encode(packet: Packet, version: ProtocolVersion) -> bytes:
        code = packet.reason_code  # type: ignore[union-attr]
        properties = packet.properties  # type: ignore[union-attr]
        if version != _MQTT_5:
            if first_byte == 0xF0:
                raise LocalProtocolError("AUTH needs MQTT 5")
            if code or properties.items:
                raise LocalProtocolError("DISCONNECT reason codes and properties need MQTT 5")
            return bytes((first_byte, 0))
        if properties.items:
            return _frame(first_byte, bytes((code,)) + encode_properties(properties))
        if code:
            return bytes((first_byte, 1, code))
        return bytes((first_byte, 0))

    return encode


_PINGREQ = b"\xc0\x00"
_PINGRESP = b"\xd0\x00"

_ENCODERS: dict[type, Callable[[Packet, ProtocolVersion], bytes]] = {
    Publish: encode_publish,  # type: ignore[dict-item]
    Connect: _encode_connect,  # type: ignore[dict-item]
    Connack: _encode_connack,  # type: ignore[dict-item]
    Puback: _ack_encoder(0x40),
    Pubrec: _ack_encoder(0x50),
    Pubrel: _ack_encoder(0x62),
    Pubcomp: _ack_encoder(0x70),
    Subscribe: _encode_subscribe,  # type: ignore[dict-item]
    Suback: _encode_suback,  # type: ignore[dict-item]
    Unsubscribe: _encode_unsubscribe,  # type: ignore[dict-item]
    Unsuback: _encode_unsuback,  # type: ignore[dict-item]
    Pingreq: lambda packet, version: _PINGREQ,
    Pingresp: lambda packet, version: _PINGRESP,
    Disconnect: _reason_encoder(0xE0),
    Auth: _reason_encoder(0xF0),
}


def encode_packet(packet: Packet, version: ProtocolVersion) -> bytes:
    """Encode ``packet`` for a connection speaking ``version`` (CONNECT uses its own)."""
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise LocalProtocolError(f"not an MQTT packet: {packet!r}")
    return encoder(packet, version)
