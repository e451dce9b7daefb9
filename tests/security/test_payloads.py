"""Hostile payloads against the schema checks: each gets a verdict (no exception, no stall)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.governance import Governance, load_schema_set
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message

REPO = Path(__file__).resolve().parents[2]
CLIENT = ClientInfo("dev", None, "192.0.2.1:1", ProtocolVersion.MQTT_5)

EVIL = {
    "type": "object",
    "properties": {
        # A backreference makes fancy-regex backtrack (plain patterns such as ^(a+)+$ run on the
        # linear-time regex engine and are harmless).
        "id": {"type": "string", "pattern": "^(a|aa)+\\1$"},
        "n": {"type": "number", "maximum": 100},
        "deep": {"type": "array"},
    },
}


@pytest.fixture(scope="module")
def governance(tmp_path_factory):
    target = tmp_path_factory.mktemp("set") / "v1"
    shutil.copytree(REPO / "schemas" / "v1", target)
    (target / "evil.json").write_text(json.dumps(EVIL))
    manifest = (target / "manifest.yaml").read_text()
    manifest = manifest.replace("  - events/#\n", "  - events/#\n  - evil/#\n")
    manifest = manifest.replace("schema_mappings:\n", "schema_mappings:\n  evil/#: evil:v1\n")
    manifest = manifest.replace("schema_files:\n", "schema_files:\n  evil:v1:\n    file: evil.json\n    format: jsonschema\n")
    (target / "manifest.yaml").write_text(manifest)
    return Governance(load_schema_set(target))


def judge(governance, topic: str, payload: bytes):
    verdict = governance.check(Message(topic, payload, 1, False, CLIENT))
    return verdict


def test_catastrophic_regex_is_a_rejection_with_a_reason(governance):
    verdict = judge(governance, "evil/x", json.dumps({"id": "a" * 40 + "!"}).encode())
    assert verdict is not None and not verdict.accepted
    # jsonschema-rs stops at REGEX_BACKTRACK_LIMIT and reports it as the schema error at /id.
    assert "backtracking" in verdict.reason_text
    assert verdict.reasons[0].path == "/id"
    assert judge(governance, "evil/x", b'{"id": "aaaa"}').accepted


@pytest.mark.parametrize("payload", [
    b"[" * 100_000 + b"]" * 100_000,                        # deeper than any parser's recursion
    b'{"deep": ' + b"[" * 200 + b"]" * 200 + b"}",          # deep but parseable
    b'{"n": 1' + b"0" * 5000 + b"}",                        # a huge number
    b'{"n": 1e999999}',
    b'{"n": 1, "n": 1000}',                                 # duplicate keys: the last one counts
    b'{"id": "\xff\xfe"}',                                  # invalid UTF-8
    b'{"id": "\\ud800"}',                                   # a lone surrogate
    b"\x00" * 10_000,
])
def test_malformed_or_hostile_json_is_judged(governance, payload):
    verdict = judge(governance, "evil/x", payload)
    assert verdict is not None
    if payload.startswith(b'{"n": 1, "n"'):
        assert not verdict.accepted and "100" in verdict.reason_text


@pytest.mark.parametrize("payload", [
    b"\x0a\xff\xff\xff\xff\x0f",                             # a length-delimited field claiming 4 GB
    b"\x0a\x02" * 5000,                                      # many fields
    bytes([0x1a, 0x7f]) * 10 + b"\x00" * 10,                 # lengths past the end
    b"\x0b" * 1000 + b"\x0c" * 1000,                         # nested groups (deprecated wire type)
    b"\x08" + b"\xff" * 20,                                  # a varint longer than 10 bytes
])
def test_protobuf_bombs_are_judged(governance, payload):
    verdict = judge(governance, "device/d1/status", payload)
    assert verdict is not None and not verdict.accepted
