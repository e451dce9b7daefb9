"""The whole path: sensors → appliance (demo schema set) → outbox → a second mosquitto as the cloud."""

from __future__ import annotations

from pathlib import Path

from appliance.mqtt import ReasonCode
from tests.conftest import make_config
from tests.e2e.test_governance import CASES
from tests.forward.harness import CloudBroker, Subscriber
from tests.governance.payloads import temperature
from tests.helpers import Client, RunningAppliance, wait_until

REPO = Path(__file__).resolve().parents[2]


def test_valid_messages_reach_the_cloud_across_an_outage(tmp_path):
    cloud = CloudBroker(tmp_path / "cloud").start()
    consumer = Subscriber(cloud.port, "gateways/#").start()
    running = RunningAppliance(make_config(
        tmp_path / "state", schemas=str(REPO / "schemas" / "v1"),
        **{"upstream.url": cloud.url, "upstream.topic_template": "gateways/gw1/{topic}", "upstream.gateway_id": "gw1",
           "upstream.backoff_initial": 0.05, "upstream.backoff_max": 0.5},
    )).start()
    try:
        pub = Client(running.port, version=5, client_id="t1").connect()
        for topic, payload, _ in CASES:
            pub.publish(topic, payload, qos=1)
        valid = [(f"gateways/gw1/{t}", p) for t, p, ok in CASES if ok]
        wait_until(lambda: consumer.count() >= len(valid), message="valid messages forwarded")
        assert [(m.topic, m.payload) for m in consumer.messages] == valid  # rejected ones never leave the gateway
        cloud.stop()
        wait_until(lambda: not running.app.forwarder.status().uplink_up, message="uplink seen down")
        outage = [temperature(temperature=round(i * 0.01, 2)) for i in range(300)]
        for payload in outage:
            pub.publish("sensor/t1/temperature", payload, qos=1)  # acknowledged: buffered durably
        wait_until(lambda: running.app.forwarder.status().depth >= 300, message="backlog counted")  # refreshed ~1 s
        cloud.start()
        wait_until(lambda: outage[-1] in consumer.payloads(), timeout=30, message="backlog drained")
        # At least once: a message whose PUBACK arrived just as the broker stopped may come again.
        # Without those duplicates, exactly what was accepted arrived, in order, and nothing else.
        seen: list[bytes] = []
        for payload in consumer.payloads():
            if payload not in seen:
                seen.append(payload)
        assert seen == [p for _, p in valid] + outage
        wait_until(lambda: running.app.status()["uplink"]["depth"] == 0, message="outbox empty")
        kinds = [kind for kind, _ in running.events]
        assert "uplink_down" in kinds and kinds.count("uplink_up") >= 2
        pub.disconnect()
    finally:
        running.stop()
        consumer.stop()
        cloud.stop()


def test_reject_new_when_the_outbox_is_full(tmp_path):
    cloud = CloudBroker(tmp_path / "cloud")  # never started: the uplink stays down
    running = RunningAppliance(make_config(
        tmp_path / "state", schemas=str(REPO / "schemas" / "v1"),
        **{"upstream.url": cloud.url, "upstream.outbox.max_messages": 5, "upstream.outbox.policy": "reject_new"},
    )).start()
    try:
        pub = Client(running.port, version=5, client_id="t1").connect()
        codes = []
        # The outbox's fullness is refreshed about every second, so it may overshoot a little first.
        for i in range(20_000):
            info = pub.publish("sensor/t1/temperature", temperature(temperature=round(i * 0.001, 3)), qos=1)
            codes.append(pub.acks[info.mid].value)
            if codes[-1] == ReasonCode.QUOTA_EXCEEDED:
                break
        assert codes[-1] == ReasonCode.QUOTA_EXCEEDED, codes
        wait_until(lambda: running.app.outbox.depth().messages >= 5, message="outbox counted")
        pub.disconnect()
    finally:
        running.stop()


def test_forward_qos_per_mapping(tmp_path):
    import shutil

    schemas = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas" / "v1", schemas)
    manifest = schemas / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace(
        "  device/+/status: device_status:v1",
        "  device/+/status:\n    schema: device_status:v1\n    forward_qos: 0",
    ))
    cloud = CloudBroker(tmp_path / "cloud").start()
    consumer = Subscriber(cloud.port, "#").start()
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(schemas), **{"upstream.url": cloud.url})).start()
    try:
        from tests.governance.payloads import device_status

        pub = Client(running.port, version=5, client_id="t1").connect()
        pub.publish("device/d1/status", device_status(), qos=1)
        pub.publish("sensor/t1/temperature", temperature(), qos=1)
        wait_until(lambda: consumer.count() >= 2, message="both forwarded")
        assert {m.topic: m.qos for m in consumer.messages} == {"device/d1/status": 0, "sensor/t1/temperature": 1}
        pub.disconnect()
    finally:
        running.stop()
        consumer.stop()
        cloud.stop()
