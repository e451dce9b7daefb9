"""The benchmark harness end to end with a tiny load: structure and accounting, never timing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.bench import BenchOptions, bench, run_benchmark
from appliance.bench.load import payload

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None, reason="mosquitto clients not installed"
)

MESSAGES = 500


def test_payloads_are_unique_100_byte_json() -> None:
    lines = [payload(seq) for seq in (0, 7, 999_999)]
    assert [len(line) for line in lines] == [100, 100, 100]
    assert json.loads(lines[1])["seq"] == 7


def test_every_message_is_accounted_for() -> None:
    report = run_benchmark(BenchOptions(messages=MESSAGES, runs=1, warmup=False))

    assert report.warmup == []
    assert {(s.scenario, s.qos) for s in report.summaries} == {
        ("mosquitto", 0), ("mosquitto", 1), ("proxy", 0), ("proxy", 1)
    }
    for summary in report.summaries:
        [run] = summary.runs
        assert run.ok, run.error
        assert run.received == MESSAGES
        if summary.qos == 1:
            assert run.in_order
        assert summary.msg_per_s is not None and summary.ratio_to_mosquitto is not None
        assert set(run.cpu_s or {}) == ({"mosquitto"} if summary.scenario == "mosquitto" else {"proxy", "mosquitto"})
        assert all(kb > 0 for kb in (run.peak_rss_kb or {}).values())
    reference = [s for s in report.summaries if s.scenario == "mosquitto"]
    assert all(s.ratio_to_mosquitto == 1.0 for s in reference)


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        bench, ["--messages", str(MESSAGES), "--runs", "1", "--no-warmup", "--qos", "1", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "× mosquitto" in result.output
    document = json.loads(out.read_text())
    assert document["options"]["messages"] == MESSAGES
    results = {(r["scenario"], r["qos"], r["load"]): r for r in document["results"]}
    assert set(results) == {(name, 1, "1 publisher") for name in ("mosquitto", "mosquitto-stock", "proxy")}
    for entry in results.values():
        assert entry["failed_runs"] == 0
        assert entry["msg_per_s"] > 0 and entry["ratio_to_mosquitto"] > 0
        assert [run["received"] for run in entry["runs"]] == [MESSAGES]


def test_lost_duplicated_and_reordered_messages_fail_the_run() -> None:
    from appliance.bench.load import _check

    expected = [payload(seq) for seq in range(5)]
    assert _check(expected, expected, qos=1) == (None, True)
    assert _check(expected[::-1], expected, qos=0) == (None, False)
    assert _check(expected[::-1], expected, qos=1) == ("delivered out of order", False)
    error, _ = _check(expected[:3] + expected[2:3], expected, qos=1)
    assert error == "received 4 of 5: 2 missing, 1 duplicates, 0 unexpected"


def test_verdict_bench_runs_every_case(tmp_path: Path) -> None:
    out = tmp_path / "verdict.json"
    result = CliRunner().invoke(bench, ["--verdict", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    from appliance.bench.verdict import CASES

    assert set(json.loads(out.read_text())["verdict_us"]) == {case.name for case in CASES}
