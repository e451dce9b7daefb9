"""FrameReader mechanics, packet constructor validation, Properties, encode-time checks."""

from __future__ import annotations

import dataclasses

import pytest

import appliance.mqtt as mqtt
from appliance.mqtt import (
    NEED_DATA, Auth, Connack, Connect, Disconnect, Frame, FrameReader, LocalProtocolError,
    PacketType, Properties, PropertyId as P, ProtocolVersion, Puback, Publish, ReasonCode,
    Subscribe, Subscription, Suback, Unsuback, Unsubscribe, Will, encode_packet,
)

V311, V5 = ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5
PUBLISH = bytes.fromhex("30070003612f626869")


def test_public_names() -> None:
    for name in ["NEED_DATA", "ProtocolVersion", "PacketType", "ReasonCode", "ConnectReturnCode",
                 "PropertyId", "Properties", "Connect", "Will", "Connack", "Publish", "Puback",
                 "Pubrec", "Pubrel", "Pubcomp", "Subscribe", "Subscription", "Suback",
                 "Unsubscribe", "Unsuback", "Pingreq", "Pingresp", "Disconnect", "Auth", "Frame",
                 "FrameReader", "Decoder", "decode_packet", "decode_publish", "encode_packet",
                 "encode_publish", "ProtocolError", "RemoteProtocolError", "LocalProtocolError"]:
        assert hasattr(mqtt, name), name
    assert repr(NEED_DATA) == "NEED_DATA"
    assert issubclass(LocalProtocolError, ValueError)
    assert issubclass(LocalProtocolError, mqtt.ProtocolError) and issubclass(mqtt.RemoteProtocolError, mqtt.ProtocolError)
    assert ReasonCode.NORMAL_DISCONNECTION == ReasonCode.GRANTED_QOS_0 == 0
    assert ProtocolVersion.MQTT_3_1.protocol_name == "MQIsdp"


def test_fast_publish_constructor_knows_every_field() -> None:
    # reader.decode_publish fills the slots directly; a new field must be added there too
    assert [f.name for f in dataclasses.fields(Publish)] == [
        "topic", "payload", "qos", "retain", "dup", "packet_id", "properties"]


@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("packet", [
    Publish("a/b", b"x"),
    Publish("a/b", b"", qos=1, packet_id=7, retain=True, dup=True),
    Publish("a/b", b"r", qos=1, packet_id=8, retain=True),  # retain and dup differ: a swap shows
    Publish("a/b", b"d", qos=2, packet_id=9, dup=True),
    Publish("", b"payload", qos=2, packet_id=65535, properties=Properties(((P.TOPIC_ALIAS, 3),))),
])
def test_publish_fields_are_the_decoded_publish_in_field_order(packet: Publish, version: ProtocolVersion) -> None:
    if version is V311 and packet.properties:
        pytest.skip("properties are MQTT 5")
    raw = encode_packet(packet, version)  # short packets: a 2-byte fixed header
    fields = mqtt.publish_fields(raw[0], raw[2:], version)
    # The expectation is the packet encoded above, not decode_publish (built from publish_fields).
    assert fields == tuple(getattr(packet, f.name) for f in dataclasses.fields(Publish))
    assert mqtt.Publish(*fields) == packet
    assert mqtt.decode_publish(raw[0], raw[2:], version) == packet


# ---- FrameReader -------------------------------------------------------------------------

def test_frame_fields() -> None:
    frames = FrameReader()
    frames.feed(PUBLISH)
    frame = frames.next_frame()
    assert isinstance(frame, Frame)
    assert (frame.packet_type, frame.flags, frame.body_offset) == (3, 0, 2)
    assert frame.body == PUBLISH[2:] and type(frame.raw) is bytes


def test_raw_is_not_a_view_of_the_buffer() -> None:
    frames = FrameReader()
    frames.feed(PUBLISH + PUBLISH[:3])
    frame = frames.next_frame()
    frames.feed(PUBLISH[3:] + b"\xff" * 100)
    assert frame.raw == PUBLISH  # type: ignore[union-attr]


