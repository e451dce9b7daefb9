"""MQTT over WebSockets on both sides: a browser-style client publishes to the gateway over ws://,
and the gateway forwards over wss:// to a second appliance standing in for the cloud (its own
wss:// listener in front of its own mosquitto), which governs and audits what it receives too."""

from __future__ import annotations

from pathlib import Path

from appliance.audit.query import AuditQuery
from appliance.mqtt import ReasonCode
from tests.conftest import make_config
from tests.governance.payloads import temperature
from tests.helpers import Client, RunningAppliance, wait_until
from tests.proxy.test_websocket import ws_client
from tests.tls import make_certificates

REPO = Path(__file__).resolve().parents[2]


def test_ws_client_to_gateway_to_a_wss_cloud(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    cloud = RunningAppliance(make_config(tmp_path / "cloud", **{
        "listeners": [{"listen": "127.0.0.1:0", "transport": "websockets", "path": "/mqtt",
                       "tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}}],
    })).start()
    try:
        assert cloud.app.proxy is not None
        cloud_wss = cloud.app.proxy.listeners[1].port
        gateway = RunningAppliance(make_config(tmp_path / "gateway", schemas=str(REPO / "schemas" / "v1"), **{
            "listeners": [{"listen": "127.0.0.1:0", "transport": "websockets"}],
            "upstream.url": f"wss://localhost:{cloud_wss}/mqtt", "upstream.tls": {"ca_file": str(certs.ca)},
            "upstream.client_id": "gw-7", "upstream.topic_template": "gateways/gw7/{topic}",
            "upstream.backoff_initial": 0.05, "upstream.backoff_max": 0.5,
        })).start()
        try:
            consumer = Client(cloud.port, version=5).connect()
            consumer.subscribe("gateways/#", qos=1)
            assert gateway.app.proxy is not None
            pub = ws_client(gateway.app.proxy.listeners[1].port, version=5, client_id="browser-1").connect()
            good = [temperature(temperature=20 + i) for i in range(50)]
            bad = temperature(temperature=999)
            rejected = pub.publish("sensor/t1/temperature", bad, qos=1)
            assert pub.acks[rejected.mid].value == ReasonCode.PAYLOAD_FORMAT_INVALID
            for payload in good:
                pub.publish("sensor/t1/temperature", payload, qos=1)
            got = consumer.expect(len(good))
            assert [(m.topic, m.payload) for m in got] == [("gateways/gw7/sensor/t1/temperature", p) for p in good]
            consumer.expect_none()  # the rejected message never left the gateway
            pub.disconnect()
            consumer.disconnect()
            forwarder = gateway.app.forwarder
            assert forwarder is not None
            wait_until(lambda: forwarder.status().depth == 0, message="outbox empty")
        finally:
            gateway.stop()
        # The cloud appliance saw the gateway as a client over wss:// and audited every message.
        with AuditQuery(tmp_path / "cloud") as audit_log:
            rows = audit_log.query("SELECT client_id, verdict, count(*) FROM decisions GROUP BY ALL").rows
        assert [tuple(row) for row in rows] == [("gw-7", "accept", len(good))]
    finally:
        cloud.stop()
