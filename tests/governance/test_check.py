"""Verdicts of the governance check on the demo sets (no sockets: Message in, Verdict out)."""

from __future__ import annotations

from pathlib import Path

import pytest
from freezegun import freeze_time

from appliance.governance import Governance, load_schema_set
from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.pipeline import ClientInfo, Message, Pipeline, Verdict
from tests.governance.payloads import device_status, temperature

REPO = Path(__file__).resolve().parents[2]
CLIENT = ClientInfo("t1", None, "192.0.2.1:4000", ProtocolVersion.MQTT_5)


@pytest.fixture(scope="module")
def v1() -> Governance:
    return Governance(load_schema_set(REPO / "schemas" / "v1"))


def judge(governance: Governance, topic: str, payload: bytes, *, retain: bool = False, client: ClientInfo = CLIENT) -> Verdict:
    return governance.check(Message(topic, payload, 1, retain, client))


def test_valid_temperature(v1):
    verdict = judge(v1, "sensor/t1/temperature", temperature())
    assert verdict.accepted
    assert (verdict.schema_set, verdict.topic_filter, verdict.schema) == ("v1", "sensor/+/temperature", "temperature:v1")


def test_valid_device_status(v1):
    verdict = judge(v1, "device/d1/status", device_status())
    assert verdict.accepted and verdict.schema == "device_status:v1"


@pytest.mark.parametrize(
    ("payload", "path", "fragment"),
    [
        (temperature(temperature=130), "/temperature", "130"),
        (temperature(temperature="warm"), "/temperature", "number"),
        (temperature(ts="yesterday"), "/ts", "date-time"),
        (temperature(unit="C"), "", "unit"),
        (b'{"device_id":"t1"}', "", "ts"),
    ],
)
def test_invalid_temperature(v1, payload, path, fragment):
    verdict = judge(v1, "sensor/t1/temperature", payload)
    assert not verdict.accepted
    assert verdict.reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID
    assert any(r.check == "schema" and r.path == path and fragment in r.message for r in verdict.reasons), verdict.reasons
    assert all(r.schema == "temperature:v1" for r in verdict.reasons)


def test_all_schema_errors_are_reported(v1):
    verdict = judge(v1, "sensor/t1/temperature", b'{"temperature": 500, "extra": 1}')
    assert len(verdict.reasons) >= 4  # device_id, ts missing; range; additional property


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b'{"device_id": "t1", "x": "\xff\xfe"}', "payload is not valid UTF-8 (byte 26)"),
        (b'{"device_id": 1e999999}', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_payloads_that_are_not_json(v1, payload, fragment):
    verdict = judge(v1, "sensor/t1/temperature", payload)
    assert not verdict.accepted and fragment in verdict.reasons[0].message


def test_invalid_utf8_names_the_byte_not_a_python_error(v1):
    verdict = judge(v1, "sensor/t1/temperature", b'{"device_id": "t\xc3"}')
    assert [reason.message for reason in verdict.reasons] == ["payload is not valid UTF-8 (byte 16)"]


def test_json_nested_100000_deep(v1):
    # Straight to the schema: the demo's max_size rule would stop a 200 kB payload first.
    schema = v1.schema_set.schemas["temperature:v1"]
    decoded, [error] = schema.validate(b"[" * 100_000 + b"]" * 100_000)
    assert decoded is None and "not valid JSON" in error.message and "depth limit" in error.message


def test_rule_device_matches_topic(v1):
    verdict = judge(v1, "sensor/t2/temperature", temperature(device_id="t1"))
    assert not verdict.accepted
    [reason] = verdict.reasons
    assert reason.check == "rule" and "device_matches_topic" in reason.message


def test_max_payload_size_rule(v1):
    verdict = judge(v1, "sensor/t1/temperature", temperature() + b" " * 2000)
    assert not verdict.accepted and "max_size" in verdict.reasons[0].message


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x0a\xff", "DeviceStatus"),  # truncated varint length
        (device_status(extra_field=7), "unknown"),
        (b"\xff" * 20, "DeviceStatus"),
    ],
)
def test_invalid_device_status(v1, payload, fragment):
    verdict = judge(v1, "device/d1/status", payload)
    assert not verdict.accepted
    assert any(fragment in r.message for r in verdict.reasons), verdict.reasons


