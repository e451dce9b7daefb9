"""A reproducible recording for measuring replay, and the measurement itself.

    python -m bench.replay_rate generate OUT_DIR [--messages 1000000] [--seed 1] [--distinct N]
    python -m bench.replay_rate run OUT_DIR --against schemas/v2 [--jobs N] [--report FILE]

`generate` writes demo traffic (schemas/v1) the way the audit store lays it out: Parquet files with
the columns of `appliance.audit.records.DECISION_COLUMNS`, partitioned by day
(`OUT_DIR/decisions/day=YYYY-MM-DD/part-NNNN.parquet`), a file per 200,000 messages and day. Every
payload is different (time stamps, readings), as in real traffic, so no cache of verdicts by
payload can make a run look faster than it would be. Per 100 messages, about:

- 60 JSON temperatures on `sensor/<id>/temperature`; 30 Protobuf device statuses on
  `device/<id>/status`; 10 unmapped door events on `events/<door>/open`;
- 10 of them invalid for v1 (recorded as rejected): 4 too hot, 2 whose `device_id` is not the
  topic's (a CEL rule), 1 not JSON, 2 undecodable Protobuf, 1 status of another device.

`--distinct N` repeats N different messages instead (traffic without time stamps in its payloads,
where replay judges each distinct message once per batch). The same seed gives the same files. `run` prints messages per second, the wall time and the CPU
time of this process and its workers (user + system), so a figure from a busy machine can be read
as CPU per message too.

`appliance bench` measures issue #13's target with `measure()`: it generates a recording and runs
the real `replay --from RECORDING --against schemas/v1` command on it, each run in a process of its
own, and checks the report: every message replayed, and none judged differently from how v1
recorded it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from appliance.audit.records import DECISION_COLUMNS, IdClock

START = 1_795_766_400.0  # 2026-11-27T08:00:00Z
SPAN_SECONDS = 3 * 86_400.0  # a recording spreads over three days, whatever its size
FILE_MESSAGES = 200_000
TEMPERATURE_DEVICES = 200
STATUS_DEVICES = 100

_TOO_HOT = {"check": "schema", "message": "150 is greater than the maximum of 125", "schema": "temperature:v1",
            "path": "/temperature"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _status(device_id: str, state: int, battery_mv: int, uptime_s: int) -> bytes:
    raw = device_id.encode()
    return (b"\x0a" + _varint(len(raw)) + raw + b"\x10" + _varint(state) + b"\x18" + _varint(battery_mv)
            + b"\x20" + _varint(uptime_s))


def demo_traffic(messages: int, *, seed: int = 1, distinct: int | None = None) -> Iterator[tuple[Any, ...]]:
    """Decision rows (DECISION_COLUMNS order) of the demo mix above, `verdict` as v1 judges them.
    With `distinct`, only that many different messages, repeated in turn (each with its own id and
    time): traffic without time stamps in its payloads."""
    if distinct is not None:
        pattern = list(demo_traffic(distinct, seed=seed))
        clock = IdClock()
        step = SPAN_SECONDS / max(messages, 1)
        for index in range(messages):
            at = START + index * step
            yield (clock.next(at), at, *pattern[index % distinct][2:])
        return
    rng = random.Random(seed)
    clock = IdClock()
    step = SPAN_SECONDS / max(messages, 1)
    for index in range(messages):
        at = START + index * step
        stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        draw = rng.random()
        reasons: list[dict[str, object]] = []
        verdict = "accept"
        schema: tuple[str | None, str | None] = (None, None)
        topic_filter: str | None = None
        if draw < 0.60:  # a temperature
            device = f"t{rng.randrange(TEMPERATURE_DEVICES)}"
            topic, client_id, host = f"sensor/{device}/temperature", device, int(device[1:])
            topic_filter, schema = "sensor/+/temperature", ("temperature", "v1")
            value = round(rng.uniform(15.0, 30.0), 2)
            if draw < 0.04:  # too hot
                value = 150 + rng.randrange(50)
                verdict, reasons = "reject", [dict(_TOO_HOT, message=f"{value} is greater than the maximum of 125")]
            body: dict[str, object] = {"device_id": device, "ts": stamp, "temperature": value}
            if 0.04 <= draw < 0.06:  # another device's id: the device_matches_topic rule
                body["device_id"] = f"t{(int(device[1:]) + 1) % TEMPERATURE_DEVICES}"
                verdict = "reject"
                reasons = [{"check": "rule", "message": "rule 'device_matches_topic' failed: payload.device_id == topic[1]",
                            "schema": "temperature:v1", "path": None}]
            payload = orjson.dumps(body)
            if 0.06 <= draw < 0.07:  # cut short: not JSON
                payload = payload[: len(payload) // 2]
                verdict = "reject"
                reasons = [{"check": "schema", "message": "not valid JSON", "schema": "temperature:v1", "path": ""}]
        elif draw < 0.90:  # a device status
            device = f"d{rng.randrange(STATUS_DEVICES)}"
            topic, client_id, host = f"device/{device}/status", device, TEMPERATURE_DEVICES + int(device[1:])
            topic_filter, schema = "device/+/status", ("device_status", "v1")
            payload = _status(device, rng.choice((1, 1, 1, 2, 3)), rng.randrange(2800, 4200), int(at - START) + rng.randrange(86_400))
            if draw < 0.62:  # a length prefix longer than what follows: undecodable
                payload = b"\x0a\x7f" + payload
                verdict = "reject"
                reasons = [{"check": "schema", "message": "cannot decode", "schema": "device_status:v1", "path": ""}]
            elif draw < 0.63:  # another device's status
                payload = _status(f"d{(int(device[1:]) + 1) % STATUS_DEVICES}", 1, 3300, 60)
                verdict = "reject"
                reasons = [{"check": "rule", "message": "rule 'device_matches_topic' failed: payload.device_id == topic[1]",
                            "schema": "device_status:v1", "path": None}]
        else:  # an unmapped event
            door = rng.randrange(20)
            topic, client_id, host = f"events/door{door}/open", f"door{door}", TEMPERATURE_DEVICES + STATUS_DEVICES + door
            payload = orjson.dumps({"door": f"door{door}", "ts": stamp, "open": rng.random() < 0.5})
        # A client keeps its address, protocol version and user name; it reconnects once a day.
        version = 5 if host % 3 == 0 else 4
        port = 40000 + (host * 7 + int((at - START) // 86_400) * 1_000) % 20_000
        yield (
            clock.next(at), at, client_id, "sensors" if host % 4 == 0 else None,
            f"10.0.{host // 250}.{host % 250 + 1}:{port}", version, topic, index % 2, False,
            payload, len(payload), hashlib.sha256(payload).hexdigest(), "v1", schema[0], schema[1], topic_filter,
            verdict, 0x99 if verdict == "reject" else 0, json.dumps(reasons), 40 + index % 60, "rev-bench", False,
            False, None,
        )


_COLUMN_TYPES = {
    "id": "BIGINT", "ts": "DOUBLE", "client_id": "VARCHAR", "username": "VARCHAR", "peer": "VARCHAR",
    "mqtt_version": "UTINYINT", "topic": "VARCHAR", "qos": "UTINYINT", "retain": "BOOLEAN", "payload": "VARCHAR",
    "payload_size": "INTEGER", "payload_sha256": "VARCHAR", "schema_set": "VARCHAR", "schema_name": "VARCHAR",
    "schema_version": "VARCHAR", "topic_filter": "VARCHAR", "verdict": "VARCHAR", "reason_code": "UTINYINT",
    "reasons": "VARCHAR", "latency_us": "INTEGER", "config_revision": "VARCHAR", "dry_run": "BOOLEAN",
    "is_will": "BOOLEAN", "released_from": "BIGINT",
}


def generate(out_dir: Path, messages: int, *, seed: int = 1, file_messages: int = FILE_MESSAGES,
             distinct: int | None = None) -> list[Path]:
    """Write the recording; returns the Parquet files written, in recording order."""
    import duckdb

    decisions = Path(out_dir) / "decisions"
    decisions.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    columns = ", ".join(f"'{name}': '{kind}'" for name, kind in _COLUMN_TYPES.items())
    select = ", ".join(
        "to_timestamp(ts) AS ts" if name == "ts" else "from_base64(payload) AS payload" if name == "payload"
        else f'"{name}"' for name in DECISION_COLUMNS
    )
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute("SET TimeZone = 'UTC'")
    rows = demo_traffic(messages, seed=seed, distinct=distinct)
    part = 0
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as scratch:
        chunk_path = Path(scratch) / "chunk.ndjson"
        while True:
            days: dict[str, int] = {}
            with chunk_path.open("wb") as out:
                for count, row in enumerate(rows, 1):
                    record = dict(zip(DECISION_COLUMNS, row, strict=True))
                    record["payload"] = base64.b64encode(row[9]).decode()
                    day = datetime.fromtimestamp(row[1], UTC).date().isoformat()
                    days[day] = days.get(day, 0) + 1
                    out.write(orjson.dumps(record) + b"\n")
                    if count >= file_messages:
                        break
            if not days:
                break
            source = f"read_json('{chunk_path}', format = 'newline_delimited', columns = {{{columns}}})"
            for day in sorted(days):
                target = decisions / f"day={day}" / f"part-{part:04d}.parquet"
                target.parent.mkdir(exist_ok=True)
                con.execute(
                    f"COPY (SELECT {select} FROM {source} WHERE strftime(to_timestamp(ts), '%Y-%m-%d') = '{day}' ORDER BY id) "
                    f"TO '{target}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 100000)"
                )
                written.append(target)
            part += 1
            if sum(days.values()) < file_messages:
                break
    con.close()
    return written


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


MESSAGES = 1_000_000
# The `replay` command (replay.cli:main, the console script's entry point) in a process of its own.
_REPLAY = "import sys; from replay.cli import main; sys.argv[0] = 'replay'; main()"


@dataclass
class ReplayFigures:
    """`replay --against` over a generated recording: one entry per run, each a process of its own."""

    messages: int
    files: int
    parquet_bytes: int
    generate_s: float
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def median(self, key: str) -> float | None:
        values = [run[key] for run in self.runs if run.get(key) is not None]
        return statistics.median(values) if values else None

    @property
    def msg_per_s(self) -> float | None:
        """What `replay --stats` prints: messages ÷ the judging's wall time (the report's `stats`)."""
        return self.median("msg_per_s")

    @property
    def command_msg_per_s(self) -> float | None:
        """Messages ÷ the whole process's wall time (start-up, opening the recording, the report)."""
        return self.median("command_msg_per_s")

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "files": self.files, "parquet_bytes": self.parquet_bytes,
                "generate_s": round(self.generate_s, 2), "msg_per_s": self.msg_per_s,
                "command_msg_per_s": self.command_msg_per_s, "cpu_us_per_msg": self.median("cpu_us_per_msg"),
                "error": self.error, "runs": self.runs}


