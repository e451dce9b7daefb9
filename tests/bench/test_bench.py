"""The benchmark harness end to end with tiny loads: structure and accounting, never timing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import BenchOptions, bench, run_benchmark
from bench.audit_sql import AuditData, AuditSqlFigures, QueryTiming
from bench.replay_rate import ReplayFigures
from bench.targets import Target
from bench.load import Load, _check, invalid_count, planned_readings
from bench.payloads import is_invalid, reading, synthetic_ts, timestamp, topic
from bench.scenarios import REPO_SCHEMAS

needs_mosquitto = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub")),
    reason="mosquitto not installed",
)

MESSAGES = 500
TARGET_KEYS = {"cpu_us_per_msg", "disk_bytes_per_payload_byte_rate", "disk_bytes_per_payload_byte_flat_out",
               "local_p99_ms", "cloud_p99_ms", "local_ratio_vs_bridge", "cloud_ratio_vs_bridge", "peak_rss_mb",
               "replay_msg_per_s", "audit_sql_group_by_s"}


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
        if scenario == "governance":
            # The power-safe log synced during the run; the helper processes were looked for.
            assert run.log is not None and run.log["syncs"] > 0 and run.log["records"] >= run.messages
            assert run.log_syncs_per_s is not None and run.log_syncs_per_s > 0
            assert run.cpu_us_per_msg("proxy") is not None and run.helper_processes is not None
        else:
            assert run.log is None and run.log_syncs_per_s is None and run.helper_processes is None

    from bench.report import render_tables, to_json

    assert report.processes is not None and set(report.processes.appliances) == {"governance"}
    assert (report.processes.service_peak_rss_kb("governance") or 0) > 0
    document = to_json(report)
    governance = document["processes"]["governance"]
    assert governance["service_peak_rss_kb"] > 0 and governance["peak_rss_kb_with_resident_helpers"] > 0
    assert governance["status_helpers"] is not None
    # Over the whole benchmark the appliance wrote at least what its message log appended (tmpfs: nothing).
    appended = sum((run.log or {}).get("bytes_appended", 0) for s in report.summaries if s.scenario == "governance" for run in s.runs)
    assert appended > 0
    if report.workdir_fs not in ("tmpfs", "ramfs"):
        assert governance["disk_write_bytes"] >= appended and governance["disk_bytes_per_accepted_payload_byte"] > 0
    for entry in document["results"]:
        assert {"log_syncs_per_s", "proxy_cpu_us_per_msg"} <= set(entry)
    targets = document["targets"]
    assert set(targets) == TARGET_KEYS
    # The measurements without a broker were not asked for (BenchOptions' default): not measured.
    assert targets["replay_msg_per_s"]["met"] is None and targets["audit_sql_group_by_s"]["met"] is None
    assert document["replay"] is None and document["audit_sql"] is None
    measured = {(key, check["case"]): check for key, target in targets.items() for check in target["checks"]}
    # What ran (QoS 1, 100 sensors flat out and at the fixed rate) is measured and judged; QoS 0 was not run.
    for key, case in [("cpu_us_per_msg", "QoS 1, 100 sensors 2k/s"), ("disk_bytes_per_payload_byte_rate", "QoS 1, 100 sensors 2k/s"),
                      ("local_p99_ms", "QoS 1, 100 sensors 2k/s"), ("cloud_p99_ms", "QoS 1, 100 sensors 2k/s"),
                      ("disk_bytes_per_payload_byte_flat_out", "QoS 1, 100 sensors"),
                      ("local_ratio_vs_bridge", "QoS 1, 100 sensors"), ("cloud_ratio_vs_bridge", "QoS 1, 100 sensors"),
                      ("peak_rss_mb", "governance")]:
        check = measured[(key, case)]
        assert check["measured"] is not None and check["limit"] is not None and isinstance(check["met"], bool), (key, check)
    assert measured[("cpu_us_per_msg", "QoS 0, 100 sensors 2k/s")]["met"] is None
    assert measured[("local_ratio_vs_bridge", "QoS 0, 1 publisher")]["measured"] is None
    runs_ = {(s.scenario, s.load): s for s in report.summaries}
    assert measured[("local_p99_ms", "QoS 1, 100 sensors 2k/s")]["limit"] == pytest.approx(
        runs_[("mosquitto", "100 sensors 2k/s")].latency_ms("local", "p99") + 2.0)
    assert measured[("local_ratio_vs_bridge", "QoS 1, 100 sensors")]["limit"] == runs_[("bridge", "100 sensors")].ratio_to_mosquitto
    text = render_tables(report)
    assert "Targets (issue #13)" in text and "Processes the appliances started" in text
    assert "log syncs/s" in text and "proxy CPU µs/msg" in text


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
    # Nothing the targets need ran: every target is there, none measured.
    assert "Targets (issue #13)" in result.output
    assert document["targets"]["peak_rss_mb"]["met"] is None
    assert all(check["measured"] is None for target in document["targets"].values() for check in target["checks"])
    assert document["processes"] == {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "bench.png").exists()
    else:
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- issue #13's replay and audit sql targets: measured in the same run, without a broker ----------

def test_replay_and_audit_sql_are_measured_in_the_same_run_with_their_targets(tmp_path: Path) -> None:
    from bench.audit_sql import QUERIES, SENSORS

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench, ["--scenario", "replay", "--scenario", "audit-sql", "--replay-messages", "2000",
                                        "--audit-rows", "3000", "--runs", "1", "--workdir", str(tmp_path),
                                        "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    # No broker ran: neither scenario is one.
    assert document["results"] == [] and document["processes"] == {}
    assert document["options"]["measurements"] == ["replay", "audit-sql"]
    assert set(document["scenarios"]) == {"replay", "audit-sql"}
    assert (document["options"]["replay_messages"], document["options"]["audit_rows"]) == (2000, 3000)

    replay = document["replay"]
    assert replay["error"] is None and replay["messages"] == 2000 and replay["files"] >= 1
    [run] = replay["runs"]
    assert set(run) == {"msg_per_s", "seconds", "workers", "process_s", "command_msg_per_s", "cpu_s", "cpu_us_per_msg"}
    assert replay["msg_per_s"] == run["msg_per_s"] > 0 and run["process_s"] > run["seconds"] > 0

    audit = document["audit_sql"]
    # Half of them left in the log (half a segment, at most half of the rows), with 4 events among them.
    assert (audit["rows"], audit["tail"]) == (3000, 1500) and audit["files"] >= 1 and audit["generate_s"] > 0
    assert set(audit["queries"]) == set(QUERIES)
    for name, query in audit["queries"].items():
        assert query["error"] is None, (name, query)
        [timing] = query["runs"]
        assert set(timing) == {"command_s", "imports_s", "start_s", "process_s"}
        assert 0 < timing["command_s"] < timing["process_s"] and timing["imports_s"] < timing["start_s"]
    assert audit["queries"]["GROUP BY verdict"]["result_rows"] == 2
    assert audit["queries"]["GROUP BY client_id"]["result_rows"] == SENSORS

    targets = document["targets"]
    assert set(targets) == TARGET_KEYS
    [check] = targets["replay_msg_per_s"]["checks"]
    assert check["case"] == "2,000 messages" and check["measured"] == replay["msg_per_s"]
    assert check["limit"] == 100_000 and check["met"] == (check["measured"] >= 100_000)
    checks = targets["audit_sql_group_by_s"]["checks"]
    assert [c["case"].split(",")[0] for c in checks] == list(QUERIES)
    for c in checks:
        assert c["measured"] == audit["queries"][c["case"].split(",")[0]]["command_s"]
        assert c["limit"] == 0.5 and c["met"] == (c["measured"] <= 0.5) and "process start" in c["detail"]
    assert targets["peak_rss_mb"]["met"] is None  # no broker scenario ran
    for heading in ("replay --from RECORDING --against schemas/v1: 2,000 messages",
                    "appliance audit sql: 3,000 verdicts: 1,500 in the message log", "GROUP BY client_id", "Targets (issue #13)"):
        assert heading in result.output


def test_generated_verdicts_are_what_the_real_command_reads(tmp_path: Path) -> None:
    """The audit-sql data is laid out as a running appliance's (Parquet files per segment under a
    watermark, the newest records still in the log): `appliance audit sql` in its own process sees
    every row once, with the planned verdicts."""
    from bench.audit_sql import decisions_per_segment, generate, run_query

    data = generate(tmp_path, 2500, tail=500, rows_per_file=1000)
    # 2,000 in Parquet; 500 in the log, with 2 events among them (one every 500 records).
    assert (data.rows, data.tail, data.rows_per_file) == (2500, 500, 1000)
    assert data.files >= 2 and data.parquet_bytes > 0
    timings, lines = run_query(tmp_path, "SELECT verdict, count(*) AS n, count(DISTINCT id) AS ids, "
                                         "count(DISTINCT client_id) AS clients FROM decisions GROUP BY verdict ORDER BY verdict")
    # One in ten rejected: the readings of sensors 9, 19, ... 99 (row i comes from sensor i % 100).
    assert lines == ["verdict,n,ids,clients", "accept,2250,2250,90", "reject,250,250,10"]
    assert run_query(tmp_path, "SELECT count(*) AS n FROM events")[1] == ["n", "2"]
    assert timings["process_s"] >= timings["command_s"] > 0
    # What a 16 MiB segment holds of the benchmark's readings (docs/audit.md: ~127,000 since record version 2).
    assert 100_000 < decisions_per_segment() < 160_000
    assert 4 * decisions_per_segment(4 << 20) == pytest.approx(decisions_per_segment(), rel=0.01)


def _replay_figures(msg_per_s: list[float], error: str | None = None) -> ReplayFigures:
    figures = ReplayFigures(messages=1_000_000, files=8, parquet_bytes=52_000_000, generate_s=18.0, error=error)
    figures.runs = [{"msg_per_s": rate, "command_msg_per_s": rate * 0.9, "workers": 2, "process_s": 1e6 / rate}
                    for rate in msg_per_s]
    return figures


def _audit_figures(command_s: dict[str, list[float]], error: str | None = None) -> AuditSqlFigures:
    data = AuditData(rows=10_000_000, files=79, rows_per_file=127_065, row_group_rows=32_768,
                     parquet_bytes=431_000_000, generate_s=49.0, tail=63_405)
    queries = []
    for name, times in command_s.items():
        query = QueryTiming(name, "SELECT ...", error=error if name == "GROUP BY hour" else None)
        query.runs = [] if query.error else [{"command_s": t, "imports_s": 0.15, "start_s": 0.2, "process_s": t + 0.2}
                                             for t in times]
        queries.append(query)
    return AuditSqlFigures(data, queries)


def test_replay_and_audit_sql_targets_given_numbers() -> None:
    """The verdict logic alone: medians over runs against the issue's bounds, failures not measured."""
    from bench.report import render_targets
    from bench.runner import BenchReport
    from bench.targets import evaluate

    def targets(replay: ReplayFigures | None, audit: AuditSqlFigures | None) -> dict[str, Target]:
        report = BenchReport(options=BenchOptions(), summaries=[], warmup=[], replay=replay, audit_sql=audit)
        return {t.key: t for t in evaluate(report)}

    met = targets(_replay_figures([90_000, 120_000, 130_000]),
                  _audit_figures({"GROUP BY verdict": [0.09, 0.6, 0.1], "GROUP BY hour": [0.49, 0.5, 0.45]}))
    replay, audit = met["replay_msg_per_s"], met["audit_sql_group_by_s"]
    assert replay.met is True and [c.measured for c in replay.checks] == [120_000]  # the median of 3 runs
    assert replay.checks[0].case == "1,000,000 messages" and "108,000 msg/s" in replay.checks[0].detail
    assert audit.met is True and [c.measured for c in audit.checks] == [0.1, 0.49]
    assert audit.checks[0].case == "GROUP BY verdict, 10,000,000 verdicts (79 files + 63,405 in the log)"
    assert "process start 0.200 s" in audit.checks[0].detail

    missed = targets(_replay_figures([99_999]), _audit_figures({"GROUP BY verdict": [0.1], "GROUP BY hour": [0.51]}))
    assert missed["replay_msg_per_s"].met is False
    assert missed["audit_sql_group_by_s"].met is False  # one query over the bound misses the target
    assert [c.met for c in missed["audit_sql_group_by_s"].checks] == [True, False]
    text = render_targets(list(missed.values()))
    assert "MISSED       `replay --against`" in text and "0.510 s ≤ 0.500: MISSED" in text

    failed = targets(_replay_figures([], error="replayed 10 of 1,000,000 messages"),
                     _audit_figures({"GROUP BY verdict": [0.1], "GROUP BY hour": [0.2]}, error="exited with 1"))
    assert failed["replay_msg_per_s"].met is None and "FAILED: replayed 10" in failed["replay_msg_per_s"].checks[0].detail
    hour = failed["audit_sql_group_by_s"].checks[1]
    assert hour.measured is None and hour.met is None and hour.detail == "FAILED: exited with 1"
    assert failed["audit_sql_group_by_s"].met is None  # measured and met where it ran, not measured where it failed

    not_run = targets(None, None)
    assert not_run["replay_msg_per_s"].met is None and not_run["audit_sql_group_by_s"].met is None
    assert not_run["replay_msg_per_s"].checks[0].detail == "not run (--scenario replay)"
    assert not_run["audit_sql_group_by_s"].checks[0].case == "10,000,000 verdicts"