def test_topic_outside_patterns(v1):
    verdict = judge(v1, "secret/door_code", b"1234")
    assert not verdict.accepted and verdict.reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert verdict.reasons[0].check == "topic"


def test_unmapped_but_allowed_topic(v1, demo_set):
    assert judge(v1, "events/door/open", b"anything at all").accepted
    d = demo_set()
    manifest = d / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("unmapped: accept", "unmapped: reject"))
    strict = Governance(load_schema_set(d))
    verdict = judge(strict, "events/door/open", b"x")
    assert not verdict.accepted and "policy.unmapped" in verdict.reasons[0].message


def test_empty_retained_payload_deletes(v1):
    assert judge(v1, "sensor/t1/temperature", b"", retain=True).accepted
    assert not judge(v1, "sensor/t1/temperature", b"", retain=False).accepted


def test_v2_requires_unit(demo_set):
    v2 = Governance(load_schema_set(REPO / "schemas" / "v2"))
    assert not judge(v2, "sensor/t1/temperature", temperature()).accepted
    assert judge(v2, "sensor/t1/temperature", temperature(unit="C")).accepted
    assert judge(v2, "device/d1/status", device_status(firmware="1.2.3")).accepted
    assert judge(v2, "device/d1/status", device_status()).accepted


def test_disconnect_policy_and_rate_limit(demo_set):
    d = demo_set()
    manifest = d / "manifest.yaml"
    text = manifest.read_text()
    text = text.replace("  sensor/+/temperature: temperature:v1", "  sensor/+/temperature:\n    schema: temperature:v1\n    on_reject: disconnect")
    text = text.replace("    - name: max_size\n", "    - name: per_device\n      max_rate: 2/s\n    - name: max_size\n")
    manifest.write_text(text)
    governance = Governance(load_schema_set(d))
    assert judge(governance, "sensor/t1/temperature", b"{}").action == "disconnect"
    with freeze_time("2026-11-27 12:00:00") as clock:
        results = [judge(governance, "sensor/t1/temperature", temperature()).accepted for _ in range(3)]
        assert results == [True, True, False]
        other = ClientInfo("t9", None, "x", ProtocolVersion.MQTT_5)
        assert judge(governance, "sensor/t9/temperature", temperature(device_id="t9"), client=other).accepted
        limited = judge(governance, "sensor/t1/temperature", temperature())
        assert limited.reason_code == ReasonCode.QUOTA_EXCEEDED
        clock.tick(1.0)
        assert judge(governance, "sensor/t1/temperature", temperature()).accepted


def test_schema_set_swap_is_atomic(v1, demo_set):
    governance = Governance(load_schema_set(REPO / "schemas" / "v1"))
    assert judge(governance, "sensor/t1/temperature", temperature()).accepted
    governance.schema_set = load_schema_set(REPO / "schemas" / "v2")
    verdict = judge(governance, "sensor/t1/temperature", temperature())
    assert not verdict.accepted and verdict.schema == "temperature:v2" and verdict.schema_set == "v2"


def test_pipeline_keeps_the_accepting_verdict_for_sinks(v1):
    from appliance.pipeline import CountingSink

    sink = CountingSink()
    pipeline = Pipeline([v1], [sink])
    pipeline.judge(Message("sensor/t1/temperature", temperature(), 0, False, CLIENT))
    [(_, verdict)] = sink.recent
    assert verdict.schema == "temperature:v1"


def test_dry_run_records_the_real_verdict(v1):
    from appliance.pipeline import CountingSink

    sink = CountingSink()
    pipeline = Pipeline([v1], [sink], dry_run=True)
    assert pipeline.judge(Message("sensor/t1/temperature", b"{}", 0, False, CLIENT)).verdict.accepted
    assert sink.counts == {"reject": 1}
