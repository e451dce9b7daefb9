"""Property tests: arbitrary input never escapes as anything but RemoteProtocolError,
and every valid packet survives encode -> decode unchanged."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from appliance.mqtt import (
    NEED_DATA, Auth, Connack, Connect, Decoder, Disconnect, Pingreq, Pingresp, Properties,
    PropertyId, ProtocolVersion, Puback, Pubcomp, Publish, Pubrec, Pubrel, RemoteProtocolError,
    Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will, decode_packet, encode_packet,
)
from appliance.mqtt.properties import BIN, BYTE, PAIR, RANGES, SPEC, STR, U16, U32, WILL
from tests.mqtt.mqtt_capture import FIXTURE
from tests.mqtt.mqtt_golden import GOLDEN, golden_bytes

V311, V5 = ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5
VERSIONS = st.sampled_from([None, ProtocolVersion.MQTT_3_1, V311, V5])
# MQTT_FUZZ_SCALE=50 for a long local run; the default keeps the suite fast.
SCALE = int(os.environ.get("MQTT_FUZZ_SCALE", "1"))
FAST = settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_WIRES = [golden_bytes(hex_text) for _, _, hex_text, _ in GOLDEN] + [
    bytes.fromhex(h) for s in json.loads(FIXTURE.read_text())["sessions"]
    for d in ("client_to_server", "server_to_client") for h in s[d]]


def _drain(decoder: Decoder, data: bytes, chunks: list[int]) -> None:
    """Feed ``data`` in chunks; only packets, NEED_DATA or RemoteProtocolError may come out."""
    pos = 0
    try:
        for size in chunks + [len(data)]:
            decoder.receive_data(data[pos:pos + size])
            pos += size
            while (packet := decoder.next_packet()) is not NEED_DATA:
                assert hasattr(packet, "packet_type")
    except RemoteProtocolError as exc:
        assert isinstance(exc.reason_code, int)


@FAST
@given(version=VERSIONS, data=st.binary(max_size=300),
       chunks=st.lists(st.integers(0, 40), max_size=8))
def test_arbitrary_bytes(version: ProtocolVersion | None, data: bytes, chunks: list[int]) -> None:
    _drain(Decoder(version=version), data, chunks)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(st.sampled_from(VALID_WIRES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(wire) - 1, 0)))
        if op == "flip" and wire:
            wire[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and wire:
            wire[i] = draw(st.integers(0, 255))
        elif op == "insert":
            wire.insert(i, draw(st.integers(0, 255)))
        elif op == "delete" and wire:
            del wire[i]
        elif op == "truncate":
            del wire[i:]
    return bytes(wire)


@FAST
@given(version=VERSIONS, data=mutated(), chunks=st.lists(st.integers(0, 20), max_size=4))
def test_mutated_valid_packets(version: ProtocolVersion | None, data: bytes, chunks: list[int]) -> None:
    _drain(Decoder(version=version), data, chunks)


@FAST
@given(version=st.sampled_from([V311, V5]), first_byte=st.integers(0x10, 0xFF), body=mutated())
def test_decode_packet_on_any_body(version: ProtocolVersion, first_byte: int, body: bytes) -> None:
    try:
        decode_packet(first_byte, body, version)
    except RemoteProtocolError:
        pass


# ---- round trip --------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
topics = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00+#"),
                 min_size=1, max_size=12)
filters = st.one_of(
    topics,
    st.lists(st.sampled_from(["a", "+", "b c", "ü", ""]), min_size=1, max_size=4).map("/".join)
    .filter(bool),
    topics.map(lambda t: t + "/#"),
    st.just("#"),
    topics.map(lambda t: "$share/g/" + t),
)
packet_ids = st.integers(1, 0xFFFF)
reason_codes = st.integers(0, 255)


def _value(pid: PropertyId) -> st.SearchStrategy[object]:
    wire_type = SPEC[pid][0]
    if wire_type == STR:
        return texts
    if wire_type == BIN:
        return st.binary(max_size=8)
    if wire_type == PAIR:
        return st.tuples(texts, texts)
    lo, hi = RANGES.get(pid) or {BYTE: (0, 255), U16: (0, 0xFFFF), U32: (0, 0xFFFFFFFF)}.get(
        wire_type, (0, 268_435_455))
    return st.integers(lo, hi)


@st.composite
def properties_for(draw: st.DrawFn, context: int, version: ProtocolVersion) -> Properties:
    if version != V5:
        return Properties.EMPTY
    allowed = sorted(pid for pid, (_, contexts) in SPEC.items() if context in contexts)
    pids = draw(st.lists(st.sampled_from(allowed), max_size=4))
    items: list[tuple[PropertyId, object]] = []
    for pid in pids:
        repeatable = pid == PropertyId.USER_PROPERTY or (
            pid == PropertyId.SUBSCRIPTION_IDENTIFIER and context == 3)
        if repeatable or all(p != pid for p, _ in items):
            items.append((pid, draw(_value(pid))))
    return Properties(tuple(items))


@st.composite
def packets(draw: st.DrawFn, version: ProtocolVersion) -> object:
    v5 = version == V5
    props = lambda ctx: properties_for(ctx, version)  # noqa: E731
    kind = draw(st.sampled_from(
        ["connect", "connack", "publish", "ack", "subscribe", "suback", "unsubscribe",
         "unsuback", "ping", "disconnect"] + (["auth"] if v5 else [])))
    if kind == "connect":
        will = draw(st.none() | st.builds(Will, topics, st.binary(max_size=8), st.integers(0, 2),
                                          st.booleans(), props(WILL)))
        username = draw(st.none() | texts)
        password = draw(st.none() | st.binary(max_size=8)) if (v5 or username is not None) else None
        return Connect(draw(texts), version, draw(st.booleans()), draw(st.integers(0, 0xFFFF)),
                       username, password, will, draw(props(1)))
    if kind == "connack":
        code = draw(reason_codes if v5 else st.integers(0, 5))
        return Connack(draw(st.booleans()) if not code else False, code, draw(props(2)))
    if kind == "publish":
        qos = draw(st.integers(0, 2))
        properties = draw(props(3))
        topic = draw(topics)
        if PropertyId.TOPIC_ALIAS in properties and draw(st.booleans()):
            topic = ""
        return Publish(topic, draw(st.binary(max_size=20)), qos, draw(st.booleans()),
                       draw(st.booleans()) if qos else False,
                       draw(packet_ids) if qos else None, properties)
    if kind == "ack":
        cls = draw(st.sampled_from([Puback, Pubrec, Pubrel, Pubcomp]))
        return cls(draw(packet_ids), draw(reason_codes) if v5 else 0, draw(props(cls.packet_type)))
    if kind == "subscribe":
        subs = draw(st.lists(filters.flatmap(lambda f: st.builds(
            Subscription, st.just(f), st.integers(0, 2),
            st.booleans() if v5 and not f.startswith("$share/") else st.just(False),
            st.booleans() if v5 else st.just(False),
            st.integers(0, 2) if v5 else st.just(0))), min_size=1, max_size=3))
        return Subscribe(draw(packet_ids), tuple(subs), draw(props(8)))
    if kind == "suback":
        codes = reason_codes if v5 else st.sampled_from([0, 1, 2, 0x80])
        return Suback(draw(packet_ids), tuple(draw(st.lists(codes, min_size=1, max_size=4))),
                      draw(props(9)))
    if kind == "unsubscribe":
        return Unsubscribe(draw(packet_ids), tuple(draw(st.lists(filters, min_size=1, max_size=3))),
                           draw(props(10)))
    if kind == "unsuback":
        codes = tuple(draw(st.lists(reason_codes, min_size=1, max_size=4))) if v5 else ()
        return Unsuback(draw(packet_ids), codes, draw(props(11)))
    if kind == "ping":
        return draw(st.sampled_from([Pingreq(), Pingresp()]))
    if kind == "disconnect":
        return Disconnect(draw(reason_codes) if v5 else 0, draw(props(14)))
    return Auth(draw(reason_codes), draw(props(15)))


@settings(max_examples=400 * SCALE, deadline=None)
@given(data=st.data(), version=st.sampled_from([V311, V5]))
def test_round_trip(data: st.DataObject, version: ProtocolVersion) -> None:
    packet = data.draw(packets(version))
    wire = encode_packet(packet, version)  # type: ignore[arg-type]
    decoder = Decoder(version=version)
    decoder.receive_data(wire)
    assert decoder.next_packet() == packet
    assert decoder.next_packet() is NEED_DATA and decoder.buffered == 0