def test_buffered_and_pending_bytes() -> None:
    frames = FrameReader()
    frames.feed(PUBLISH + PUBLISH[:4])
    assert frames.buffered == len(PUBLISH) + 4
    assert frames.next_frame() is not NEED_DATA
    assert frames.buffered == 4 and frames.pending_bytes() == PUBLISH[:4]
    assert frames.next_frame() is NEED_DATA


def test_long_stream_compacts_the_buffer() -> None:
    frames = FrameReader()
    count = 30_000  # ~270 kB, enough to cross the compaction threshold several times
    frames.feed(PUBLISH * count + PUBLISH[:5])
    for _ in range(count):
        assert frames.next_frame().raw == PUBLISH  # type: ignore[union-attr]
    assert frames.pending_bytes() == PUBLISH[:5]
    assert len(frames._buf) < 70_000  # compacted, not holding every consumed byte


def test_empty_feed() -> None:
    frames = FrameReader()
    frames.feed(b"")
    assert frames.next_frame() is NEED_DATA


# ---- packet constructors -----------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: Publish("a", qos=3),
    lambda: Publish("a", qos=1),
    lambda: Publish("a", qos=1, packet_id=0),
    lambda: Publish("a", qos=0, packet_id=1),
    lambda: Publish("a", dup=True),
    lambda: Publish("a/+"),
    lambda: Publish("a#"),
    lambda: Publish("a\x00"),
    lambda: Publish(""),
    lambda: Publish("a", "text"),  # type: ignore[arg-type]
    lambda: Publish("a", properties=Properties(((P.SESSION_EXPIRY_INTERVAL, 1),))),
    lambda: Publish("a", properties={}),  # type: ignore[arg-type]
    lambda: Puback(0),
    lambda: Puback(70000),
    lambda: Puback(1, 256),
    lambda: Puback(1, properties=Properties(((P.TOPIC_ALIAS, 1),))),
    lambda: Connect("c", password=b"p"),
    lambda: Connect("c", protocol_version=7),  # type: ignore[arg-type]
    lambda: Connect("c", keepalive=70000),
    lambda: Connect("c", properties=Properties(((P.SESSION_EXPIRY_INTERVAL, 1),))),
    lambda: Connect("c", V5, properties=Properties(((P.TOPIC_ALIAS, 1),))),
    lambda: Will("w/#", b""),
    lambda: Will("", b""),
    lambda: Will("w", b"", qos=3),
    lambda: Connack(True, 5),
    lambda: Subscription("a/#/b"),
    lambda: Subscription("a+"),
    lambda: Subscription(""),
    lambda: Subscription("$share/g"),
    lambda: Subscription("$share/g/a", no_local=True),
    lambda: Subscription("a", retain_handling=3),
    lambda: Subscribe(1, ()),
    lambda: Subscribe(1, ("a",)),  # type: ignore[arg-type]
    lambda: Suback(1, ()),
    lambda: Suback(1, (300,)),
    lambda: Unsubscribe(1, ()),
    lambda: Unsubscribe(1, "a/b"),  # type: ignore[arg-type]
    lambda: Unsubscribe(1, ("a#",)),
    lambda: Disconnect(-1),
    lambda: Auth(properties=Properties(((P.TOPIC_ALIAS, 1),))),
])
def test_constructor_rejects_misuse(make: object) -> None:
    with pytest.raises(LocalProtocolError):
        make()  # type: ignore[operator]


