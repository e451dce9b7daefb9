"""Protobuf pairs with the verdict expected per mode, under the appliance's strict decoding."""

from __future__ import annotations

import pytest

from replay.compat import compare_sets
from tests.replay.compat.builders import proto_set


def p3(body: str, *, package: str = "demo", message: str = "Reading") -> str:
    return f'syntax = "proto3";\npackage {package};\n\nmessage {message} {{\n{body}\n}}\n'


def p2(body: str) -> str:
    return f'syntax = "proto2";\npackage demo;\n\nmessage Reading {{\n{body}\n}}\n'


BASE = p3("  string id = 1;\n  int32 level = 2;")
STATE = "  enum State {{ STATE_UNKNOWN = 0; STATE_OK = 1; {extra} }}\n  string id = 1;\n  State state = 2;"

# (id, old source, new source, old allows unknown fields?, new allows?, BACKWARD ok?, FORWARD ok?, kind)
CASES = [
    ("identical", BASE, BASE, False, False, True, True, None),
    ("optional field added, strict old set", BASE, p3("  string id = 1;\n  int32 level = 2;\n  optional string fw = 3;"),
     False, False, True, False, "field added"),
    ("optional field added, old set allows unknown fields", BASE, p3("  string id = 1;\n  int32 level = 2;\n  optional string fw = 3;"),
     True, False, True, True, None),
    ("field deleted, strict new set", BASE, p3("  string id = 1;\n  reserved 2;"), False, False, False, True, "field deleted"),
    ("field deleted and reserved, lenient new set", BASE, p3("  string id = 1;\n  reserved 2;\n  reserved \"level\";"),
     False, True, True, True, None),
    ("field deleted unreserved, lenient new set", BASE, p3("  string id = 1;"), False, True, False, True,
     "field deleted without reserving its number"),
    ("int32 to int64 (wire-compatible)", BASE, p3("  string id = 1;\n  int64 level = 2;"), False, False, True, True, None),
    ("int32 to sint32 (zigzag)", BASE, p3("  string id = 1;\n  sint32 level = 2;"), False, False, False, False, "field type changed"),
    ("int32 to string", BASE, p3("  string id = 1;\n  string level = 2;"), False, False, False, False, "field type changed"),
    ("string to bytes", BASE, p3("  bytes id = 1;\n  int32 level = 2;"), False, False, True, False, "field type changed (string/bytes)"),
    ("field renamed", BASE, p3("  string id = 1;\n  int32 height = 2;"), False, False, True, True, None),
    ("number reused with another name and type", BASE, p3("  string id = 1;\n  string note = 2;"),
     False, False, False, False, "field number reused"),
    ("field numbers swapped", p3("  int32 a = 1;\n  int32 b = 2;"), p3("  int32 b = 1;\n  int32 a = 2;"),
     False, False, False, False, "field number reused"),
    ("proto2 required field added", p2("  optional string id = 1;"), p2("  optional string id = 1;\n  required int32 level = 2;"),
     True, True, False, True, "required field added"),
    ("proto2 optional became required", p2("  optional string id = 1;"), p2("  required string id = 1;"),
     False, False, False, True, "field became required"),
    ("proto2 required became optional", p2("  required string id = 1;"), p2("  optional string id = 1;"),
     False, False, True, False, "field no longer required"),
    ("singular became repeated", BASE, p3("  string id = 1;\n  repeated int32 level = 2;"), False, False, True, False,
     "field became repeated"),
    ("repeated became singular", p3("  string id = 1;\n  repeated int32 level = 2;"), BASE, False, False, False, True,
     "field no longer repeated"),
    ("open enum value added", p3(STATE.format(extra="")), p3(STATE.format(extra="STATE_FAULT = 2;")), False, False, True, True, None),
    ("closed enum value added", p2("  enum State { STATE_OK = 1; }\n  optional State state = 1;"),
     p2("  enum State { STATE_OK = 1; STATE_FAULT = 2; }\n  optional State state = 1;"), False, False, True, False, "enum value added"),
    ("open enum value removed unreserved", p3(STATE.format(extra="STATE_FAULT = 2;")), p3(STATE.format(extra="")),
     False, False, False, True, "enum value removed without reserving its number"),
    ("enum value numbers swapped", p3(STATE.format(extra="STATE_FAULT = 2;")),
     p3("  enum State { STATE_UNKNOWN = 0; STATE_FAULT = 1; STATE_OK = 2; }\n  string id = 1;\n  State state = 2;"),
     False, False, False, False, "enum value number reused"),
    ("field moved into a oneof", BASE, p3("  oneof key {\n    string id = 1;\n    int32 level = 2;\n  }"),
     False, False, False, True, "field moved into a oneof"),
    ("package renamed, same structure", BASE, p3("  string id = 1;\n  int32 level = 2;", package="demo2"),
     False, False, True, True, None),
    ("nested message gains a field", p3("  message Geo { double lat = 1; }\n  Geo geo = 1;"),
     p3("  message Geo { double lat = 1; double lon = 2; }\n  Geo geo = 1;"), False, False, True, False, "field added"),
]


@pytest.mark.parametrize(("old", "new", "old_lenient", "new_lenient", "backward", "forward", "kind"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pair(tmp_path, old, new, old_lenient, new_lenient, backward, forward, kind):
    new_message = "demo2.Reading" if "package demo2" in new else "demo.Reading"
    report = compare_sets(
        proto_set(tmp_path, "v1", old, allow_unknown=old_lenient),
        proto_set(tmp_path, "v2", new, allow_unknown=new_lenient, message=new_message),
    )
    result = report.result("reading")
    assert result.format == "protobuf"
    assert result.verdicts == {"BACKWARD": backward, "FORWARD": forward, "FULL": backward and forward}, result.findings
    kinds = [f.kind for f in result.findings if f.breaks]
    if kind is None:
        assert kinds == []
    else:
        assert kind in kinds


def test_notes_explain_what_does_not_break(tmp_path):
    renamed = p3("  string id = 1;\n  int32 level = 2;", package="demo2")
    result = compare_sets(proto_set(tmp_path, "v1", BASE), proto_set(tmp_path, "v2", renamed, message="demo2.Reading")).result("reading")
    assert [(f.kind, f.old, f.new, f.level) for f in result.findings] == [
        ("package renamed", "demo.Reading", "demo2.Reading", "note"),
    ]


def test_nested_paths_name_the_message_and_number(tmp_path):
    old = p3("  message Geo { double lat = 1; }\n  Geo geo = 1;")
    new = p3("  message Geo { double lat = 1; double lon = 2; }\n  Geo geo = 1;")
    [finding] = compare_sets(proto_set(tmp_path, "v1", old), proto_set(tmp_path, "v2", new)).result("reading").findings
    assert finding.path == "demo.Reading.Geo.lon = 2"
    assert "strict decoding" in finding.detail
