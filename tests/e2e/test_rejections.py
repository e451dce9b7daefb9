"""The proxy answers rejected messages itself, in MQTT's acknowledgement order."""

from __future__ import annotations

import subprocess

import pytest

from appliance.mqtt import (
    Connack, Connect, ProtocolVersion, Puback, Pubcomp, Publish, Pubrec, Pubrel, ReasonCode, Will,
)
from appliance.pipeline import CountingSink, Message, Pipeline, Reason, Verdict
from tests.helpers import Client, RawClient, RunningAppliance, mosquitto_sub


class RejectPayload:
    """Rejects payloads that start with b"bad" (the real checks come with the governance pipeline)."""

    name = "test"

    def check(self, message: Message) -> Verdict | None:
        if message.payload.startswith(b"bad"):
            return Verdict.reject(Reason("test", f"payload {message.payload[:10]!r} is bad"))
        return None


@pytest.fixture
def sink() -> CountingSink:
    return CountingSink()


@pytest.fixture
def rejecting(config, sink):
    running = RunningAppliance(config, Pipeline([RejectPayload()], [sink])).start()
    try:
        yield running
    finally:
        running.stop()


def test_mosquitto_pub_with_invalid_lines_loses_nothing(rejecting, sink):
    # mosquitto_pub -l disconnects when its last message is acked: an injected ack that overtook the
    # broker's acks would lose the valid messages still in flight (docs/evidence.md, pitfall 1).
    lines = [("bad" if i % 10 == 3 else "ok") + f"-{i}" for i in range(3000)]
    valid = [line for line in lines if line.startswith("ok")]
    sub = mosquitto_sub(rejecting.port, "lines", len(valid), client_id="lines-sub")
    pub = subprocess.run(
        ["mosquitto_pub", "-p", str(rejecting.port), "-t", "lines", "-q", "1", "-l"],
        input="\n".join(lines) + "\n", text=True, capture_output=True, timeout=60,
    )
    assert pub.returncode == 0, pub.stderr
    out, _ = sub.communicate(timeout=60)
    assert out.splitlines() == valid
    assert sink.counts == {"accept": len(valid), "reject": len(lines) - len(valid)}


def test_mqtt5_rejection_reason_code_seen_by_paho(rejecting):
    pub = Client(rejecting.port, version=5).connect()
    info = pub.publish("t", b"bad payload", qos=1)
    assert pub.acks[info.mid].value == ReasonCode.PAYLOAD_FORMAT_INVALID
    ok = pub.publish("t", b"fine", qos=1)
    assert pub.acks[ok.mid].value in (0, ReasonCode.NO_MATCHING_SUBSCRIBERS)
    # paho sends PUBREL even after a failed PUBREC; the proxy completes the flow itself.
    info2 = pub.publish("t", b"bad again", qos=2)
    assert info2.is_published()
    pub.publish("t", b"fine", qos=2)
    pub.disconnect()


@pytest.mark.parametrize("qos", [1, 2])
def test_mqtt5_rejection_reason_code(rejecting, qos):
    raw = RawClient(rejecting.port)
    raw.send(Connect(client_id="rc", protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive().reason_code == 0
    raw.send(Publish("t", b"bad", qos=qos, packet_id=3), Publish("t", b"ok", qos=qos, packet_id=4))
    first, second = raw.receive(), raw.receive()
    assert type(first) is type(second) is (Puback if qos == 1 else Pubrec)
    assert (first.packet_id, first.reason_code) == (3, ReasonCode.PAYLOAD_FORMAT_INVALID)
    assert second.packet_id == 4 and second.reason_code < 0x80


def test_mqtt5_rejection_carries_reason_string(rejecting):
    raw = RawClient(rejecting.port)
    raw.send(Connect(client_id="r1", protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive().reason_code == 0
    raw.send(Publish("t", b"bad", qos=1, packet_id=7))
    ack = raw.receive()
    assert isinstance(ack, Puback) and ack.packet_id == 7
    assert ack.reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID
    assert "is bad" in ack.properties.get(0x1F)


def test_mqtt311_rejected_qos2_gets_pubrec_then_pubcomp(rejecting, sink):
    raw = RawClient(rejecting.port, ProtocolVersion.MQTT_3_1_1)
    raw.send(Connect(client_id="q2"))
    assert raw.receive() == Connack(reason_code=0)
    raw.send(Publish("t", b"bad", qos=2, packet_id=9))
    assert raw.receive() == Pubrec(9)
    raw.send(Pubrel(9))
    assert raw.receive() == Pubcomp(9)
    raw.send(Publish("t", b"ok", qos=2, packet_id=10))
    assert raw.receive() == Pubrec(10)
    raw.send(Pubrel(10))
    assert raw.receive() == Pubcomp(10)
    assert sink.counts == {"reject": 1, "accept": 1}


def test_injected_acks_keep_order_behind_broker_acks(rejecting):
    raw = RawClient(rejecting.port, ProtocolVersion.MQTT_3_1_1)
    raw.send(Connect(client_id="order"))
    # Pipelined: CONNECT's answer and every ack must come back in the order sent.
    payloads = [b"ok", b"bad", b"ok", b"ok", b"bad", b"bad", b"ok"]
    raw.send(*[Publish("t", p, qos=1, packet_id=i + 1) for i, p in enumerate(payloads)])
    assert raw.receive() == Connack(reason_code=0)
    assert [raw.receive() for _ in payloads] == [Puback(i + 1) for i in range(len(payloads))]


def test_rejected_messages_are_not_delivered_or_retained(rejecting):
    sub = Client(rejecting.port).connect()
    sub.subscribe("r/#", qos=1)
    pub = Client(rejecting.port).connect()
    pub.publish("r/1", b"bad", qos=1, retain=True)
    pub.publish("r/1", b"bad", qos=0)
    pub.publish("r/2", b"good", qos=1)
    [got] = sub.expect(1)
    assert got.payload == b"good"
    late = Client(rejecting.port).connect()
    late.subscribe("r/#", qos=1)
    late.expect_none()
    for c in (sub, pub, late):
        c.disconnect()


@pytest.mark.parametrize("version", [ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5])
def test_invalid_will_is_refused_at_connect(rejecting, version):
    raw = RawClient(rejecting.port, version)
    raw.send(Connect(client_id="w", protocol_version=version, will=Will("status/w", b"bad will")))
    connack = raw.receive()
    expected = ReasonCode.PAYLOAD_FORMAT_INVALID if version == ProtocolVersion.MQTT_5 else 5
    assert connack.reason_code == expected
    assert raw.receive() is None
