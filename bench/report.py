"""The benchmark's outputs: a table per QoS and load for people, a JSON document for machines, and
a PNG chart (optional: needs matplotlib, the `bench` extra)."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.children import memory_target, summarise_by_name
from bench.runner import MEASUREMENTS, BenchReport, Summary
from bench.scenarios import SCENARIOS
from bench.targets import Target, evaluate

COLUMNS = ("scenario", "msg/s", "× mosquitto", "× stock", "cloud msg/s", "cloud × mosq.", "latency ms p50/p99/max",
           "cloud latency ms", "CPU % proxy/mosq./cloud", "proxy CPU µs/msg", "log syncs/s", "peak RSS proxy/mosq.",
           "disk B/msg", "disk B/payload B", "accounted")
ROLES = ("proxy", "mosquitto", "cloud")


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _megabytes(kb: int | None) -> str:
    return "–" if kb is None else f"{kb / 1024:.1f}"


def _latency(summary: Summary, where: str) -> str:
    values = [summary.latency_ms(where, stat) for stat in ("p50", "p99", "max")]
    return "–" if values[0] is None else "/".join(_number(v, 1 if v is not None and v < 10 else 0) for v in values)


def _row(summary: Summary) -> list[str]:
    rate = _number(summary.msg_per_s)
    if summary.failed:
        rate += f" ({summary.failed}/{len(summary.runs)} runs FAILED)"
    accounted = "–"
    if summary.runs:
        accounted = "yes" if summary.accounted else "NO"
    cpu = [summary.cpu_percent(role) for role in ROLES]
    return [
        summary.scenario,
        rate,
        _number(summary.ratio_to_mosquitto, 2),
        _number(summary.ratio_to_stock_mosquitto, 2),
        _number(summary.cloud_msg_per_s),
        _number(summary.cloud_ratio_to_mosquitto, 2),
        _latency(summary, "local"),
        _latency(summary, "cloud"),
        "/".join(_number(value) for value in cpu),
        _number(summary.cpu_us_per_msg("proxy"), 1),
        _number(summary.log_syncs_per_s),
        "/".join(_megabytes(summary.peak_rss_kb(role)) for role in ("proxy", "mosquitto")) + " MB",
        _number(summary.disk_bytes_per_msg, 0),
        _number(summary.disk_bytes_per_payload_byte, 2),
        accounted,
    ]


def _table(rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _files(count: int) -> str:
    return f"{count} Parquet file{'s' if count != 1 else ''}"


def render_measurements(report: BenchReport) -> str | None:
    """The measurements without a broker: replay's rate, `appliance audit sql`'s GROUP BY times."""
    blocks = []
    runs = f"median of {report.options.runs} run{'s' if report.options.runs != 1 else ''}, each in a process of its own"
    if (replay := report.replay) is not None:
        lines = [f"replay --from RECORDING --against schemas/v1: {replay.messages:,} messages in "
                 f"{_files(replay.files)} ({replay.parquet_bytes / 1e6:.0f} MB, generated in "
                 f"{replay.generate_s:.1f} s), {runs}"]
        if replay.error is not None:
            lines.append(f"  FAILED: {replay.error}")
        if replay.runs:
            median = replay.median
            lines += ["  " + line for line in _table([
                ["msg/s (--stats)", "whole command msg/s", "process s", "CPU µs/msg", "workers"],
                [_number(replay.msg_per_s), _number(replay.command_msg_per_s), _number(median("process_s"), 2),
                 _number(median("cpu_us_per_msg"), 1), str(replay.runs[0]["workers"])],
            ])]
        blocks.append("\n".join(lines))
    if (audit := report.audit_sql) is not None:
        data = audit.data
        lines = [f"appliance audit sql: {data.rows:,} verdicts: {data.tail:,} in the message log, not converted yet, "
                 f"the others in {_files(data.files)} as the seal helper writes them ({data.rows_per_file:,} rows "
                 f"per {report.options.audit_segment_bytes / (1 << 20):g} MiB segment, {data.row_group_rows:,}-row groups, {data.parquet_bytes / 1e6:.0f} MB); "
                 f"generated in {data.generate_s:.1f} s; {runs}"]
        rows = [["query", "command s", "process s", "process start s", "of which imports s", "result rows"]]
        for query in audit.queries:
            if query.error is not None:
                lines.append(f"  {query.name}: FAILED: {query.error}")
            rows.append([query.name, _number(query.median("command_s"), 3), _number(query.median("process_s"), 3),
                         _number(query.median("start_s"), 3), _number(query.median("imports_s"), 3),
                         "–" if query.result_rows is None else f"{query.result_rows:,}"])
        lines += ["  " + line for line in _table(rows)]
        blocks.append("\n".join(lines))
    if not blocks:
        return None
    legend = []
    if replay is not None:
        legend.append("msg/s (--stats): messages ÷ the judging's wall time, as `replay --stats` prints it; whole "
                      "command: ÷ the process's wall time.")
    if audit is not None:
        legend.append("command s: `appliance audit sql` from its arguments to its printed result (opening the "
                      "snapshot: decoding the records not converted, the views; the query; printing); process start: "
                      "the rest of the process's wall time (interpreter, imports, exit).")
    blocks.append(" ".join(legend))
    return "\n\n".join(blocks)


def render_tables(report: BenchReport) -> str:
    options = report.options
    blocks: list[str] = []
    runs = f"median of {options.runs} run{'s' if options.runs != 1 else ''}"
    for load in dict.fromkeys((s.qos, s.load) for s in report.summaries):
        summaries = [s for s in report.summaries if (s.qos, s.load) == load]
        sent = summaries[0].runs[0].messages if summaries and summaries[0].runs else 0
        lines = [f"QoS {load[0]}, {load[1]}, {sent:,} messages (10% invalid), {runs}"]
        lines += _table([list(COLUMNS)] + [_row(s) for s in summaries])
        blocks.append("\n".join(lines))
    if report.summaries:
        blocks.append(_legend(report))
    if (processes := render_processes(report)) is not None:
        blocks.append(processes)
    if (measurements := render_measurements(report)) is not None:
        blocks.append(measurements)
    failures = [run for s in report.summaries for run in s.runs if not run.ok]
    if failures:
        blocks.append("\n".join(["Failed runs:"] + [
            f"  {run.scenario} QoS {run.qos} {run.load} run {run.round}: {run.error}" for run in failures
        ]))
    blocks.append(render_targets(evaluate(report)))
    return "\n\n".join(blocks)


def _legend(report: BenchReport) -> str:
    return (
        "msg/s: messages published ÷ time until the last one was delivered (or rejected) at the local subscriber; "
        "cloud: at the cloud subscriber. × mosquitto: median of same-round ratios. proxy CPU µs/msg: the appliance "
        "process (all threads) per message sent. log syncs/s: the message log's fdatasync calls per second (its "
        "status). disk: /proc/PID/io write_bytes of the appliance (its exited helpers included) and brokers, per "
        "message sent and per byte of accepted payload."
        + (f"\nWARNING: the work directory is on {report.workdir_fs}: disk figures are meaningless."
           if report.workdir_fs in ("tmpfs", "ramfs") else "")
    )


def _helpers_cpu_us_per_msg(report: BenchReport, scenario: str) -> tuple[float | None, float | None]:
    """CPU seconds of the helpers that exited during the benchmark, and per message the appliance handled."""
    if report.processes is None:
        return None, None
    cpu = report.processes.helpers_cpu_s(scenario)
    messages = sum(run.messages for s in report.summaries if s.scenario == scenario for run in s.runs)
    messages += sum(run.messages for run in report.warmup if run.scenario == scenario)
    return cpu, (1e6 * cpu / messages if cpu is not None and messages else None)


def whole_run_disk(report: BenchReport, scenario: str) -> tuple[int | None, float | None]:
    """Bytes the appliance wrote over the whole benchmark (between runs too, its helpers included),
    and per byte of accepted payload of all its runs (warm-up included): the long-run figure, with
    every seal to Parquet in it, where one run's figure has a seal in it or not."""
    if report.processes is None:
        return None, None
    written = report.processes.service_write_bytes(scenario)
    runs = [run for s in report.summaries if s.scenario == scenario for run in s.runs]
    runs += [run for run in report.warmup if run.scenario == scenario]
    payload = sum(run.accepted_payload_bytes or 0 for run in runs)
    return written, (written / payload if written is not None and payload else None)


