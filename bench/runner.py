"""Runs every scenario under every load, round after round, and summarises the rounds.

All scenarios run side by side for the whole benchmark (an idle broker costs nothing), and each
round measures every scenario once under each load, alternating which scenario goes first. Ratios
are taken within a round, then the median over rounds is reported: the machine's drift between
rounds cancels out. Round 0 is the warm-up and is discarded.

The measurements that need no broker (issue #13's replay rate and `audit sql` GROUP BY time) run
after the scenarios are stopped, in a work directory of their own (`MEASUREMENTS`).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.audit_sql import AuditSqlFigures
from bench.children import ProcessWatch
from bench.load import LOAD_KINDS, Load, RunResult, run_once
from bench.procfs import filesystem_type
from bench.replay_rate import ReplayFigures
from bench.scenarios import REFERENCE, SCENARIOS, STOCK_REFERENCE, Scenario, Target
from bench.status import helper_stats

# Measurements without a broker: `replay --against` over a generated recording, and `appliance
# audit sql` GROUP BY queries over generated Parquet verdicts (bench/replay_rate.py, bench/audit_sql.py).
REPLAY, AUDIT_SQL = "replay", "audit-sql"
MEASUREMENTS = {
    REPLAY: "no broker: `replay --from RECORDING --against schemas/v1` over a generated recording of the demo traffic",
    AUDIT_SQL: "no broker: `appliance audit sql` GROUP BY queries, each in its own process, over generated verdicts "
               "laid out as a running appliance's audit log (Parquet files per segment + the active segment's records)",
}


@dataclass(frozen=True)
class BenchOptions:
    messages: int = 50_000
    runs: int = 3
    warmup: bool = True
    qos: Sequence[int] = (0, 1)
    scenarios: Sequence[str] = (REFERENCE, "proxy")
    loads_: Sequence[str] = LOAD_KINDS
    rate: float = 1000.0
    duration: float = 5.0
    # QoS levels of the fixed-rate load (None: the same as `qos`)
    rate_qos: Sequence[int] | None = None
    workdir: Path | None = None
    # Measurements without a broker (MEASUREMENTS) and their sizes: issue #13's by default
    measurements: Sequence[str] = ()
    replay_messages: int = 1_000_000
    audit_rows: int = 10_000_000
    audit_tail: int | None = None  # of them, records left in the log (None: half a segment)
    audit_segment_bytes: int = 16 << 20  # the segment size the audit-sql layout models

    def loads(self) -> list[Load]:
        loads = []
        for kind in self.loads_:
            for qos in (self.rate_qos or self.qos) if kind == "rate" else self.qos:
                if kind == "rate":
                    loads.append(Load(kind=kind, qos=qos, rate=self.rate, duration=self.duration))
                else:
                    loads.append(Load(kind=kind, qos=qos, messages=self.messages))
        return loads


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Summary:
    """One scenario under one load: medians over the counted (non warm-up) runs that passed."""

    scenario: str
    qos: int
    load: str
    runs: list[RunResult]
    ratios: list[float] = field(default_factory=list)
    # Against mosquitto with the distribution's defaults, when that scenario ran in the same rounds.
    stock_ratios: list[float] = field(default_factory=list)
    # Cloud subscriber's rate against bare mosquitto's local rate, same round.
    cloud_ratios: list[float] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for run in self.runs if not run.ok)

    @property
    def msg_per_s(self) -> float | None:
        return _median([run.msg_per_s for run in self.runs])

    @property
    def ratio_to_mosquitto(self) -> float | None:
        return _median(list(self.ratios))

    @property
    def ratio_to_stock_mosquitto(self) -> float | None:
        return _median(list(self.stock_ratios))

    @property
    def delivered_per_s(self) -> float | None:
        return _median([run.delivered_per_s for run in self.runs])

    @property
    def cloud_msg_per_s(self) -> float | None:
        return _median([run.cloud_msg_per_s for run in self.runs])

    @property
    def cloud_ratio_to_mosquitto(self) -> float | None:
        return _median(list(self.cloud_ratios))

    def latency_ms(self, where: str, stat: str) -> float | None:
        """Median over runs of one latency figure (p50, p99, max) at the local or cloud subscriber."""
        return _median([run.latency_ms[where][stat] for run in self.runs
                        if run.ok and run.latency_ms and where in run.latency_ms])

    @property
    def log_syncs_per_s(self) -> float | None:
        return _median([run.log_syncs_per_s for run in self.runs])

    @property
    def log_bytes_per_msg(self) -> float | None:
        return _median([run.log_bytes_per_msg for run in self.runs])

    @property
    def disk_bytes_per_msg(self) -> float | None:
        return _median([run.disk_bytes_per_msg for run in self.runs])

    @property
    def disk_bytes_per_payload_byte(self) -> float | None:
        return _median([run.disk_bytes_per_payload_byte for run in self.runs])

    @property
    def accounted(self) -> bool:
        """Every message of every run accounted for (the run passed its verification)."""
        return bool(self.runs) and all(run.ok for run in self.runs)

    def cpu_percent(self, role: str) -> float | None:
        return _median([run.cpu_percent(role) for run in self.runs])

    def cpu_us_per_msg(self, role: str) -> float | None:
        return _median([run.cpu_us_per_msg(role) for run in self.runs])

    def peak_rss_kb(self, role: str) -> int | None:
        values = [run.peak_rss_kb[role] for run in self.runs if run.peak_rss_kb and role in run.peak_rss_kb]
        return max(values) if values else None


@dataclass
class BenchReport:
    options: BenchOptions
    summaries: list[Summary]
    warmup: list[RunResult]
    workdir_fs: str = "unknown"
    # Every process the appliances started (mosquitto aside), polled over the whole benchmark
    processes: ProcessWatch | None = None
    # Each appliance's own record of its helper processes at the end (status → audit.helpers)
    helper_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    replay: ReplayFigures | None = None
    audit_sql: AuditSqlFigures | None = None

    @property
    def failed(self) -> int:
        """Runs that failed, a measurement without a broker that failed counting as one."""
        failed = sum(summary.failed for summary in self.summaries)
        failed += int(self.replay is not None and self.replay.error is not None)
        failed += sum(1 for q in self.audit_sql.queries if q.error is not None) if self.audit_sql is not None else 0
        return failed


Progress = Callable[[RunResult], None]
Note = Callable[[str], None]


def run_benchmark(options: BenchOptions, *, progress: Progress | None = None, note: Note | None = None) -> BenchReport:
    unknown = [name for name in options.scenarios if name not in SCENARIOS]
    unknown += [name for name in options.measurements if name not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join([*SCENARIOS, *MEASUREMENTS])}")
    if options.scenarios:
        report = _run_scenarios(options, progress)
    else:  # only measurements without a broker
        report = _summarise(options, [], [])
        report.workdir_fs = filesystem_type(options.workdir or Path(tempfile.gettempdir()))
    if options.measurements:
        report.replay, report.audit_sql = run_measurements(options, note=note)
    return report


def _run_scenarios(options: BenchOptions, progress: Progress | None) -> BenchReport:
    scenarios: list[Scenario] = [SCENARIOS[name] for name in options.scenarios]
    loads = options.loads()
    first_round = 0 if options.warmup else 1
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="appliance-bench-", dir=options.workdir) as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir_fs = filesystem_type(workdir)
        targets: dict[str, Target] = {s.name: stack.enter_context(s.start(workdir)) for s in scenarios}
        # Started once every scenario is up: no process is spawned with preexec_fn while it runs.
        watch = ProcessWatch({name: t.pids["proxy"] for name, t in targets.items() if "proxy" in t.pids}).start()
        try:
            for round_ in range(first_round, options.runs + 1):
                for load in loads:
                    order = scenarios if round_ % 2 else scenarios[::-1]
                    for scenario in order:
                        start = watch.now()
                        result = run_once(targets[scenario.name], load, scenario=scenario.name, round=round_,
                                          workdir=workdir)
                        result.helper_processes = [
                            {"name": p.name, "pid": p.pid, "peak_rss_kb": p.peak_rss_kb}
                            for p in watch.seen_between(scenario.name, start, watch.now())
                        ] if "proxy" in targets[scenario.name].pids else None
                        results.append(result)
                        if progress is not None:
                            progress(result)
        finally:
            watch.stop()
        helpers = {name: stats for name, target in targets.items()
                   if (stats := helper_stats(target.state_dir)) is not None}
        for name, stats in helpers.items():
            watch.merge_reported(name, stats)
    report = _summarise(options, loads, results)
    report.workdir_fs = workdir_fs
    report.processes = watch
    report.helper_stats = helpers
    return report


def run_measurements(options: BenchOptions, *,
                     note: Note | None = None) -> tuple[ReplayFigures | None, AuditSqlFigures | None]:
    """The measurements without a broker that `options` asks for, each over data generated first
    (the generation is timed and reported too)."""
    from bench import audit_sql, replay_rate

    say = note or (lambda text: None)
    replay: ReplayFigures | None = None
    audit: AuditSqlFigures | None = None
    with tempfile.TemporaryDirectory(prefix="appliance-bench-data-", dir=options.workdir) as tmp:
        if REPLAY in options.measurements:
            say(f"replay: generating a recording of {options.replay_messages:,} messages, then "
                f"{options.runs} run(s) of `replay --against schemas/v1`")
            replay = replay_rate.measure(Path(tmp), options.replay_messages, runs=options.runs)
            say(f"replay: FAILED: {replay.error}" if replay.error is not None
                else f"replay: {replay.msg_per_s or 0:,.0f} msg/s")
        if AUDIT_SQL in options.measurements:
            say(f"audit-sql: generating {options.audit_rows:,} verdicts as Parquet, then {options.runs} run(s) "
                f"of each of {len(audit_sql.QUERIES)} `appliance audit sql` GROUP BY queries")
            audit = audit_sql.measure(Path(tmp), options.audit_rows, tail=options.audit_tail,
                                      segment_bytes=options.audit_segment_bytes, runs=options.runs)
            for query in audit.queries:
                outcome = f"{query.median('command_s') or 0:.3f} s" if query.error is None else f"FAILED: {query.error}"
                say(f"audit-sql: {query.name}: {outcome}")
    return replay, audit


def _summarise(options: BenchOptions, loads: list[Load], results: list[RunResult]) -> BenchReport:
    counted = [r for r in results if r.round > 0]
    summaries: list[Summary] = []
    def same_round_ratios(runs: list[RunResult], reference_name: str, load: Load, cloud: bool = False) -> list[float]:
        reference = {r.round: r for r in counted if r.scenario == reference_name and r.qos == load.qos and r.load == load.name}
        return [
            rate / ref.msg_per_s
            for run in runs
            if (ref := reference.get(run.round)) is not None and ref.msg_per_s
            and (rate := run.cloud_msg_per_s if cloud else run.msg_per_s)
        ]

    for load in loads:
        for name in options.scenarios:
            runs = [r for r in counted if r.scenario == name and r.qos == load.qos and r.load == load.name]
            summaries.append(Summary(
                scenario=name, qos=load.qos, load=load.name, runs=runs,
                ratios=same_round_ratios(runs, REFERENCE, load),
                stock_ratios=same_round_ratios(runs, STOCK_REFERENCE, load),
                cloud_ratios=same_round_ratios(runs, REFERENCE, load, cloud=True),
            ))
    return BenchReport(options=options, summaries=summaries, warmup=[r for r in results if r.round == 0])
