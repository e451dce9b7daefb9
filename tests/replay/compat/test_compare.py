"""Whole schema sets: the demo v1 -> v2, a transitive chain, topic changes, $refs, modes, output."""

from __future__ import annotations

import json

import orjson
import pytest

from appliance.governance.schemaset import load_schema_set
from replay.compat import (
    CompatConfigError,
    Mode,
    compare_chain,
    compare_sets,
    read_modes,
    render_text,
)
from tests.replay.compat.builders import FIXTURES, REPO, json_set

SENSOR = {"device_id": "t1", "ts": "2026-11-27T12:00:00Z", "temperature": 21.5}


@pytest.fixture(scope="module")
def demo():
    return load_schema_set(REPO / "schemas" / "v1"), load_schema_set(REPO / "schemas" / "v2")


def test_demo_temperature_breaks_both_ways(demo):
    """`unit` became required: v1 messages (no unit) fail v2, which breaks BACKWARD. FORWARD breaks
    too: v1 is a closed content model (additionalProperties: false) without `unit`, so every v2
    message (which must carry `unit`) fails v1."""
    result = compare_sets(*demo).result("temperature")
    assert (result.old_name, result.name, result.paired_by) == ("temperature:v1", "temperature:v2", "name")
    assert result.verdicts == {"BACKWARD": False, "FORWARD": False, "FULL": False}
    assert not result.compatible
    assert {(f.kind, f.path, tuple(sorted(d.value for d in f.breaks))) for f in result.findings} == {
        ("required added", "/required", ("BACKWARD",)),
        ("property added to closed content model", "/properties/unit", ("FORWARD",)),
    }


def test_demo_verdicts_agree_with_the_validators(demo):
    old, new = demo
    v1_message = orjson.dumps(SENSOR)
    v2_message = orjson.dumps({**SENSOR, "unit": "C"})
    assert old.schemas["temperature:v1"].validate(v1_message)[1] == []
    assert new.schemas["temperature:v2"].validate(v1_message)[1] != []  # BACKWARD broken
    assert new.schemas["temperature:v2"].validate(v2_message)[1] == []
    assert old.schemas["temperature:v1"].validate(v2_message)[1] != []  # FORWARD broken

    v1_class = old.schemas["device_status:v1"]._class
    v2_class = new.schemas["device_status:v2"]._class
    assert new.schemas["device_status:v2"].validate(v1_class(device_id="d1", state=1).SerializeToString())[1] == []
    with_firmware = v2_class(device_id="d1", firmware="1.2.3").SerializeToString()
    assert "unknown field 5" in old.schemas["device_status:v1"].validate(with_firmware)[1][0].message  # FORWARD broken


def test_demo_device_status_is_backward_compatible_but_strict_decoding_breaks_forward(demo):
    result = compare_sets(*demo).result("device_status")
    assert result.compatible  # BACKWARD, the default mode
    assert result.verdicts == {"BACKWARD": True, "FORWARD": False, "FULL": False}
    [finding] = result.findings
    assert (finding.kind, finding.path, finding.new) == ("field added", "demo.DeviceStatus.firmware = 5", "optional string firmware = 5")
    assert "strict decoding" in finding.detail


def test_demo_report_as_a_whole(demo):
    report = compare_sets(*demo)
    assert report.breaking
    assert (report.old_version, report.new_version, report.added, report.removed) == ("v1", "v2", (), ())
    assert [t.findings for t in report.topics] == [()]
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["breaking"] is True
    assert {s["name"]: s["compatible"] for s in as_json["schemas"]} == {"device_status:v2": True, "temperature:v2": False}
    text = render_text(report)
    assert "temperature:v1 (v1) -> temperature:v2 (v2)" in text
    assert "breaks BACKWARD: required added at /required" in text


def test_per_schema_modes(demo):
    report = compare_sets(*demo, modes={"device_status": Mode.FULL, "temperature:v2": Mode.NONE})
    assert report.result("device_status").mode is Mode.FULL
    assert not report.result("device_status").compatible
    assert report.result("temperature").compatible  # NONE accepts anything
    assert report.breaking


def test_modes_come_from_the_manifest(tmp_path):
    old = json_set(tmp_path, "v1", {"type": "object"})
    new = json_set(tmp_path, "v2", {"type": "object", "required": ["a"]})
    manifest = new.directory / "manifest.yaml"
    # The loader does not accept `compatibility:` yet: add it after loading.
    manifest.write_text(manifest.read_text().replace("format: jsonschema", "format: jsonschema\n    compatibility: forward"))
    assert read_modes(new.directory) == {"reading:v2": Mode.FORWARD}
    result = compare_sets(old, new).result("reading")
    assert (result.mode, result.compatible) == (Mode.FORWARD, True)
    manifest.write_text(manifest.read_text().replace("forward", "sideways"))
    with pytest.raises(CompatConfigError, match="schema_files.reading:v2.compatibility: unknown compatibility mode 'sideways'"):
        compare_sets(old, new)


