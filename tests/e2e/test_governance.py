"""The demo schema set enforced through the proxy, with real clients and a real mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.mqtt import Connect, ProtocolVersion, Puback, Publish, Pubrec, ReasonCode, Will
from tests.conftest import make_config
from tests.governance.payloads import device_status, temperature
from tests.helpers import Client, RawClient, RunningAppliance

REPO = Path(__file__).resolve().parents[2]
VERSIONS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]


def governed(tmp_path: Path, **overrides: object) -> RunningAppliance:
    config = make_config(tmp_path / "state", schemas=str(REPO / "schemas" / "v1"), **overrides)
    return RunningAppliance(config).start()


@pytest.fixture
def appliance_v1(tmp_path):
    running = governed(tmp_path)
    try:
        yield running
    finally:
        running.stop()


CASES = [
    # (topic, payload, accepted)
    ("sensor/t1/temperature", temperature(), True),
    ("sensor/t1/temperature", temperature(temperature=999), False),
    ("sensor/t1/temperature", b"not json", False),
    ("sensor/t2/temperature", temperature(device_id="t1"), False),  # rule: device id = topic level
    ("device/d1/status", device_status(), True),
    ("device/d1/status", b"\x0a\xff", False),  # truncated protobuf
    ("device/d1/status", device_status(device_id="zz"), False),
    ("events/door/open", b"free-form", True),
    ("secret/door_code", b"1234", False),  # outside topic_patterns
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_only_valid_messages_are_delivered(appliance_v1, version, qos):
    sub = Client(appliance_v1.port, version=version).connect()
    sub.subscribe("#", qos=2)
    pub = Client(appliance_v1.port, version=version).connect()
    for topic, payload, _ in CASES:
        pub.publish(topic, payload, qos=qos)
    pub.publish("events/end", b"marker", qos=qos)  # same connection, in order: arrives last
    valid = [(t, p) for t, p, ok in CASES if ok] + [("events/end", b"marker")]
    got = sub.expect(len(valid))
    assert [(m.topic, m.payload) for m in got] == valid
    sub.expect_none(within=0.2)
    counts = appliance_v1.verdicts.counts
    assert counts["reject"] == sum(1 for *_, ok in CASES if not ok)
    sub.disconnect()
    pub.disconnect()


@pytest.mark.parametrize("qos", [1, 2])
def test_mqtt5_reason_codes(appliance_v1, qos):
    raw = RawClient(appliance_v1.port)
    raw.send(Connect(client_id="t1", protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive().reason_code == 0
    ack = Puback if qos == 1 else Pubrec
    raw.send(Publish("sensor/t1/temperature", b"{}", qos=qos, packet_id=1))
    bad_payload = raw.receive()
    raw.send(Publish("secret/x", b"1", qos=qos, packet_id=2))
    bad_topic = raw.receive()
    raw.send(Publish("sensor/t1/temperature", temperature(), qos=qos, packet_id=3))
    good = raw.receive()
    assert isinstance(bad_payload, ack) and bad_payload.reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID
    assert "required" in bad_payload.properties.get(0x1F)
    assert isinstance(bad_topic, ack) and bad_topic.reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert isinstance(good, ack) and good.reason_code < 0x80


def test_invalid_messages_are_never_retained(appliance_v1):
    pub = Client(appliance_v1.port, version=5).connect()
    pub.publish("sensor/t1/temperature", temperature(), qos=1, retain=True)
    pub.publish("sensor/t1/temperature", temperature(temperature=999), qos=1, retain=True)
    late = Client(appliance_v1.port, version=5).connect()
    late.subscribe("sensor/#", qos=1)
    [retained] = late.expect(1)
    assert retained.payload == temperature() and retained.retain
    # An empty retained payload deletes it (and passes validation).
    pub.publish("sensor/t1/temperature", b"", qos=1, retain=True)
    later = Client(appliance_v1.port, version=5).connect()
    later.subscribe("sensor/#", qos=1)
    later.expect_none(within=0.3)
    for c in (pub, late, later):
        c.disconnect()


@pytest.mark.parametrize("version", [ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5])
def test_will_with_invalid_payload_is_refused(appliance_v1, version):
    raw = RawClient(appliance_v1.port, version)
    raw.send(Connect(client_id="t1", protocol_version=version, will=Will("sensor/t1/temperature", b"offline")))
    connack = raw.receive()
    assert connack.reason_code == (ReasonCode.PAYLOAD_FORMAT_INVALID if version is ProtocolVersion.MQTT_5 else 5)
    assert raw.receive() is None
    ok = RawClient(appliance_v1.port, version)
    ok.send(Connect(client_id="t1", protocol_version=version, will=Will("events/t1/offline", b"gone")))
    assert ok.receive().reason_code == 0


def test_dry_run_delivers_everything_and_records_verdicts(tmp_path):
    running = governed(tmp_path, dry_run=True)
    try:
        sub = Client(running.port, version=5).connect()
        sub.subscribe("#", qos=1)
        pub = Client(running.port, version=5).connect()
        for topic, payload, _ in CASES:
            info = pub.publish(topic, payload, qos=1)
            assert pub.acks[info.mid].value < 0x80
        assert len(sub.expect(len(CASES))) == len(CASES)
        assert running.verdicts.counts["reject"] == sum(1 for *_, ok in CASES if not ok)
        sub.disconnect()
        pub.disconnect()
    finally:
        running.stop()


def test_ten_megabyte_payload_closes_only_that_client(tmp_path):
    running = governed(tmp_path, **{"limits.max_packet_size": 16 * 1024 * 1024})
    try:
        sub = Client(running.port, version=5).connect()
        sub.subscribe("sensor/#", qos=1)
        raw = RawClient(running.port)
        raw.send(Connect(client_id="t1", protocol_version=ProtocolVersion.MQTT_5))
        assert raw.receive().reason_code == 0
        raw.send(Publish("sensor/t1/temperature", b"{" + b" " * 10_000_000 + b"}", qos=1, packet_id=1))
        ack = raw.receive()
        assert ack.reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID and "max_size" in ack.properties.get(0x1F)
        pub = Client(running.port, version=5).connect()
        pub.publish("sensor/t1/temperature", temperature(), qos=1)
        assert sub.expect(1)[0].payload == temperature()
        sub.disconnect()
        pub.disconnect()
    finally:
        running.stop()


@pytest.mark.parametrize("topic", [b"sensor/+/temperature", b"sensor/\x00/temperature"])
def test_topic_with_wildcard_or_nul_is_a_protocol_error(appliance_v1, topic):
    raw = RawClient(appliance_v1.port)
    raw.send(Connect(client_id="t1", protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive().reason_code == 0
    body = len(topic).to_bytes(2, "big") + topic + b"\x00" + b"{}"  # QoS 0, empty properties
    raw.send_raw(bytes([0x30, len(body)]) + body)
    disconnect = raw.receive()
    assert disconnect.reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert raw.receive() is None


def test_disconnect_policy_closes_the_offender_only(tmp_path):
    import shutil

    schemas = tmp_path / "strict"
    shutil.copytree(REPO / "schemas" / "v1", schemas)
    manifest = schemas / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace(
        "  sensor/+/temperature: temperature:v1",
        "  sensor/+/temperature:\n    schema: temperature:v1\n    on_reject: disconnect",
    ))
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(schemas))).start()
    try:
        sub = Client(running.port, version=5).connect()
        sub.subscribe("sensor/#", qos=1)
        offender = Client(running.port, version=5, client_id="t1").connect()
        offender.publish("sensor/t1/temperature", b"{}", qos=1, wait=False)
        assert offender.disconnected.wait(10)
        assert offender.disconnect_reason.value == ReasonCode.PAYLOAD_FORMAT_INVALID
        offender.paho.loop_stop()
        good = Client(running.port, version=5, client_id="t2").connect()
        good.publish("sensor/t2/temperature", temperature(device_id="t2"), qos=1)
        assert sub.expect(1)[0].topic == "sensor/t2/temperature"
        sub.disconnect()
        good.disconnect()
    finally:
        running.stop()
