"""Each class of malformed input raises RemoteProtocolError with the right reason code."""

from __future__ import annotations

import pytest

from appliance.mqtt import (
    NEED_DATA, Decoder, FrameReader, ProtocolVersion, ReasonCode as RC, RemoteProtocolError,
    decode_packet,
)

V311, V5 = ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def decode_stream(wire: bytes, version: ProtocolVersion | None) -> object:
    decoder = Decoder(version=version)
    decoder.receive_data(wire)
    return decoder.next_packet()


# (id, version, full packet bytes, expected reason code)
MALFORMED = [
    ("publish-qos3", V311, "3605 000174 0001", RC.MALFORMED_PACKET),
    ("publish-bad-utf8", V311, "3004 0002 c328", RC.MALFORMED_PACKET),
    ("publish-surrogate-utf8", V311, "3005 0003 eda080", RC.MALFORMED_PACKET),
    ("publish-nul-in-topic", V311, "3005 0003 610062", RC.TOPIC_NAME_INVALID),
    ("publish-plus-in-topic", V311, "3005 0003 612f2b", RC.TOPIC_NAME_INVALID),
    ("publish-hash-in-topic", V5, "3006 0003 612f23 00", RC.TOPIC_NAME_INVALID),
    ("publish-empty-topic-v311", V311, "3002 0000", RC.PROTOCOL_ERROR),
    ("publish-empty-topic-no-alias", V5, "3003 0000 00", RC.PROTOCOL_ERROR),
    ("publish-topic-alias-0", V5, "3007 0000 03230000 7a", RC.TOPIC_ALIAS_INVALID),
    ("publish-packet-id-0", V311, "3205 000174 0000", RC.PROTOCOL_ERROR),
    ("publish-dup-qos0", V311, "3803 000174", RC.MALFORMED_PACKET),
    ("publish-truncated-topic", V311, "3003 0005 61", RC.MALFORMED_PACKET),
    ("publish-truncated-packet-id", V311, "3204 000174 00", RC.MALFORMED_PACKET),
    ("publish-missing-props-v5", V5, "3003 000174", RC.MALFORMED_PACKET),
    ("publish-duplicate-property", V5, "300a 000174 06 23000123 0001", RC.PROTOCOL_ERROR),
    ("publish-property-not-allowed", V5, "3009 000174 05 1100000001", RC.PROTOCOL_ERROR),
    ("publish-unknown-property", V5, "3006 000174 02 7f00", RC.MALFORMED_PACKET),
    ("publish-truncated-property", V5, "3007 000174 03 020000", RC.MALFORMED_PACKET),
    ("publish-property-length-overrun", V5, "3006 000174 09 0101", RC.MALFORMED_PACKET),
    ("publish-bad-payload-format", V5, "3006 000174 02 0102", RC.PROTOCOL_ERROR),
    ("publish-subscription-id-0", V5, "3006 000174 02 0b00", RC.PROTOCOL_ERROR),
    ("publish-nul-in-user-property", V5, "300b 000174 07 26000100 000161", RC.MALFORMED_PACKET),
    ("pubrel-bad-flags", V311, "6002 0001", RC.MALFORMED_PACKET),
    ("puback-bad-flags", V311, "4202 0001", RC.MALFORMED_PACKET),
    ("subscribe-bad-flags", V311, "8006 0001 000161 00", RC.MALFORMED_PACKET),
    ("unsubscribe-bad-flags", V311, "a005 0001 000161", RC.MALFORMED_PACKET),
    ("puback-leftovers-v311", V311, "4003 0001 00", RC.MALFORMED_PACKET),
    ("puback-truncated", V311, "4001 00", RC.MALFORMED_PACKET),
    ("puback-packet-id-0", V5, "4002 0000", RC.PROTOCOL_ERROR),
    ("puback-props-leftovers-v5", V5, "4005 0001 00 00 ff", RC.MALFORMED_PACKET),
    ("pingreq-with-body", V311, "c001 00", RC.MALFORMED_PACKET),
    ("pingresp-bad-flags", V311, "d100", RC.MALFORMED_PACKET),
    ("disconnect-with-body-v311", V311, "e001 00", RC.MALFORMED_PACKET),
    ("disconnect-property-not-allowed", V5, "e004 00 02 2301", RC.PROTOCOL_ERROR),
    ("auth-in-v311", V311, "f000", RC.MALFORMED_PACKET),
    ("subscribe-empty", V311, "8202 0001", RC.PROTOCOL_ERROR),
    ("subscribe-qos3", V311, "8206 0001 000161 03", RC.MALFORMED_PACKET),
    ("subscribe-reserved-option-bits-v311", V311, "8206 0001 000161 04", RC.MALFORMED_PACKET),
    ("subscribe-reserved-option-bits-v5", V5, "8207 0001 00 000161 40", RC.MALFORMED_PACKET),
    ("subscribe-retain-handling-3", V5, "8207 0001 00 000161 30", RC.PROTOCOL_ERROR),
    ("subscribe-missing-options", V311, "8205 0001 000161", RC.MALFORMED_PACKET),
    ("subscribe-bad-wildcard-v5", V5, "8208 0001 00 0002232f 00", RC.TOPIC_FILTER_INVALID),
    ("subscribe-bad-plus-v5", V5, "8208 0001 00 0002612b 00", RC.TOPIC_FILTER_INVALID),
    ("subscribe-empty-filter", V5, "8206 0001 00 0000 00", RC.TOPIC_FILTER_INVALID),
    ("subscribe-bad-share-name", V5, "820d 0001 00 0007 2473686172652f 00", RC.TOPIC_FILTER_INVALID),
    ("subscribe-no-local-shared", V5, "8212 0001 00 000c 247368617265 2f672f612f62 04",
     RC.PROTOCOL_ERROR),
    ("subscribe-property-twice", V5, "820b 0001 04 0b010b02 000161 00", RC.PROTOCOL_ERROR),
    ("unsubscribe-empty", V5, "a203 0001 00", RC.PROTOCOL_ERROR),
    ("unsubscribe-bad-filter", V311, "a206 0001 0002 2b61", RC.TOPIC_FILTER_INVALID),
    ("suback-bad-code-v311", V311, "9003 0001 03", RC.MALFORMED_PACKET),
    ("suback-empty", V311, "9002 0001", RC.PROTOCOL_ERROR),
    ("unsuback-leftovers-v311", V311, "b003 0001 00", RC.MALFORMED_PACKET),
    ("unsuback-no-codes-v5", V5, "b003 0001 00", RC.PROTOCOL_ERROR),
    ("connack-reserved-flags", V311, "2002 0200", RC.MALFORMED_PACKET),
    ("connack-bad-return-code", V311, "2002 0006", RC.MALFORMED_PACKET),
    ("connack-leftovers", V311, "2003 000000", RC.MALFORMED_PACKET),
    ("connack-truncated-props", V5, "2003 0000 05", RC.MALFORMED_PACKET),
]