def test_packets_are_frozen_and_typed() -> None:
    packet = Publish("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        packet.topic = "b"  # type: ignore[misc]
    assert not hasattr(packet, "__dict__")
    assert Publish.packet_type == PacketType.PUBLISH and Auth.packet_type == PacketType.AUTH
    assert Connect("c", 5).protocol_version is V5  # type: ignore[arg-type]


@pytest.mark.parametrize("packet", [
    Publish("a", properties=Properties(((P.USER_PROPERTY, ("k", "v")),))),
    Publish("", properties=Properties(((P.TOPIC_ALIAS, 1),))),
    Puback(1, 0x10),
    Disconnect(4),
    Auth(),
    Unsuback(1, (0,)),
    Subscribe(1, (Subscription("a", no_local=True),)),
    Suback(1, (1,), Properties(((P.REASON_STRING, "r"),))),
    Connack(properties=Properties(((P.MAXIMUM_QOS, 1),))),
    Unsubscribe(1, ("a",), Properties(((P.USER_PROPERTY, ("k", "v")),))),
])
def test_mqtt5_only_features_rejected_for_311(packet: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_packet(packet, V311)  # type: ignore[arg-type]


def test_encode_limits() -> None:
    with pytest.raises(LocalProtocolError):
        encode_packet(Publish("a" * 70000), V311)
    with pytest.raises(LocalProtocolError):
        encode_packet(Unsuback(1), V5)  # MQTT 5 needs a reason code per filter
    with pytest.raises(LocalProtocolError):
        encode_packet("not a packet", V5)  # type: ignore[arg-type]


def test_shortest_forms() -> None:
    assert encode_packet(Puback(1), V5) == bytes.fromhex("40020001")
    assert encode_packet(Puback(1, 0x10), V5) == bytes.fromhex("4003000110")
    assert encode_packet(Disconnect(), V5) == b"\xe0\x00"
    assert encode_packet(Disconnect(0x8E), V5) == b"\xe0\x01\x8e"
    assert encode_packet(Auth(), V5) == b"\xf0\x00"


# ---- Properties --------------------------------------------------------------------------

def test_properties_api() -> None:
    props = Properties(((P.USER_PROPERTY, ("a", "1")), (P.CONTENT_TYPE, "x"),
                        (P.USER_PROPERTY, ("a", "2"))))
    assert props.get(P.CONTENT_TYPE) == "x" and props.get(P.TOPIC_ALIAS, 7) == 7
    assert props.user_properties == (("a", "1"), ("a", "2"))
    assert list(props)[1] == (P.CONTENT_TYPE, "x") and len(props) == 3 and props
    assert not Properties.EMPTY and Properties() == Properties.EMPTY
    replaced = props.with_(P.CONTENT_TYPE, "y")
    assert replaced.items[1] == (P.CONTENT_TYPE, "y") and props.get(P.CONTENT_TYPE) == "x"
    assert props.with_(P.USER_PROPERTY, ("b", "3")).user_properties[-1] == ("b", "3")
    assert props.with_(0x23, 4).get(P.TOPIC_ALIAS) == 4  # type: ignore[arg-type]
    assert props.without(P.USER_PROPERTY).items == ((P.CONTENT_TYPE, "x"),)
    assert Properties(((0x03, "x"),)).items[0][0] is P.CONTENT_TYPE  # type: ignore[arg-type]
    hash(props)


@pytest.mark.parametrize("items", [
    ((P.CONTENT_TYPE, 1),),
    ((P.CORRELATION_DATA, "text"),),
    ((P.USER_PROPERTY, ("k",)),),
    ((P.TOPIC_ALIAS, 0),),
    ((P.TOPIC_ALIAS, 70000),),
    ((P.PAYLOAD_FORMAT_INDICATOR, 2),),
    ((P.MESSAGE_EXPIRY_INTERVAL, True),),
    ((P.CONTENT_TYPE, "a"), (P.CONTENT_TYPE, "b")),
    ((0x7F, 1),),
    ((P.CONTENT_TYPE,),),
    [(P.CONTENT_TYPE, "a")],
])
def test_properties_validation(items: object) -> None:
    with pytest.raises(LocalProtocolError):
        Properties(items)  # type: ignore[arg-type]


def test_subscription_identifier_repeats_only_in_publish() -> None:
    twice = Properties(((P.SUBSCRIPTION_IDENTIFIER, 1), (P.SUBSCRIPTION_IDENTIFIER, 2)))
    Publish("a", properties=twice)
    with pytest.raises(LocalProtocolError):
        Subscribe(1, (Subscription("a"),), twice)
