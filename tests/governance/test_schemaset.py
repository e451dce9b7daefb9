"""Loading schema sets: the demo sets load, and every kind of broken set is a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.governance import SchemaSetError, load_schema_set

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_demo_sets_load(version):
    schema_set = load_schema_set(REPO / "schemas" / version)
    assert schema_set.version == version
    assert set(schema_set.schemas) == {f"temperature:{version}", f"device_status:{version}"}
    assert schema_set.route("sensor/t1/temperature")[1].schema_name == f"temperature:{version}"
    assert schema_set.route("device/d1/status")[1].schema_name == f"device_status:{version}"
    assert schema_set.route("events/door/open") == (True, None)
    assert schema_set.route("other/topic") == (False, None)


def broken(directory: Path) -> list[str]:
    with pytest.raises(SchemaSetError) as info:
        load_schema_set(directory)
    return info.value.problems


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_not_a_directory(tmp_path):
    assert broken(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a directory"]


def test_missing_manifest(tmp_path):
    [problem] = broken(tmp_path)
    assert "manifest.yaml: missing" in problem


def test_broken_yaml_names_file_and_line(demo_set):
    d = demo_set()
    edit(d / "manifest.yaml", "  - events/#", "  - events/#\n  bad: [")
    [problem] = broken(d)
    assert re.match(rf"{re.escape(str(d / 'manifest.yaml'))}:\d+: YAML error", problem)


def test_duplicate_key(demo_set):
    d = demo_set()
    edit(d / "manifest.yaml", "policy:", "version: again\npolicy:")
    [problem] = broken(d)
    assert "duplicate key 'version'" in problem and f"manifest.yaml:{line_of(d / 'manifest.yaml', 'version: again')}" in problem


def test_missing_schema_file(demo_set):
    d = demo_set()
    (d / "temperature.json").unlink()
    problems = broken(d)
    line = line_of(d / "manifest.yaml", "file: temperature.json")
    assert any(f"manifest.yaml:{line}:" in p and "file 'temperature.json' not found" in p for p in problems)


def test_invalid_json_syntax(demo_set):
    d = demo_set()
    (d / "temperature.json").write_text('{\n  "type": "object",\n  "required": [\n}\n')
    [problem] = broken(d)
    assert f"{d / 'temperature.json'}:4:" in problem and "not valid JSON" in problem


def test_invalid_json_schema(demo_set):
    d = demo_set()
    edit(d / "temperature.json", '"type": "number"', '"type": "numeric"')
    [problem] = broken(d)
    assert "temperature.json" in problem and "not a valid JSON Schema" in problem


def test_unresolvable_ref(demo_set):
    d = demo_set()
    edit(d / "temperature.json", '"type": "number", "minimum"', '"$ref": "units.json#/$defs/celsius", "minimum"')
    [problem] = broken(d)
    assert "temperature.json" in problem and "units.json" in problem


def test_ref_between_files_of_the_set(demo_set):
    d = demo_set()
    (d / "common.json").write_text('{"$defs": {"device_id": {"type": "string", "pattern": "^[a-z0-9-]+$"}}}')
    edit(d / "temperature.json", '"device_id": { "type": "string", "minLength": 1, "maxLength": 64 }', '"device_id": { "$ref": "common.json#/$defs/device_id" }')
    schema = load_schema_set(d).schemas["temperature:v1"]
    ok = b'{"device_id":"t-1","ts":"2026-11-27T12:00:00Z","temperature":20}'
    assert schema.validate(ok)[1] == []
    _, errors = schema.validate(ok.replace(b"t-1", b"T_1"))
    assert [e.path for e in errors] == ["/device_id"]


def test_proto_syntax_error(demo_set):
    d = demo_set()
    edit(d / "device_status.proto", "uint32 battery_mv = 3;", "uint32 battery_mv = ;")
    [problem] = broken(d)
    assert "device_status.proto" in problem and f":{line_of(d / 'device_status.proto', 'battery_mv')}" in problem


def test_cel_syntax_error(demo_set):
    d = demo_set()
    edit(d / "manifest.yaml", "expr: payload.device_id == topic[1]\n    - name: max_size", "expr: payload.device_id == == topic[1]\n    - name: max_size")
    [problem] = broken(d)
    assert f"manifest.yaml:{line_of(d / 'manifest.yaml', '== ==')}" in problem and "device_matches_topic" in problem


def test_every_problem_reported_at_once(demo_set):
    d = demo_set()
    edit(d / "manifest.yaml", "format: jsonschema", "format: xml")
    edit(d / "manifest.yaml", "unmapped: accept", "unmapped: maybe")
    edit(d / "manifest.yaml", "  - sensor/+/temperature\n", "  - sensor/+/temperature\n  - bad/#/filter\n")
    problems = broken(d)
    assert len(problems) >= 3
    assert any("format must be one of jsonschema, protobuf, avro, sparkplug_b" in p for p in problems)
    assert any("policy.unmapped" in p for p in problems)
    assert any("bad/#/filter" in p for p in problems)


def test_unknown_keys_and_dangling_references(demo_set):
    d = demo_set()
    edit(d / "manifest.yaml", "policy:", "polcy: {}\npolicy:")
    edit(d / "manifest.yaml", "device/+/status: device_status:v1", "device/+/status: device_status:v9")
    problems = broken(d)
    assert any("unknown key 'polcy'; did you mean 'policy'?" in p for p in problems)
    assert any("'device_status:v9' is not in schema_files" in p for p in problems)


def test_schema_file_outside_the_set(demo_set, tmp_path):
    d = demo_set()
    (tmp_path / "elsewhere.json").write_text("{}")
    edit(d / "manifest.yaml", "file: temperature.json", "file: ../elsewhere.json")
    assert any("outside the schema set" in p for p in broken(d))


def test_mapping_not_covered_by_topic_patterns(demo_set):
    d = demo_set()
    edit(d / "manifest.yaml", "  - device/+/status\n", "")
    assert any("not covered by topic_patterns" in p for p in broken(d))


@pytest.mark.parametrize(
    ("schema_uri", "exclusive", "value", "valid"),
    [
        # draft-04: exclusiveMaximum is a boolean modifying maximum
        ("http://json-schema.org/draft-04/schema#", {"maximum": 10, "exclusiveMaximum": True}, 10, False),
        ("http://json-schema.org/draft-04/schema#", {"maximum": 10, "exclusiveMaximum": True}, 9, True),
        # draft-06 onwards: exclusiveMaximum is a number
        ("http://json-schema.org/draft-06/schema#", {"exclusiveMaximum": 10}, 10, False),
        ("http://json-schema.org/draft-07/schema#", {"exclusiveMaximum": 10}, 9.5, True),
        ("https://json-schema.org/draft/2019-09/schema", {"exclusiveMaximum": 10}, 10, False),
        ("https://json-schema.org/draft/2020-12/schema", {"exclusiveMaximum": 10}, 10, False),
    ],
)
def test_drafts_picked_from_dollar_schema(demo_set, schema_uri, exclusive, value, valid):
    import json

    d = demo_set()
    (d / "temperature.json").write_text(json.dumps({"$schema": schema_uri, "type": "object",
                                                    "properties": {"v": {"type": "number", **exclusive}}}))
    schema = load_schema_set(d).schemas["temperature:v1"]
    assert (schema.validate(json.dumps({"v": value}).encode())[1] == []) is valid


@pytest.mark.parametrize(("fmt", "good", "bad"), [
    ("email", "ops@example.com", "not-an-email"),
    ("uuid", "123e4567-e89b-12d3-a456-426614174000", "1234"),
    ("ipv4", "192.0.2.1", "300.1.1.1"),
    ("date-time", "2026-11-27T12:00:00+01:00", "27/11/2026"),
])
def test_formats_are_checked(demo_set, fmt, good, bad):
    import json

    d = demo_set()
    (d / "temperature.json").write_text(json.dumps({"type": "object", "properties": {"v": {"type": "string", "format": fmt}}}))
    schema = load_schema_set(d).schemas["temperature:v1"]
    assert schema.validate(json.dumps({"v": good}).encode())[1] == []
    [error] = schema.validate(json.dumps({"v": bad}).encode())[1]
    assert error.path == "/v"


def test_catastrophic_regex_is_rejected_not_hung(demo_set):
    # A look-ahead forces the backtracking engine; its step limit (REGEX_BACKTRACK_LIMIT) bounds the
    # work, and pytest-timeout would catch a hang.
    import json

    d = demo_set()
    (d / "temperature.json").write_text(json.dumps({"type": "object", "properties": {"v": {"type": "string", "pattern": "^(a+)+(?!x)$"}}}))
    schema = load_schema_set(d).schemas["temperature:v1"]
    _, errors = schema.validate(json.dumps({"v": "a" * 40 + "b"}).encode())
    assert [e.path for e in errors] == ["/v"]


@pytest.mark.parametrize(("patterns", "mapping"), [
    ("sensor/#", "#"),
    ("sensor/t1", "sensor/+"),
    ("sensor/+/temp", "+/+/temp"),
    ("a/+/c", "a/b/#"),
])
def test_mappings_that_overlap_the_patterns_are_accepted(demo_set, patterns, mapping):
    d = demo_set()
    manifest = d / "manifest.yaml"
    text = manifest.read_text()
    text = text.replace("  - events/#\n", f"  - events/#\n  - {patterns}\n")
    text = text.replace("  device/+/status: device_status:v1\n", f"  device/+/status: device_status:v1\n  '{mapping}': device_status:v1\n")
    manifest.write_text(text)
    assert load_schema_set(d).mappings is not None


def test_backtracking_patterns_bound_the_strings_per_message(demo_set):
    import json

    from appliance.governance.jsonschemas import MAX_STRINGS_WITH_BACKTRACKING

    d = demo_set()
    (d / "temperature.json").write_text(json.dumps({
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "^(a|aa)+(?=b)c?"}}}}))
    schema = load_schema_set(d).schemas["temperature:v1"]
    assert schema.max_strings == MAX_STRINGS_WITH_BACKTRACKING
    assert schema.validate(json.dumps({"tags": ["aab"] * 10}).encode())[1] == []
    _, [error] = schema.validate(json.dumps({"tags": ["aab"] * (MAX_STRINGS_WITH_BACKTRACKING + 1)}).encode())
    assert "backtracking" in error.message and error.path == ""
    plain = load_schema_set(demo_set("v2")).schemas["temperature:v2"]
    assert plain.max_strings is None  # linear-time patterns only: no cap


def test_a_manifest_may_name_a_precompiled_descriptor_set(demo_set):
    import subprocess

    from appliance.governance.protobuf import protoc_command

    d = demo_set()
    subprocess.run([*protoc_command(), "-I.", "--include_imports", "--descriptor_set_out=device_status.binpb",
                    "device_status.proto"], cwd=d, check=True, timeout=60)
    (d / "device_status.proto").unlink()
    edit(d / "manifest.yaml", "file: device_status.proto", "file: device_status.binpb")
    schema_set = load_schema_set(d)
    schema = schema_set.schemas["device_status:v1"]
    assert schema.message_type == "demo.DeviceStatus"
    decoded, errors = schema.validate(b"\x0a\x02d1")  # device_id = "d1"
    assert errors == [] and decoded is not None and decoded["device_id"] == "d1"