@pytest.mark.parametrize("version,wire,code", [pytest.param(v, h(w), c, id=i) for i, v, w, c in MALFORMED])
def test_malformed_packet(version: ProtocolVersion, wire: bytes, code: RC) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_stream(wire, version)
    assert exc.value.reason_code == code, exc.value


# (id, CONNECT body after the fixed header, expected code)
BAD_CONNECTS = [
    ("reserved-flag", "00044d515454 04 03 003c 000161", RC.MALFORMED_PACKET),
    ("will-qos-without-will", "00044d515454 04 0a 003c 000161", RC.MALFORMED_PACKET),
    ("will-retain-without-will", "00044d515454 04 22 003c 000161", RC.MALFORMED_PACKET),
    ("will-qos-3", "00044d515454 04 1e 003c 000161 000177 0000", RC.MALFORMED_PACKET),
    ("password-without-username-v311", "00044d515454 04 42 003c 000161 000170", RC.PROTOCOL_ERROR),
    ("unknown-level", "00044d515454 06 02 003c 000161", RC.UNSUPPORTED_PROTOCOL_VERSION),
    ("bridge-level", "00044d515454 84 02 003c 000161", RC.UNSUPPORTED_PROTOCOL_VERSION),
    ("name-level-mismatch", "00044d515454 03 02 003c 000161", RC.UNSUPPORTED_PROTOCOL_VERSION),
    ("wrong-name", "00044d515458 04 02 003c 000161", RC.UNSUPPORTED_PROTOCOL_VERSION),
    ("truncated", "00044d515454 04 02 00", RC.MALFORMED_PACKET),
    ("missing-username", "00044d515454 04 82 003c 000161", RC.MALFORMED_PACKET),
    ("leftovers", "00044d515454 04 02 003c 000161 00", RC.MALFORMED_PACKET),
    ("wildcard-will-topic", "00044d515454 04 06 003c 000161 0001 23 0000", RC.TOPIC_NAME_INVALID),
    ("nul-client-id", "00044d515454 04 02 003c 000100", RC.MALFORMED_PACKET),
    ("v5-will-property-in-connect", "00044d515454 05 02 003c 05 1800000001 000161",
     RC.PROTOCOL_ERROR),
    ("v5-receive-maximum-0", "00044d515454 05 02 003c 03 210000 000161", RC.PROTOCOL_ERROR),
]