def test_default_mode_is_backward(demo):
    assert read_modes(REPO / "schemas" / "v2") == {}
    assert compare_sets(*demo).result("temperature").mode is Mode.BACKWARD


def test_transitive_chain():
    """v2 deletes field 2 and reserves it (compatible with v1), v3 reuses 2 as a string (compatible
    with v2): only a transitive mode compares v3 with v1 and sees int32 -> string."""
    chain = [load_schema_set(FIXTURES / "chain" / v) for v in ("v1", "v2", "v3")]
    assert not compare_sets(chain[0], chain[1], modes={"reading": Mode.FULL}).breaking
    assert not compare_sets(chain[1], chain[2], modes={"reading": Mode.FULL}).breaking

    plain = compare_chain(chain, modes={"reading": Mode.FULL})
    assert not plain.breaking
    assert [(r.old_version, r.new_version) for r in plain.schemas] == [("v2", "v3")]

    transitive = compare_chain(chain, modes={"reading": Mode.FULL_TRANSITIVE})
    assert transitive.breaking
    assert {r.old_version: r.compatible for r in transitive.schemas} == {"v1": False, "v2": True}
    broken = transitive.result("reading", old_version="v1")
    assert [(f.kind, f.old, f.new) for f in broken.findings] == [("field type changed", "int32", "string")]
    assert (transitive.old_version, transitive.new_version) == ("v1", "v3")

    with pytest.raises(ValueError):
        compare_chain(chain[:1])


def test_different_topic_patterns():
    report = compare_sets(load_schema_set(FIXTURES / "topics" / "old"), load_schema_set(FIXTURES / "topics" / "new"))
    [topics] = report.topics
    found = {(f.kind, f.path): sorted(d.value for d in f.breaks) for f in topics.findings}
    assert found == {
        ("topic pattern removed", "topic_patterns/device/+/status"): ["BACKWARD"],
        ("topic pattern removed", "topic_patterns/events/#"): ["BACKWARD"],  # events/alerts/+ covers less
        ("topic pattern replaced", "topic_patterns/sensor/+/temperature"): [],  # sensor/# covers it
        ("topic pattern added", "topic_patterns/sensor/#"): ["FORWARD"],
        ("topic pattern added", "topic_patterns/lab/+/humidity"): ["FORWARD"],
        ("mapping added", "schema_mappings/lab/+/humidity"): [],
        ("mapping points to another schema", "schema_mappings/sensor/+/temperature"): [],
    }
    assert not topics.compatible and report.breaking
    # temp:v1 and temperature:v2 share no name: they pair through the filter both map.
    result = report.result("temperature")
    assert (result.old_name, result.paired_by, result.compatible) == ("temp:v1", "topic filter sensor/+/temperature", True)
    assert (report.added, report.removed) == (("humidity:v1",), ())


def test_refs_within_a_file_and_between_files():
    report = compare_sets(load_schema_set(FIXTURES / "refs" / "old"), load_schema_set(FIXTURES / "refs" / "new"))
    result = report.result("reading")
    assert result.warnings == ()
    assert [(f.kind, f.path, f.old, f.new) for f in result.findings] == [
        ("maxLength tightened", "/properties/device_id/maxLength", 64, 32),  # common.json#/$defs/device_id
        ("maximum loosened", "/properties/value/maximum", 100, 1000),  # #/$defs/value
    ]
    assert result.verdicts == {"BACKWARD": False, "FORWARD": False, "FULL": False}


def test_schemas_only_in_one_set_are_listed(tmp_path):
    old = json_set(tmp_path, "v1", {"type": "object"}, name="humidity")
    new = json_set(tmp_path, "v2", {"type": "object"}, name="pressure")
    report = compare_sets(old, new)
    # Both are mapped to meter/+/reading, so they pair by topic filter rather than being added/removed.
    assert report.result("pressure").paired_by == "topic filter meter/+/reading"
    assert (report.added, report.removed) == ((), ())


def test_format_change_breaks_both_ways(tmp_path):
    from tests.replay.compat.builders import proto_set

    old = json_set(tmp_path, "v1", {"type": "object"})
    new = proto_set(tmp_path, "v2", 'syntax = "proto3";\npackage demo;\nmessage Reading { string id = 1; }\n')
    result = compare_sets(old, new).result("reading")
    assert result.format == "jsonschema -> protobuf"
    assert result.verdicts["BACKWARD"] is False and result.verdicts["FORWARD"] is False
