"""What the proxy says itself, per protocol version: bytes out."""

from __future__ import annotations

from appliance.mqtt import (
    Connack, Connect, Disconnect, Properties, PropertyId, ProtocolVersion, Puback, Pubrec, ReasonCode,
)
from appliance.pipeline import Reason, Verdict
from appliance.proxy.replies import MAX_REASON_STRING, Replies
from tests.proxy.units import decode

V3 = ProtocolVersion.MQTT_3_1_1
V5 = ProtocolVersion.MQTT_5
BAD = Verdict.reject(Reason("bad", "bad payload"))


def reason(text: str) -> Properties:
    return Properties(((PropertyId.REASON_STRING, text),))


def test_mqtt5_rejections_carry_the_code_and_the_reason():
    replies = Replies(V5, Connect(client_id="d", protocol_version=V5))
    assert decode(replies.rejection(1, 4, BAD), V5) == Puback(4, ReasonCode.PAYLOAD_FORMAT_INVALID, reason("bad payload"))
    assert decode(replies.rejection(2, 5, BAD), V5) == Pubrec(5, ReasonCode.PAYLOAD_FORMAT_INVALID, reason("bad payload"))
    assert decode(replies.disconnect(ReasonCode.NOT_AUTHORIZED), V5) == Disconnect(ReasonCode.NOT_AUTHORIZED)
    assert decode(replies.connack(ReasonCode.PROTOCOL_ERROR, "why"), V5) == Connack(reason_code=ReasonCode.PROTOCOL_ERROR,
                                                                                    properties=reason("why"))


def test_mqtt311_gets_plain_acks_and_no_disconnect():
    replies = Replies(V3, Connect(client_id="d"))
    assert decode(replies.rejection(1, 4, BAD), V3) == Puback(4)
    assert decode(replies.rejection(2, 4, BAD), V3) == Pubrec(4)
    assert replies.disconnect(ReasonCode.QUOTA_EXCEEDED) is None
    assert decode(replies.connack(5, "ignored"), V3) == Connack(reason_code=5)
    assert replies.unstored(4, 1) is None


def test_reason_strings_follow_the_clients_wishes_and_size():
    quiet = Replies(V5, Connect(client_id="d", protocol_version=V5,
                                properties=Properties(((PropertyId.REQUEST_PROBLEM_INFORMATION, 0),))))
    assert quiet.reason("bad payload") == Properties.EMPTY
    small = Replies(V5, Connect(client_id="d", protocol_version=V5,
                                properties=Properties(((PropertyId.MAXIMUM_PACKET_SIZE, 25),))))
    assert small.reason("short") == reason("short") and small.reason("x" * 10) == Properties.EMPTY
    assert Replies(V5).reason("y" * 500) == reason("y" * MAX_REASON_STRING)


def test_an_unstored_message_gets_quota_exceeded_only_at_qos1_in_mqtt5():
    replies = Replies(V5)
    ack = decode(replies.unstored(3, 1), V5)
    assert (ack.packet_id, ack.reason_code) == (3, ReasonCode.QUOTA_EXCEEDED)
    assert replies.unstored(3, 2) is None
