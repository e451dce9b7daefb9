"""Issue #13's targets for the full governance path, checked against one benchmark's figures.

Each target has one or more checks (QoS 0 and 1, each load it names); a check is met, missed, or
not measured (its scenario or load was not run, or every run of it failed). A target is met when
every check is, missed when one is missed, and not measured otherwise. Figures are the medians the
tables show (peak RSS: the maximum over the whole benchmark). The replay and `audit sql` targets
are judged at the sizes that ran (`--replay-messages`, `--audit-rows`; the issue's by default),
which their checks name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.audit_sql import AuditSqlFigures, QueryTiming
from bench.children import memory_target
from bench.load import SENSORS
from bench.replay_rate import ReplayFigures
from bench.runner import AUDIT_SQL, REPLAY, BenchReport, Summary

GOVERNANCE = "governance"
BRIDGE = "bridge"
REFERENCE = "mosquitto"

CPU_US_PER_MSG = 150.0
DISK_BYTES_PER_PAYLOAD_BYTE = 4.0
ADDED_P99_MS = 2.0
CLOUD_P99_MS = 50.0
PEAK_RSS_MB = 80.0
REPLAY_MSG_PER_S = 100_000.0
AUDIT_SQL_S = 0.5
FLAT_OUT = ("1 publisher", f"{SENSORS} sensors")


@dataclass(frozen=True)
class Check:
    case: str  # "QoS 0, 100 sensors 1k/s"
    measured: float | None
    limit: float | None  # what `measured` is compared with (≤ or ≥, as the target says)
    met: bool | None
    detail: str = ""


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    unit: str
    at_most: bool  # measured ≤ limit (else ≥)
    checks: list[Check] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        if any(check.met is False for check in self.checks):
            return False
        if self.checks and all(check.met for check in self.checks):
            return True
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description, "unit": self.unit, "comparison": "<=" if self.at_most else ">=",
            "met": self.met,
            "checks": [{"case": c.case, "measured": c.measured, "limit": c.limit, "met": c.met,
                        **({"detail": c.detail} if c.detail else {})} for c in self.checks],
        }


def _compare(measured: float | None, limit: float | None, at_most: bool) -> bool | None:
    if measured is None or limit is None:
        return None
    return measured <= limit if at_most else measured >= limit


class _Figures:
    def __init__(self, report: BenchReport):
        self._by_key = {(s.scenario, s.qos, s.load): s for s in report.summaries}
        self.rate_loads = sorted({s.load for s in report.summaries if s.load.endswith("/s")})

    def get(self, scenario: str, qos: int, load: str) -> Summary | None:
        summary = self._by_key.get((scenario, qos, load))
        return summary if summary is not None and any(run.ok for run in summary.runs) else None

    def value(self, scenario: str, qos: int, load: str, figure: Callable[[Summary], float | None]) -> float | None:
        summary = self.get(scenario, qos, load)
        return None if summary is None else figure(summary)


def _per_case(figures: _Figures, loads: list[str], figure: Callable[[Summary], float | None],
              limit: Callable[[int, str], float | None] | float, at_most: bool,
              detail: Callable[[Summary], str] | None = None) -> list[Check]:
    checks = []
    for load in loads:
        for qos in (0, 1):
            measured = figures.value(GOVERNANCE, qos, load, figure)
            bound = limit(qos, load) if callable(limit) else limit
            summary = figures.get(GOVERNANCE, qos, load)
            note = detail(summary) if detail is not None and summary is not None else ""
            checks.append(Check(f"QoS {qos}, {load}", measured, bound, _compare(measured, bound, at_most), note))
    return checks


def _helpers_during(summary: Summary) -> str:
    """Which runs had a helper (a seal to Parquet...) running: its writes and CPU are in that run's figures."""
    runs = [run for run in summary.runs if run.ok]
    names = sorted({str(p["name"]) for run in runs for p in run.helper_processes or []})
    during = sum(1 for run in runs if run.helper_processes)
    if not during:
        return ""
    return f"{', '.join(names)} ran during {during} of {len(runs)} run(s)"


