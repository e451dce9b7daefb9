"""The load: publishers and one subscriber (mosquitto_pub / mosquitto_sub), one timed and verified run.

One run, as in EVIDENCE.md's prototype measurements:
1. The subscriber's session is created once (`mosquitto_sub -c -i ID -q 1 -E`: persistent, QoS 1),
   then resumed by a `mosquitto_sub -c -i ID -q QOS -C N+1` writing to a file.
2. One QoS 1 probe is published. The persistent session queues it even if the subscriber has not
   reconnected yet; once it is in the file, the subscriber is connected and subscribed.
3. The clock starts, then `mosquitto_pub -l` publishes N lines from a file.
4. The clock stops when the subscriber exits after its N+1th message (awaited with a pidfd).
5. The file must hold the probe and then exactly the N lines published: all of them, each once, and
   in order at QoS 1. Otherwise the run failed and has no rate. A subscriber that receives nothing
   for `STALL_S` seconds is stopped and the run fails.
CPU seconds and peak RSS of the target's processes are read just before 3 and just after 4.
"""

from __future__ import annotations

import collections
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.bench.processes import BenchError, spawn_client, stop, wait_exit, wait_until
from appliance.bench.procfs import Snapshot
from appliance.bench.scenarios import Target

PAYLOAD_BYTES = 100
PROBE = b"bench-probe"
STALL_S = 5.0
SETUP_TIMEOUT_S = 15.0


def payload(seq: int) -> bytes:
    """A ~100-byte sensor reading; every line is unique so loss and duplicates can be counted."""
    head = f'{{"device_id":"t{seq % 50:02d}","ts":"2026-11-27T12:00:00Z","temperature":21.5,"seq":{seq},"pad":"'
    return (head + "x" * max(0, PAYLOAD_BYTES - len(head) - 2) + '"}').encode()


