"""Running a replay: work from a source, judged in worker processes, tallies merged.

Work is either a *unit* (a row range of a Parquet file: a worker opens and reads it itself, so the
parent sends a few hundred bytes per unit and the reading is spread over every core) or a batch of
rows the parent read (NDJSON, an audit .duckdb file, a log tail: anything that cannot be split).
`--jobs N` judges in N processes: N - 1 workers and the parent, which judges what the workers have
no room for. Each worker loads the target (and baseline) set once, judges whole units or batches
and returns a `Tally` (counts, reasons and a few samples), never per-message objects. At most two
pieces per worker are in flight: memory stays bounded however long the recording is. Tallies merge
in any order to the same result, so the report does not depend on `--jobs`. A small recording is
judged in-process (no pool start-up).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from replay.judge import Judge, load_for_replay
from replay.sources import Work, unit_connection
from replay.tally import Tally

BATCH_SIZE = 5_000
# Units per worker: enough that the last ones end close together (the slowest worker sets the
# time), few enough that starting a unit's query stays negligible.
PIECES_PER_JOB = 16
# Below this many messages a pool costs more than it saves: starting a worker (imports, loading the
# sets) takes 0.3-0.4 s of CPU, in which one process judges about 40,000 messages.
IN_PROCESS_ROWS = 50_000

_worker_judge: Judge | None = None


def _init_worker(target: Path, baseline: Path | None) -> None:
    global _worker_judge
    _worker_judge = Judge(load_for_replay(target), load_for_replay(baseline) if baseline else None)
    unit_connection(threads=1)  # the other workers have the other cores


def _judge(judge: Judge, item: int, work: Work, tally: Tally, between: Callable[[], object] | None = None) -> None:
    """Judge one piece; `between()` is called after each batch of it."""
    if isinstance(work, list):
        judge.judge(work, tally, item)
        return
    start = 0
    for batch in work.batches(BATCH_SIZE):
        judge.judge(batch, tally, item, start)
        start += len(batch)
        if between is not None:
            between()


def _judge_in_worker(item: int, work: Work) -> Tally:
    assert _worker_judge is not None
    tally = Tally()
    _judge(_worker_judge, item, work, tally)
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


def pieces(jobs: int) -> int:
    """How many units to ask a source for."""
    return jobs * PIECES_PER_JOB if jobs > 1 else 1


def _size(work: Work) -> int:
    return len(work) if isinstance(work, list) else work.rows


def run(
    work: Iterable[Work],
    *,
    target: Path,
    baseline: Path | None,
    jobs: int,
    progress: Callable[[int], None] | None = None,
    in_process_below: int = IN_PROCESS_ROWS,
) -> tuple[Tally, RunStats]:
    """Judge every piece of `work` (in recording order); `progress(n)` as n more messages are done.
    Fewer than `in_process_below` messages are judged in this process alone."""
    started = time.perf_counter()
    tally = Tally()
    rest = iter(work)
    if jobs == 1:
        return _run_here(rest, tally, target, baseline, progress, started)
    head: list[Work] = []
    rows = 0
    for piece in rest:
        head.append(piece)
        rows += _size(piece)
        if rows >= in_process_below:
            return _run_pool(_chain(head, rest), tally, target, baseline, jobs, progress, started)
    return _run_here(iter(head), tally, target, baseline, progress, started)


def _run_here(work: Iterator[Work], tally: Tally, target: Path, baseline: Path | None,
              progress: Callable[[int], None] | None, started: float) -> tuple[Tally, RunStats]:
    first = next(work, None)
    if first is None:
        return tally, RunStats(0, time.perf_counter() - started, 0)
    work = _chain([first], work)
    judge = Judge(load_for_replay(target), load_for_replay(baseline) if baseline else None)
    for item, piece in enumerate(work):
        before = tally.replayed if progress else 0
        _judge(judge, item, piece, tally)
        if progress:
            progress(tally.replayed - before)
    return tally, RunStats(tally.replayed, time.perf_counter() - started, 1)


def _run_pool(work: Iterator[Work], tally: Tally, target: Path, baseline: Path | None, jobs: int,
              progress: Callable[[int], None] | None, started: float) -> tuple[Tally, RunStats]:
    """`jobs - 1` worker processes, and this one: it judges whatever the workers have no room for,
    starting at once, while the workers still start (0.3-0.4 s of CPU each: imports, loading the
    sets). A pool of `jobs` workers would leave this process idle but for merging. Between two
    batches of its own, it hands the workers more, so they never wait for it to finish a piece."""
    judge = Judge(load_for_replay(target), load_for_replay(baseline) if baseline else None)
    unit_connection(threads=1)
    workers = jobs - 1
    pieces = enumerate(work)
    pending: set[Future[Tally]] = set()
    context = multiprocessing.get_context("spawn")  # the parent may run DuckDB threads: never fork
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(target, baseline)) as pool:

        def hand_out() -> bool:
            """Collect what is done and fill the workers' queues (one running, one waiting each);
            False once there is nothing left to hand out."""
            _collect(pending, tally, progress, timeout=0)
            while len(pending) < 2 * workers:
                piece = next(pieces, None)
                if piece is None:
                    return False
                pending.add(pool.submit(_judge_in_worker, *piece))
            return True

        while hand_out():
            piece = next(pieces, None)
            if piece is None:
                break
            before = tally.replayed
            _judge(judge, piece[0], piece[1], tally, between=hand_out)
            if progress:
                progress(tally.replayed - before)
        while pending:
            _collect(pending, tally, progress)
    return tally, RunStats(tally.replayed, time.perf_counter() - started, jobs)


def _chain(head: list[Work], rest: Iterator[Work]) -> Iterator[Work]:
    yield from head
    yield from rest


def _collect(pending: set[Future[Tally]], tally: Tally, progress: Callable[[int], None] | None,
             timeout: float | None = None) -> None:
    if not pending:
        return
    done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
    for future in done:
        pending.discard(future)
        result = future.result()
        tally.merge(result)
        if progress:
            progress(result.replayed)
