"""Sparkplug B declarations in `replay diff`."""

from __future__ import annotations

from pathlib import Path

from appliance.governance import load_schema_set
from appliance.governance.sparkplug import DATATYPES, MetricSpec, SparkplugSchema
from replay.compat import compare_sets
from replay.compat.sparkplug_rules import compare_sparkplug

REPO = Path(__file__).resolve().parents[3]


def schema(node=None, device=None) -> SparkplugSchema:
    return SparkplugSchema("plant", node_metrics=node, device_metrics=device)


def spec(name, datatype="Float", low=None, high=None) -> dict[str, MetricSpec]:
    return {name: MetricSpec(name, DATATYPES[datatype], low, high)}


def kinds(old, new):
    return [(f.kind, sorted(d.value for d in f.breaks)) for f in compare_sparkplug(old, new)]


def test_declaration_changes():
    assert kinds(schema(device=spec("t")), schema(device=spec("t"))) == []
    assert kinds(schema(device=spec("t")), schema(device={})) == [("metric removed", ["BACKWARD"])]
    assert kinds(schema(device={}), schema(device=spec("t"))) == [("metric added", ["FORWARD"])]
    assert kinds(schema(device=spec("t")), schema(device=spec("t", "Double"))) == [("datatype changed", ["BACKWARD", "FORWARD"])]
    assert kinds(schema(device=spec("t", low=0)), schema(device=spec("t", low=-10))) == [("min widened", ["FORWARD"])]
    assert kinds(schema(device=spec("t", high=100)), schema(device=spec("t"))) == [("max widened", ["FORWARD"])]
    assert kinds(schema(device=spec("t")), schema(device=spec("t", high=5))) == [("max narrowed", ["BACKWARD"])]
    assert kinds(schema(), schema(node=spec("u"))) == [("metric declarations added", ["BACKWARD"])]
    assert kinds(schema(node=spec("u")), schema()) == [("metric declarations removed", ["FORWARD"])]


def test_example_sets_v1_to_v2():
    report = compare_sets(load_schema_set(REPO / "fixtures" / "sparkplug" / "v1"), load_schema_set(REPO / "fixtures" / "sparkplug" / "v2"))
    result = report.result("plant")
    assert result.format == "sparkplug_b"
    assert sorted(f.kind for f in result.findings) == ["max narrowed", "metric added", "min narrowed"]
    assert not result.compatible
