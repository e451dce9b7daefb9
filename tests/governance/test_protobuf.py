"""Protobuf schemas: compiling a set's .proto files, and decoding payloads, hostile ones included.

Payloads are built with the classes compiled from the fixtures (fixtures/proto/), or written byte by
byte where the point is malformed wire format."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from appliance.governance.protobuf import (
    ProtobufSchema,
    ProtoCompileError,
    SchemaError,
    compile_protos,
)

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "fixtures" / "proto"
DEMO = PROTO / "demo"


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            return bytes(out + bytes([byte]))
        out.append(byte | 0x80)


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def pool() -> DescriptorPool:
    return compile_protos(DEMO, ["device_status.proto", "legacy.proto", "tree.proto"])


def message_class(pool: DescriptorPool, name: str) -> Any:
    return GetMessageClass(pool.FindMessageTypeByName(name))


@pytest.fixture(scope="module")
def status(pool: DescriptorPool) -> ProtobufSchema:
    return ProtobufSchema("device_status:v1", pool, "demo.DeviceStatus")


def full_status(pool: DescriptorPool) -> Any:
    status = message_class(pool, "demo.DeviceStatus")(
        device_id="dev-7",
        state=1,
        battery_mv=3300,
        uptime_s=2**63 + 1,
        labels={"site": "north"},
        history=[1, 3],
        blob=b"\x00\xff",
        offset=-5,
        rssi=0,
        samples=[1, 2, 3],
        temperature=-4.25,
        solar_mw=1200,
    )
    status.readings.add(name="t", value=21.1, at_ms=2**62)
    status.channels[3].name = "aux"
    status.position.lat = 47.5
    status.seen_at.FromJsonString("2026-11-27T12:00:00.250Z")
    return status


# --- compiling ----------------------------------------------------------------------------------


def test_imports_within_the_set_and_well_known_types(pool):
    for name in ("demo.DeviceStatus", "demo.Reading", "demo.geo.Position", "google.protobuf.Timestamp", "legacy.Meter"):
        assert pool.FindMessageTypeByName(name).full_name == name


def test_a_file_listed_and_also_imported_loads_once():
    pool = compile_protos(DEMO, ["common.proto", "device_status.proto", "./common.proto"])
    assert pool.FindFileByName("common.proto").name == "common.proto"


def test_syntax_error_names_file_and_line():
    with pytest.raises(ProtoCompileError) as caught:
        compile_protos(PROTO / "broken", ["syntax_error.proto"])
    # protoc reports a missing ";" at the token after it.
    line = line_of(PROTO / "broken" / "syntax_error.proto", "uptime_s")
    assert (caught.value.file, caught.value.line) == ("syntax_error.proto", line)
    assert str(caught.value) == f"syntax_error.proto:{line}:3: Expected \";\"."
    assert caught.value.message == "Expected \";\"."


def test_import_outside_the_set_is_refused():
    with pytest.raises(ProtoCompileError) as caught:
        compile_protos(PROTO / "escape", ["outside_import.proto"])
    error = caught.value
    assert (error.file, error.line) == ("outside_import.proto", line_of(PROTO / "escape" / "outside_import.proto", "import"))
    assert 'Import "../demo/common.proto" was not found' in str(error)


@pytest.mark.parametrize("file", ["../demo/common.proto", str(DEMO / "common.proto")])
def test_a_file_outside_the_set_is_refused(file):
    with pytest.raises(ProtoCompileError, match="outside the schema set"):
        compile_protos(PROTO / "escape", [file])


def test_a_missing_file_is_named():
    with pytest.raises(ProtoCompileError, match="nope.proto: not found") as caught:
        compile_protos(DEMO, ["nope.proto"])
    assert caught.value.file == "nope.proto"


def test_an_import_symlinked_outside_the_set_is_refused(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "secret.proto").write_text('syntax = "proto3";\nmessage Secret { string s = 1; }\n')
    (tmp_path / "set" / "link.proto").symlink_to(tmp_path / "secret.proto")
    (tmp_path / "set" / "main.proto").write_text('syntax = "proto3";\nimport "link.proto";\nmessage M { Secret s = 1; }\n')
    with pytest.raises(ProtoCompileError, match="links outside the schema set") as caught:
        compile_protos(tmp_path / "set", ["main.proto"])
    assert caught.value.file == "link.proto"


def test_an_import_of_a_missing_file_names_the_importing_line(tmp_path):
    (tmp_path / "main.proto").write_text('syntax = "proto3";\n\nimport "gone.proto";\n')
    with pytest.raises(ProtoCompileError) as caught:
        compile_protos(tmp_path, ["main.proto"])
    assert (caught.value.file, caught.value.line) == ("main.proto", 3)
    assert "gone.proto: File not found." in str(caught.value)


def test_two_sets_define_the_same_message_without_clashing(pool):
    v2 = compile_protos(PROTO / "v2", ["device_status.proto"])
    old = ProtobufSchema("device_status:v1", pool, "demo.DeviceStatus")
    new = ProtobufSchema("device_status:v2", v2, "demo.DeviceStatus")
    payload = message_class(v2, "demo.DeviceStatus")(device_id="d", battery_pct=80).SerializeToString()
    assert new.validate(payload) == ({"device_id": "d", "battery_pct": 80}, [])
    # Field 3 is battery_mv in v1: the same bytes mean something else there.
    decoded, errors = old.validate(payload)
    assert errors == [] and decoded is not None and decoded["battery_mv"] == 80


def test_unknown_message_type_is_a_value_error(pool):
    with pytest.raises(ValueError, match="'demo.Nope' is not defined"):
        ProtobufSchema("x:v1", pool, "demo.Nope")


# --- decoding -----------------------------------------------------------------------------------


def test_decodes_every_kind_of_field(pool, status):
    decoded, errors = status.validate(full_status(pool).SerializeToString())
    assert errors == []
    assert decoded == {
        "device_id": "dev-7",
        "state": "STATE_OK",
        "battery_mv": 3300,
        "uptime_s": 2**63 + 1,
        "readings": [{"name": "t", "value": 21.1, "at_ms": 2**62}],
        "labels": {"site": "north"},
        "channels": {3: {"name": "aux", "value": 0.0, "at_ms": 0}},
        "history": ["STATE_OK", "STATE_FAULT"],
        "blob": b"\x00\xff",
        "offset": -5,
        "rssi": 0,
        "position": {"lat": 47.5, "lon": 0.0},
        "seen_at": "2026-11-27T12:00:00.250Z",
        "solar_mw": 1200,
        "samples": [1, 2, 3],
        "temperature": -4.25,
    }


def test_an_empty_payload_has_the_defaults_of_fields_without_presence(status):
    decoded, errors = status.validate(b"")
    assert errors == []
    # No rssi (proto3 optional), position, seen_at or power (oneof): has() tells they are absent.
    assert decoded == {
        "device_id": "",
        "state": "STATE_UNKNOWN",
        "battery_mv": 0,
        "uptime_s": 0,
        "readings": [],
        "labels": {},
        "channels": {},
        "history": [],
        "blob": b"",
        "offset": 0,
        "samples": [],
        "temperature": 0.0,
    }


def test_an_open_enum_value_the_schema_does_not_know_stays_a_number(pool, status):
    payload = message_class(pool, "demo.DeviceStatus")(state=9, history=[2, 42]).SerializeToString()
    decoded, errors = status.validate(payload)
    assert errors == [] and decoded is not None
    assert (decoded["state"], decoded["history"]) == (9, ["STATE_DEGRADED", 42])


def test_the_demo_schema_set(demo_set):
    pool = compile_protos(demo_set("v1"), ["device_status.proto"])
    schema = ProtobufSchema("device_status:v1", pool, "demo.DeviceStatus")
    payload = message_class(pool, "demo.DeviceStatus")(device_id="d1", state=1, battery_mv=3300, uptime_s=86400)
    assert schema.validate(payload.SerializeToString()) == (
        {"device_id": "d1", "state": "STATE_OK", "battery_mv": 3300, "uptime_s": 86400},
        [],
    )


def test_decoded_payloads_suit_cel_rules(pool, status):
    from appliance.governance.rules import compile_rule, make_activation

    decoded, _ = status.validate(full_status(pool).SerializeToString())
    rule = compile_rule(
        "healthy",
        "payload.state == 'STATE_OK' && payload.battery_mv > 3000 && payload.uptime_s > 1u"
        " && payload.readings[0].value == 21.1 && !has(payload.mains_v) && payload.labels.site == 'north'",
    )
    assert rule.evaluate(make_activation(decoded, "device/dev-7/status", "c", None, "peer")) is None


# --- malformed payloads -------------------------------------------------------------------------


def test_truncated_varint(status):
    decoded, errors = status.validate(b"\x18\xff\xff")  # battery_mv, then a varint that never ends
    assert decoded is None
    assert [e.path for e in errors] == [""]
    assert errors[0].message.startswith("cannot decode as demo.DeviceStatus: ")


def test_every_truncation_and_trailing_garbage_is_an_error_not_an_exception(pool, status):
    payload = full_status(pool).SerializeToString()
    for end in range(len(payload)):
        decoded, errors = status.validate(payload[:end])
        assert (decoded is None) == bool(errors)
    decoded, errors = status.validate(payload + b"\xff")
    assert decoded is None and errors[0].message.startswith("cannot decode as demo.DeviceStatus")


@pytest.mark.parametrize("seed", range(20))
def test_random_garbage(status, seed):
    garbage = random.Random(seed).randbytes(64)
    decoded, errors = status.validate(garbage)
    assert (decoded is None) == bool(errors)
    assert all(isinstance(e, SchemaError) for e in errors)


@given(payload=st.binary(max_size=300))
def test_any_bytes_give_a_verdict(status, payload):
    decoded, errors = status.validate(payload)
    assert (decoded is None) == bool(errors)


# --- unknown fields -----------------------------------------------------------------------------


def unknown_varint(number: int, value: int = 1) -> bytes:
    return varint(number << 3) + varint(value)


def test_unknown_fields_are_rejected_with_their_numbers(pool, status):
    payload = full_status(pool).SerializeToString() + unknown_varint(99) + unknown_varint(120, 5)
    assert status.validate(payload) == (None, [SchemaError("", "unknown fields 99, 120 (not in demo.DeviceStatus)")])


def test_unknown_fields_in_nested_messages_have_a_path(pool, status):
    inner = message_class(pool, "demo.Reading")(name="x").SerializeToString() + unknown_varint(50)
    readings = b"".join(varint(5 << 3 | 2) + varint(len(r)) + r for r in (b"", inner))  # field 5: readings
    entry = b"\x08\x03\x12" + varint(len(inner)) + inner  # key 3, value: the Reading
    channels = varint(7 << 3 | 2) + varint(len(entry)) + entry  # field 7: channels
    decoded, errors = status.validate(readings + channels)
    assert decoded is None
    assert errors == [
        SchemaError("/readings/1", "unknown field 50 (not in demo.Reading)"),
        SchemaError("/channels/3", "unknown field 50 (not in demo.Reading)"),
    ]


def test_unknown_fields_allowed(pool):
    schema = ProtobufSchema("device_status:v1", pool, "demo.DeviceStatus", allow_unknown_fields=True)
    payload = message_class(pool, "demo.DeviceStatus")(device_id="d").SerializeToString() + unknown_varint(99)
    decoded, errors = schema.validate(payload)
    assert errors == [] and decoded is not None and decoded["device_id"] == "d"


# --- proto2 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meter(pool: DescriptorPool) -> ProtobufSchema:
    return ProtobufSchema("meter:v1", pool, "legacy.Meter")


def test_proto2_valid(pool, meter):
    Meter = message_class(pool, "legacy.Meter")
    message = Meter(serial="M-1", kind=2)
    message.history.add(number=4)
    message.Extensions[pool.FindExtensionByName("legacy.note")] = "sealed twice"
    # Unset optional fields are absent (not their [default = 7]), as in JSON.
    assert meter.validate(message.SerializeToString()) == (
        {"serial": "M-1", "kind": "GAS", "history": [{"number": 4}], "[legacy.note]": "sealed twice"},
        [],
    )


def test_proto2_missing_required_fields_are_named(pool, meter):
    Meter = message_class(pool, "legacy.Meter")
    message = Meter(kind=1)
    message.seal.by = "inspector"
    message.history.add(number=1)
    message.history.add()
    # upb serializes and parses a message with missing required fields without complaint.
    decoded, errors = meter.validate(message.SerializePartialToString())
    assert decoded is None
    assert errors == [
        SchemaError("/serial", "required field 'serial' is missing"),
        SchemaError("/seal/number", "required field 'seal.number' is missing"),
        SchemaError("/history/1/number", "required field 'history[1].number' is missing"),
    ]


def test_proto2_enum_value_not_in_the_closed_enum(meter):
    payload = b"\x0a\x01M" + b"\x10\x63"  # serial "M", kind 99
    assert meter.validate(payload) == (None, [SchemaError("", "enum value not defined for 'kind'")])


def test_proto2_string_that_is_not_utf8(meter):
    # proto3 refuses it while decoding; in proto2 upb decodes it and hands over bytes.
    payload = b"\x0a\x02\xff\xfe"  # serial: two bytes that are not UTF-8
    assert meter.validate(payload) == (None, [SchemaError("", "string field legacy.Meter.serial is not valid UTF-8")])


def test_proto3_string_that_is_not_utf8(status):
    decoded, errors = status.validate(b"\x0a\x02\xff\xfe")
    assert decoded is None and errors[0].message.startswith("cannot decode as demo.DeviceStatus: ")


# --- hostile payloads ---------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    """demo.Node with `levels` children, each inside the one before."""
    sizes = [0]
    for _ in range(levels):
        sizes.append(sizes[-1] + 1 + len(varint(sizes[-1])))
    return b"".join(b"\x0a" + varint(sizes[level]) for level in range(levels - 1, -1, -1))


@pytest.fixture(scope="module")
def node(pool: DescriptorPool) -> ProtobufSchema:
    return ProtobufSchema("node:v1", pool, "demo.Node")


def test_moderate_nesting_decodes(node):
    decoded, errors = node.validate(nested(50))
    depth = 0
    while decoded and "child" in decoded:
        decoded, depth = decoded["child"], depth + 1
    assert (errors, depth) == ([], 50)


def test_a_nesting_bomb_is_an_error(node):
    assert node.validate(nested(100_000)) == (
        None,
        [SchemaError("", "cannot decode as demo.Node: messages nested too deeply (more than 100 levels)")],
    )


@pytest.mark.parametrize("length", [2**31, 2**63 - 1, 2**64 - 1])
def test_a_giant_length_prefix_is_an_error(node, length):
    decoded, errors = node.validate(b"\x1a" + varint(length) + b"tiny")  # field 3: data
    assert decoded is None and errors[0].message.startswith("cannot decode as demo.Node: ")


# --- protoc in a subprocess, and precompiled descriptor sets -------------------------------------


def _descriptor_set(directory: Path, files: list[str], out: Path, *, include_imports: bool = True) -> Path:
    """A .binpb made the way docs/schemas.md says, with the same protoc the appliance runs."""
    from appliance.governance.protobuf import protoc_command

    flags = ["--include_imports"] if include_imports else []
    subprocess.run([*protoc_command(), "-I.", *flags, f"--descriptor_set_out={out}", *files], cwd=directory, check=True,
                   capture_output=True, timeout=60)
    return out


def test_a_precompiled_descriptor_set_loads_without_protoc(tmp_path, monkeypatch):
    binpb = _descriptor_set(DEMO, ["device_status.proto"], tmp_path / "status.binpb")
    # No protoc anywhere: a set of .binpb files must not need one.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("appliance.governance.protobuf.protoc_command", _no_protoc)
    pool = compile_protos(tmp_path, [binpb.name])
    schema = ProtobufSchema("device_status:v1", pool, "demo.DeviceStatus")
    payload = message_class(pool, "demo.DeviceStatus")(device_id="d", battery_mv=3000).SerializeToString()
    decoded, errors = schema.validate(payload)
    assert errors == [] and decoded is not None and decoded["device_id"] == "d"
    assert pool.FindMessageTypeByName("google.protobuf.Timestamp").full_name == "google.protobuf.Timestamp"


def _no_protoc() -> list[str]:
    raise AssertionError("protoc was run for a precompiled descriptor set")


def test_sources_and_descriptor_sets_mix_in_one_set(tmp_path):
    (tmp_path / "set").mkdir()
    _descriptor_set(DEMO, ["tree.proto"], tmp_path / "set" / "tree.binpb")
    (tmp_path / "set" / "own.proto").write_text('syntax = "proto3";\npackage own;\nmessage Ping { int32 n = 1; }\n')
    pool = compile_protos(tmp_path / "set", ["own.proto", "tree.binpb"])
    assert pool.FindMessageTypeByName("own.Ping").full_name == "own.Ping"
    assert pool.FindFileByName("tree.proto").name == "tree.proto"


def test_a_descriptor_set_without_its_imports_is_explained(tmp_path):
    _descriptor_set(DEMO, ["device_status.proto"], tmp_path / "bare.binpb", include_imports=False)
    with pytest.raises(ProtoCompileError, match="--include_imports") as caught:
        compile_protos(tmp_path, ["bare.binpb"])
    assert caught.value.file == "bare.binpb"


def test_a_file_that_is_not_a_descriptor_set_is_explained(tmp_path):
    (tmp_path / "junk.binpb").write_bytes(b"\xff\xff\xff not a descriptor set")
    with pytest.raises(ProtoCompileError, match="not a descriptor set") as caught:
        compile_protos(tmp_path, ["junk.binpb"])
    assert caught.value.file == "junk.binpb"


def test_without_any_protoc_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProtoCompileError, match="install grpcio-tools or Debian's protobuf-compiler"):
        compile_protos(DEMO, ["device_status.proto"])


@pytest.mark.skipif(shutil.which("protoc") is None, reason="no protoc on PATH (Debian: apt install protobuf-compiler)")
def test_a_protoc_on_path_is_used_without_grpcio_tools(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    pool = compile_protos(DEMO, ["device_status.proto"])
    assert pool.FindMessageTypeByName("demo.DeviceStatus").full_name == "demo.DeviceStatus"


def test_a_file_name_that_looks_like_an_option_is_refused(tmp_path):
    (tmp_path / "--plugin=x.proto").write_text('syntax = "proto3";\n')
    with pytest.raises(ProtoCompileError, match="must not start with '-'"):
        compile_protos(tmp_path, ["--plugin=x.proto"])


def test_compiling_leaves_no_protoc_in_the_process():
    code = ("import sys; from appliance.governance.protobuf import compile_protos; from pathlib import Path; "
            f"compile_protos(Path({str(DEMO)!r}), ['device_status.proto']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc_tools', 'grpc')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
