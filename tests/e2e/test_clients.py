"""Real MQTT clients through the proxy to a real mosquitto: the proxy must be invisible."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import Client, mosquitto_sub, paho_props, wait_until

VERSIONS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_subscribe_each_qos(appliance, version, qos):
    sub = Client(appliance.port, version=version).connect()
    pub = Client(appliance.port, version=version).connect()
    sub.subscribe("sensor/+/temperature", qos=2)
    for i in range(20):
        pub.publish(f"sensor/t{i}/temperature", f'{{"n":{i}}}', qos=qos)
    got = sub.expect(20)
    assert [m.payload for m in got] == [f'{{"n":{i}}}'.encode() for i in range(20)]
    assert {m.qos for m in got} == {qos}
    assert appliance.verdicts.counts["accept"] == 20
    sub.disconnect()
    pub.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_message_and_empty_payload_delete(appliance, version):
    pub = Client(appliance.port, version=version).connect()
    pub.publish("config/site", b"v1", qos=1, retain=True)
    late = Client(appliance.port, version=version).connect()
    late.subscribe("config/#", qos=1)
    [retained] = late.expect(1)
    assert (retained.payload, retained.retain) == (b"v1", True)
    # An empty retained payload deletes the retained message: it must pass the pipeline.
    pub.publish("config/site", b"", qos=1, retain=True)
    late.expect(1)
    later = Client(appliance.port, version=version).connect()
    later.subscribe("config/#", qos=1)
    pub.publish("config/marker", b"m", qos=1)
    [marker] = later.expect(1)
    assert marker.topic == "config/marker"
    for c in (pub, late, later):
        c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_will_published_on_abrupt_disconnect(appliance, version):
    watcher = Client(appliance.port, version=version).connect()
    watcher.subscribe("status/#", qos=1)
    device = Client(appliance.port, version=version, client_id="dev-1").will("status/dev-1", b"offline", qos=1)
    device.connect()
    device.close_abruptly()
    [will] = watcher.expect(1)
    assert (will.topic, will.payload) == ("status/dev-1", b"offline")
    watcher.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_no_will_after_clean_disconnect(appliance, version):
    watcher = Client(appliance.port, version=version).connect()
    watcher.subscribe("status/#", qos=1)
    device = Client(appliance.port, version=version, client_id="dev-2").will("status/dev-2", b"offline", qos=1)
    device.connect()
    device.disconnect()
    # A message published after the disconnect arrives alone: the will was not sent before it.
    marker = Client(appliance.port, version=version).connect()
    marker.publish("status/marker", b"m", qos=1)
    [got] = watcher.expect(1)
    assert got.topic == "status/marker"
    watcher.disconnect()
    marker.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_session_redelivery(appliance, version):
    extra = {"properties": paho_props(1, SessionExpiryInterval=300)} if version == 5 else {}
    sub = Client(appliance.port, version=version, client_id="persist-1", clean=False, **extra).connect()
    sub.subscribe("queue/jobs", qos=1)
    sub.disconnect()
    pub = Client(appliance.port, version=version).connect()
    for i in range(5):
        pub.publish("queue/jobs", f"job-{i}", qos=1)
    again = Client(appliance.port, version=version, client_id="persist-1", clean=False, **extra).connect()
    assert again.connect_result is not None
    got = again.expect(5)
    assert [m.payload for m in got] == [f"job-{i}".encode() for i in range(5)]
    again.disconnect()
    pub.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_unsubscribe_stops_delivery(appliance, version):
    sub = Client(appliance.port, version=version).connect()
    sub.subscribe("a/#", qos=1)
    sub.subscribe("b/#", qos=1)
    unsubacks: list[int] = []
    sub.paho.on_unsubscribe = lambda client, userdata, mid, *rest: unsubacks.append(mid)
    result, mid = sub.paho.unsubscribe("a/#")
    wait_until(lambda: mid in unsubacks, message="UNSUBACK")
    pub = Client(appliance.port, version=version).connect()
    # Both publishes go over one connection in order: when b/ arrives, a/ would have arrived first.
    pub.publish("a/1", b"x", qos=1)
    pub.publish("b/1", b"y", qos=1)
    [got] = sub.expect(1)
    assert got.topic == "b/1"
    sub.disconnect()
    pub.disconnect()


def test_mqtt5_topic_alias(appliance):
    sub = Client(appliance.port, version=5).connect()
    sub.subscribe("plant/#", qos=1)
    pub = Client(appliance.port, version=5).connect()
    pub.publish("plant/line1/speed", b"1", qos=1, properties=paho_props(TopicAlias=1))
    pub.publish("", b"2", qos=1, properties=paho_props(TopicAlias=1))
    pub.publish("plant/line2/speed", b"3", qos=1, properties=paho_props(TopicAlias=1))
    pub.publish("", b"4", qos=1, properties=paho_props(TopicAlias=1))
    got = sub.expect(4)
    assert [(m.topic, m.payload) for m in got] == [
        ("plant/line1/speed", b"1"), ("plant/line1/speed", b"2"),
        ("plant/line2/speed", b"3"), ("plant/line2/speed", b"4"),
    ]
    assert [msg.topic for msg, _ in appliance.verdicts.recent] == [
        "plant/line1/speed", "plant/line1/speed", "plant/line2/speed", "plant/line2/speed"
    ]
    sub.disconnect()
    pub.disconnect()


def test_mqtt5_user_properties_pass_through(appliance):
    sub = Client(appliance.port, version=5).connect()
    sub.subscribe("p/#", qos=1)
    pub = Client(appliance.port, version=5).connect()
    pub.publish("p/1", b"x", qos=1, properties=paho_props(UserProperty=[("site", "north")], ContentType="application/json"))
    [got] = sub.expect(1)
    assert got.properties.UserProperty == [("site", "north")]
    assert got.properties.ContentType == "application/json"
    sub.disconnect()
    pub.disconnect()


def test_mosquitto_clients(appliance):
    lines = [f'{{"seq":{i}}}' for i in range(2000)]
    sub = mosquitto_sub(appliance.port, "bulk/#", len(lines), client_id="bulk-sub")
    pub = subprocess.run(
        ["mosquitto_pub", "-p", str(appliance.port), "-t", "bulk/data", "-q", "1", "-l"],
        input="\n".join(lines) + "\n", text=True, capture_output=True, timeout=60,
    )
    assert pub.returncode == 0, pub.stderr
    out, _ = sub.communicate(timeout=60)
    assert out.splitlines() == lines


@pytest.mark.parametrize("version", VERSIONS)
def test_keepalive_ping_and_silent_client_gets_will(appliance, version):
    from appliance.mqtt import Connect, Pingreq, Pingresp, ProtocolVersion, Will
    from tests.helpers import RawClient

    v = ProtocolVersion(version)
    watcher = Client(appliance.port, version=version).connect()
    watcher.subscribe("ka/#", qos=1)
    raw = RawClient(appliance.port, v)
    raw.send(Connect(client_id="ka", protocol_version=v, keepalive=1, will=Will("ka/gone", b"silent")))
    assert raw.receive().reason_code == 0
    raw.send(Pingreq())
    assert raw.receive() == Pingresp()
    # Now silent: the broker enforces 1.5 × keepalive through the proxy and publishes the will.
    [will] = watcher.expect(1, timeout=10)
    assert will.payload == b"silent"
    assert raw.receive() is None
    watcher.disconnect()


def test_plain_asyncio_event_loop(config):
    from tests.helpers import RunningAppliance

    running = RunningAppliance(config, uvloop=False).start()
    try:
        sub = Client(running.port, version=5).connect()
        sub.subscribe("loop/#", qos=2)
        pub = Client(running.port, version=4).connect()
        for qos in (0, 1, 2):
            pub.publish(f"loop/{qos}", b"x", qos=qos)
        assert sorted(m.topic for m in sub.expect(3)) == ["loop/0", "loop/1", "loop/2"]
        sub.disconnect()
        pub.disconnect()
    finally:
        running.stop()
