"""Replaying Parquet exports and NDJSON captures: counts, filters, formats, exit codes, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tests.replay.conftest import V1, V2
from tests.replay.recordings import (
    START,
    decision_rows,
    demo_messages,
    export,
    write_audit_log,
    write_ndjson,
)

COUNT = 200  # per 10: 5 valid temperatures, 1 too hot, 3 device statuses, 1 unmapped event


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recording")
    write_audit_log(root / "audit.duckdb", decision_rows(demo_messages(COUNT)))
    export(root / "audit.duckdb", root / "export")
    return root / "export"


def _json(result) -> dict:
    return json.loads(result.stdout)


def test_parquet_against_v2_reports_every_temperature_as_breaking(parquet, run):
    result = run("--from", parquet, "--against", V2, "--format", "json")
    assert result.exit_code == 1, result.output
    report = _json(result)
    assert set(report) >= {"result", "exit_code", "fail_on", "source", "filters", "target", "baseline", "reference",
                           "recorded_with", "totals", "groups", "notes", "static", "stats"}
    groups = {g["topic_filter"]: g for g in report["groups"]}
    temp = groups["sensor/+/temperature"]
    assert (temp["replayed"], temp["newly_rejected"], temp["still_rejected"]) == (120, 100, 20)
    assert groups["device/+/status"]["breaking"] == 0 and groups["device/+/status"]["still_accepted"] == 60
    events = groups["(no mapping)"]
    assert (events["replayed"], events["unmapped"], events["still_accepted"]) == (20, 20, 20)
    reasons = {(r["check"], r["path"], r["message"]): r for r in temp["reasons"]}
    assert reasons[("schema", None, '"unit" is a required property')]["breaking"] == 100
    # "150 is greater...", "151 is greater..." are one reason; those messages were rejected already.
    too_hot = reasons[("schema", "/temperature", "<value> is greater than the maximum of N")]
    assert (too_hot["count"], too_hot["breaking"]) == (20, 0)
    assert report["totals"]["breaking"] == 100 and report["totals"]["replayed"] == COUNT


def test_parquet_against_v1_is_compatible(parquet, run):
    result = run("--from", f"{parquet}/**/*.parquet", "--against", V1)
    assert result.exit_code == 0, result.output
    assert "compatible" in result.stdout and "sensor/+/temperature" in result.stdout


def test_audit_duckdb_file_as_source(parquet, run):
    result = run("--from", parquet.parent / "audit.duckdb", "--against", V2, "--format", "json")
    assert result.exit_code == 1 and _json(result)["totals"]["breaking"] == 100


@pytest.mark.parametrize("args, replayed", [
    (["--topic", "device/+/status"], 60),
    (["--topic", "sensor/#"], 120),
    (["--client", "d1"], 20),
    (["--limit", "15"], 15),
    (["--sample", "10"], 20),
    (["--sample", "10", "--limit", "3"], 3),
    (["--since", "2026-11-27T08:00:01Z"], 100),
    (["--until", "2026-11-27T08:00:01Z"], 100),
])
def test_filters_on_parquet_and_ndjson(parquet, tmp_path, run, args, replayed):
    capture = tmp_path / "capture.ndjson"
    write_ndjson(capture, demo_messages(COUNT))
    for source in (parquet, capture):
        result = run("--from", source, "--against", V1, "--format", "json", *args)
        assert result.exit_code == 0, result.output
        assert _json(result)["totals"]["replayed"] == replayed, (source, args)


def test_fail_on_thresholds(parquet, run):
    assert run("--from", parquet, "--against", V2, "--fail-on", "rate>60%").exit_code == 0  # 50% are breaking
    assert run("--from", parquet, "--against", V2, "--fail-on", "rate>0.1%").exit_code == 1
    assert run("--from", parquet, "--against", V2, "--fail-on", "count>100").exit_code == 0
    assert run("--from", parquet, "--against", V2, "--fail-on", "never").exit_code == 0
    bad = run("--from", parquet, "--against", V2, "--fail-on", "lots")
    assert bad.exit_code == 2 and "--fail-on" in bad.stderr


def test_junit_parses_with_a_failure_per_breaking_group(parquet, tmp_path, run):
    out = tmp_path / "replay.xml"
    result = run("--from", parquet, "--against", V2, "--format", "junit", "--output", out)
    assert result.exit_code == 1 and "BREAKING" in result.stdout
    suite = ET.parse(out).getroot().find("testsuite")
    assert suite is not None
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"sensor/+/temperature (temperature:v2)", "device/+/status (device_status:v2)", "(no mapping)"}
    failure = cases["sensor/+/temperature (temperature:v2)"].find("failure")
    assert failure is not None and '"unit" is a required property' in (failure.text or "")
    assert cases["device/+/status (device_status:v2)"].find("failure") is None


def test_markdown_has_a_table(parquet, run):
    result = run("--from", parquet, "--against", V2, "--format", "markdown")
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| topic filter"))
    assert lines[header + 1].startswith("|---|")
    assert any(line.startswith("| sensor/+/temperature (temperature:v2) | 120 |") for line in lines)


def test_ndjson_without_verdicts_uses_the_baseline(tmp_path, run):
    capture = tmp_path / "capture.ndjson"
    write_ndjson(capture, demo_messages(COUNT), verdicts=False)
    report = _json(run("--from", capture, "--against", V2, "--baseline", V1, "--format", "json"))
    temp = next(g for g in report["groups"] if g["topic_filter"] == "sensor/+/temperature")
    assert (temp["newly_rejected"], temp["still_rejected"]) == (100, 20)
    assert report["baseline"]["version"] == "v1"

    unreferenced = _json(run("--from", capture, "--against", V2, "--format", "json"))
    assert unreferenced["reference"].startswith("none")
    assert unreferenced["totals"]["rejected_without_reference"] == 120 and unreferenced["totals"]["breaking"] == 120


def test_the_worker_pool_gives_the_same_report(tmp_path, run):
    capture = tmp_path / "big.ndjson"
    write_ndjson(capture, demo_messages(12_000))
    pooled = _json(run("--from", capture, "--against", V2, "--format", "json", "--jobs", "2"))
    inline = _json(run("--from", capture, "--against", V2, "--format", "json", "--jobs", "1"))
    assert pooled["stats"]["workers"] == 2 and inline["stats"]["workers"] == 1
    for report in (pooled, inline):
        del report["stats"]
        for group in report["groups"]:
            for reason in group["reasons"]:
                del reason["samples"]  # which three are kept depends on batch order
    assert pooled == inline


# -- bad input: exit 2 with a message that says what is wrong ---------------------------------------


def test_target_not_a_schema_set(parquet, tmp_path, run):
    result = run("--from", parquet, "--against", tmp_path)
    assert result.exit_code == 2
    assert "manifest.yaml" in result.stderr and "missing" in result.stderr


def test_corrupt_parquet(tmp_path, run):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all")
    result = run("--from", tmp_path / "bad.parquet", "--against", V2)
    assert result.exit_code == 2
    assert "cannot read" in result.stderr and "bad.parquet" in result.stderr


def test_empty_recordings(tmp_path, run, parquet):
    empty = tmp_path / "empty.ndjson"
    empty.write_text("")
    result = run("--from", empty, "--against", V2)
    assert result.exit_code == 2 and "nothing to replay" in result.stderr
    nothing_matches = run("--from", parquet, "--against", V2, "--topic", "nobody/#")
    assert nothing_matches.exit_code == 2 and "nothing to replay" in nothing_matches.stderr
    no_files = run("--from", f"{tmp_path}/*.parquet", "--against", V2)
    assert no_files.exit_code == 2 and "nothing to replay" in no_files.stderr


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"payload": "x"}', "topic"),
    ('{"topic": "a/b", "payload_b64": "%%%"}', "base64"),
    ('{"topic": "a/b", "payload": "x", "verdict": "maybe"}', "verdict"),
])
def test_bad_ndjson_line_names_its_number(tmp_path, run, line, problem):
    capture = tmp_path / "capture.ndjson"
    good = json.dumps({"ts": START, "topic": "events/x", "payload": "ok"})
    capture.write_text(f"{good}\n{good}\n{line}\n")
    result = run("--from", capture, "--against", V2)
    assert result.exit_code == 2
    assert f"{capture}:3:" in result.stderr and problem in result.stderr


def test_usage_errors_exit_2(run, parquet):
    assert run().exit_code == 2
    assert run("--from", parquet, "--against", V2, "--sample", "0").exit_code == 2
    assert run("--from", parquet, "--against", V2, "--since", "yesterday").exit_code == 2
    assert run("--from", parquet, "--against", V2, "--topic", "a/#/b").exit_code == 2


def test_dry_run_rejections_count_as_delivered_and_breaking(tmp_path):
    """A dry run delivered what it rejected: enforcing that set would break those messages."""
    from appliance.audit.records import IdClock
    from appliance.audit.store import AuditStore
    from tests.audit.factory import decision

    store_path = tmp_path / "audit.duckdb"
    clock = IdClock()
    rows = []
    for i in range(10):
        row = list(decision(clock.next(1_795_000_000 + i), 1_795_000_000 + i, device=f"t{i}", verdict="reject",
                            payload=f'{{"device_id":"t{i}","ts":"2026-11-27T12:00:00Z","temperature":21}}'.encode(),
                            topic=f"sensor/t{i}/temperature"))
        row[21] = True  # dry_run
        rows.append(tuple(row))
    with AuditStore(store_path) as store:
        store.append(rows)
    result = subprocess.run([sys.executable, "-m", "replay.cli", "--from", str(store_path), "--against",
                             str(V2), "--format", "json", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["totals"]["newly_rejected"] == 10


def test_a_recording_without_payloads_is_an_input_error(tmp_path):
    from appliance.audit.records import IdClock
    from appliance.audit.store import AuditStore
    from tests.audit.factory import decision

    store_path = tmp_path / "audit.duckdb"
    clock = IdClock()
    rows = []
    for i in range(5):
        row = list(decision(clock.next(1_795_000_000 + i), 1_795_000_000 + i))
        row[9] = None  # payload removed by retention
        rows.append(tuple(row))
    with AuditStore(store_path) as store:
        store.append(rows)
    result = subprocess.run([sys.executable, "-m", "replay.cli", "--from", str(store_path), "--against",
                             str(V1), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nothing could be judged" in result.stderr


def test_breaking_reasons_show_only_newly_rejected_messages_as_examples(tmp_path, run):
    """Three messages v1 rejected already (too hot) and, after them, one it accepted: against v2 all
    four lack `unit`, but only the last is an example of what v2 breaks."""
    from tests.governance.payloads import temperature

    capture = tmp_path / "capture.ndjson"
    rejected = [(START + i, "sensor/t1/temperature", temperature("t1", 150 + i), "t1", "reject", None) for i in range(3)]
    accepted = [(START + 9, "sensor/t1/temperature", temperature("t1", 21.5), "t1", "accept", None)]
    write_ndjson(capture, [*rejected, *accepted])
    report = _json(run("--from", capture, "--against", V2, "--format", "json"))
    [temp] = [g for g in report["groups"] if g["topic_filter"] == "sensor/+/temperature"]
    assert (temp["newly_rejected"], temp["still_rejected"]) == (1, 3)
    for fmt in ("table", "markdown", "junit"):
        output = run("--from", capture, "--against", V2, "--format", fmt).stdout
        assert "21.5" in output, (fmt, output)  # the breaking example
        assert "150" not in output and "151" not in output, (fmt, output)  # not the already rejected ones


def test_a_normalised_reason_still_shows_its_limit(parquet, run):
    report = _json(run("--from", parquet, "--against", V2, "--format", "json"))
    temp = next(g for g in report["groups"] if g["topic_filter"] == "sensor/+/temperature")
    [too_hot] = [r for r in temp["reasons"] if r["message"] == "<value> is greater than the maximum of N"]
    assert too_hot["detail"] == "<value> is greater than the maximum of 125"
    table = run("--from", parquet, "--against", V1, "--format", "table", "--fail-on", "never").stdout
    assert "greater than the maximum of 125" not in table  # v1: nothing newly rejected, no reasons listed
