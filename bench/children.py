"""Every process an appliance starts besides its mosquitto, and what each cost in memory.

Work moved out of the service into a helper process is not free: issue #13 counts a helper that
stays resident against the appliance's 80 MB, and shows the short-lived ones (sealing, retention,
export) beside it. Two sources, merged by pid:

- `ProcessWatch` polls each appliance's descendants in /proc while the benchmark runs (a thread,
  started once every scenario is up, so no fork happens while it runs): when each was first and
  last seen, its peak RSS (VmHWM) and CPU seconds as last read. A process that lives less than one
  polling interval can be missed; one that exits between two polls is seen with its figures of the
  poll before.
- The appliance's own record of its helpers (`status` → audit.helpers, appliance/audit/helpers.py):
  each helper's exact lifetime and its peak RSS from getrusage, for the last run of each task.

A process counts as *resident* when it was up for at least half of the time the benchmark watched
(a process that stays, like a forwarder of its own would); the others are *short-lived*.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import procfs

POLL_S = 0.1
RESIDENT_FRACTION = 0.5
# Not counted: the broker is measured on its own (role "mosquitto"), and it is what the appliance replaces.
IGNORED_COMMANDS = frozenset({"mosquitto"})
HELPER_MODULE = "appliance.audit.maintain"


def _without_emulator(argv: list[str]) -> list[str]:
    """The program's own command line when it runs under qemu-user through binfmt_misc (`make
    test-arm64`): the kernel puts the interpreter and the program's path first, and with the
    preserve-argv0 flag (Debian's `…/qemu-binfmt/aarch64-binfmt-P`) the original argv[0] after them;
    without it the program's path stands for argv[0]."""
    first = Path(argv[0]).name if argv else ""
    if "binfmt" in first or first.startswith("qemu-"):
        return argv[2:] if first.endswith("-P") else argv[1:]
    return argv


@dataclass
class ChildProcess:
    """One process started by an appliance (directly or not), mosquitto aside."""

    scenario: str
    pid: int
    name: str  # "appliance.audit.maintain seal" for `python -m appliance.audit.maintain seal ...`
    first_seen_s: float  # seconds after the watch started
    last_seen_s: float
    peak_rss_kb: int = 0
    cpu_s: float = 0.0
    alive_at_end: bool = False
    # The appliance's own record of it (audit.helpers), when it has one: exact figures.
    reported: bool = False
    exit_status: int | None = None

    @property
    def lived_s(self) -> float:
        return self.last_seen_s - self.first_seen_s

    def to_json(self, watched_s: float) -> dict[str, Any]:
        return {**asdict(self), "lived_s": round(self.lived_s, 3), "resident": self.resident(watched_s)}

    def resident(self, watched_s: float) -> bool:
        return watched_s > 0 and self.lived_s >= RESIDENT_FRACTION * watched_s


def process_name(argv: list[str], comm: str) -> str:
    """`python -m MODULE TASK ...` → "MODULE TASK"; otherwise the command name."""
    argv = _without_emulator(argv)
    if "-m" in argv:
        index = argv.index("-m")
        module = argv[index + 1 : index + 2]
        task = [arg for arg in argv[index + 2 : index + 3] if not arg.startswith("-")]
        if module:
            return " ".join(module + task)
    return Path(argv[0]).name if argv else comm


@dataclass
class _Watched:
    pid: int
    peak_rss_kb: int = 0
    # CPU seconds of the children it waited for (cutime + cstime) when the watch started and stopped
    children_cpu_s: tuple[float, float] = (0.0, 0.0)
    # /proc/PID/io write_bytes (its exited children's included) when the watch started and stopped
    write_bytes: tuple[int, int] | None = None


@dataclass
class ProcessWatch:
    """Polls the descendants of each appliance (scenario name → pid), mosquitto aside."""

    appliances: dict[str, int]
    interval: float = POLL_S
    processes: dict[tuple[int, int], ChildProcess] = field(default_factory=dict)  # (pid, start ticks) →
    _watched: dict[str, _Watched] = field(default_factory=dict)
    _ignored: set[tuple[int, int]] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = 0.0
    watched_s: float = 0.0

    def __post_init__(self) -> None:
        self._watched = {name: _Watched(pid) for name, pid in self.appliances.items()}

    def start(self) -> ProcessWatch:
        self._started = time.monotonic()
        for watched in self._watched.values():
            cpu = _children_cpu_s(watched.pid)
            watched.children_cpu_s = (cpu, cpu)
            written = _write_bytes(watched.pid)
            watched.write_bytes = None if written is None else (written, written)
        self.poll()
        self._thread = threading.Thread(target=self._loop, name="bench-process-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, after one last poll: what runs then is `alive_at_end`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for process in self.processes.values():
            process.alive_at_end = False
        self.poll(final=True)
        self.watched_s = time.monotonic() - self._started
        for watched in self._watched.values():
            watched.children_cpu_s = (watched.children_cpu_s[0], _children_cpu_s(watched.pid, watched.children_cpu_s[1]))
            if watched.write_bytes is not None and (written := _write_bytes(watched.pid)) is not None:
                watched.write_bytes = (watched.write_bytes[0], written)

    def now(self) -> float:
        """Seconds since the watch started (the clock of first_seen_s and last_seen_s)."""
        return time.monotonic() - self._started

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self, final: bool = False) -> None:
        now = self.now()
        for scenario, watched in self._watched.items():
            try:
                watched.peak_rss_kb = max(watched.peak_rss_kb, procfs.peak_rss_kb(watched.pid))
            except (OSError, LookupError):
                continue  # the appliance is gone (or a zombie): nothing more to see
            for pid in procfs.descendant_pids(watched.pid):
                self._observe(scenario, pid, now, final)

    def _observe(self, scenario: str, pid: int, now: float, final: bool) -> None:
        try:
            key = (pid, procfs.start_ticks(pid))
            if key in self._ignored:
                return
            # Read every time: between fork and exec a child still shows its parent's command.
            comm = procfs.command_name(pid)
            if comm in IGNORED_COMMANDS:
                self._ignored.add(key)
                self.processes.pop(key, None)
                return
            peak, _ = procfs.memory_kb(pid)
            cpu = procfs.cpu_seconds(pid)
            name = process_name(procfs.command_line(pid), comm)
        except (OSError, LookupError, ValueError):
            return  # exited between the listing and the reads
        process = self.processes.get(key)
        if process is None:
            process = self.processes[key] = ChildProcess(scenario, pid, name, now, now)
        process.name = name
        process.last_seen_s = now
        process.peak_rss_kb = max(process.peak_rss_kb, peak)
        process.cpu_s = max(process.cpu_s, cpu)
        process.alive_at_end = final

    def service_peak_rss_kb(self, scenario: str) -> int | None:
        """The appliance process's own VmHWM, as last read: its peak over its whole life."""
        watched = self._watched.get(scenario)
        return watched.peak_rss_kb or None if watched else None

    def helpers_cpu_s(self, scenario: str) -> float | None:
        """CPU seconds of the appliance's children that exited while the watch ran (the kernel's count)."""
        watched = self._watched.get(scenario)
        return None if watched is None else watched.children_cpu_s[1] - watched.children_cpu_s[0]

    def service_write_bytes(self, scenario: str) -> int | None:
        """Bytes the appliance (and its children that exited) wrote to storage while the watch ran."""
        watched = self._watched.get(scenario)
        if watched is None or watched.write_bytes is None:
            return None
        return watched.write_bytes[1] - watched.write_bytes[0]

    def seen_between(self, scenario: str, start: float, end: float) -> list[ChildProcess]:
        """The processes of `scenario` seen alive at some point between `start` and `end` (watch clock)."""
        return [p for p in self.processes.values()
                if p.scenario == scenario and p.first_seen_s <= end and p.last_seen_s >= start]

    def merge_reported(self, scenario: str, helpers: dict[str, Any]) -> None:
        """Merge an appliance's own record of its helpers (status → audit.helpers: per task, the last
        run) into what was polled: exact lifetime and peak RSS where the pids match, and a helper the
        polling missed (it lived less than one interval) added from the record."""
        for entry in helpers.values():
            last = entry.get("last") or {}
            if "pid" not in last:
                continue
            merge_helper_run(self, scenario, last)

    def children(self, scenario: str | None = None) -> list[ChildProcess]:
        return sorted((p for p in self.processes.values() if scenario is None or p.scenario == scenario),
                      key=lambda p: (p.scenario, p.first_seen_s, p.pid))


def merge_helper_run(watch: ProcessWatch, scenario: str, run: dict[str, Any]) -> ChildProcess:
    """One helper run as the appliance recorded it (HelperRun as a dict) into the watch's processes."""
    pid = int(run["pid"])
    started = float(run["started"]) - (time.time() - watch.now())  # epoch → watch clock
    seconds = float(run.get("seconds") or 0.0)
    matches = [p for p in watch.processes.values() if p.scenario == scenario and p.pid == pid
               and p.first_seen_s <= started + seconds + watch.interval + 1.0 and p.last_seen_s >= started - 1.0]
    if matches:
        process = matches[0]
    else:
        process = ChildProcess(scenario, pid, f"{HELPER_MODULE} {run.get('task', '?')}", started, started)
        watch.processes[(pid, -int(started * 1000))] = process
    process.first_seen_s = min(process.first_seen_s, started)
    process.last_seen_s = max(process.last_seen_s, started + seconds)
    process.peak_rss_kb = max(process.peak_rss_kb, int(run.get("peak_rss_kb") or 0))
    process.name = f"{HELPER_MODULE} {run.get('task', '?')}"  # the appliance's word for it
    process.reported = True
    process.exit_status = int(run.get("exit_status") or 0)
    return process


def _write_bytes(pid: int) -> int | None:
    try:
        return procfs.disk_write_bytes(pid)
    except (OSError, KeyError):
        return None


def _children_cpu_s(pid: int, default: float = 0.0) -> float:
    try:
        return procfs.children_cpu_seconds(pid)
    except OSError:
        return default


@dataclass(frozen=True)
class MemoryTarget:
    """Peak RSS of one appliance over the whole benchmark: the service plus its resident helpers."""

    scenario: str
    service_peak_rss_kb: int | None
    resident: list[ChildProcess]
    short_lived: list[ChildProcess]

    @property
    def peak_rss_kb(self) -> int | None:
        if self.service_peak_rss_kb is None:
            return None
        return self.service_peak_rss_kb + sum(p.peak_rss_kb for p in self.resident)


def memory_target(watch: ProcessWatch, scenario: str) -> MemoryTarget:
    children = watch.children(scenario)
    resident = [p for p in children if p.resident(watch.watched_s)]
    return MemoryTarget(scenario, watch.service_peak_rss_kb(scenario), resident,
                        [p for p in children if p not in resident])


def summarise_by_name(processes: Iterable[ChildProcess]) -> list[dict[str, Any]]:
    """Per process name: how many, their largest peak RSS, their shortest and longest lifetimes."""
    groups: dict[str, list[ChildProcess]] = {}
    for process in processes:
        groups.setdefault(process.name, []).append(process)
    return [
        {"name": name, "count": len(group), "max_peak_rss_kb": max(p.peak_rss_kb for p in group),
         "min_lived_s": round(min(p.lived_s for p in group), 3), "max_lived_s": round(max(p.lived_s for p in group), 3),
         "cpu_s": round(sum(p.cpu_s for p in group), 3)}
        for name, group in sorted(groups.items())
    ]
