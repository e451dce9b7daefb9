"""format: avro — loading .avsc files (references, errors), the three encodings, hostile payloads."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import shutil
from pathlib import Path

import fastavro
import pytest

from appliance.governance import Governance, SchemaSetError, load_schema_set
from appliance.governance.avro import AvroSchema, crc64_avro, fingerprint
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message
from appliance.simulate_formats import METER_READING, meter_reading

REPO = Path(__file__).resolve().parents[2]
CLIENT = ClientInfo("m1", None, "192.0.2.1:1", ProtocolVersion.MQTT_5)
RECORD = {"meter_id": "m1", "ts": dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC), "energy_kwh": decimal.Decimal("12.345"),
          "power_w": 230.5, "phase": "L2", "site": {"building": "A", "floor": 2}}


@pytest.fixture
def avro_set(tmp_path):
    def copy(version: str = "v1") -> Path:
        target = tmp_path / version
        shutil.copytree(REPO / "fixtures" / "avro" / version, target)
        return target

    return copy


def write(schema, record) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def test_example_set_loads_and_decodes_for_rules():
    schema = load_schema_set(REPO / "fixtures" / "avro" / "v1").schemas["meter_reading:v1"]
    decoded, errors = schema.validate(meter_reading(RECORD))
    assert errors == []
    # Logical types arrive in a form CEL takes; the referenced record from site.avsc is decoded too.
    assert decoded == {"meter_id": "m1", "ts": "2026-11-27T12:00:00Z", "energy_kwh": 12.345, "power_w": 230.5,
                       "phase": "L2", "site": {"building": "A", "floor": 2}}


def test_simulator_schema_is_the_example_schema():
    schema = load_schema_set(REPO / "fixtures" / "avro" / "v1").schemas["meter_reading:v1"]
    assert fingerprint(schema.parsed) == fingerprint(fastavro.parse_schema(METER_READING))


@pytest.mark.parametrize("payload, reason", [
    (b"", "ends early"),
    (meter_reading(RECORD)[:-1], "ends early"),
    (meter_reading(RECORD) + b"\x00", "1 byte left over"),
    (b"\x04\xff\xfe" + meter_reading(RECORD)[3:], "not valid UTF-8"),
    (b"\x03" + meter_reading(RECORD)[1:], "negative length"),
    (b"\xfe\xff\xff\xff\x0f" + meter_reading(RECORD)[1:], "a length of 2147483647 bytes"),
])
def test_bad_payloads_get_a_reason(payload, reason):
    schema = load_schema_set(REPO / "fixtures" / "avro" / "v1").schemas["meter_reading:v1"]
    decoded, errors = schema.validate(payload)
    assert decoded is None and len(errors) == 1
    assert reason in errors[0].message and "cannot decode as demo.meter.MeterReading" in errors[0].message


def test_every_byte_prefix_is_rejected_never_raises():
    schema = load_schema_set(REPO / "fixtures" / "avro" / "v1").schemas["meter_reading:v1"]
    good = meter_reading(RECORD)
    for end in range(len(good)):
        decoded, errors = schema.validate(good[:end])
        assert decoded is None and errors, end


def test_confluent_wire_format_resolves_older_writers():
    v2 = load_schema_set(REPO / "fixtures" / "avro" / "v2").schemas["meter_reading_registry:v2"]
    old = meter_reading(RECORD)
    decoded, errors = v2.validate(b"\x00\x00\x00\x00\x01" + old)  # id 1: meter_reading_v1.avsc
    assert errors == [] and decoded["voltage_v"] is None  # the reader's default
    assert "schema id 9 is not mapped" in v2.validate(b"\x00\x00\x00\x00\x09" + old)[1][0].message
    assert "magic byte 0" in v2.validate(b"\x01\x00\x00\x00\x01" + old)[1][0].message
    assert "too short" in v2.validate(b"\x00\x00")[1][0].message


def test_single_object_encoding():
    v2 = load_schema_set(REPO / "fixtures" / "avro" / "v2").schemas["meter_reading_single:v2"]
    v1 = load_schema_set(REPO / "fixtures" / "avro" / "v1").schemas["meter_reading_single:v1"]
    framed_v1 = b"\xc3\x01" + fingerprint(v1.parsed) + meter_reading(RECORD)
    assert v1.validate(framed_v1)[1] == []
    assert v2.validate(framed_v1)[1] == []  # listed in `writers`: resolved into v2
    framed_v2 = b"\xc3\x01" + fingerprint(v2.parsed) + write(v2.parsed, {**RECORD, "voltage_v": 231.0})
    assert v2.validate(framed_v2)[0]["voltage_v"] == 231.0
    assert "matches no schema" in v1.validate(framed_v2)[1][0].message
    assert "single-object marker" in v1.validate(meter_reading(RECORD))[1][0].message


def test_crc64_avro_matches_fastavro():
    schema = fastavro.parse_schema(METER_READING)
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    # fastavro spells the fingerprint as its little-endian bytes, the order single-object encoding uses.
    assert crc64_avro(canonical.encode()).to_bytes(8, "little").hex() == fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")


def test_rules_see_the_record(avro_set):
    governance = Governance(load_schema_set(avro_set()))
    ok = governance.check(Message("meter/m1/reading", meter_reading(RECORD), 1, False, CLIENT))
    wrong_meter = governance.check(Message("meter/m2/reading", meter_reading(RECORD), 1, False, CLIENT))
    negative = governance.check(Message("meter/m1/reading", meter_reading({**RECORD, "energy_kwh": decimal.Decimal(-1)}), 1, False, CLIENT))
    assert ok.accepted
    assert not wrong_meter.accepted and "meter_matches_topic" in wrong_meter.reasons[0].message
    assert not negative.accepted and "energy_not_negative" in negative.reasons[0].message


def test_schema_problems_are_reported_with_their_file(avro_set):
    d = avro_set()
    (d / "site.avsc").write_text("{not json")
    with pytest.raises(SchemaSetError) as caught:
        load_schema_set(d)
    assert any("site.avsc:1" in p and "not valid JSON" in p for p in caught.value.problems)


def test_unknown_reference_is_reported(avro_set):
    d = avro_set()
    (d / "site.avsc").unlink()
    with pytest.raises(SchemaSetError) as caught:
        load_schema_set(d)
    assert any("meter_reading.avsc" in p and "unknown type 'demo.meter.Site'" in p for p in caught.value.problems)


def test_manifest_keys_are_checked(avro_set):
    d = avro_set()
    manifest = d / "manifest.yaml"
    text = manifest.read_text().replace("    encoding: single_object", "    encoding: zip", 1)
    text = text.replace("    format: avro\n  meter_reading_registry", "    format: avro\n    schema_ids: {1: meter_reading.avsc}\n  meter_reading_registry", 1)
    manifest.write_text(text)
    with pytest.raises(SchemaSetError) as caught:
        load_schema_set(d)
    problems = "\n".join(caught.value.problems)
    assert "encoding must be one of binary, confluent, single_object, got 'zip'" in problems
    assert "schema_ids (Schema Registry id -> .avsc file) is for encoding: confluent" in problems


def test_zero_width_array_items_are_refused(tmp_path):
    parsed = fastavro.parse_schema({"type": "record", "name": "R", "fields": [{"name": "xs", "type": {"type": "array", "items": "null"}}]})
    with pytest.raises(ValueError, match="zero bytes"):
        AvroSchema("r", "r.avsc", parsed)


def test_recursive_schema_deep_payload_is_rejected_not_a_crash():
    parsed = fastavro.parse_schema({"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]})
    schema = AvroSchema("node", "node.avsc", parsed)
    assert schema.validate(b"\x02\x02\x00")[0] == {"next": {"next": {"next": None}}}
    decoded, errors = schema.validate(b"\x02" * 100_000 + b"\x00")
    assert decoded is None and "nested too deeply" in errors[0].message


def test_logical_types_in_unions_arrays_and_maps():
    parsed = fastavro.parse_schema({"type": "record", "name": "L", "fields": [
        {"name": "maybe_ts", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
        {"name": "prices", "type": {"type": "array", "items": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}}},
        {"name": "days", "type": {"type": "map", "values": {"type": "int", "logicalType": "date"}}},
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
    ]})
    schema = AvroSchema("l", "l.avsc", parsed)
    value = {"maybe_ts": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "prices": [decimal.Decimal("1.25")],
             "days": {"a": dt.date(2026, 1, 2)}, "id": "6f1c6c1e-58f5-4a51-9d4c-1f0b8e6f2a10"}
    decoded, errors = schema.validate(write(parsed, value))
    assert errors == []
    assert decoded == {"maybe_ts": "2026-01-02T03:04:05Z", "prices": [1.25], "days": {"a": "2026-01-02"},
                       "id": "6f1c6c1e-58f5-4a51-9d4c-1f0b8e6f2a10"}
    assert schema.validate(write(parsed, {**value, "maybe_ts": None}))[0]["maybe_ts"] is None


def test_negative_union_and_enum_indexes_are_rejected():
    # Python's lists would take index -1 from the end: such bytes must not pass as a valid record.
    parsed = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "v", "type": ["null", "int"]}, {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
        {"name": "xs", "type": {"type": "array", "items": "int"}}]})
    schema = AvroSchema("r", "r.avsc", parsed)
    assert "index out of range (or negative)" in schema.validate(b"\x01\x02\x00\x00")[1][0].message
    assert "index out of range (or negative)" in schema.validate(b"\x00\x01\x00")[1][0].message
    # Encodings that are valid but not what fastavro writes back pass: arrays in several blocks, a
    # block with its byte size (negative count), a padded varint.
    assert schema.validate(b"\x02\x02\x02\x02\x02\x02\x04\x00") == ({"v": 1, "e": "B", "xs": [1, 2]}, [])
    assert schema.validate(b"\x02\x02\x02\x03\x02\x02\x04\x00") == ({"v": 1, "e": "B", "xs": [1, 2]}, [])
    assert schema.validate(b"\x02\x82\x00\x02\x00") == ({"v": 1, "e": "B", "xs": []}, [])


def test_negative_index_from_an_older_writer_is_rejected():
    v2 = load_schema_set(REPO / "fixtures" / "avro" / "v2").schemas["meter_reading_registry:v2"]
    good = meter_reading({**RECORD, "power_w": None})
    at = good.index(b"\x00\x02")  # power_w: branch 0 (null), then phase index 1 (L2)
    bad = good[:at] + b"\x01" + good[at + 1:]  # branch -1: the last one, double, would swallow 8 bytes
    assert schema_errors(v2.validate(b"\x00\x00\x00\x00\x01" + good)) == []
    assert any("negative" in e or "ends early" in e or "left over" in e
               for e in schema_errors(v2.validate(b"\x00\x00\x00\x00\x01" + bad)))


def schema_errors(result) -> list[str]:
    return [e.message for e in result[1]]
