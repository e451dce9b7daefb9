"""The small pure parts: reason normalising, topic filters in SQL, --fail-on, inference."""

from __future__ import annotations

import json

import duckdb
import pytest

from appliance.mqtt.topics import TopicTrie, topic_filter_regex
from replay.infer import infer_schema
from replay.report import FailOn
from replay.tally import normalise
from tests.replay.recordings import START, demo_messages, write_ndjson


@pytest.mark.parametrize("a, b", [
    ("150 is greater than the maximum of 125", "130.5 is greater than the maximum of 125"),
    ('"abc" is not of type "number"', '"xyz" is not of type "number"'),
    ("topic 'secret/a' is not allowed by the schema set's topic_patterns",
     "topic 'secret/b' is not allowed by the schema set's topic_patterns"),
    ("rule 'max_size': payload is 2000 bytes, more than 1024", "rule 'max_size': payload is 3000 bytes, more than 1024"),
])
def test_values_are_normalised_so_reasons_group(a, b):
    assert normalise(a, "/x/3") == normalise(b, "/x/7")


def test_property_names_are_kept():
    assert normalise('"unit" is a required property', "")[0] == '"unit" is a required property'
    assert normalise('"unit" is a required property', "")[0] != normalise('"ts" is a required property', "")[0]


TOPICS = ["a", "a/b", "a/b/c", "b/b", "/a", "$SYS/x", "$SYS", "a//c", ""]


@pytest.mark.parametrize("topic_filter", ["#", "a/#", "+/b", "+", "a/+/c", "+/+", "$SYS/#", "a/b", "/+", "+/#"])
def test_sql_topic_filter_agrees_with_the_appliance(topic_filter):
    trie: TopicTrie[None] = TopicTrie()
    trie.insert(topic_filter, None)
    expected = {t for t in TOPICS if t and trie.match(t)}
    rows = duckdb.execute("SELECT t FROM unnest(?) AS u(t) WHERE regexp_full_match(t, ?)",
                          [[t for t in TOPICS if t], topic_filter_regex(topic_filter)]).fetchall()
    assert {r[0] for r in rows} == expected


def test_fail_on():
    assert FailOn.parse("any").failed(1, 1000) and not FailOn.parse("any").failed(0, 1000)
    assert FailOn.parse("rate>0.1%").failed(2, 1000) and not FailOn.parse("rate>0.1%").failed(1, 1000)
    assert FailOn.parse("count>5").failed(6, 10) and not FailOn.parse("count > 5").failed(5, 10)
    for bad in ("rate>0.1", "sometimes", "rate<1%"):
        with pytest.raises(ValueError):
            FailOn.parse(bad)


def test_infer_drafts_types_required_ranges_enums():
    payloads = [
        {"device_id": "t1", "ts": "2026-11-27T12:00:00Z", "temperature": 21.5, "unit": "C", "meta": {"fw": 3}},
        {"device_id": "t2", "ts": "2026-11-27T12:00:01Z", "temperature": -3, "unit": "F", "meta": {"fw": 4, "x": True}},
        {"device_id": "t3", "ts": "2026-11-27T12:00:02Z", "temperature": 30, "unit": "C", "meta": {"fw": 4}, "tags": ["a"]},
    ]
    rows = [("s/t/x", json.dumps(p).encode(), 0, False, "c", None, "", 4, "accept", START, False, None, None) for p in payloads]
    rows.append(("s/t/x", b"\x0a\x01", 0, False, "c", None, "", 4, "accept", START, False, None, None))
    schema = infer_schema(iter([rows]), title="t")
    assert schema["type"] == "object"
    assert schema["required"] == ["device_id", "meta", "temperature", "ts", "unit"]
    props = schema["properties"]
    assert props["temperature"] == {"type": "number", "minimum": -3, "maximum": 30}
    assert props["unit"]["enum"] == ["C", "F"]
    assert props["ts"]["format"] == "date-time"
    assert props["meta"]["required"] == ["fw"] and props["meta"]["properties"]["fw"]["type"] == "integer"
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert "1 non-JSON" in schema["description"]


def test_infer_command(tmp_path, run):
    capture = tmp_path / "capture.ndjson"
    write_ndjson(capture, demo_messages(100))
    result = run("infer", "--topic", "sensor/+/temperature", "--from", capture)
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["required"] == ["device_id", "temperature", "ts"]
    assert schema["properties"]["temperature"]["maximum"] >= 150
    nothing = run("infer", "--topic", "device/+/status", "--from", capture)  # protobuf: not JSON
    assert nothing.exit_code == 2 and "no JSON payloads" in nothing.stderr


def test_diff_command(run):
    from tests.replay.conftest import V1, V2

    assert run("diff", V1, V1).exit_code == 0
    breaking = run("diff", V1, V2)
    assert breaking.exit_code == 1 and "temperature" in breaking.stdout
    missing = run("diff", V1, "/nonexistent")
    assert missing.exit_code == 2 and "not a directory" in missing.stderr
