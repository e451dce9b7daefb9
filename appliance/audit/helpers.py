"""Short-lived helper processes the service starts for work that needs DuckDB (sealing log segments
into Parquet, retention, the upgrade of an old state directory): DuckDB never loads into the
service's own memory (docs/decisions/0004-message-log.md).

One process of each kind at a time. A request while one runs makes it run once more when it ends
(requests coalesce: a helper always works on everything there is). Each helper prints one JSON line
last (`{"ok": ..., "peak_rss_kb": ...}`, see `report()`): what `status`, the metrics and `appliance
bench` show beside the service's own figures (peak RSS and how long it lived).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from appliance.children import prepare_child

log = logging.getLogger(__name__)

HELPER_MODULE = "appliance.audit.maintain"


@dataclass(frozen=True, slots=True)
class HelperRun:
    task: str
    pid: int
    started: float  # epoch seconds
    seconds: float
    exit_status: int
    peak_rss_kb: int | None
    result: dict[str, Any] = field(default_factory=dict)


def report(result: dict[str, Any]) -> None:
    """What a helper prints last: its result and its own peak RSS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    sys.stdout.write(orjson.dumps({**result, "peak_rss_kb": peak}).decode() + "\n")
    sys.stdout.flush()


class HelperProcesses:
    def __init__(self, args: Sequence[str], *, on_done: Callable[[HelperRun], None] | None = None, keep: int = 50):
        """`args`: arguments every helper gets (e.g. --state-dir DIR), after the task name."""
        self._args = list(args)
        self._on_done = on_done
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._extra: dict[str, list[str]] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self.history: deque[HelperRun] = deque(maxlen=keep)
        self.failures = 0
        self._stopping = False

    def request(self, task: str, *extra: str) -> None:
        """Run helper `task` (event loop only). Coalesces with one that is running or queued."""
        if self._stopping:
            return
        self._extra[task] = list(extra)
        if task in self._running:
            self._again.add(task)
            return
        self._running[task] = asyncio.get_running_loop().create_task(self._run(task), name=f"helper-{task}")

    async def _run(self, task: str) -> None:
        try:
            while True:
                await self._once(task)
                if task not in self._again or self._stopping:
                    return
                self._again.discard(task)
        finally:
            self._running.pop(task, None)

    async def _once(self, task: str) -> HelperRun:
        started, clock = time.time(), time.monotonic()
        argv = [sys.executable, "-m", HELPER_MODULE, task, *self._args, *self._extra.get(task, [])]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            # A helper must not outlive the service (nor hold a lock after a kill -9 of it), and a
            # terminal's Ctrl-C stops the service, which lets running helpers finish.
            preexec_fn=prepare_child,
        )
        self._procs[task] = proc
        try:
            out, err = await proc.communicate()
        finally:
            self._procs.pop(task, None)
        result: dict[str, Any] = {}
        lines = out.decode(errors="replace").strip().splitlines()
        if lines:
            try:
                result = orjson.loads(lines[-1])
            except orjson.JSONDecodeError:
                result = {"output": lines[-1]}
        run = HelperRun(task, proc.pid, started, round(time.monotonic() - clock, 3), proc.returncode or 0,
                        result.pop("peak_rss_kb", None), result)
        self.history.append(run)
        if run.exit_status != 0:
            self.failures += 1
            tail = err.decode(errors="replace").strip().splitlines()[-5:]
            log.error("helper %s (pid %d) failed with status %d: %s", task, proc.pid, run.exit_status, " | ".join(tail) or "no output")
        if self._on_done is not None:
            self._on_done(run)
        return run

    def stats(self) -> dict[str, Any]:
        """Per task: runs, failures, the last run, the largest peak RSS seen."""
        tasks: dict[str, Any] = {}
        for run in tuple(self.history):  # the metrics thread reads while the loop appends
            entry = tasks.setdefault(run.task, {"runs": 0, "failures": 0, "max_peak_rss_kb": 0, "last": None})
            entry["runs"] += 1
            entry["failures"] += run.exit_status != 0
            entry["max_peak_rss_kb"] = max(entry["max_peak_rss_kb"], run.peak_rss_kb or 0)
            entry["last"] = asdict(run)
        return tasks

    async def stop(self, timeout: float = 30.0) -> None:
        """Let running helpers finish (they are short); terminate them after `timeout`."""
        self._stopping = True
        self._again.clear()
        tasks = list(self._running.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                proc.terminate()
        if pending:
            await asyncio.wait(pending, timeout=5)

