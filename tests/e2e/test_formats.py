"""Avro and Sparkplug B enforced through the real proxy and a real mosquitto, MQTT 5 reason codes."""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

from appliance.governance.sparkplug import payload_class
from appliance.mqtt import Connect, Disconnect, ProtocolVersion, Puback, Publish, ReasonCode
from appliance.simulate_formats import meter_reading
from tests.conftest import make_config
from tests.helpers import Client, RawClient, RunningAppliance

REPO = Path(__file__).resolve().parents[2]


def running(tmp_path: Path, example: str) -> RunningAppliance:
    config = make_config(tmp_path / "state", schemas=str(REPO / "fixtures" / example / "v1"))
    return RunningAppliance(config).start()


def reading(meter: str = "m1", energy: str = "12.5") -> bytes:
    return meter_reading({"meter_id": meter, "ts": dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC),
                          "energy_kwh": decimal.Decimal(energy), "power_w": None, "phase": "L1",
                          "site": {"building": "A", "floor": 1}})


def publish_all(port: int, messages: list[tuple[str, bytes]], *, client_id: str = "dev", disconnect: bool = False) -> list[Puback]:
    """Publishes at QoS 1 on a new connection, one PUBACK each; `disconnect`: then leaves with a
    DISCONNECT and waits for the appliance to close the connection."""
    raw = RawClient(port)
    raw.send(Connect(client_id=client_id, protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive().reason_code == 0
    acks = []
    for packet_id, (topic, payload) in enumerate(messages, start=1):
        raw.send(Publish(topic, payload, qos=1, packet_id=packet_id))
        ack = raw.receive()
        assert isinstance(ack, Puback), ack
        acks.append(ack)
    if disconnect:
        raw.send(Disconnect())
        assert raw.closed_by_peer()
        raw.close()
    return acks


def test_avro_payloads_through_the_proxy(tmp_path):
    appliance = running(tmp_path, "avro")
    try:
        sub = Client(appliance.port, version=5).connect()
        sub.subscribe("meter/#", qos=1)
        good = reading()
        messages = [
            ("meter/m1/reading", good),
            ("meter/m1/reading", good[:9]),                      # truncated
            ("meter/m1/reading", b"\xff" * 30),                  # garbage
            ("meter/m1/reading", reading(energy="-1")),          # rule energy_not_negative
            ("meter/m1/reading/registry", b"\x00\x00\x00\x00\x01" + good),
            ("meter/m1/reading/registry", b"\x00\x00\x00\x00\x07" + good),  # id not mapped
            ("meter/m1/config", good),                           # topic not allowed
        ]
        acks = publish_all(appliance.port, messages)
        codes = [ack.reason_code for ack in acks]
        assert codes[0] < 0x80 and codes[4] < 0x80
        assert codes[1] == codes[2] == codes[3] == codes[5] == ReasonCode.PAYLOAD_FORMAT_INVALID
        assert codes[6] == ReasonCode.TOPIC_NAME_INVALID
        assert "cannot decode as demo.meter.MeterReading" in acks[1].properties.get(0x1F)
        assert "energy_not_negative" in acks[3].properties.get(0x1F)
        assert "schema id 7 is not mapped" in acks[5].properties.get(0x1F)
        got = sub.expect(2)
        assert [(m.topic, m.payload) for m in got] == [messages[0], messages[4]]
        sub.expect_none(within=0.2)
        sub.disconnect()
    finally:
        appliance.stop()


def test_sparkplug_b_through_the_proxy(tmp_path):
    payload = payload_class()
    birth = payload(timestamp=1, seq=0)
    birth.metrics.add(name="bdSeq", datatype=8, long_value=0)
    device = payload(timestamp=1, seq=1)
    device.metrics.add(name="temperature", alias=10, datatype=9, float_value=21.0)

    def data(seq: int, alias: int = 10, value: float = 22.0) -> bytes:
        message = payload(timestamp=2, seq=seq)
        message.metrics.add(alias=alias, float_value=value)
        return message.SerializeToString()

    appliance = running(tmp_path, "sparkplug")
    try:
        sub = Client(appliance.port, version=5).connect()
        sub.subscribe("spBv1.0/#", qos=1)
        messages = [
            ("spBv1.0/plant1/DDATA/edge1/dev1", data(5)),            # alias before any BIRTH
            ("spBv1.0/plant1/NBIRTH/edge1", birth.SerializeToString()),
            ("spBv1.0/plant1/DBIRTH/edge1/dev1", device.SerializeToString()),
            ("spBv1.0/plant1/DDATA/edge1/dev1", data(2)),            # resolved by alias: delivered
            ("spBv1.0/plant1/DDATA/edge1/dev1", data(3, alias=77)),  # unknown alias
            ("spBv1.0/plant1/DDATA/edge1/dev1", data(9)),            # sequence gap
            ("spBv1.0/plant1/DDATA/edge1/dev1", data(10, value=500.0)),  # above the declared max
            ("spBv1.0/plant1/DDATA/edge1/dev1", b"\x0a\xff"),        # not a Tahu payload
            ("spBv1.0/plant1/BOGUS/edge1", birth.SerializeToString()),
            ("spBv1.0/STATE/scada", b'{"online": true, "timestamp": 1700000000000}'),
        ]
        acks = publish_all(appliance.port, messages)
        codes = [ack.reason_code for ack in acks]
        reasons = [ack.properties.get(0x1F) or "" for ack in acks]
        accepted = [i for i, code in enumerate(codes) if code < 0x80]
        assert accepted == [1, 2, 3, 9]
        assert all(codes[i] == ReasonCode.PAYLOAD_FORMAT_INVALID for i in (0, 4, 5, 6, 7, 8))
        assert "no DBIRTH seen" in reasons[0]
        assert "alias 77 was not declared in the DBIRTH" in reasons[4]
        assert "seq 9 out of order" in reasons[5]
        assert "above the declared maximum" in reasons[6]
        assert "cannot decode as a Sparkplug B payload" in reasons[7]
        assert "unknown Sparkplug message type 'BOGUS'" in reasons[8]
        got = sub.expect(4)
        assert [m.topic for m in got] == [messages[i][0] for i in accepted]
        sub.disconnect()
    finally:
        appliance.stop()


def test_sparkplug_aliases_survive_a_reconnect(tmp_path):
    # The BIRTH certificates are the node's, not its connection's: a node that reconnects without a
    # new NBIRTH (Sparkplug lets it) keeps publishing by alias.
    payload = payload_class()
    birth = payload(timestamp=1, seq=0)
    birth.metrics.add(name="bdSeq", datatype=8, long_value=0)
    birth.metrics.add(name="uptime_s", alias=1, datatype=8, long_value=10)
    device = payload(timestamp=1, seq=1)
    device.metrics.add(name="temperature", alias=10, datatype=9, float_value=21.0)

    def by_alias(seq: int, alias: int, **value: float | int) -> bytes:
        message = payload(timestamp=2, seq=seq)
        message.metrics.add(alias=alias, **value)
        return message.SerializeToString()

    appliance = running(tmp_path, "sparkplug")
    try:
        sub = Client(appliance.port, version=5).connect()
        sub.subscribe("spBv1.0/#", qos=1)
        first = [("spBv1.0/plant1/NBIRTH/edge1", birth.SerializeToString()),
                 ("spBv1.0/plant1/DBIRTH/edge1/dev1", device.SerializeToString())]
        assert [ack.reason_code for ack in publish_all(appliance.port, first, client_id="edge1", disconnect=True)] == [0, 0]
        again = [("spBv1.0/plant1/DDATA/edge1/dev1", by_alias(2, 10, float_value=23.5)),
                 ("spBv1.0/plant1/NDATA/edge1", by_alias(3, 1, long_value=11)),
                 ("spBv1.0/plant1/DDATA/edge1/dev1", by_alias(4, 99, float_value=1.0))]  # still checked
        acks = publish_all(appliance.port, again, client_id="edge1")
        assert [ack.reason_code for ack in acks[:2]] == [0, 0], [ack.properties.get(0x1F) for ack in acks]
        assert acks[2].reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID
        assert "alias 99 was not declared in the DBIRTH" in acks[2].properties.get(0x1F)
        got = sub.expect(4)
        assert [(m.topic, m.payload) for m in got] == [*first, *again[:2]]
        sub.disconnect()
    finally:
        appliance.stop()
