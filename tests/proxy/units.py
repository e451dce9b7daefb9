"""Helpers for the policy units' transcripts: a packet as the session's scan hands it over."""

from __future__ import annotations

from appliance.mqtt import Decoder, NEED_DATA, ProtocolVersion, encode_packet, read_fixed_header


def split(packet: object, version: ProtocolVersion) -> tuple[int, bytes]:
    """(first byte, body) of `packet` encoded for `version`."""
    data = encode_packet(packet, version)  # type: ignore[arg-type]
    header = read_fixed_header(data, 0, len(data))
    assert header is not None
    first, body, end = header
    assert end == len(data)
    return first, data[body:end]


def decode(data: bytes, version: ProtocolVersion) -> object:
    """The one packet in `data`."""
    decoder = Decoder(version=version)
    decoder.receive_data(data)
    packet = decoder.next_packet()
    assert packet is not NEED_DATA and decoder.next_packet() is NEED_DATA
    return packet