@pytest.mark.parametrize("body,code", [pytest.param(h(b), c, id=i) for i, b, c in BAD_CONNECTS])
def test_bad_connect(body: bytes, code: RC) -> None:
    wire = bytes((0x10, len(body))) + body
    with pytest.raises(RemoteProtocolError) as exc:
        decode_stream(wire, None)
    assert exc.value.reason_code == code, exc.value


def test_first_packet_must_be_connect() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_stream(h("c000"), None)
    assert exc.value.reason_code == RC.PROTOCOL_ERROR


def test_remaining_length_with_fifth_byte() -> None:
    frames = FrameReader()
    frames.feed(h("30 ff ff ff ff"))
    with pytest.raises(RemoteProtocolError) as exc:
        frames.next_frame()
    assert exc.value.reason_code == RC.MALFORMED_PACKET


def test_remaining_length_not_minimal() -> None:
    frames = FrameReader()
    frames.feed(h("c0 80 00"))
    with pytest.raises(RemoteProtocolError) as exc:
        frames.next_frame()
    assert exc.value.reason_code == RC.MALFORMED_PACKET


def test_packet_type_0_fails_on_the_first_byte() -> None:
    frames = FrameReader()
    frames.feed(b"\x00")
    with pytest.raises(RemoteProtocolError) as exc:
        frames.next_frame()
    assert exc.value.reason_code == RC.MALFORMED_PACKET


def test_huge_connect_rejected_after_header_only() -> None:
    frames = FrameReader(max_packet_size=1024)
    frames.feed(h("10"))
    assert frames.next_frame() is NEED_DATA
    frames.feed(h("80 80 80"))
    assert frames.next_frame() is NEED_DATA  # the length is not known yet
    frames.feed(h("01"))  # remaining length 2**21: the header is complete, no body yet
    with pytest.raises(RemoteProtocolError) as exc:
        frames.next_frame()
    assert exc.value.reason_code == RC.PACKET_TOO_LARGE


def test_256mb_connect_rejected_by_decoder() -> None:
    decoder = Decoder(max_packet_size=4096)
    decoder.receive_data(h("10 ff ff ff 7f"))  # 268435455 bytes announced
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.next_packet()
    assert exc.value.reason_code == RC.PACKET_TOO_LARGE


def test_max_packet_size_counts_the_whole_packet() -> None:
    wire = h("3007 0003612f62 6869")  # 9 bytes on the wire
    frames = FrameReader(max_packet_size=9)
    frames.feed(wire)
    assert frames.next_frame() is not NEED_DATA
    frames.max_packet_size = 8
    frames.feed(wire)
    with pytest.raises(RemoteProtocolError):
        frames.next_frame()


def test_decode_packet_rejects_type_0() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_packet(0x00, b"", V5)


def test_error_carries_message_and_code() -> None:
    err = RemoteProtocolError("boom", RC.PROTOCOL_ERROR)
    assert str(err) == "boom" and err.reason_code is RC.PROTOCOL_ERROR
    assert RemoteProtocolError("x").reason_code == RC.MALFORMED_PACKET
