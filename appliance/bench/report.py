"""The benchmark's two outputs: a table per QoS for people, a JSON document for machines."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from typing import Any

from appliance.bench.load import PAYLOAD_BYTES
from appliance.bench.runner import BenchReport, Summary

COLUMNS = ("scenario", "msg/s", "× mosquitto", "× stock", "proxy CPU µs/msg", "proxy CPU %", "mosquitto CPU %",
           "peak RSS proxy", "peak RSS mosquitto")


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _megabytes(kb: int | None) -> str:
    return "–" if kb is None else f"{kb / 1024:.1f} MB"


def _row(summary: Summary) -> list[str]:
    rate = _number(summary.msg_per_s)
    if summary.failed:
        rate += f" ({summary.failed}/{len(summary.runs)} runs FAILED)"
    return [
        summary.scenario,
        rate,
        _number(summary.ratio_to_mosquitto, 2),
        _number(summary.ratio_to_stock_mosquitto, 2),
        _number(summary.cpu_us_per_msg("proxy"), 1),
        _number(summary.cpu_percent("proxy")),
        _number(summary.cpu_percent("mosquitto")),
        _megabytes(summary.peak_rss_kb("proxy")),
        _megabytes(summary.peak_rss_kb("mosquitto")),
    ]


def render_tables(report: BenchReport) -> str:
    options = report.options
    blocks: list[str] = []
    for qos in options.qos:
        summaries = [s for s in report.summaries if s.qos == qos]
        for load in dict.fromkeys(s.load for s in summaries):
            rows = [list(COLUMNS)] + [_row(s) for s in summaries if s.load == load]
            widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
            lines = [
                (f"QoS {qos}, {load}, {options.messages:,} × {PAYLOAD_BYTES} B, "
                 f"median of {options.runs} run{'s' if options.runs != 1 else ''}")
            ]
            for index, row in enumerate(rows):
                cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
                lines.append("  ".join(cells).rstrip())
                if index == 0:
                    lines.append("  ".join("-" * width for width in widths))
            blocks.append("\n".join(lines))
    failures = [run for s in report.summaries for run in s.runs if not run.ok]
    if failures:
        blocks.append("\n".join(["Failed runs:"] + [
            f"  {run.scenario} QoS {run.qos} {run.load} run {run.round}: {run.error}" for run in failures
        ]))
    return "\n\n".join(blocks)


def _mosquitto_version() -> str | None:
    try:
        out = subprocess.run(["mosquitto_sub", "--help"], check=False, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "version" in line:
            return line.strip()
    return None


def to_json(report: BenchReport) -> dict[str, Any]:
    options = report.options
    return {
        "options": {"messages": options.messages, "runs": options.runs, "warmup": options.warmup,
                    "qos": list(options.qos), "scenarios": list(options.scenarios),
                    "payload_bytes": PAYLOAD_BYTES},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "mosquitto": _mosquitto_version()},
        "results": [
            {
                "scenario": s.scenario,
                "qos": s.qos,
                "load": s.load,
                "msg_per_s": s.msg_per_s,
                "ratio_to_mosquitto": s.ratio_to_mosquitto,
                "ratio_to_stock_mosquitto": s.ratio_to_stock_mosquitto,
                "proxy_cpu_us_per_msg": s.cpu_us_per_msg("proxy"),
                "proxy_cpu_percent": s.cpu_percent("proxy"),
                "mosquitto_cpu_percent": s.cpu_percent("mosquitto"),
                "peak_rss_kb": {role: s.peak_rss_kb(role) for role in ("proxy", "mosquitto")
                                if s.peak_rss_kb(role) is not None},
                "failed_runs": s.failed,
                "runs": [dataclasses.asdict(run) for run in s.runs],
            }
            for s in report.summaries
        ],
        "warmup_runs": [dataclasses.asdict(run) for run in report.warmup],
    }
