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

from appliance.bench.load import Load, RunResult, run_once, write_payloads
from appliance.bench.scenarios import REFERENCE, SCENARIOS, STOCK_REFERENCE, Scenario, Target


@dataclass(frozen=True)
class BenchOptions:
    messages: int = 50_000
    runs: int = 3
    warmup: bool = True
    qos: Sequence[int] = (0, 1)
    scenarios: Sequence[str] = (REFERENCE, "proxy")

    def loads(self) -> list[Load]:
        return [Load(name="1 publisher", qos=qos, messages=self.messages) for qos in self.qos]


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
    with tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        payloads = workdir / "payloads.txt"
        expected = write_payloads(payloads, options.messages)
        targets: dict[str, Target] = {s.name: stack.enter_context(s.start(workdir)) for s in scenarios}
        for round_ in range(first_round, options.runs + 1):
            for load in loads:
                order = scenarios if round_ % 2 else scenarios[::-1]
                for scenario in order:
                    result = run_once(targets[scenario.name], load, scenario=scenario.name, round=round_,
                                      workdir=workdir, payloads=payloads, expected=expected)
                    results.append(result)
                    if progress is not None:
                        progress(result)
    return _summarise(options, loads, results)


def _summarise(options: BenchOptions, loads: list[Load], results: list[RunResult]) -> BenchReport:
    counted = [r for r in results if r.round > 0]
    summaries: list[Summary] = []
    def same_round_ratios(runs: list[RunResult], reference_name: str, load: Load) -> list[float]:
        reference = {r.round: r for r in counted if r.scenario == reference_name and r.qos == load.qos and r.load == load.name}
        return [
            run.msg_per_s / ref.msg_per_s
            for run in runs
            if (ref := reference.get(run.round)) is not None and run.msg_per_s and ref.msg_per_s
        ]

    for load in loads:
        for name in options.scenarios:
            runs = [r for r in counted if r.scenario == name and r.qos == load.qos and r.load == load.name]
            summaries.append(Summary(
                scenario=name, qos=load.qos, load=load.name, runs=runs,
                ratios=same_round_ratios(runs, REFERENCE, load),
                stock_ratios=same_round_ratios(runs, STOCK_REFERENCE, load),
            ))
    return BenchReport(options=options, summaries=summaries, warmup=[r for r in results if r.round == 0])