def evaluate(report: BenchReport) -> list[Target]:
    figures = _Figures(report)
    rate = figures.rate_loads  # normally one: "100 sensors 1k/s"

    def reference_p99_plus(qos: int, load: str) -> float | None:
        p99 = figures.value(REFERENCE, qos, load, lambda s: s.latency_ms("local", "p99"))
        return None if p99 is None else p99 + ADDED_P99_MS

    def bridge(figure: Callable[[Summary], float | None]) -> Callable[[int, str], float | None]:
        return lambda qos, load: figures.value(BRIDGE, qos, load, figure)

    targets = [
        Target("cpu_us_per_msg", f"appliance CPU ≤ {CPU_US_PER_MSG:g} µs per message at the fixed rate",
               "µs/msg", True,
               _per_case(figures, rate, lambda s: s.cpu_us_per_msg("proxy"), CPU_US_PER_MSG, True, _helpers_during)),
        Target("disk_bytes_per_payload_byte_rate",
               f"≤ {DISK_BYTES_PER_PAYLOAD_BYTE:g} bytes written per accepted payload byte at the fixed rate",
               "B/B", True,
               _per_case(figures, rate, lambda s: s.disk_bytes_per_payload_byte, DISK_BYTES_PER_PAYLOAD_BYTE, True,
                         _helpers_during)),
        Target("disk_bytes_per_payload_byte_flat_out",
               f"≤ {DISK_BYTES_PER_PAYLOAD_BYTE:g} bytes written per accepted payload byte flat out", "B/B", True,
               _per_case(figures, list(FLAT_OUT), lambda s: s.disk_bytes_per_payload_byte,
                         DISK_BYTES_PER_PAYLOAD_BYTE, True, _helpers_during)),
        Target("local_p99_ms", f"local p99 ≤ mosquitto's p99 + {ADDED_P99_MS:g} ms at the fixed rate", "ms", True,
               _per_case(figures, rate, lambda s: s.latency_ms("local", "p99"), reference_p99_plus, True,
                         _helpers_during)),
        Target("cloud_p99_ms", f"cloud p99 ≤ {CLOUD_P99_MS:g} ms at the fixed rate", "ms", True,
               _per_case(figures, rate, lambda s: s.latency_ms("cloud", "p99"), CLOUD_P99_MS, True, _helpers_during)),
        Target("local_ratio_vs_bridge", "flat out, local subscriber: × mosquitto ≥ the bridge's", "×", False,
               _per_case(figures, list(FLAT_OUT), lambda s: s.ratio_to_mosquitto,
                         bridge(lambda s: s.ratio_to_mosquitto), False)),
        Target("cloud_ratio_vs_bridge", "flat out, cloud subscriber: × mosquitto ≥ the bridge's", "×", False,
               _per_case(figures, list(FLAT_OUT), lambda s: s.cloud_ratio_to_mosquitto,
                         bridge(lambda s: s.cloud_ratio_to_mosquitto), False)),
        _peak_rss(report),
        replay_target(report.replay, report.options.replay_messages),
        audit_sql_target(report.audit_sql, report.options.audit_rows),
    ]
    return targets


def replay_target(figures: ReplayFigures | None, messages: int) -> Target:
    """`replay --against` over the recording: msg/s as `replay --stats` gives it (the judging's wall
    time), the whole command's rate beside it."""
    target = Target("replay_msg_per_s", f"`replay --against` over a recording ≥ {REPLAY_MSG_PER_S:,.0f} msg/s",
                    "msg/s", False)
    case = f"{(figures.messages if figures else messages):,} messages"
    if figures is None:
        target.checks.append(Check(case, None, REPLAY_MSG_PER_S, None, f"not run (--scenario {REPLAY})"))
        return target
    measured = figures.msg_per_s
    if figures.error is not None:
        detail = f"FAILED: {figures.error}"
    else:
        detail = (f"{figures.files} Parquet files; the whole command (process start to report) "
                  f"{figures.command_msg_per_s or 0:,.0f} msg/s; {figures.runs[0]['workers']} worker(s)")
    target.checks.append(Check(case, measured, REPLAY_MSG_PER_S, _compare(measured, REPLAY_MSG_PER_S, False), detail))
    return target


def audit_sql_target(figures: AuditSqlFigures | None, rows: int) -> Target:
    """Each GROUP BY query: the `appliance audit sql` command's wall time from its arguments to its
    printed result, in a process of its own; the process start (interpreter, imports) beside it."""
    target = Target("audit_sql_group_by_s",
                    f"`appliance audit sql` GROUP BY over recorded verdicts ≤ {AUDIT_SQL_S:g} s "
                    "(the command, in its own process; process start beside it)", "s", True)
    if figures is None:
        target.checks.append(Check(f"{rows:,} verdicts", None, AUDIT_SQL_S, None, f"not run (--scenario {AUDIT_SQL})"))
        return target
    for query in figures.queries:
        measured = query.median("command_s") if query.error is None else None
        data = figures.data
        where = f"{data.files} file{'s' if data.files != 1 else ''} + {data.tail:,} in the log"
        target.checks.append(Check(f"{query.name}, {data.rows:,} verdicts ({where})",
                                   measured, AUDIT_SQL_S, _compare(measured, AUDIT_SQL_S, True), _start(query)))
    return target


def _start(query: QueryTiming) -> str:
    if query.error is not None:
        return f"FAILED: {query.error}"
    process, start, imports = query.median("process_s"), query.median("start_s"), query.median("imports_s")
    if process is None or start is None or imports is None:
        return ""
    return f"whole process {process:.3f} s, of which process start {start:.3f} s (imports {imports:.3f} s)"


def _peak_rss(report: BenchReport) -> Target:
    target = Target("peak_rss_mb", f"appliance peak RSS ≤ {PEAK_RSS_MB:g} MB over the whole benchmark "
                    "(the service's VmHWM + helpers that stay resident)", "MB", True)
    if report.processes is None or GOVERNANCE not in report.processes.appliances:
        target.checks.append(Check(GOVERNANCE, None, PEAK_RSS_MB, None, "not run"))
        return target
    memory = memory_target(report.processes, GOVERNANCE)
    measured = None if memory.peak_rss_kb is None else memory.peak_rss_kb / 1024
    parts = [f"service {memory.service_peak_rss_kb / 1024:.1f} MB" if memory.service_peak_rss_kb else "service ?"]
    parts += [f"resident {p.name} {p.peak_rss_kb / 1024:.1f} MB" for p in memory.resident]
    if memory.short_lived:
        biggest = max(memory.short_lived, key=lambda p: p.peak_rss_kb)
        parts.append(f"beside it {len(memory.short_lived)} short-lived, largest {biggest.name} "
                     f"{biggest.peak_rss_kb / 1024:.1f} MB for {biggest.lived_s:.1f} s")
    target.checks.append(Check(GOVERNANCE, measured, PEAK_RSS_MB, _compare(measured, PEAK_RSS_MB, True),
                               "; ".join(parts)))
    return target
