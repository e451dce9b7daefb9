"""The manifest side of `format: sparkplug_b`: `node_metrics` and `device_metrics` read and checked.

    plant:v1:
      format: sparkplug_b
      node_metrics:
        - {name: "Node Control/Rebirth", datatype: Boolean}
      device_metrics:
        - {name: temperature, datatype: Float, min: -40, max: 125}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.governance.sparkplug import DATATYPES, MetricSpec, SparkplugSchema

METRIC_KEYS = {"name", "datatype", "min", "max"}
Report = Callable[[int, str], None]  # (manifest line, message)


def load_sparkplug(name: str, spec: Any, report: Report) -> SparkplugSchema | None:
    ok = True
    for key in ("file", "message", "allow_unknown_fields", "encoding", "schema_ids", "writers"):
        if key in spec:
            report(spec.line_of(key), f"schema_files.{name}: `{key}` is not for sparkplug_b (its payload definition is built in)")
            ok = False
    declared: dict[str, dict[str, MetricSpec] | None] = {}
    for section in ("node_metrics", "device_metrics"):
        raw = spec.get(section)
        if raw is None:
            declared[section] = None
            continue
        metrics = _metrics(f"schema_files.{name}.{section}", raw, spec.line_of(section), report)
        ok = ok and metrics is not None
        declared[section] = metrics
    if not ok:
        return None
    return SparkplugSchema(name, node_metrics=declared["node_metrics"], device_metrics=declared["device_metrics"])


def _metrics(where: str, raw: Any, line: int, report: Report) -> dict[str, MetricSpec] | None:
    if not isinstance(raw, list):
        report(line, f"{where} must be a list of metrics ({{name, datatype, min, max}})")
        return None
    metrics: dict[str, MetricSpec] = {}
    ok = True
    for entry in raw:
        entry_line = getattr(entry, "line", line)
        if not isinstance(entry, dict):
            report(entry_line, f"{where}: each metric is a mapping with name and datatype, got {entry!r}")
            ok = False
            continue
        unknown = set(entry) - METRIC_KEYS
        name: Any = entry.get("name")  # checked below
        datatype: Any = entry.get("datatype")
        low, high = entry.get("min"), entry.get("max")
        problems = []
        if unknown:
            problems.append(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(sorted(map(str, unknown)))}")
        if not isinstance(name, str) or not name:
            problems.append("needs a `name`")
        if datatype not in DATATYPES:
            problems.append(f"datatype must be one of the Sparkplug datatypes ({', '.join(DATATYPES)}), got {datatype!r}")
        for key, value in (("min", low), ("max", high)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(f"{key} must be a number, got {value!r}")
        if not problems and (low is not None or high is not None) and DATATYPES[datatype] not in (*range(1, 11), 13):
            problems.append(f"min and max are for numeric datatypes, not {datatype}")
        if not problems and low is not None and high is not None and low > high:
            problems.append(f"min {low} is above max {high}")
        if not problems and name in metrics:
            problems.append(f"metric {name!r} is declared twice")
        if problems:
            report(entry_line, f"{where}: {'; '.join(problems)}")
            ok = False
            continue
        metrics[name] = MetricSpec(name, DATATYPES[datatype], low, high)
    return metrics if ok else None
