"""Dead letters end to end: real mosquitto, real paho clients, the appliance on its own loop.

A rejected message goes to its mapping's dead-letter topic on the local broker (as a JSON envelope
or as is) and/or to the cloud broker through the forwarder, across an uplink outage; its publisher
still gets the reject reason code; the audit log records each republish; dry run republishes
nothing; replay reads the same decisions as without dead letters."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from appliance.governance import SchemaSetError
from appliance.mqtt import ReasonCode
from tests.conftest import make_config
from tests.deadletter.conftest import REPO, V1, mapping, schema_set
from tests.e2e.test_audit import sql
from tests.forward.harness import CloudBroker, Subscriber
from tests.governance.payloads import device_status, temperature
from tests.helpers import Client, RunningAppliance, wait_until

BAD_TEMPERATURE = temperature(temperature=999)
BAD_STATUS = b"\x0a\xff"  # truncated protobuf


def user_properties(received) -> dict[str, str]:
    return dict(getattr(received.properties, "UserProperty", []) or [])


@pytest.fixture
def local_set(tmp_path: Path) -> Path:
    return schema_set(
        tmp_path / "set",
        temperature=mapping("temperature:v1", "topic: deadletter/{topic}\nqos: 1"),  # envelope (default)
        status=mapping("device_status:v1", "topic: invalid/{client_id}/{schema}\nenvelope: false\nqos: 0"),
    )


def test_rejected_messages_arrive_on_their_local_dead_letter_topics(tmp_path, local_set):
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(local_set))).start()
    try:
        sub = Client(running.port, version=5, client_id="ops").connect()
        sub.subscribe("deadletter/#", qos=1)
        sub.subscribe("invalid/#", qos=1)
        pub = Client(running.port, version=5, client_id="t1").connect()
        ok = pub.publish("sensor/t1/temperature", temperature(), qos=1)
        bad = pub.publish("sensor/t1/temperature", BAD_TEMPERATURE, qos=1)
        bad_status = pub.publish("device/d1/status", BAD_STATUS, qos=1)
        pub.publish("device/d1/status", device_status(), qos=1)
        # The publisher is told as before: success, then the reject reason codes.
        assert not pub.acks[ok.mid].is_failure  # success (no matching subscribers)
        assert pub.acks[bad.mid].value == ReasonCode.PAYLOAD_FORMAT_INVALID
        assert pub.acks[bad_status.mid].value == ReasonCode.PAYLOAD_FORMAT_INVALID

        got = {m.topic: m for m in sub.expect(2)}
        assert set(got) == {"deadletter/sensor/t1/temperature", "invalid/t1/device_status:v1"}
        sub.expect_none()  # the valid messages made none

        rejects = sql(state, "SELECT CAST(id AS VARCHAR) AS id, topic FROM decisions WHERE verdict = 'reject' ORDER BY id")
        ids = {row["topic"]: row["id"] for row in rejects}

        wrapped = got["deadletter/sensor/t1/temperature"]
        assert wrapped.qos == 1 and not wrapped.retain
        envelope = json.loads(wrapped.payload)
        assert envelope["verdict_id"] == ids["sensor/t1/temperature"]
        assert (envelope["topic"], envelope["client_id"], envelope["schema"], envelope["reason_code"]) == \
            ("sensor/t1/temperature", "t1", "temperature:v1", 0x99)
        assert envelope["reasons"][0]["check"] == "schema" and "999" in envelope["reasons"][0]["message"]
        assert base64.b64decode(envelope["payload_base64"]) == BAD_TEMPERATURE
        assert (envelope["topic_filter"], envelope["schema_set"], envelope["envelope_version"]) == ("sensor/+/temperature", "v1", 1)

        raw = got["invalid/t1/device_status:v1"]
        assert raw.payload == BAD_STATUS and raw.qos == 0
        props = user_properties(raw)
        assert props["verdict-id"] == ids["device/d1/status"] and props["original-topic"] == "device/d1/status"
        assert props["client-id"] == "t1" and props["reason"]

        events = sql(state, "SELECT kind, client_id, detail->>'verdict_id' AS verdict_id, detail->>'topic' AS topic, "
                            "detail->>'to' AS dest, detail->>'envelope' AS envelope FROM events "
                            "WHERE kind LIKE 'dead_letter%' ORDER BY id")
        assert [(e["kind"], e["client_id"], e["verdict_id"], e["topic"], json.loads(e["dest"]), e["envelope"]) for e in events] == [
            ("dead_letter", "t1", ids["sensor/t1/temperature"], "deadletter/sensor/t1/temperature", ["local"], "true"),
            ("dead_letter", "t1", ids["device/d1/status"], "invalid/t1/device_status:v1", ["local"], "false"),
        ]
        # The query docs/audit.md gives for "which rejections were republished, which dropped".
        documented = (REPO / "docs" / "audit.md").read_text().split("### Dead letters\n", 1)[1].split("```sql\n", 1)[1]
        republished = sql(state, documented.split("```", 1)[0])
        assert [(str(r["id"]), r["dead_letter_topic"], r["dropped"]) for r in republished] == [
            (ids["sensor/t1/temperature"], "deadletter/sensor/t1/temperature", None),
            (ids["device/d1/status"], "invalid/t1/device_status:v1", None),
        ]
        wait_until(lambda: running.app.status()["dead_letters"]["counts"].get("local/published") == 2, message="counted")
        assert running.app.status()["dead_letters"]["local_connected"] is True
        from prometheus_client import generate_latest

        from appliance.metrics import make_registry

        exposition = generate_latest(make_registry(running.app.stats, running.app.metrics)).decode()
        assert 'mqtt_proxy_dead_letters_total{outcome="published",to="local"} 2.0' in exposition
        assert "mqtt_proxy_dead_letter_queue 0.0" in exposition
        pub.disconnect()
        sub.disconnect()
    finally:
        running.stop()


def test_a_client_cannot_publish_to_a_dead_letter_topic_through_the_proxy(tmp_path, local_set):
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(local_set))).start()
    try:
        sub = Client(running.port, version=5, client_id="ops").connect()
        sub.subscribe("deadletter/#", qos=1)
        pub = Client(running.port, version=5, client_id="forger").connect()
        forged = pub.publish("deadletter/sensor/t1/temperature", b'{"verdict_id": "1"}', qos=1)
        assert pub.acks[forged.mid].value == ReasonCode.TOPIC_NAME_INVALID  # outside topic_patterns, by rule
        sub.expect_none()
        assert running.app.dead_letters is not None and not running.app.dead_letters.active
        pub.disconnect()
        sub.disconnect()
    finally:
        running.stop()


def test_dry_run_records_what_would_have_been_republished(tmp_path, local_set):
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(local_set), dry_run=True)).start()
    try:
        sub = Client(running.port, version=5, client_id="ops").connect()
        sub.subscribe("deadletter/#", qos=1)
        sub.subscribe("sensor/#", qos=1)
        pub = Client(running.port, version=5, client_id="t1").connect()
        info = pub.publish("sensor/t1/temperature", BAD_TEMPERATURE, qos=1)
        assert not pub.acks[info.mid].is_failure  # dry run: delivered
        [delivered] = sub.expect(1)
        assert delivered.topic == "sensor/t1/temperature"  # to its own topic, not the dead-letter one
        sub.expect_none()
        events = sql(state, "SELECT kind, detail->>'dry_run' AS dry_run, detail->>'topic' AS topic FROM events "
                            "WHERE kind LIKE 'dead_letter%'")
        assert events == [{"kind": "dead_letter", "dry_run": "true", "topic": "deadletter/sensor/t1/temperature"}]
        assert running.app.dead_letters is not None
        assert running.app.dead_letters.totals() == {("none", "dry_run"): 1, ("local", "published"): 0,
                                                     ("local", "dropped"): 0, ("local", "refused"): 0}
        pub.disconnect()
        sub.disconnect()
    finally:
        running.stop()


def test_dead_letters_reach_the_cloud_across_an_outage_and_replay_is_unaffected(tmp_path):
    from replay.cli import cli as replay_cli
    from click.testing import CliRunner

    schemas = schema_set(tmp_path / "set", temperature=mapping(
        "temperature:v1", "topic: deadletter/{topic}\nto: [local, cloud]\nenvelope: false\nqos: 1"))
    cloud = CloudBroker(tmp_path / "cloud")  # down at first
    state = tmp_path / "state"
    running = RunningAppliance(make_config(
        state, schemas=str(schemas),
        **{"upstream.url": cloud.url, "upstream.topic_template": "gateways/gw1/{topic}", "upstream.gateway_id": "gw1",
           "upstream.backoff_initial": 0.05, "upstream.backoff_max": 0.5},
    )).start()
    consumer = None
    try:
        pub = Client(running.port, version=5, client_id="t1").connect()
        sent = [temperature(), BAD_TEMPERATURE, b"not json", temperature(temperature=22.0)]
        codes = [pub.acks[pub.publish("sensor/t1/temperature", p, qos=1).mid] for p in sent]
        assert [code.is_failure for code in codes] == [False, True, True, False]
        assert codes[1].value == codes[2].value == ReasonCode.PAYLOAD_FORMAT_INVALID
        wait_until(lambda: running.app.forwarder.status().depth >= 4, message="two messages and two dead letters buffered")
        cloud.start()
        consumer = Subscriber(cloud.port, "gateways/#").start()
        wait_until(lambda: consumer.count() >= 4, timeout=30, message="backlog forwarded")
        seen = []
        for message in consumer.messages:
            if (message.topic, message.payload) not in seen:  # at least once: a duplicate may come
                seen.append((message.topic, message.payload))
        # In log order: each dead letter right after its rejection, among the accepted messages.
        assert seen == [("gateways/gw1/sensor/t1/temperature", sent[0]),
                        ("gateways/gw1/deadletter/sensor/t1/temperature", sent[1]),
                        ("gateways/gw1/deadletter/sensor/t1/temperature", sent[2]),
                        ("gateways/gw1/sensor/t1/temperature", sent[3])]
        events = sql(state, "SELECT detail->>'to' AS dest FROM events WHERE kind = 'dead_letter'")
        assert [json.loads(e["dest"]) for e in events] == [["local", "cloud"]] * 2
        assert running.app.dead_letters.totals()["cloud", "appended"] == 2
        pub.disconnect()

        # Replay reads the decisions only: the forward-only records of the dead letters are not traffic.
        result = CliRunner().invoke(replay_cli, ["--state-dir", str(state), "--against", str(V1), "--format", "json"],
                                    prog_name="replay", catch_exceptions=False)
        report = json.loads(result.stdout)
        assert report["totals"]["replayed"] == len(sent) and report["totals"]["breaking"] == 0, report["totals"]
    finally:
        running.stop()
        if consumer is not None:
            consumer.stop()
        cloud.stop()


def test_cloud_dead_letters_need_forwarding(tmp_path):
    schemas = schema_set(tmp_path / "set", temperature=mapping("temperature:v1", "topic: deadletter/{topic}\nto: cloud"))
    with pytest.raises(SchemaSetError, match=r"on_reject.republish.to: cloud needs forwarding \(upstream.url"):
        RunningAppliance(make_config(tmp_path / "state", schemas=str(schemas)))


def test_a_reload_that_adds_cloud_dead_letters_without_forwarding_fails(tmp_path):
    import shutil

    schemas = tmp_path / "set"
    shutil.copytree(V1, schemas)
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(schemas), reload_on_change=False)).start()
    try:
        manifest = schemas / "manifest.yaml"
        manifest.write_text(manifest.read_text().replace(
            "  sensor/+/temperature: temperature:v1",
            "  sensor/+/temperature:" + mapping("temperature:v1", "topic: deadletter/{topic}\nto: [cloud]")))
        assert running.call(running.app.reload("test")) is False
        [(kind, detail)] = [(k, d) for k, d in running.events if k == "config_reload"]
        assert detail["result"] == "failed" and "cloud needs forwarding" in str(detail["error"])
        manifest.write_text(manifest.read_text().replace("to: [cloud]", "to: [local]"))
        assert running.call(running.app.reload("test")) is True
    finally:
        running.stop()


def test_local_dead_letters_made_while_mosquitto_is_down_arrive_after_its_restart(tmp_path):
    import asyncio
    import os
    import signal
    import time

    from appliance.pipeline import ClientInfo, Message
    from appliance.mqtt import ProtocolVersion

    schemas = schema_set(tmp_path / "set", temperature=mapping(
        "temperature:v1", "topic: deadletter/{topic}\nqos: 1\nretain: true"))  # retained: read after the restart
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(schemas))).start()
    try:
        app = running.app
        pub = Client(running.port, version=5, client_id="t0").connect()
        pub.publish("sensor/t0/temperature", BAD_TEMPERATURE, qos=1)  # the local connection is up
        wait_until(lambda: app.dead_letters.totals()["local", "published"] == 1, message="first dead letter sent")

        async def outage() -> None:
            os.kill(app.broker.pid, signal.SIGKILL)
            while app.broker.endpoint() is not None:  # the supervisor has seen it die
                await asyncio.sleep(0.005)
            # Rejections while the broker is down (judged as a live message would be): judge() does
            # not wait for the dead letters, they wait for the broker.
            for n in (1, 2, 3):
                client = ClientInfo(f"t{n}", None, "192.0.2.9:5000", ProtocolVersion.MQTT_5)
                app.pipeline.judge(Message(f"sensor/t{n}/temperature", BAD_TEMPERATURE, 1, False, client,
                                           received_at=time.time()))

        running.call(outage())
        assert app.dead_letters.totals()["local", "queued"] == 4
        wait_until(lambda: app.broker.restarts == 1 and app.broker.endpoint() is not None, message="mosquitto restarted")
        wait_until(lambda: app.dead_letters.totals()["local", "published"] == 4, timeout=30, message="sent after the restart")
        sub = Client(running.port, version=5, client_id="ops").connect()
        sub.subscribe("deadletter/#", qos=1)
        # Retained: t1-t3's, sent to the new mosquitto (t0's went with the killed one, unless it
        # had saved it already).
        got = {m.topic for m in sub.expect(3)}
        assert {f"deadletter/sensor/t{n}/temperature" for n in (1, 2, 3)} <= got
        assert app.dead_letters.totals()["local", "dropped"] == 0
        sub.disconnect()
        pub.disconnect()
    finally:
        running.stop()



def test_a_flood_past_the_rate_limit_makes_no_dead_letters(tmp_path):
    d = schema_set(
        tmp_path / "set",
        temperature=mapping("temperature:v1", "topic: deadletter/{topic}\nqos: 1"),
        status=mapping("device_status:v1", "topic: deadletter/{topic}\nqos: 1"),
    )
    manifest = d / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace(
        "    - name: max_size\n", "    - name: per_device\n      max_rate: 1/hour\n    - name: max_size\n"))
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(d))).start()
    try:
        sub = Client(running.port, version=5, client_id="ops").connect()
        sub.subscribe("deadletter/#", qos=1)
        pub = Client(running.port, version=5, client_id="t1").connect()
        first = pub.publish("sensor/t1/temperature", BAD_TEMPERATURE, qos=1)  # takes the hour's one message
        flood = [pub.publish("sensor/t1/temperature", BAD_TEMPERATURE, qos=1) for _ in range(20)]
        last = pub.publish("device/d1/status", BAD_STATUS, qos=1)  # no rate limit: a dead letter
        assert pub.acks[first.mid].value == ReasonCode.PAYLOAD_FORMAT_INVALID
        assert {pub.acks[info.mid].value for info in flood} == {ReasonCode.QUOTA_EXCEEDED}
        assert pub.acks[last.mid].value == ReasonCode.PAYLOAD_FORMAT_INVALID
        # Dead letters go out in order on one connection: the flood's would come before the last one.
        assert [m.topic for m in sub.expect(2)] == ["deadletter/sensor/t1/temperature", "deadletter/device/d1/status"]
        pub.disconnect()
        sub.disconnect()
    finally:
        running.stop()
