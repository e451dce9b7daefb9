"""The incomplete packet kept between chunks."""

from __future__ import annotations

from appliance.mqtt import ProtocolVersion, Publish, encode_packet
from appliance.proxy.framing import PacketBuffer


def test_a_packet_cut_anywhere_is_joined_once_complete():
    packet = encode_packet(Publish("t", b"x" * 300), ProtocolVersion.MQTT_5)
    for cut in range(1, len(packet)):
        buffer = PacketBuffer()
        buffer.keep(packet[:cut], 0)
        assert len(buffer) == cut
        rest = packet[cut:]
        if len(rest) > 1 and cut >= 3:  # the header (3 bytes here) arrived: wait for the whole body
            assert buffer.join(rest[:1]) is None
            rest = rest[1:]
        assert buffer.join(rest + b"next") == packet + b"next"
        assert len(buffer) == 0


def test_nothing_kept_passes_the_chunk_through():
    buffer = PacketBuffer()
    chunk = b"\xc0\x00"
    assert buffer.join(chunk) is chunk
    buffer.keep(chunk, 2)
    assert len(buffer) == 0
