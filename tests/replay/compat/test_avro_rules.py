"""Avro compatibility in `replay diff`, checked against fastavro's own schema resolution: records
written with one schema are read with the other, and the static verdict must agree."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import pytest
from fastavro.utils import generate_many

from appliance.governance import load_schema_set
from replay.compat import compare_sets
from replay.compat.avro_rules import readable, resolution_problems

REPO = Path(__file__).resolve().parents[3]


def record(*fields, name="Reading", **extra):
    return {"type": "record", "name": name, "namespace": "demo", "fields": list(fields), **extra}


def field(name, type_, **extra):
    return {"name": name, "type": type_, **extra}


BASE = record(field("id", "string"), field("value", "int"))
ENUM2 = {"type": "enum", "name": "State", "symbols": ["OK", "FAULT"]}
ENUM3 = {"type": "enum", "name": "State", "symbols": ["OK", "FAULT", "UNKNOWN"]}

# (case, old schema, new schema)
PAIRS = [
    ("same", BASE, BASE),
    ("field added with default", BASE, record(field("id", "string"), field("value", "int"), field("unit", "string", default="C"))),
    ("field added without default", BASE, record(field("id", "string"), field("value", "int"), field("unit", "string"))),
    ("int promoted to long", BASE, record(field("id", "string"), field("value", "long"))),
    ("int promoted to double", BASE, record(field("id", "string"), field("value", "double"))),
    ("string to bytes", BASE, record(field("id", "bytes"), field("value", "int"))),
    ("int to string", BASE, record(field("id", "string"), field("value", "string"))),
    ("enum symbol added", record(field("s", ENUM2)), record(field("s", ENUM3))),
    ("enum symbol added, reader default", record(field("s", {**ENUM2, "default": "OK"})), record(field("s", {**ENUM3, "default": "OK"}))),
    ("record renamed", BASE, record(field("id", "string"), field("value", "int"), name="Sample")),
    ("record renamed with alias", BASE, record(field("id", "string"), field("value", "int"), name="Sample", aliases=["Reading"])),
    ("field renamed with alias", BASE, record(field("id", "string"), field("reading", "int", aliases=["value"]))),
    ("union widened", record(field("v", ["null", "int"])), record(field("v", ["null", "int", "string"]))),
    ("value made nullable", record(field("v", "int")), record(field("v", ["null", "int"]))),
    ("fixed resized", record(field("f", {"type": "fixed", "name": "Mac", "size": 6})), record(field("f", {"type": "fixed", "name": "Mac", "size": 8}))),
    ("array items promoted", record(field("xs", {"type": "array", "items": "int"})), record(field("xs", {"type": "array", "items": "long"}))),
    ("map values changed", record(field("m", {"type": "map", "values": "string"})), record(field("m", {"type": "map", "values": "int"}))),
    ("nested field added without default",
     record(field("site", record(field("building", "string"), name="Site"))),
     record(field("site", record(field("building", "string"), field("floor", "int"), name="Site")))),
    ("logical type on the same base type",
     record(field("ts", "long")), record(field("ts", {"type": "long", "logicalType": "timestamp-millis"}))),
]


def fastavro_reads(writer, reader, samples: int = 150) -> bool:
    """Whether every one of `samples` random records written with `writer` reads with `reader`."""
    for item in generate_many(writer, samples):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, writer, item)
        out.seek(0)
        try:
            fastavro.schemaless_reader(out, writer, reader)
        except (fastavro.read.SchemaResolutionError, ValueError, TypeError, KeyError):
            return False
    return True


@pytest.mark.parametrize("case, old, new", PAIRS, ids=[p[0] for p in PAIRS])
def test_static_verdict_agrees_with_fastavro(case, old, new):
    old_parsed, new_parsed = fastavro.parse_schema(old), fastavro.parse_schema(new)
    # BACKWARD: the new schema reads the old one's data; FORWARD: the old one reads the new one's.
    assert readable(old_parsed, new_parsed) == fastavro_reads(old_parsed, new_parsed), resolution_problems(old_parsed, new_parsed)
    assert readable(new_parsed, old_parsed) == fastavro_reads(new_parsed, old_parsed), resolution_problems(new_parsed, old_parsed)


def test_some_pairs_break_each_way():
    # The table above is not all one answer: it has compatible, backward-only, forward-only and broken pairs.
    outcomes = set()
    for _, old, new in PAIRS:
        o, n = fastavro.parse_schema(old), fastavro.parse_schema(new)
        outcomes.add((readable(o, n), readable(n, o)))
    assert outcomes == {(True, True), (True, False), (False, True), (False, False)}


def test_problems_name_the_place():
    old = fastavro.parse_schema(BASE)
    new = fastavro.parse_schema(record(field("id", "string"), field("value", "int"), field("unit", "string")))
    [(kind, path, _, _, _)] = resolution_problems(old, new)
    assert (kind, path) == ("reader field without default", "/unit")


def test_example_sets_v1_to_v2():
    report = compare_sets(load_schema_set(REPO / "fixtures" / "avro" / "v1"), load_schema_set(REPO / "fixtures" / "avro" / "v2"))
    binary = report.result("meter_reading")
    assert binary.verdicts == {"BACKWARD": False, "FORWARD": False, "FULL": False}
    assert [f.kind for f in binary.findings] == ["binary layout changed"]  # voltage_v has a default: resolution alone is fine
    registry = report.result("meter_reading_registry")
    assert registry.verdicts == {"BACKWARD": True, "FORWARD": False, "FULL": False} and registry.compatible
    assert "schema id 2" in registry.findings[0].detail
    single = report.result("meter_reading_single")
    assert single.verdicts == {"BACKWARD": True, "FORWARD": False, "FULL": False}
    back = compare_sets(load_schema_set(REPO / "fixtures" / "avro" / "v2"), load_schema_set(REPO / "fixtures" / "avro" / "v1"))
    # Going back to v1 drops schema id 2: producers already on v2 would be rejected.
    assert not back.result("meter_reading_registry").verdicts["BACKWARD"]


def confluent_set(root: Path, version: str, files: dict[str, dict]) -> Path:
    """A set with one `encoding: confluent` entry reading `a.avsc`, schema id 1 -> the first file."""
    folder = root / version
    folder.mkdir()
    for name, schema in files.items():
        (folder / name).write_text(json.dumps(schema))
    first = next(iter(files))
    (folder / "manifest.yaml").write_text(
        f"version: {version}\ntopic_patterns: [r/+]\nschema_mappings:\n  r/+: reading:{version}\n"
        f"schema_files:\n  reading:{version}:\n    file: {first}\n    format: avro\n    encoding: confluent\n"
        f"    schema_ids:\n      1: {first}\npolicy:\n  unmapped: reject\n")
    return folder


def test_schema_id_remapped_to_another_writer_breaks(tmp_path):
    # Id 1 means {a: int} in v1 and {a: string, b} in v2: a v1 producer's payload framed with id 1 is
    # decoded with v2's writer schema, however the readers resolve.
    old = confluent_set(tmp_path, "v1", {"a.avsc": record(field("a", "int"), name="R")})
    new = confluent_set(tmp_path, "v2", {"b.avsc": record(field("a", "string"), field("b", "string", default=""), name="R")})
    result = compare_sets(load_schema_set(old), load_schema_set(new)).result("reading")
    assert result.verdicts == {"BACKWARD": False, "FORWARD": False, "FULL": False}
    remaps = [f for f in result.findings if f.kind == "schema id remapped"]
    assert {d.value for f in remaps for d in f.breaks} == {"BACKWARD", "FORWARD"}
    assert "schema id 1" in remaps[0].detail and "b.avsc" in remaps[0].detail


def test_schema_id_mapped_to_the_same_schema_in_another_file_is_fine(tmp_path):
    schema = record(field("a", "int"), name="R")
    old = confluent_set(tmp_path, "v1", {"a.avsc": schema})
    new = confluent_set(tmp_path, "v2", {"copy.avsc": {**schema, "doc": "same canonical form"}})
    result = compare_sets(load_schema_set(old), load_schema_set(new)).result("reading")
    assert result.compatible and not [f for f in result.findings if f.kind == "schema id remapped"]
