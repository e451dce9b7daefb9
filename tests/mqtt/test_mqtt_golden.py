"""Golden packets: decode to the expected object, encode back to the same bytes,
and survive the stream whole, byte by byte, and followed by another packet."""

from __future__ import annotations

import pytest

from appliance.mqtt import (
    NEED_DATA, Decoder, FrameReader, PacketType, ProtocolVersion, ReasonCode, RemoteProtocolError,
    decode_packet, encode_packet,
)
from tests.mqtt.mqtt_golden import GOLDEN, golden_bytes

CASES = [pytest.param(version, golden_bytes(hex_text), packet, id=name)
         for name, version, hex_text, packet in GOLDEN]
TRAILER = bytes.fromhex("c000")  # a PINGREQ following the packet under test


def test_golden_covers_every_packet_type_in_both_versions() -> None:
    seen = {(version >= ProtocolVersion.MQTT_5, packet.packet_type) for _, version, _, packet in GOLDEN}
    for v5 in (False, True):
        for packet_type in PacketType:
            if packet_type == PacketType.AUTH and not v5:
                continue
            assert (v5, packet_type) in seen


@pytest.mark.parametrize("version,wire,packet", CASES)
def test_decode_then_encode(version: ProtocolVersion, wire: bytes, packet: object) -> None:
    frames = FrameReader()
    frames.feed(wire)
    frame = frames.next_frame()
    assert frame is not NEED_DATA
    assert frame.raw == wire and type(frame.raw) is bytes
    assert frame.packet_type == packet.packet_type  # type: ignore[attr-defined]
    decoded = decode_packet(frame.first_byte, frame.body, version)
    assert decoded == packet
    assert encode_packet(packet, version) == wire  # type: ignore[arg-type]
    assert encode_packet(decoded, version) == wire
    assert frames.next_frame() is NEED_DATA and frames.buffered == 0


def _decoder(version: ProtocolVersion) -> Decoder:
    return Decoder(version=version)


def _drain(decoder: Decoder) -> list[object]:
    out = []
    while (packet := decoder.next_packet()) is not NEED_DATA:
        out.append(packet)
    return out


@pytest.mark.parametrize("version,wire,packet", CASES)
def test_stream_whole(version: ProtocolVersion, wire: bytes, packet: object) -> None:
    decoder = _decoder(version)
    decoder.receive_data(wire)
    assert _drain(decoder) == [packet]


@pytest.mark.parametrize("version,wire,packet", CASES)
def test_stream_byte_by_byte(version: ProtocolVersion, wire: bytes, packet: object) -> None:
    decoder = _decoder(version)
    got: list[object] = []
    for i in range(len(wire)):
        decoder.receive_data(wire[i:i + 1])
        got += _drain(decoder)
        if i < len(wire) - 1:
            assert got == []
    assert got == [packet]
    assert decoder.buffered == 0


@pytest.mark.parametrize("version,wire,packet", CASES)
def test_stream_with_trailing_bytes(version: ProtocolVersion, wire: bytes, packet: object) -> None:
    decoder = _decoder(version)
    decoder.receive_data(wire + TRAILER[:1])
    assert _drain(decoder) == [packet]
    assert decoder.buffered == 1
    decoder.receive_data(TRAILER[1:])
    assert [p.packet_type for p in _drain(decoder)] == [PacketType.PINGREQ]  # type: ignore[attr-defined]


@pytest.mark.parametrize("version,wire,packet", CASES)
def test_stream_many_in_one_chunk(version: ProtocolVersion, wire: bytes, packet: object) -> None:
    decoder = _decoder(version)
    decoder.receive_data(wire * 3)
    if packet.packet_type == PacketType.CONNECT:  # type: ignore[attr-defined]
        assert decoder.next_packet() == packet
        with pytest.raises(RemoteProtocolError) as exc:
            decoder.next_packet()
        assert exc.value.reason_code == ReasonCode.PROTOCOL_ERROR
    else:
        assert _drain(decoder) == [packet] * 3


def test_decoder_learns_version_from_connect() -> None:
    for _, version, hex_text, packet in GOLDEN:
        if packet.packet_type != PacketType.CONNECT:  # type: ignore[attr-defined]
            continue
        decoder = Decoder()
        assert decoder.version is None
        decoder.receive_data(golden_bytes(hex_text) + TRAILER)
        assert _drain(decoder)[0] == packet
        assert decoder.version == packet.protocol_version  # type: ignore[attr-defined]