def write_payloads(path: Path, messages: int) -> list[bytes]:
    lines = [payload(seq) for seq in range(messages)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


@dataclass(frozen=True)
class Load:
    """A message flow: how many publishers, at which QoS, how many messages in all."""

    name: str
    qos: int
    messages: int
    publishers: int = 1


@dataclass
class RunResult:
    scenario: str
    qos: int
    load: str
    round: int
    messages: int
    ok: bool
    error: str | None = None
    elapsed_s: float | None = None
    msg_per_s: float | None = None
    received: int = 0
    in_order: bool | None = None
    cpu_s: dict[str, float] | None = None
    peak_rss_kb: dict[str, int] | None = None
    # read-like and write-like system calls per message, by role
    reads_per_msg: dict[str, float] | None = None
    writes_per_msg: dict[str, float] | None = None
    # CPU seconds of every mosquitto_pub / mosquitto_sub reaped during the run (setup clients too)
    clients_cpu_s: float | None = None

    def cpu_percent(self, role: str) -> float | None:
        if not self.ok or not self.cpu_s or role not in self.cpu_s or not self.elapsed_s:
            return None
        return 100.0 * self.cpu_s[role] / self.elapsed_s

    def cpu_us_per_msg(self, role: str) -> float | None:
        if not self.ok or not self.cpu_s or role not in self.cpu_s:
            return None
        return 1e6 * self.cpu_s[role] / self.messages


def _client_args(tool: str, port: int, topic: str, client_id: str) -> list[str]:
    return [tool, "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-i", client_id]


def _check(got: list[bytes], expected: list[bytes], qos: int) -> tuple[str | None, bool]:
    """(error or None, in order) for what the subscriber printed after the probe."""
    if got == expected:
        return None, True
    if len(got) == len(expected) and sorted(got) == sorted(expected):
        return ("delivered out of order" if qos > 0 else None), False
    counts = collections.Counter(got)
    wanted = set(expected)
    missing = sum(1 for line in expected if line not in counts)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    unexpected = sum(1 for line in counts if line not in wanted)
    return f"received {len(got)} of {len(expected)}: {missing} missing, {duplicates} duplicates, {unexpected} unexpected", False


def run_once(
    target: Target, load: Load, *, scenario: str, round: int, workdir: Path, payloads: Path, expected: list[bytes]
) -> RunResult:
    if load.publishers != 1:
        raise NotImplementedError("only one publisher for now")
    run_id = f"{scenario}-q{load.qos}-{load.name}-r{round}"
    result = RunResult(scenario=scenario, qos=load.qos, load=load.name, round=round, messages=load.messages, ok=False)
    topic = f"bench/{run_id}"
    sub_args = [*_client_args("mosquitto_sub", target.port, topic, f"sub-{run_id}"), "-c"]
    output = workdir / f"{run_id}.out"
    running: list[subprocess.Popen[bytes]] = []
    children_before = _children_cpu_s()
    try:
        subprocess.run([*sub_args, "-q", "1", "-E"], check=True, capture_output=True, timeout=SETUP_TIMEOUT_S)
        with output.open("wb") as out:
            subscriber = spawn_client([*sub_args, "-q", str(load.qos), "-C", str(load.messages + 1)], stdout=out)
        running.append(subscriber)
        probe = [*_client_args("mosquitto_pub", target.port, topic, f"probe-{run_id}"), "-q", "1", "-m", PROBE.decode()]
        subprocess.run(probe, check=True, capture_output=True, timeout=SETUP_TIMEOUT_S)
        wait_until(lambda: output.stat().st_size > len(PROBE), timeout=SETUP_TIMEOUT_S,
                   what="subscriber did not receive the probe", alive=subscriber)

        before = Snapshot.take(target.pids)
        with payloads.open("rb") as lines:
            started = time.perf_counter()
            publisher = spawn_client(
                [*_client_args("mosquitto_pub", target.port, topic, f"pub-{run_id}"), "-q", str(load.qos), "-l"],
                stdin=lines,
            )
        running.append(publisher)
        finished = _await_subscriber(subscriber, output)
        after = Snapshot.take(target.pids)
        if not wait_exit(publisher, SETUP_TIMEOUT_S):
            result.error = "publisher did not exit"
        elif publisher.returncode != 0:
            assert publisher.stderr is not None
            result.error = f"publisher exited with {publisher.returncode}: {publisher.stderr.read().decode(errors='replace').strip()}"

        result.clients_cpu_s = _children_cpu_s() - children_before
        lines_got = output.read_bytes().split(b"\n")
        if lines_got and lines_got[-1] == b"":
            lines_got.pop()
        if not lines_got or lines_got[0] != PROBE:
            result.error = result.error or "the subscriber's first message is not the probe"
        got = lines_got[1:]
        result.received = len(got)
        error, result.in_order = _check(got, expected, load.qos)
        result.error = result.error or error or (None if finished else "subscriber stalled")
        result.cpu_s = {role: after.cpu_s[role] - before.cpu_s[role] for role in target.pids}
        result.peak_rss_kb = after.peak_rss_kb
        result.reads_per_msg = {
            role: (after.syscalls[role][0] - before.syscalls[role][0]) / load.messages for role in target.pids
        }
        result.writes_per_msg = {
            role: (after.syscalls[role][1] - before.syscalls[role][1]) / load.messages for role in target.pids
        }
        if result.error is None and finished is not None:
            result.ok = True
            result.elapsed_s = finished - started
            result.msg_per_s = load.messages / result.elapsed_s
        return result
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, BenchError) as exc:
        stderr = getattr(exc, "stderr", None)
        result.error = f"{exc}" + (f": {stderr.decode(errors='replace').strip()}" if stderr else "")
        return result
    finally:
        for process in running:
            stop(process, timeout=2)
            if process.stderr is not None:
                process.stderr.close()
        # Drop the persistent session so the broker does not keep it (clean session on connect).
        try:
            subprocess.run([*sub_args[:-1], "-E"], capture_output=True, timeout=SETUP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pass  # the broker is gone; nothing left to clean
        output.unlink(missing_ok=True)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _await_subscriber(subscriber: subprocess.Popen[bytes], output: Path) -> float | None:
    """perf_counter() when the subscriber exited, or None if it stopped receiving for STALL_S."""
    size, progress_at = -1, time.monotonic()
    while True:
        if wait_exit(subscriber, 0.25):
            return time.perf_counter()
        now_size = output.stat().st_size
        if now_size != size:
            size, progress_at = now_size, time.monotonic()
        elif time.monotonic() - progress_at > STALL_S:
            return None
