"""Running a replay: batches from a source, judged in worker processes, tallies merged.

Each worker loads the target (and baseline) set once, judges whole batches and returns a `Tally`
(counts, reasons and a few samples), never per-message objects, so the parent only reads rows and
merges small results. At most `2 × jobs` batches are in flight: memory stays bounded however long
the recording is. A recording that fits in one batch is judged in-process (no pool start-up).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from replay.judge import Judge, load_for_replay
from replay.rows import Row
from replay.tally import Tally

BATCH_SIZE = 5_000

_worker_judge: Judge | None = None


def _init_worker(target: Path, baseline: Path | None) -> None:
    global _worker_judge
    _worker_judge = Judge(load_for_replay(target), load_for_replay(baseline) if baseline else None)


def _judge_batch(batch: list[Row]) -> Tally:
    assert _worker_judge is not None
    tally = Tally()
    _worker_judge.judge(batch, tally)
    return tally


@dataclass(frozen=True, slots=True)
class RunStats:
    messages: int
    seconds: float
    workers: int

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"messages": self.messages, "seconds": round(self.seconds, 3),
                "messages_per_second": round(self.per_second), "workers": self.workers}


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(
    batches: Iterator[list[Row]],
    *,
    target: Path,
    baseline: Path | None,
    jobs: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tally, RunStats]:
    """Judge every batch; `progress(n)` is called as n more messages are done."""
    started = time.perf_counter()
    tally = Tally()
    first = next(batches, None)
    if first is None:
        return tally, RunStats(0, time.perf_counter() - started, 0)
    second = next(batches, None) if jobs > 1 else None
    if second is None:
        judge = Judge(load_for_replay(target), load_for_replay(baseline) if baseline else None)
        for batch in _chain(first, None, batches):
            judge.judge(batch, tally)
            if progress:
                progress(len(batch))
        return tally, RunStats(tally.replayed, time.perf_counter() - started, 1)
    context = multiprocessing.get_context("spawn")  # the parent may run DuckDB threads: never fork
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(target, baseline)) as pool:
        pending: dict[Future[Tally], int] = {}
        for batch in _chain(first, second, batches):
            while len(pending) >= 2 * jobs:
                _collect(pending, tally, progress)
            pending[pool.submit(_judge_batch, batch)] = len(batch)
        while pending:
            _collect(pending, tally, progress)
    return tally, RunStats(tally.replayed, time.perf_counter() - started, jobs)


def _chain(first: list[Row], second: list[Row] | None, rest: Iterator[list[Row]]) -> Iterator[list[Row]]:
    yield first
    if second is not None:
        yield second
    yield from rest


def _collect(pending: dict[Future[Tally], int], tally: Tally, progress: Callable[[int], None] | None) -> None:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        size = pending.pop(future)
        tally.merge(future.result())
        if progress:
            progress(size)
