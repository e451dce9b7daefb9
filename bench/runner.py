"""Runs every scenario under every load, round after round, and summarises the rounds.

All scenarios run side by side for the whole benchmark (an idle broker costs nothing), and each
round measures every scenario once under each load, alternating which scenario goes first. Ratios
are taken within a round, then the median over rounds is reported: the machine's drift between
rounds cancels out. Round 0 is the warm-up and is discarded.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.children import ProcessWatch
from bench.load import LOAD_KINDS, Load, RunResult, run_once
from bench.procfs import filesystem_type
from bench.scenarios import REFERENCE, SCENARIOS, STOCK_REFERENCE, Scenario, Target
from bench.status import helper_stats


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

    @property
    def failed(self) -> int:
        return sum(summary.failed for summary in self.summaries)


Progress = Callable[[RunResult], None]


def run_benchmark(options: BenchOptions, *, progress: Progress | None = None) -> BenchReport:
    unknown = [name for name in options.scenarios if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
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