def render_processes(report: BenchReport) -> str | None:
    """Per appliance: its peak RSS over the whole benchmark, and every process it started (mosquitto aside)."""
    watch = report.processes
    if watch is None or not watch.appliances:
        return None
    lines = [f"Processes the appliances started, mosquitto aside (polled every {watch.interval:g} s for "
             f"{watch.watched_s:,.0f} s; resident: up for at least half of that)"]
    for scenario in watch.appliances:
        memory = memory_target(watch, scenario)
        cpu, per_msg = _helpers_cpu_us_per_msg(report, scenario)
        written, per_byte = whole_run_disk(report, scenario)
        lines.append(f"  {scenario}: service peak RSS {_megabytes(memory.service_peak_rss_kb)} MB (VmHWM over the "
                     f"whole benchmark); with resident helpers {_megabytes(memory.peak_rss_kb)} MB; helpers' CPU "
                     f"{_number(cpu, 2)} s (= {_number(per_msg, 1)} µs per message handled); written to disk "
                     f"over the whole benchmark {_number(None if written is None else written / 1e6, 1)} MB "
                     f"(= {_number(per_byte, 2)} B per accepted payload byte, all loads, helpers included)")
        for kind, group in (("resident", memory.resident), ("short-lived", memory.short_lived)):
            for entry in summarise_by_name(group):
                lived = (f"{entry['min_lived_s']:.1f}–{entry['max_lived_s']:.1f}"
                         if entry["count"] > 1 else f"{entry['max_lived_s']:.1f}")
                lines.append(f"    {kind:<11} {entry['name']:<34} ×{entry['count']:<3} peak RSS "
                             f"{_megabytes(entry['max_peak_rss_kb']):>6} MB, lived {lived} s")
        if not memory.resident and not memory.short_lived:
            lines.append("    no other process")
        for task, stats in sorted(report.helper_stats.get(scenario, {}).items()):
            lines.append(f"    its status: helper {task}: {stats.get('runs')} run(s), {stats.get('failures')} failed, "
                         f"largest peak RSS {_megabytes(stats.get('max_peak_rss_kb'))} MB")
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def _measured(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "s":
        return f"{value:,.3f}"
    if unit == "msg/s":
        return f"{value:,.0f}"
    return f"{value:,.2f}" if unit in ("×", "B/B") else f"{value:,.1f}"


def render_targets(targets: list[Target]) -> str:
    lines = ["Targets (issue #13): the governance path, replay, audit sql"]
    width = max([26, *(len(check.case) for target in targets for check in target.checks)])
    for target in targets:
        lines.append(f"  {_verdict(target.met):<12} {target.description}")
        for check in target.checks:
            comparison = "≤" if target.at_most else "≥"
            limit = "–" if check.limit is None else _measured(check.limit, target.unit)
            detail = f" ({check.detail})" if check.detail else ""
            lines.append(f"      {check.case:<{width}} {_measured(check.measured, target.unit):>9} {target.unit} "
                         f"{comparison} {limit}: {_verdict(check.met)}{detail}")
    return "\n".join(lines)


def _mosquitto_version() -> str | None:
    try:
        out = subprocess.run(["mosquitto_sub", "--help"], check=False, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "version" in line:
            return line.strip()
    return None


def _run(run: Any) -> dict[str, Any]:
    document = dataclasses.asdict(run)
    document["disk_bytes_per_msg"] = run.disk_bytes_per_msg
    document["disk_bytes_per_payload_byte"] = run.disk_bytes_per_payload_byte
    document["log_syncs_per_s"] = run.log_syncs_per_s
    return document


def _processes_json(report: BenchReport) -> dict[str, Any]:
    watch = report.processes
    if watch is None:
        return {}
    document: dict[str, Any] = {}
    for scenario in watch.appliances:
        memory = memory_target(watch, scenario)
        cpu, per_msg = _helpers_cpu_us_per_msg(report, scenario)
        document[scenario] = {
            "service_peak_rss_kb": memory.service_peak_rss_kb,
            "peak_rss_kb_with_resident_helpers": memory.peak_rss_kb,
            "helpers_cpu_s": cpu,
            "helpers_cpu_us_per_msg": per_msg,
            "disk_write_bytes": whole_run_disk(report, scenario)[0],
            "disk_bytes_per_accepted_payload_byte": whole_run_disk(report, scenario)[1],
            "watched_s": round(watch.watched_s, 3),
            "poll_interval_s": watch.interval,
            "processes": [p.to_json(watch.watched_s) for p in watch.children(scenario)],
            "status_helpers": report.helper_stats.get(scenario),
        }
    return document


def to_json(report: BenchReport) -> dict[str, Any]:
    options = report.options
    return {
        "options": {"messages": options.messages, "runs": options.runs, "warmup": options.warmup,
                    "qos": list(options.qos), "scenarios": list(options.scenarios), "loads": list(options.loads_),
                    "rate": options.rate, "duration_s": options.duration,
                    "measurements": list(options.measurements), "replay_messages": options.replay_messages,
                    "audit_rows": options.audit_rows, "audit_tail": options.audit_tail,
                    "audit_segment_bytes": options.audit_segment_bytes},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "mosquitto": _mosquitto_version(),
                    "workdir_filesystem": report.workdir_fs},
        "scenarios": {**{name: SCENARIOS[name].description for name in options.scenarios},
                      **{name: MEASUREMENTS[name] for name in options.measurements}},
        "results": [
            {
                "scenario": s.scenario,
                "qos": s.qos,
                "load": s.load,
                "msg_per_s": s.msg_per_s,
                "ratio_to_mosquitto": s.ratio_to_mosquitto,
                "ratio_to_stock_mosquitto": s.ratio_to_stock_mosquitto,
                "delivered_per_s": s.delivered_per_s,
                "cloud_msg_per_s": s.cloud_msg_per_s,
                "cloud_ratio_to_mosquitto": s.cloud_ratio_to_mosquitto,
                "latency_ms": {
                    where: {stat: s.latency_ms(where, stat) for stat in ("p50", "p99", "max")}
                    for where in ("local", "cloud") if s.latency_ms(where, "p50") is not None
                },
                "proxy_cpu_us_per_msg": s.cpu_us_per_msg("proxy"),
                "log_syncs_per_s": s.log_syncs_per_s,
                "log_bytes_per_msg": s.log_bytes_per_msg,
                "cpu_percent": {role: s.cpu_percent(role) for role in ROLES if s.cpu_percent(role) is not None},
                "peak_rss_kb": {role: s.peak_rss_kb(role) for role in ROLES if s.peak_rss_kb(role) is not None},
                "disk_bytes_per_msg": s.disk_bytes_per_msg,
                "disk_bytes_per_accepted_payload_byte": s.disk_bytes_per_payload_byte,
                "accounted": s.accounted,
                "failed_runs": s.failed,
                "runs": [_run(run) for run in s.runs],
            }
            for s in report.summaries
        ],
        "warmup_runs": [_run(run) for run in report.warmup],
        "processes": _processes_json(report),
        "replay": None if report.replay is None else report.replay.to_json(),
        "audit_sql": None if report.audit_sql is None else report.audit_sql.to_json(),
        "targets": {target.key: target.to_json() for target in evaluate(report)},
    }


def write_chart(report: BenchReport, path: Path) -> bool:
    """A bar chart of each scenario's ratio to bare mosquitto per QoS and load (local and cloud).
    False when matplotlib is not installed (`pip install 'mqtt-governance-appliance[bench]'`)."""
    try:
        # Optional (the bench extra); it ships its own types when installed.
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    groups = [g for g in dict.fromkeys((s.qos, s.load) for s in report.summaries) if "/s" not in g[1]]
    scenarios = list(report.options.scenarios)
    series: list[tuple[str, list[float]]] = []
    for name in scenarios:
        by_group = {(s.qos, s.load): s for s in report.summaries if s.scenario == name}
        series.append((name, [by_group[g].ratio_to_mosquitto or 0.0 if g in by_group else 0.0 for g in groups]))
        if any(by_group[g].cloud_ratio_to_mosquitto for g in groups if g in by_group):
            series.append((f"{name} → cloud",
                           [by_group[g].cloud_ratio_to_mosquitto or 0.0 if g in by_group else 0.0 for g in groups]))
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for index, (label, values) in enumerate(series):
        axes.bar([g + index * width for g in range(len(groups))], values, width, label=label)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    axes.set_xticklabels([f"QoS {qos}\n{load}" for qos, load in groups])
    axes.set_ylabel("throughput × bare mosquitto (same round)")
    axes.set_title(f"appliance bench: median of {report.options.runs} run(s)")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
