"""Event kinds and metric names: declared once (appliance/names.py), used by the code, documented
(docs/audit.md's table of event kinds, docs/operations.md's table of metrics), all three in step."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

from appliance.metrics import AuditStats, DeadLetterStats, MetricsSink, Stats, UplinkStats, make_registry
from appliance.names import LIMITS, PROXY_COUNTED, EventKind, Metric

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "appliance").rglob("*.py"), *(ROOT / "replay").rglob("*.py")])
# Functions that record an event, and the proxy's `Record` command (a session's `notes.record(kind, detail)`);
# the kind is one of their first two positional arguments (or `kind=`).
EMITTERS = {"on_event", "_on_event", "emit", "_emit", "_event", "record_event", "_record_event", "_append_event",
            "event_record", "record", "Record"}
EVENT_NAME = re.compile(r"^[a-z]+(_[a-z]+)+$")


def _table(doc: str, header: str) -> list[list[str]]:
    """The rows of the markdown table under `header` (a header line), as lists of cells."""
    lines = (ROOT / "docs" / doc).read_text().splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _kinds_in_code() -> tuple[Counter[str], set[str]]:
    """(event kinds written as string literals where events are recorded, EventKind members referenced)."""
    literals: Counter[str] = Counter()
    members: set[str] = set()
    for path in SOURCES:
        if path.name != "names.py":
            _find_kinds(ast.parse(path.read_text(), str(path)), literals, members)
    return literals, members


def _find_kinds(tree: ast.AST, literals: Counter[str], members: set[str]) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "EventKind":
            members.add(node.attr)
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        candidates: list[ast.expr] = []
        if name in EMITTERS:
            candidates = [*node.args[:2], *(k.value for k in node.keywords if k.arg == "kind")]
        elif name == "call" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value == "audit_event":
            candidates = [k.value for k in node.keywords if k.arg == "kind"]  # admin.call(..., "audit_event", kind=)
        for candidate in candidates:
            if isinstance(candidate, ast.Constant) and isinstance(candidate.value, str) and EVENT_NAME.match(candidate.value):
                literals[candidate.value] += 1


def test_every_event_kind_in_the_code_is_declared():
    literals, members = _kinds_in_code()
    declared = {kind.value for kind in EventKind}
    assert set(literals) <= declared, f"declare these in appliance/names.py: {sorted(set(literals) - declared)}"
    assert members <= {kind.name for kind in EventKind}, members


def test_every_declared_event_kind_is_recorded_somewhere():
    literals, members = _kinds_in_code()
    used = set(literals) | {EventKind[name].value for name in members}
    assert used == {kind.value for kind in EventKind}, f"never recorded: {sorted({k.value for k in EventKind} - used)}"


def test_the_finder_sees_each_way_of_recording_an_event():
    """EventKind members are found wherever they are used (the proxy's `notes.record`, the appliance's
    `on_event`, the forwarder's `_emit`...), and a bare string given to any emitter, including the
    proxy's `record` and `Record`, is found as well, so an undeclared kind cannot slip in."""
    literals, members = _kinds_in_code()
    assert {"AUTH_FAILED", "ACL_DENIED", "LIMIT_EXCEEDED"} <= members
    assert {"CONFIG_RELOAD", "UPLINK_UP", "LOG_TORN_TAIL", "QUARANTINE_PURGED"} <= members
    found: Counter[str] = Counter()
    _find_kinds(ast.parse(
        'notes.record("acl_denied", {})\nRecord("limit_exceeded", {})\nself.on_event("config_reload", {})\n'
        'self._emit("uplink_up", {})\nadmin.call(target, "audit_event", kind="quarantine_purged")\n'
        'notes.record(kind="auth_failed", detail={})\nlog.info("not_an_event", 1)\n'), found, set())
    assert set(found) == {"acl_denied", "limit_exceeded", "config_reload", "uplink_up", "quarantine_purged", "auth_failed"}


def test_every_event_kind_is_documented_and_every_documented_one_exists():
    rows = _table("audit.md", "| kind | recorded when | detail |")
    documented = [row[0].strip("`") for row in rows]
    assert len(documented) == len(set(documented))
    assert set(documented) == {kind.value for kind in EventKind}
    assert all(row[1] for row in rows), "each kind says when it is recorded"


def test_every_metric_is_documented_with_its_type_and_labels():
    rows = _table("operations.md", "| metric | type | labels | meaning |")
    # labels: "`status` (valid/invalid), `topic_filter`, `schema`": the names in backticks, outside brackets
    documented = {row[0].strip("`"): (row[1], tuple(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", row[2]))), row[3])
                  for row in rows}
    declared = {metric.value.exported: metric.value for metric in Metric}
    assert set(documented) == set(declared), (sorted(set(documented) - set(declared)), sorted(set(declared) - set(documented)))
    for name, (kind, labels, meaning) in documented.items():
        spec = declared[name]
        assert kind == spec.type, name
        assert labels == spec.labels, (name, labels, spec.labels)
        assert meaning, name


def _collect(stats: Stats) -> dict[str, object]:
    registry = make_registry(lambda: stats, MetricsSink())
    return {family.name: family for family in registry.collect()}


def test_the_collector_exports_every_declared_metric_and_no_other():
    stats = Stats(
        uptime_s=1.0, state_dir=ROOT, broker_up=True, broker_restarts=0, clients=2, reloads={"ok": 1},
        counts={(Metric.LIMIT_EXCEEDED, "inflight"): 3, (Metric.AUDIT_UNAVAILABLE, ""): 2},
        audit=AuditStats(quarantine_bytes=5, pending_records=1, lost_records=0, healthy=True, log_syncs=4,
                         log_appended_bytes=100, helper_failures=0),
        uplink=UplinkStats(up=True, depth=1, bytes=10, oldest_age_s=0.5, forwarded=7, dropped=0),
        dead_letters=DeadLetterStats(totals={("local", "published"): 4}, queue=1),
    )
    families = _collect(stats)
    ours = {name for name in families if name.startswith("mqtt_proxy_")}
    assert ours == {metric.value.name for metric in Metric}
    for metric in Metric:
        family = families[metric.value.name]
        assert family.type == metric.value.type and family.documentation == metric.value.help, metric
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("mqtt_proxy_limit_exceeded_total", (("limit", "inflight"),))] == 3
    assert samples[("mqtt_proxy_audit_unavailable_total", ())] == 2
    assert samples[("mqtt_proxy_dead_letters_total", (("outcome", "published"), ("to", "local")))] == 4


def _proxy_counted() -> list[str]:
    """The metrics the proxy counts: `Metric.X` in every `count(...)` call of appliance/proxy/."""
    found = []
    for path in sorted((ROOT / "appliance" / "proxy").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count":
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "Metric":
                        found.append(sub.attr)
    return found


def test_the_proxy_counts_exactly_the_declared_proxy_metrics():
    counted = _proxy_counted()
    assert set(counted) == {metric.name for metric in PROXY_COUNTED}, counted


def _limits_in_code() -> set[str]:
    """Every `limit` label the code gives: `limit_exceeded(limit, ...)`, `refuse(transport, peer, limit, ...)`,
    `(Metric.LIMIT_EXCEEDED, limit)`, `{"limit": limit}` and `limit = a if ... else b`."""
    found: set[str] = set()

    def strings(node: ast.expr | None) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.IfExp):
            return strings(node.body) + strings(node.orelse)
        return []

    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "limit_exceeded" and node.args:
                    found.update(strings(node.args[0]))
                elif node.func.attr == "refuse" and len(node.args) >= 3:
                    found.update(strings(node.args[2]))
            elif isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Attribute) \
                    and node.elts[0].attr == "LIMIT_EXCEEDED":
                found.update(strings(node.elts[1]))
            elif isinstance(node, ast.Dict):
                found.update(v for k, value in zip(node.keys, node.values)
                             if isinstance(k, ast.Constant) and k.value == "limit" for v in strings(value))
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "limit" for t in node.targets):
                found.update(strings(node.value))
    return found


def test_every_limit_label_is_declared_and_documented():
    used = _limits_in_code()
    assert {"connect_size", "packet_size", "inflight", "connections"} <= used  # the finder sees each way
    assert used == set(LIMITS), (sorted(used - set(LIMITS)), sorted(set(LIMITS) - used))
    operations = next(row for row in _table("operations.md", "| metric | type | labels | meaning |")
                      if row[0] == "`mqtt_proxy_limit_exceeded_total`")
    audit = next(row for row in _table("audit.md", "| kind | recorded when | detail |") if row[0] == "`limit_exceeded`")
    for limit in LIMITS:
        assert limit in Metric.LIMIT_EXCEEDED.value.help, limit
        assert f"`{limit}`" in operations[3], limit
        assert f"`{limit}`" in audit[1], limit