def test_a_failed_measurement_fails_the_benchmark() -> None:
    from bench.runner import BenchReport

    report = BenchReport(options=BenchOptions(), summaries=[], warmup=[])
    assert report.failed == 0
    report.replay = _replay_figures([], error="replay exited with 2")
    report.audit_sql = _audit_figures({"GROUP BY hour": []}, error="exited with 1")
    assert report.failed == 2


def test_chart_is_skipped_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from bench.report import write_chart
    from bench.runner import BenchReport

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = BenchReport(options=BenchOptions(), summaries=[], warmup=[])
    assert write_chart(report, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_verdict_bench_runs_every_case(tmp_path: Path) -> None:
    out = tmp_path / "verdict.json"
    result = CliRunner().invoke(bench, ["--verdict", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    from bench.verdict import ALL_CASES

    assert set(json.loads(out.read_text())["verdict_us"]) == {case.name for case in ALL_CASES}


# -- processes the appliance starts, the message log's syncs, issue #13's targets ------------------

_PARENT = """
import subprocess, sys
helper = subprocess.Popen([sys.executable, "-c", "x = bytearray(30 << 20); sum(range(3_000_000)); import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE)
broker = subprocess.Popen([sys.argv[1], "60"])
print("started", flush=True)
sys.stdin.readline()
helper.stdin.close(); helper.wait()
print("helper done", flush=True)
sys.stdin.readline()
broker.kill(); broker.wait()
"""


def test_process_watch_sees_each_child_with_its_peak_rss_and_lifetime(tmp_path: Path) -> None:
    import subprocess
    import sys

    from bench.children import ProcessWatch
    from tests.helpers import wait_until

    # A child whose command is "mosquitto" (a copy of sleep) is the broker: not counted.
    broker = tmp_path / "mosquitto"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", broker)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(broker)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdin is not None and parent.stdout is not None
    try:
        assert parent.stdout.readline().strip() == "started"
        watch = ProcessWatch({"appliance": parent.pid}, interval=0.02).start()
        wait_until(lambda: any(p.peak_rss_kb >= 30 * 1024 for p in watch.children()), message="the helper's 30 MB")
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "helper done"
        watch.stop()
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)

    [helper] = watch.children("appliance")
    assert helper.name.startswith("python") and helper.pid != parent.pid
    assert helper.peak_rss_kb >= 30 * 1024
    assert helper.lived_s > 0 and not helper.alive_at_end
    assert not helper.resident(watch.watched_s * 10)  # a tenth of a longer benchmark: short-lived
    assert (watch.service_peak_rss_kb("appliance") or 0) > 0
    # The parent waited for it: its CPU seconds are the kernel's count of the exited child's.
    assert (watch.helpers_cpu_s("appliance") or 0) > 0


@pytest.mark.parametrize(("argv", "name"), [
    (["/usr/bin/python3", "-m", "appliance.audit.maintain", "seal", "--x"], "appliance.audit.maintain seal"),
    (["/usr/sbin/mosquitto", "-c", "m.conf"], "mosquitto"),
    # Under qemu-user through binfmt_misc (make test-arm64), with and without the preserve-argv0 flag.
    (["/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "/usr/bin/python3", "python3", "-c", "x"], "python3"),
    (["/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "/usr/bin/python3", "python3", "-m", "m", "t"], "m t"),
    (["/usr/bin/qemu-aarch64-static", "/usr/sbin/mosquitto", "-c", "m.conf"], "mosquitto"),
    ([], "comm"),
])
def test_process_names_come_from_the_command_line_even_under_emulation(argv: list[str], name: str) -> None:
    from bench.children import process_name

    assert process_name(argv, "comm") == name


def test_helper_runs_the_appliance_recorded_are_merged_and_resident_ones_count_against_the_target() -> None:
    import time

    from bench.children import ChildProcess, ProcessWatch, memory_target, merge_helper_run

    watch = ProcessWatch({"governance": 1})
    watch._started = time.monotonic() - 100.0
    watch.watched_s = 100.0
    watch._watched["governance"].peak_rss_kb = 60 * 1024
    # Polled between fork and exec: it still had the service's command line.
    polled = watch.processes[(4242, 1)] = ChildProcess("governance", 4242, "appliance run", 10.0, 10.3,
                                                       peak_rss_kb=50_000)
    watch.processes[(4343, 1)] = ChildProcess("governance", 4343, "appliance.forward", 1.0, 99.0, peak_rss_kb=15 * 1024)
    now = time.time()
    # The same seal, exactly: it lived 0.5 s and peaked at 90 MB after the last poll.
    merged = merge_helper_run(watch, "governance", {"task": "seal", "pid": 4242, "started": now - 90.0, "seconds": 0.5,
                                                    "exit_status": 0, "peak_rss_kb": 90 * 1024})
    assert merged is polled and merged.reported and merged.name == "appliance.audit.maintain seal"
    assert merged.peak_rss_kb == 90 * 1024 and abs(merged.lived_s - 0.5) < 0.05
    # One the polling missed altogether is added from the record.
    missed = merge_helper_run(watch, "governance", {"task": "retain", "pid": 4444, "started": now - 50.0, "seconds": 0.05,
                                                    "exit_status": 1, "peak_rss_kb": 70 * 1024})
    assert missed.name == "appliance.audit.maintain retain" and missed.exit_status == 1
    assert len(watch.children("governance")) == 3

    memory = memory_target(watch, "governance")
    assert [p.name for p in memory.resident] == ["appliance.forward"]
    assert {p.pid for p in memory.short_lived} == {4242, 4444}
    assert memory.peak_rss_kb == 75 * 1024  # the service and the resident helper; the seal is beside them


@needs_mosquitto
def test_a_seal_helper_of_the_governance_appliance_is_reported(tmp_path: Path) -> None:
    import subprocess

    from appliance import admin
    from bench.children import ProcessWatch
    from bench.scenarios import SCENARIOS
    from bench.status import helper_stats, log_counters
    from tests.helpers import wait_until

    with SCENARIOS["governance"].start(tmp_path) as target:
        watch = ProcessWatch({"governance": target.pids["proxy"]}, interval=0.02).start()
        before = log_counters(target.state_dir)
        assert before is not None and set(before) == {"records", "bytes_appended", "syncs"}
        subprocess.run(["mosquitto_pub", "-p", str(target.port), "-t", topic("dev-s01"), "-q", "1",
                        "-m", reading("dev-s01", 0, synthetic_ts(0)).decode()], check=True, timeout=30)
        after = log_counters(target.state_dir)
        assert after is not None and after["records"] > before["records"] and after["syncs"] > before["syncs"]
        admin.call(target.state_dir, "audit_seal")
        stats = wait_until(lambda: (s := helper_stats(target.state_dir)) and s.get("seal", {}).get("runs") and s,
                           timeout=60, message="a seal helper run")
        watch.stop()
        watch.merge_reported("governance", stats)
    [seal] = [p for p in watch.children("governance") if p.name == "appliance.audit.maintain seal"]
    assert seal.reported and seal.exit_status == 0
    assert seal.peak_rss_kb > 0 and seal.lived_s > 0
    assert not any(p.name == "mosquitto" for p in watch.children())


def test_an_installed_package_without_the_harness_says_how_to_get_it(tmp_path: Path) -> None:
    """bench/ is not shipped: `appliance bench` from an installed package (here: appliance/ copied
    alone) fails with a pointer to the source tree instead of an ImportError."""
    import subprocess
    import sys

    import appliance

    shutil.copytree(Path(appliance.__file__).parent, tmp_path / "site" / "appliance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "appliance", "bench", "--quick"], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "not part of the installed package" in done.stderr and "make bench" in done.stderr
