"""replay on Avro and Sparkplug B recordings: verdicts by the example sets, Sparkplug in recorded order."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from pathlib import Path

from appliance.governance.sparkplug import payload_class
from appliance.simulate_formats import meter_reading
from replay import engine
from tests.replay.recordings import START, write_ndjson

REPO = Path(__file__).resolve().parents[2]
AVRO_V1, AVRO_V2 = REPO / "fixtures" / "avro" / "v1", REPO / "fixtures" / "avro" / "v2"
SPARKPLUG_V1, SPARKPLUG_V2 = REPO / "fixtures" / "sparkplug" / "v1", REPO / "fixtures" / "sparkplug" / "v2"


def _json(result) -> dict:
    assert result.exit_code in (0, 1), result.output + result.stderr
    return json.loads(result.stdout)


def sparkplug_messages(nodes: int, per_node: int):
    """Every node born (NBIRTH, DBIRTH), then DDATA by alias, nodes interleaved; temperatures from -10."""
    payload = payload_class()
    at = START
    for node in range(nodes):
        birth = payload(timestamp=1, seq=0)
        birth.metrics.add(name="bdSeq", datatype=8, long_value=0)
        yield at, f"spBv1.0/plant1/NBIRTH/edge{node}", birth.SerializeToString(), f"edge{node}", "accept", "spBv1.0/#"
        device = payload(timestamp=1, seq=1)
        device.metrics.add(name="temperature", alias=10, datatype=9, float_value=20.0)
        yield at, f"spBv1.0/plant1/DBIRTH/edge{node}/dev1", device.SerializeToString(), f"edge{node}", "accept", "spBv1.0/#"
    for index in range(per_node):
        for node in range(nodes):
            at += 0.001
            data = payload(timestamp=2, seq=(index + 2) % 256)
            data.metrics.add(alias=10, float_value=float(index % 50 - 10))
            yield at, f"spBv1.0/plant1/DDATA/edge{node}/dev1", data.SerializeToString(), f"edge{node}", "accept", "spBv1.0/#"


def test_sparkplug_replay_keeps_recorded_order_in_one_judge(tmp_path, run):
    capture = tmp_path / "plant.ndjson"
    per_node = engine.BATCH_SIZE // 4 + 10  # several batches: a pool would split the nodes' sequences
    write_ndjson(capture, sparkplug_messages(5, per_node))
    report = _json(run("--from", capture, "--against", SPARKPLUG_V1, "--format", "json", "--jobs", "2"))
    assert report["stats"]["workers"] == 1
    assert report["totals"]["rejected"] == 0 and report["totals"]["replayed"] == 5 * (per_node + 2)

    narrower = _json(run("--from", capture, "--against", SPARKPLUG_V2, "--format", "json", "--jobs", "2"))
    # v2 narrows temperature to 0..100: the -10..-1 readings (10 of every 50) are newly rejected, nothing else.
    expected = 5 * sum(1 for index in range(per_node) if index % 50 < 10)
    assert narrower["totals"]["newly_rejected"] == expected
    [group] = narrower["groups"]
    assert all("below the declared minimum" in reason["message"] for reason in group["reasons"])


def test_avro_replay_follows_the_encoding(tmp_path, run):
    record = {"meter_id": "m1", "ts": dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC), "energy_kwh": decimal.Decimal("5.5"),
              "power_w": None, "phase": "L3", "site": {"building": "B", "floor": 0}}
    body = meter_reading(record)
    messages = [(START + i, topic, payload, "m1", "accept", None) for i, (topic, payload) in enumerate(
        [("meter/m1/reading", body)] * 3 + [("meter/m1/reading/registry", b"\x00\x00\x00\x00\x01" + body)] * 2)]
    capture = tmp_path / "meters.ndjson"
    write_ndjson(capture, messages)
    same = _json(run("--from", capture, "--against", AVRO_V1, "--format", "json"))
    assert same["totals"]["rejected"] == 0
    report = _json(run("--from", capture, "--against", AVRO_V2, "--format", "json"))
    groups = {g["topic_filter"]: g for g in report["groups"]}
    # Headerless binary is decoded with v2's schema: v1 records no longer decode. The registry
    # framing names schema id 1, which v2 maps to its v1 file and resolves into v2.
    assert groups["meter/+/reading"]["newly_rejected"] == 3
    assert groups["meter/+/reading/registry"]["still_accepted"] == 2
