"""Traffic recorded from paho-mqtt clients and a mosquitto broker round-trips byte for byte."""

from __future__ import annotations

import json
import shutil

import pytest

from appliance.mqtt import (
    NEED_DATA, Connect, Decoder, Disconnect, ProtocolVersion, Publish, PropertyId, decode_packet,
    encode_packet,
)
from tests.mqtt.mqtt_capture import FIXTURE, capture

DOCUMENT = json.loads(FIXTURE.read_text())
SESSIONS = DOCUMENT["sessions"]


def _assert_round_trip(session: dict) -> list[object]:
    version = ProtocolVersion(session["version"])
    packets = []
    for direction in ("client_to_server", "server_to_client"):
        frames = [bytes.fromhex(h) for h in session[direction]]
        # the client side starts with CONNECT: let the Decoder learn the version from it
        decoder = Decoder(version=None if direction == "client_to_server" else version)
        decoder.receive_data(b"".join(frames))
        for wire in frames:
            packet = decoder.next_packet()
            assert packet is not NEED_DATA
            assert encode_packet(packet, version) == wire, (session["name"], packet)  # type: ignore[arg-type]
            packets.append(packet)
        assert decoder.next_packet() is NEED_DATA
        assert decoder.version == version
    return packets


@pytest.mark.parametrize("session", SESSIONS, ids=[s["name"] for s in SESSIONS])
def test_recorded_session_round_trips(session: dict) -> None:
    _assert_round_trip(session)


def test_recording_covers_what_we_claim() -> None:
    """Guard against a silently shrunken fixture."""
    names = {s["name"] for s in SESSIONS}
    assert {"paho-v311-0", "paho-v311-1", "paho-v5-0", "paho-v5-1",
            "mosquitto_pub-v311-0", "mosquitto_pub-v5-0"} <= names
    v5_pub = next(s for s in SESSIONS if s["name"] == "paho-v5-1")
    packets = _assert_round_trip(v5_pub)
    connect = packets[0]
    assert isinstance(connect, Connect) and connect.will and connect.will.properties
    assert connect.username == "alice" and connect.password == b"s3cret"
    publishes = [p for p in packets if isinstance(p, Publish)]
    assert {p.qos for p in publishes} == {0, 1, 2}
    assert any(p.properties.user_properties for p in publishes)
    assert any(p.topic == "" and p.properties.get(PropertyId.TOPIC_ALIAS) == 1 for p in publishes)
    assert Disconnect(4) in packets


def test_paho_explicit_success_disconnect_is_normalised() -> None:
    """paho sends e0 01 00 only when the caller passes reasoncode=0 explicitly; we
    re-encode it in the shortest form (e0 00). Relays that must keep the exact
    bytes forward Frame.raw instead of re-encoding."""
    packet = decode_packet(0xE0, b"\x00", ProtocolVersion.MQTT_5)
    assert packet == Disconnect()
    assert encode_packet(packet, ProtocolVersion.MQTT_5) == b"\xe0\x00"


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto not installed")
def test_live_capture_round_trips() -> None:
    document = capture()
    assert len(document["sessions"]) == len(SESSIONS)
    for session in document["sessions"]:
        _assert_round_trip(session)