def run_command(recording: Path, against: Path, *, messages: int, timeout: float = 600.0) -> dict[str, Any]:
    """`replay --from RECORDING --against AGAINST --format json` once in its own process; its figures.
    Raises RuntimeError if it failed or its report does not account for every message as recorded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _REPLAY, "--from", str(recording), "--against", str(against),
                           "--format", "json", "--fail-on", "never", "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"replay exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout)
    totals, stats = report["totals"], report["stats"]
    changed = totals["newly_rejected"] + totals["newly_accepted"] + totals["errors"]
    if totals["replayed"] != messages or changed:
        raise RuntimeError(f"replayed {totals['replayed']:,} of {messages:,} messages, {changed:,} judged otherwise "
                           "than recorded or not at all")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"msg_per_s": round(stats["messages"] / stats["seconds"]), "seconds": stats["seconds"],
            "workers": stats["workers"], "process_s": round(wall, 3), "command_msg_per_s": round(messages / wall),
            "cpu_s": round(cpu, 2), "cpu_us_per_msg": round(1e6 * cpu / messages, 2)}


def measure(workdir: Path, messages: int = MESSAGES, *, runs: int = 3, against: Path | None = None) -> ReplayFigures:
    """Generate a recording of `messages` under `workdir`, then replay it `runs` times against
    `against` (default: the demo set v1 the recording was judged with)."""
    from bench.scenarios import REPO_SCHEMAS

    against = against or REPO_SCHEMAS / "v1"
    started = time.perf_counter()
    recording = workdir / "replay-recording"
    files = generate(recording, messages)
    figures = ReplayFigures(messages, len(files), sum(p.stat().st_size for p in files), time.perf_counter() - started)
    try:
        for _ in range(runs):
            figures.runs.append(run_command(recording, against, messages=messages))
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        figures.error = str(exc)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_rate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write a demo recording as Parquet")
    gen.add_argument("out_dir", type=Path)
    gen.add_argument("--messages", type=int, default=1_000_000)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--distinct", type=int, help="only this many different messages, repeated (default: all differ)")
    run = commands.add_parser("run", help="replay a recording and print the rate")
    run.add_argument("recording", type=Path)
    run.add_argument("--against", type=Path, required=True)
    run.add_argument("--jobs", type=int)
    run.add_argument("--report", type=Path, help="write the report (JSON) to this file, to compare runs")
    args = parser.parse_args(argv)
    if args.command == "generate":
        started = time.perf_counter()
        files = generate(args.out_dir, args.messages, seed=args.seed, distinct=args.distinct)
        print(f"wrote {args.messages:,} messages in {len(files)} files under {args.out_dir} "
              f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 0
    report, stats = replay(args.recording, args.against, jobs=args.jobs)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1, sort_keys=True))
    print(json.dumps(stats))
    return 0


def replay(recording: Path, against: Path, *, jobs: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replay a recording as `replay --from RECORDING --against AGAINST` does; (report without its
    `stats`, the measurements)."""
    from replay import engine
    from replay.judge import load_for_replay
    from replay.report import FailOn, build_report
    from replay.rows import Filters
    from replay.sources import open_recording

    load_for_replay(against)  # fail early on a broken set
    cpu, started = _cpu_seconds(), time.perf_counter()
    source = open_recording([str(recording)], None, Filters())
    try:
        jobs = jobs or engine.default_jobs()
        if hasattr(source, "work"):
            work = source.work(engine.BATCH_SIZE, engine.pieces(jobs))
        else:  # the engine before units (to measure it with the same script)
            work = source.batches(engine.BATCH_SIZE)
        tally, run_stats = engine.run(work, target=against, baseline=None, jobs=jobs)
    finally:
        source.close()
    wall, used = time.perf_counter() - started, _cpu_seconds() - cpu
    report = build_report(tally, source=source.description, filters=Filters().describe(), target={"directory": str(against)},
                          baseline=None, fail_on=FailOn.parse("never"), notes=[])
    messages = tally.replayed
    stats = {"messages": messages, "seconds": round(wall, 2), "messages_per_second": round(messages / wall),
             "cpu_seconds": round(used, 2), "cpu_percent": round(100 * used / wall), "cpu_us_per_message": round(1e6 * used / max(messages, 1), 1),
             "workers": run_stats.workers, "load_average": os.getloadavg()[0]}
    return report, stats


if __name__ == "__main__":
    sys.exit(main())
