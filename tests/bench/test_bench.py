"""The benchmark harness end to end with tiny loads: structure and accounting, never timing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.bench import BenchOptions, bench, run_benchmark
from appliance.bench.load import Load, _check, invalid_count, planned_readings
from appliance.bench.payloads import is_invalid, reading, synthetic_ts, timestamp, topic
from appliance.bench.scenarios import REPO_SCHEMAS

needs_mosquitto = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub")),
    reason="mosquitto not installed",
)

MESSAGES = 500


def test_readings_are_judged_by_the_demo_schema_set_as_planned() -> None:
    from appliance.governance import Governance, load_schema_set
    from appliance.mqtt import ProtocolVersion
    from appliance.pipeline import ClientInfo, Message

    governance = Governance(load_schema_set(REPO_SCHEMAS / "v1"))
    client = ClientInfo("t1", None, "192.0.2.1:40000", ProtocolVersion.MQTT_5)
    for seq in range(40):
        for ts in (synthetic_ts(seq), timestamp(1_795_000_000.123456)):
            verdict = governance.check(Message(topic("dev-s01"), reading("dev-s01", seq, ts), 1, False, client))
            assert verdict.accepted is not is_invalid(seq), (seq, verdict)


def test_planned_loads_are_unique_and_one_in_ten_invalid() -> None:
    for load in (Load(kind="publisher", qos=0, messages=1000), Load(kind="sensors", qos=1, messages=1000)):
        planned = planned_readings(load, "tag")
        assert planned is not None and len(planned) == load.total == len(set(planned))
        assert invalid_count(load) == 100
    rate = Load(kind="rate", qos=1, rate=1000, duration=2)
    assert planned_readings(rate, "tag") is None
    assert rate.total == 2000 and invalid_count(rate) == 200


def test_lost_duplicated_and_reordered_messages_fail_the_run() -> None:
    expected = [reading("a", seq, synthetic_ts(seq)) for seq in range(5)]
    assert _check(expected, expected, qos=1) == (None, True)
    assert _check(expected[::-1], expected, qos=0) == (None, False)
    assert _check(expected[::-1], expected, qos=1) == ("delivered out of order", False)
    error, _ = _check(expected[:3] + expected[2:3], expected, qos=1)
    assert error == "received 4 of 5: 2 missing, 1 duplicates, 0 unexpected"
    # Two sensors interleaved differently: still in order per sensor.
    other = [reading("b", seq, synthetic_ts(seq)) for seq in range(3)]
    mixed = [x for pair in zip(expected, other) for x in pair] + expected[3:]
    assert _check(mixed, expected + other, qos=1) == (None, True)


@needs_mosquitto
def test_every_message_is_accounted_for() -> None:
    report = run_benchmark(BenchOptions(messages=MESSAGES, runs=1, warmup=False, loads_=("publisher",)))

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


@needs_mosquitto
def test_governance_and_bridge_deliver_locally_and_to_the_cloud() -> None:
    report = run_benchmark(BenchOptions(
        messages=1000, runs=1, warmup=False, qos=(1,), scenarios=("mosquitto", "governance", "bridge"),
        loads_=("sensors", "rate"), rate=2000, duration=0.5,
    ))

    runs = {(s.scenario, s.load): s.runs[0] for s in report.summaries}
    assert set(runs) == {(name, load) for name in ("mosquitto", "governance", "bridge")
                         for load in ("100 sensors", "100 sensors 2k/s")}
    for (scenario, load), run in runs.items():
        assert run.ok, (scenario, load, run.error)
        assert run.in_order
        if scenario == "governance":
            # sent = delivered + rejected, the rejections counted by the appliance's audit log
            assert run.rejected == run.invalid_sent > 0
            assert run.received + run.rejected == run.messages
            assert set(run.disk_write_bytes or {}) == {"proxy", "mosquitto", "cloud"}
        else:
            assert run.received == run.messages
        if scenario != "mosquitto":
            assert run.cloud_received == run.received and run.cloud_msg_per_s
        if load.endswith("k/s"):
            assert run.latency_ms is not None
            assert set(run.latency_ms) == ({"local"} if scenario == "mosquitto" else {"local", "cloud"})
            assert run.latency_ms["local"]["p50"] <= run.latency_ms["local"]["p99"] <= run.latency_ms["local"]["max"]


@needs_mosquitto
def test_cli_writes_json_and_a_chart_next_to_it(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench, ["--scenario", "mosquitto", "--load", "publisher", "--messages", "200",
                                        "--runs", "1", "--no-warmup", "--qos", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "× mosquitto" in result.output
    document = json.loads(out.read_text())
    assert document["options"]["messages"] == 200
    [entry] = document["results"]
    assert (entry["scenario"], entry["qos"], entry["load"]) == ("mosquitto", 0, "1 publisher")
    assert entry["failed_runs"] == 0 and entry["accounted"] is True
    assert entry["msg_per_s"] > 0 and entry["ratio_to_mosquitto"] == 1.0
    assert [run["received"] for run in entry["runs"]] == [200]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "bench.png").exists()
    else:
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_is_skipped_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from appliance.bench.report import write_chart
    from appliance.bench.runner import BenchReport

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = BenchReport(options=BenchOptions(), summaries=[], warmup=[])
    assert write_chart(report, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_verdict_bench_runs_every_case(tmp_path: Path) -> None:
    out = tmp_path / "verdict.json"
    result = CliRunner().invoke(bench, ["--verdict", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    from appliance.bench.verdict import ALL_CASES

    assert set(json.loads(out.read_text())["verdict_us"]) == {case.name for case in ALL_CASES}
