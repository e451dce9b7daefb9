"""What the benchmark reads about a running process from /proc (Linux only, no psutil).

CPU time is utime + stime from /proc/PID/stat (clock ticks, usually 10 ms), which also counts
threads that have exited. Peak RSS is VmHWM from /proc/PID/status: the high-water mark over the
process's whole life, not over one run. System call counts (syscr/syscw in /proc/PID/io) show
how well the proxy batches: reads and writes per message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def _stat_fields(pid: int) -> list[bytes]:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return data[data.rindex(b")") + 2 :].split()  # fields[0] is field 3 of proc(5)


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of the children `pid` has waited for (cutime + cstime): helpers that exited."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS  # fields 16 and 17 of proc(5)


def start_ticks(pid: int) -> int:
    """When the process started, in clock ticks after boot: with the pid, an identity that survives pid reuse."""
    return int(_stat_fields(pid)[19])  # field 22 of proc(5)


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in KiB: the peak resident set over the process's life so far, and the current one."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            found[line[:5]] = int(line.split()[1])
    if len(found) != 2:
        raise LookupError(f"no VmHWM/VmRSS in /proc/{pid}/status (a zombie?)")
    return found["VmHWM"], found["VmRSS"]


def peak_rss_kb(pid: int) -> int:
    return memory_kb(pid)[0]


def command_line(pid: int) -> list[str]:
    return [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]


def _io(pid: int) -> dict[str, int]:
    return {key: int(value) for key, value in (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}


def syscalls(pid: int) -> tuple[int, int]:
    """(read-like, write-like) system calls so far, from /proc/PID/io (syscr, syscw)."""
    counts = _io(pid)
    return counts["syscr"], counts["syscw"]


def disk_write_bytes(pid: int) -> int:
    """Bytes this process (all its threads) caused to be written to storage: /proc/PID/io write_bytes.

    Charged when a page is dirtied, so it counts writes the kernel flushes later; 0 on tmpfs."""
    return _io(pid)["write_bytes"]


def command_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


_HAS_CHILDREN_FILES = Path(f"/proc/self/task/{os.getpid()}/children").exists()  # CONFIG_PROC_CHILDREN


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children, or by scanning every parent pid.

    FileNotFoundError if `pid` does not exist."""
    children: list[int] = []
    if _HAS_CHILDREN_FILES:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                children.extend(int(p) for p in (task / "children").read_text().split())
            except (FileNotFoundError, ProcessLookupError):
                pass  # that thread exited meanwhile
        return children
    if not Path(f"/proc/{pid}").exists():
        raise FileNotFoundError(f"/proc/{pid}")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_bytes()
        except OSError:
            continue
        if int(data[data.rindex(b")") + 2 :].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def descendant_pids(pid: int) -> list[int]:
    """Children, grandchildren... of `pid` (those that exit meanwhile are skipped)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            children = child_pids(parent)
        except OSError:
            continue  # exited meanwhile
        found.extend(children)
        todo.extend(children)
    return found


@dataclass(frozen=True, slots=True)
class Snapshot:
    """CPU seconds, peak RSS, system calls and disk writes of each measured process (by role) at one instant."""

    cpu_s: dict[str, float]
    peak_rss_kb: dict[str, int]
    syscalls: dict[str, tuple[int, int]]
    write_bytes: dict[str, int]

    @classmethod
    def take(cls, pids: dict[str, int]) -> Snapshot:
        return cls(
            cpu_s={role: cpu_seconds(pid) for role, pid in pids.items()},
            peak_rss_kb={role: peak_rss_kb(pid) for role, pid in pids.items()},
            syscalls={role: syscalls(pid) for role, pid in pids.items()},
            write_bytes={role: disk_write_bytes(pid) for role, pid in pids.items()},
        )


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (tmpfs would make disk figures meaningless)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind
