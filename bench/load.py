"""The loads and one timed, verified run of a load against a scenario.

Loads (all demo temperature readings, one in ten invalid: payloads.py):
- `publisher`: one pipelined `mosquitto_pub -l` publishing N lines from a file to one sensor's topic;
- `sensors`: 100 sensors, one connection each, spread over 4 processes (sensors.py), N messages in
  all, each sensor as fast as its connection takes them;
- `rate`: the same 100 sensors at a fixed total rate (1,000 msg/s), each reading stamped with its
  publish time, for latency.

One run:
1. One subscriber per broker the messages reach: the local one (through the proxy, if any) and the
   cloud one for forwarding scenarios. Each subscriber's session is created once
   (`mosquitto_sub -c -i ID -q 1 -E`: persistent), then resumed by a `mosquitto_sub -c -q QOS -C K`
   writing to a file, K = the messages it must receive.
2. One valid QoS 1 probe reading is published on its own topic. Persistent sessions queue it even if
   a subscriber has not reconnected yet; once it is in every file, every subscriber is ready.
3. CPU, RSS and disk counters are read, the clock starts, the publishers start (sensor processes are
   connected before the clock and only told to go).
4. The clock stops for each subscriber when it exits after its Kth message (pidfds).
5. Verification: each file holds the probe, then exactly the readings expected (every valid one
   where the scenario validates, else every one), each once, and at QoS 1 in order per sensor; for a
   validating scenario the audit log (`appliance audit sql`) must count exactly the valid readings
   (+ the probe) as accepted and the invalid ones as rejected: sent = delivered + rejected.
   Otherwise the run failed and has no rate. A subscriber that receives nothing for `STALL_S`
   seconds is stopped and the run fails.
Disk writes are read after the audit query, which makes the appliance sync its message log. For an
appliance with an audit log, its status gives the log's counters (records, bytes, syncs) before the
clock starts and once every record of the run is written (before the audit query's own sync).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.payloads import (
    TOPIC_FILTER,
    device_of,
    is_invalid,
    parse_ts,
    probe,
    reading,
    synthetic_ts,
    topic,
    ts_of,
)
from bench.processes import BenchError, spawn_client, stop, wait_exit, wait_until
from bench.procfs import Snapshot
from bench.scenarios import CHECKOUT, Target
from bench.status import log_counters

# APPLIANCE_TIMEOUT_SCALE stretches the waits for a slow machine (emulated arm64 runs 5-10x slower).
_SCALE = float(os.environ.get("APPLIANCE_TIMEOUT_SCALE", "1"))
STALL_S = 5.0 * _SCALE
# How long to wait for the message log to write the last records of a run (its sync window, normally)
LOG_SETTLE_S = 2.0 * _SCALE
SETUP_TIMEOUT_S = 15.0 * _SCALE
SENSORS = 100
SENSOR_PROCESSES = 4
LOAD_KINDS = ("publisher", "sensors", "rate")


@dataclass(frozen=True)
class Load:
    """A message flow: which publishers, at which QoS, how many messages (or what rate for how long)."""

    kind: str
    qos: int
    messages: int = 0
    rate: float = 0.0
    duration: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "publisher":
            return "1 publisher"
        if self.kind == "sensors":
            return f"{SENSORS} sensors"
        return f"{SENSORS} sensors {self.rate / 1000:g}k/s"

    @property
    def total(self) -> int:
        """Messages published in all."""
        if self.kind == "rate":
            return int(self.rate / SENSOR_PROCESSES * self.duration) * SENSOR_PROCESSES
        if self.kind == "sensors":
            return self.messages // SENSORS * SENSORS
        return self.messages


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
    # Messages published per second until the last one was delivered (or rejected): handled msg/s.
    msg_per_s: float | None = None
    delivered_per_s: float | None = None
    received: int = 0
    rejected: int | None = None
    invalid_sent: int = 0
    in_order: bool | None = None
    cloud_elapsed_s: float | None = None
    cloud_msg_per_s: float | None = None
    cloud_received: int | None = None
    # {"local"|"cloud": {"p50": ms, "p99": ms, "max": ms}} from the publish time in each payload
    latency_ms: dict[str, dict[str, float]] | None = None
    cpu_s: dict[str, float] | None = None
    peak_rss_kb: dict[str, int] | None = None
    # read-like and write-like system calls per message, by role
    reads_per_msg: dict[str, float] | None = None
    writes_per_msg: dict[str, float] | None = None
    disk_write_bytes: dict[str, int] | None = None
    accepted_payload_bytes: int | None = None
    # CPU seconds of every client process reaped during the run (setup clients too)
    clients_cpu_s: float | None = None
    # The appliance's message log during the run (counter deltas from its status: records,
    # bytes_appended, syncs), for scenarios with an audit log
    log: dict[str, int] | None = None
    # Processes the appliance started (mosquitto aside) seen alive during the run: name, pid, peak RSS
    helper_processes: list[dict[str, object]] | None = None

    def cpu_percent(self, role: str) -> float | None:
        if not self.ok or not self.cpu_s or role not in self.cpu_s or not self.elapsed_s:
            return None
        return 100.0 * self.cpu_s[role] / self.elapsed_s

    def cpu_us_per_msg(self, role: str) -> float | None:
        if not self.ok or not self.cpu_s or role not in self.cpu_s:
            return None
        return 1e6 * self.cpu_s[role] / self.messages

    @property
    def log_syncs_per_s(self) -> float | None:
        """fdatasync calls of the message log per second of the run (what wears an SD card at low rates)."""
        if not self.ok or not self.log or "syncs" not in self.log or not self.elapsed_s:
            return None
        return self.log["syncs"] / self.elapsed_s

    @property
    def log_bytes_per_msg(self) -> float | None:
        if not self.ok or not self.log or "bytes_appended" not in self.log:
            return None
        return self.log["bytes_appended"] / self.messages

    @property
    def disk_bytes_per_msg(self) -> float | None:
        if not self.ok or self.disk_write_bytes is None:
            return None
        return sum(self.disk_write_bytes.values()) / self.messages

    @property
    def disk_bytes_per_payload_byte(self) -> float | None:
        if not self.ok or self.disk_write_bytes is None or not self.accepted_payload_bytes:
            return None
        return sum(self.disk_write_bytes.values()) / self.accepted_payload_bytes


@dataclass
class _Subscriber:
    where: str  # "local" or "cloud"
    port: int
    client_id: str
    output: Path
    expect: int
    process: subprocess.Popen[bytes] | None = None
    finished: float | None = None
    stalled: bool = False
    lines: list[bytes] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)

    def args(self) -> list[str]:
        return ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), "-t", TOPIC_FILTER, "-i", self.client_id]


def _sensor_devices(tag: str) -> list[list[str]]:
    devices = [f"{tag}-s{n:02d}" for n in range(SENSORS)]
    per = SENSORS // SENSOR_PROCESSES
    return [devices[i * per : (i + 1) * per] for i in range(SENSOR_PROCESSES)]


def planned_readings(load: Load, tag: str) -> list[bytes] | None:
    """Every reading the load publishes, or None when they carry live timestamps (rate)."""
    if load.kind == "publisher":
        device = f"{tag}-s00"
        return [reading(device, seq, synthetic_ts(seq)) for seq in range(load.total)]
    if load.kind == "sensors":
        each = load.total // SENSORS
        return [reading(d, seq, synthetic_ts(seq)) for group in _sensor_devices(tag) for d in group for seq in range(each)]
    return None


def invalid_count(load: Load) -> int:
    if load.kind == "publisher":
        return sum(1 for seq in range(load.total) if is_invalid(seq))
    per_process = load.total // SENSOR_PROCESSES
    per = SENSORS // SENSOR_PROCESSES
    # sensor i of a process publishes messages i, i + per, ...: its sequence numbers are 0..count-1
    counts = [len(range(i, per_process, per)) for i in range(per)] if load.kind == "rate" else [load.total // SENSORS] * per
    return SENSOR_PROCESSES * sum(sum(1 for seq in range(c) if is_invalid(seq)) for c in counts)


def _check(got: list[bytes], expected: list[bytes], qos: int) -> tuple[str | None, bool]:
    """(error or None, in order per sensor) for what a subscriber printed after the probe."""
    if got == expected:
        return None, True
    if len(got) == len(expected) and sorted(got) == sorted(expected):
        in_order = _per_device(got) == _per_device(expected)
        return ("delivered out of order" if qos > 0 and not in_order else None), in_order
    counts = collections.Counter(got)
    wanted = set(expected)
    missing = sum(1 for line in expected if line not in counts)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    unexpected = sum(1 for line in counts if line not in wanted)
    return f"received {len(got)} of {len(expected)}: {missing} missing, {duplicates} duplicates, {unexpected} unexpected", False


def _per_device(lines: list[bytes]) -> dict[bytes, list[bytes]]:
    groups: dict[bytes, list[bytes]] = collections.defaultdict(list)
    for line in lines:
        groups[device_of(line)].append(line)
    return groups


def _latency(lines: list[bytes], received_at: list[float]) -> dict[str, float] | None:
    if not received_at:
        return None
    values = sorted(1000.0 * (at - parse_ts(ts_of(line))) for line, at in zip(lines, received_at))
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return {"p50": statistics.median(values), "p99": p99, "max": values[-1]}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _await_subscribers(subscribers: list[_Subscriber]) -> None:
    """Record when each subscriber exits (pidfds); mark one stalled when its file stops growing."""
    fds = {}
    for sub in subscribers:
        assert sub.process is not None
        try:
            fds[os.pidfd_open(sub.process.pid)] = sub
        except ProcessLookupError:
            sub.finished = time.perf_counter()
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    sizes = {sub.where: (-1, time.monotonic()) for sub in subscribers}
    try:
        while any(sub.finished is None and not sub.stalled for sub in fds.values()):
            for fd, _ in poller.poll(250):
                sub = fds[fd]
                if sub.finished is None:
                    sub.finished = time.perf_counter()
                poller.unregister(fd)
            now = time.monotonic()
            for sub in fds.values():
                if sub.finished is not None or sub.stalled:
                    continue
                size, since = sizes[sub.where]
                now_size = sub.output.stat().st_size
                if now_size != size:
                    sizes[sub.where] = (now_size, now)
                elif now - since > STALL_S:
                    sub.stalled = True
    finally:
        for fd in fds:
            os.close(fd)


def _read_output(sub: _Subscriber, timestamped: bool) -> None:
    lines = sub.output.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if timestamped:
        # mosquitto_sub -F prints the format's own "\n" and one more: skip the empty lines
        for line in filter(None, lines):
            at, _, payload = line.partition(b" ")
            sub.received_at.append(float(at))
            sub.lines.append(payload)
    else:
        sub.lines = lines


def audit_verdicts(state_dir: Path, tag: str) -> dict[str, int]:
    """Verdicts of one run's readings, counted by the running appliance's audit log."""
    query = (f"SELECT verdict, count(*) AS n FROM decisions WHERE topic LIKE 'sensor/{tag}-%' "
             "GROUP BY verdict")
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "sql", query, "--state-dir", str(state_dir), "--format", "json"],
        check=True, capture_output=True, timeout=60,
    ).stdout
    return {row["verdict"]: int(row["n"]) for row in json.loads(out)["rows"]}


def _with_checkout_on_path() -> dict[str, str]:
    """The environment for `python -m bench.sensors`: the harness is not installed with the
    appliance, so its children find it through the checkout it runs from."""
    path = [str(CHECKOUT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _start_sensors(target: Target, load: Load, tag: str, workdir: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    for index, devices in enumerate(_sensor_devices(tag)):
        out = workdir / f"{tag}-p{index}.sent"
        args = [sys.executable, "-m", "bench.sensors", "--port", str(target.port), "--qos", str(load.qos),
                "--devices", ",".join(devices), "--out", str(out)]
        if load.kind == "rate":
            args += ["--rate", str(load.rate / SENSOR_PROCESSES), "--duration", str(load.duration),
                     "--offset", str(index / SENSOR_PROCESSES)]
        else:
            args += ["--messages-each", str(load.total // SENSORS)]
        process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=_with_checkout_on_path())
        started.append((process, out))
    for process, _ in started:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], SETUP_TIMEOUT_S)
        if not ready or process.stdout.readline().strip() != b"ready":
            stop(process, timeout=1)
            assert process.stderr is not None
            raise BenchError(f"sensor process did not connect: {process.stderr.read().decode(errors='replace').strip()}")
    return started


def run_once(target: Target, load: Load, *, scenario: str, round: int, workdir: Path) -> RunResult:
    tag = f"{scenario}-q{load.qos}-{load.kind}-r{round}"
    sent = load.total
    result = RunResult(scenario=scenario, qos=load.qos, load=load.name, round=round, messages=sent, ok=False,
                       invalid_sent=invalid_count(load))
    planned = planned_readings(load, tag)
    expect = sent - result.invalid_sent if target.validates else sent
    timestamped = load.kind == "rate"
    brokers = [("local", target.port)] + ([("cloud", target.cloud_port)] if target.cloud_port is not None else [])
    subscribers = [_Subscriber(where, port, f"sub-{where}-{tag}", workdir / f"{tag}.{where}.out", expect + 1)
                   for where, port in brokers]
    probe_topic, probe_payload = probe(tag)
    processes: list[subprocess.Popen[bytes]] = []
    children_before = _children_cpu_s()
    try:
        for sub in subscribers:
            subprocess.run([*sub.args(), "-c", "-q", "1", "-E"], check=True, capture_output=True, timeout=SETUP_TIMEOUT_S)
        for sub in subscribers:
            extra = ["-F", r"%U %p\n"] if timestamped else []
            with sub.output.open("wb") as out:
                sub.process = spawn_client([*sub.args(), "-c", "-q", str(load.qos), "-C", str(sub.expect), *extra], stdout=out)
            processes.append(sub.process)
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(target.port), "-t", probe_topic, "-q", "1",
                        "-i", f"probe-{tag}", "-m", probe_payload.decode()],
                       check=True, capture_output=True, timeout=SETUP_TIMEOUT_S)
        for sub in subscribers:
            wait_until(functools.partial(_has_output, sub.output), timeout=SETUP_TIMEOUT_S,
                       what=f"{sub.where} subscriber did not receive the probe", alive=sub.process)

        sensors: list[tuple[subprocess.Popen[bytes], Path]] = []
        payload_file = workdir / f"{tag}.payloads"
        if load.kind == "publisher":
            assert planned is not None
            payload_file.write_bytes(b"".join(p + b"\n" for p in planned))
        else:
            sensors = _start_sensors(target, load, tag, workdir)
            processes.extend(process for process, _ in sensors)

        log_before = log_counters(target.state_dir)
        before = Snapshot.take(target.pids)
        if load.kind == "publisher":
            with payload_file.open("rb") as lines:
                started = time.perf_counter()
                publisher = spawn_client(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(target.port),
                                          "-t", topic(f"{tag}-s00"), "-i", f"pub-{tag}", "-q", str(load.qos), "-l"],
                                         stdin=lines)
            publishers = [publisher]
            processes.append(publisher)
        else:
            started = time.perf_counter()
            for process, _ in sensors:
                assert process.stdin is not None
                process.stdin.write(b"go\n")
                process.stdin.flush()
            publishers = [process for process, _ in sensors]
        _await_subscribers(subscribers)
        after = Snapshot.take(target.pids)
        if log_before is not None:
            result.log = _log_settled(target.state_dir, log_before, sent)

        errors: list[str] = []
        for publisher in publishers:
            if not wait_exit(publisher, SETUP_TIMEOUT_S + 30):
                errors.append("a publisher did not exit")
            elif publisher.returncode != 0:
                assert publisher.stderr is not None
                errors.append(f"a publisher exited with {publisher.returncode}: "
                              f"{publisher.stderr.read().decode(errors='replace').strip()[-300:]}")
        if planned is None:
            planned = [line for _, out in sensors if out.exists() for line in out.read_bytes().splitlines()]
            if len(planned) != sent:
                errors.append(f"the sensors published {len(planned)} of {sent} messages")
        accepted = [p for p in planned if not target.validates or _valid(p)]
        if target.validates:
            verdicts = audit_verdicts(target.state_dir, tag) if target.state_dir else {}
            result.rejected = verdicts.get("reject", 0)
            if verdicts.get("accept", 0) != len(accepted) + 1 or result.rejected != sent - len(accepted):
                errors.append(f"audit log counts {verdicts}, expected {len(accepted) + 1} accept "
                              f"(probe included) and {sent - len(accepted)} reject")
        settled = Snapshot.take(target.pids)
        result.clients_cpu_s = _children_cpu_s() - children_before

        latency: dict[str, dict[str, float]] = {}
        for sub in subscribers:
            _read_output(sub, timestamped)
            if not sub.lines or sub.lines[0] != probe_payload:
                errors.append(f"the {sub.where} subscriber's first message is not the probe")
            got, at = sub.lines[1:], sub.received_at[1:]
            error, in_order = _check(got, accepted, load.qos)
            if sub.where == "local":
                result.received, result.in_order = len(got), in_order
            else:
                result.cloud_received = len(got)
                result.in_order = bool(result.in_order and in_order)
            if error:
                errors.append(f"{sub.where}: {error}")
            if sub.finished is None:
                errors.append(f"{sub.where} subscriber stalled")
            if timestamped and (stats := _latency(got, at)) is not None:
                latency[sub.where] = stats
        if target.validates and result.received + (result.rejected or 0) != sent:
            errors.append(f"sent {sent} != delivered {result.received} + rejected {result.rejected}")

        result.latency_ms = latency or None
        result.cpu_s = {role: after.cpu_s[role] - before.cpu_s[role] for role in target.pids}
        result.peak_rss_kb = after.peak_rss_kb
        result.reads_per_msg = {role: (after.syscalls[role][0] - before.syscalls[role][0]) / sent for role in target.pids}
        result.writes_per_msg = {role: (after.syscalls[role][1] - before.syscalls[role][1]) / sent for role in target.pids}
        result.disk_write_bytes = {role: settled.write_bytes[role] - before.write_bytes[role] for role in target.pids}
        result.accepted_payload_bytes = sum(len(p) for p in accepted)
        local = subscribers[0]
        if local.finished is not None:
            result.elapsed_s = local.finished - started
        cloud = subscribers[1] if len(subscribers) > 1 else None
        if cloud is not None and cloud.finished is not None:
            result.cloud_elapsed_s = cloud.finished - started
        result.error = "; ".join(errors) or None
        if result.error is None and result.elapsed_s:
            result.ok = True
            result.msg_per_s = sent / result.elapsed_s
            result.delivered_per_s = result.received / result.elapsed_s
            if result.cloud_elapsed_s:
                result.cloud_msg_per_s = sent / result.cloud_elapsed_s
        return result
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, BenchError, OSError) as exc:
        stderr = getattr(exc, "stderr", None)
        result.error = f"{exc}" + (f": {stderr.decode(errors='replace').strip()}" if stderr else "")
        return result
    finally:
        for process in processes:
            stop(process, timeout=2)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        for sub in subscribers:
            # Drop the persistent session so the broker does not keep it (clean session on connect).
            try:
                subprocess.run([*sub.args(), "-E"], capture_output=True, timeout=SETUP_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                pass  # the broker is gone; nothing left to clean
        for path in workdir.glob(f"{tag}.*"):
            path.unlink(missing_ok=True)
        for path in workdir.glob(f"{tag}-p*.sent"):
            path.unlink(missing_ok=True)


def _log_settled(state_dir: Path | None, before: dict[str, int], sent: int, timeout: float = LOG_SETTLE_S) -> dict[str, int] | None:
    """The message log's counters since `before`, once its writer has written a record of every
    message sent (the last ones may wait for the sync window after their delivery; `records` counts
    written records). Read before the audit query, whose sync request would count as one more sync."""
    deadline = time.monotonic() + timeout
    while True:
        after = log_counters(state_dir)
        if after is None:
            return None
        delta = {key: after[key] - before[key] for key in after if key in before}
        if delta.get("records", sent) >= sent or time.monotonic() > deadline:
            return delta
        time.sleep(0.01)


def _has_output(path: Path) -> bool:
    return path.stat().st_size > 0


def _valid(payload: bytes) -> bool:
    """What schemas/v1 accepts of `reading()`'s output: in range, device id matching the topic."""
    return b"999.5" not in payload and not device_of(payload).endswith(b"-x")
