"""`appliance audit sql` GROUP BY over N recorded verdicts (issue #13: 10 million in < 0.5 s).

The verdicts are laid out as a running appliance's audit log holds them. The newest are still in
the message log, not converted yet: on average half a segment (the active one fills up to 16 MiB,
then the seal helper converts it), which every query decodes when it opens (`AuditQuery`'s tail);
they are written as real log records (`bench.audit_store.write_log`). The others are Parquet as
the seal helper leaves them before a day is compacted: one file per 16 MiB log segment and UTC
day, named after the segment's first seq, in 32,768-row groups, under a watermark that covers them
(`appliance.audit.seal.copy_days` writes them, from a staging table filled by SQL instead of
decoded log records: 10 million rows in under a minute, where the log and the helper would take
several). That is the most files a query meets: at 1,000 msg/s a segment holds ~2 minutes of
traffic and 10 million verdicts are ~80 files of one day; once the day is over the helper merges
them into files of up to 2 million rows (`compact_days`), 5 for the same verdicts.

Each query runs as the user runs it: `appliance audit sql --state-dir DIR --format csv SQL` in a
process of its own (`python -c` around `appliance.cli.main`, so the process can say where its
time went): `command_s`, from parsing the arguments to the printed result (opening the snapshot:
listing the files, reading the tail, creating the views; the query; printing), is the figure the
target judges; `imports_s` (the CLI and DuckDB) and the interpreter's own start are the process
start, shown beside it; `process_s` is the wall time of the whole process, what a user waits.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from appliance.audit.layout import Layout

ROWS = 10_000_000
SEGMENT_BYTES = 16 << 20  # audit.segment_bytes' default
RATE = 1_000.0  # msg/s of the recorded traffic: sets the span of the time stamps (10M: 2.8 h)
SENSORS = 100
QUERIES = {
    "GROUP BY verdict": "SELECT verdict, count(*) AS n FROM decisions GROUP BY verdict",
    "GROUP BY client_id": ("SELECT client_id, count(*) FILTER (WHERE verdict = 'reject') AS rejected, count(*) AS n "
                           "FROM decisions GROUP BY client_id"),
    "GROUP BY hour": ("SELECT date_trunc('hour', ts) AS hour, count(*) AS n, avg(latency_us) AS latency "
                      "FROM decisions GROUP BY hour"),
}
# The staged fields (DECISION.stage_ddl) of row i, a reading of ~90 bytes from one of SENSORS sensors,
# one in ten rejected. `{t0}` and `{step}`: the first time stamp and the seconds between two rows.
_STAGE = {
    "id": "(CAST(({t0} + i * {step}) * 1000 AS BIGINT) << 20) + (i & 1048575)",
    "ts": "{t0} + i * {step}",
    "client_id": "'sensor-' || lpad(CAST(i % {sensors} AS VARCHAR), 4, '0')",
    "username": "CAST(NULL AS VARCHAR)",
    "peer": "'10.0.0.' || CAST(i % {sensors} AS VARCHAR) || ':5' || lpad(CAST(i % {sensors} AS VARCHAR), 4, '0')",
    "mqtt_version": "CAST(5 AS UTINYINT)",
    "topic": "'sensor/sensor-' || lpad(CAST(i % {sensors} AS VARCHAR), 4, '0') || '/temperature'",
    "qos": "CAST(1 AS UTINYINT)",
    "retain": "false",
    "payload": ("CAST('{{\"device_id\":\"sensor-' || lpad(CAST(i % {sensors} AS VARCHAR), 4, '0') || '\",\"ts\":' "
                "|| CAST(round({t0} + i * {step}, 3) AS VARCHAR) || ',\"temperature\":' "
                "|| CAST(CASE WHEN i % 10 = 9 THEN 999.5 ELSE (i * 7919) % 3000 / 100.0 END AS VARCHAR) || '}}' AS BLOB)"),
    "payload_size": "CAST(octet_length({payload}) AS INTEGER)",
    "payload_sha256": "sha256(CAST(i AS VARCHAR))",
    "schema_set": "'v1'",
    "schema_name": "'temperature'",
    "schema_version": "'v1'",
    "topic_filter": "'sensor/+/temperature'",
    "verdict": "CASE WHEN i % 10 = 9 THEN 'reject' ELSE 'accept' END",
    "reason_code": "CAST(CASE WHEN i % 10 = 9 THEN 153 ELSE 0 END AS UTINYINT)",
    "reasons": ("CASE WHEN i % 10 = 9 THEN '[{{\"check\":\"schema\",\"message\":\"999.5 is greater than the maximum "
                "of 125\",\"schema\":\"temperature:v1\",\"path\":\"/temperature\"}}]' ELSE '[]' END"),
    "latency_us": "CAST(20 + hash(i) % 200 AS INTEGER)",
    "config_revision": "'3f2a9c1b'",
    "dry_run": "false",
    "is_will": "false",
    "released_from": "CAST(NULL AS BIGINT)",
    "forward": "i % 10 != 9",
    "forward_qos": "CAST(NULL AS UTINYINT)",
    "payload_audited": "true",
}

# Runs in the query's own process: the real command, timed from the inside.
_CHILD = """\
import json, sys, time
started = time.perf_counter()
from appliance.cli import main
import appliance.audit.query  # DuckDB: what the command imports when it runs
imported = time.perf_counter()
try:
    main(sys.argv[1:], prog_name="appliance", standalone_mode=False)
finally:
    done = time.perf_counter()
    sys.stderr.write("\\n" + json.dumps({"imports_s": imported - started, "command_s": done - imported}) + "\\n")
"""


@dataclass(frozen=True)
class AuditData:
    rows: int  # verdicts in all: in Parquet and in the log
    files: int
    rows_per_file: int
    row_group_rows: int
    parquet_bytes: int
    generate_s: float
    tail: int = 0  # of them, verdicts in the log, not converted (with an event every 500 records)


@dataclass
class QueryTiming:
    """One query, each run in a process of its own: medians over the runs."""

    name: str
    sql: str
    runs: list[dict[str, float]] = field(default_factory=list)  # command_s, imports_s, start_s, process_s
    result_rows: int | None = None
    error: str | None = None

    def median(self, key: str) -> float | None:
        values = [run[key] for run in self.runs if key in run]
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"sql": self.sql, "command_s": self.median("command_s"), "imports_s": self.median("imports_s"),
                "start_s": self.median("start_s"), "process_s": self.median("process_s"),
                "result_rows": self.result_rows, "error": self.error, "runs": self.runs}


@dataclass
class AuditSqlFigures:
    data: AuditData
    queries: list[QueryTiming]

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.data.rows, "tail": self.data.tail, "files": self.data.files,
                "rows_per_file": self.data.rows_per_file,
                "row_group_rows": self.data.row_group_rows, "parquet_bytes": self.data.parquet_bytes,
                "generate_s": round(self.data.generate_s, 2),
                "queries": {q.name: q.to_json() for q in self.queries}}


def decisions_per_segment(segment_bytes: int = 16 << 20, *, sample: int = 5_000) -> int:
    """How many decisions of the benchmark's readings a log segment holds, from the real codec: a
    sample encoded as the sink writes them (a connection and a context record per sensor once per
    segment, then compact decisions referring to them), extrapolated to the segment's size."""
    from appliance.audit.records import COMPACT_DECISION, CONNECTION, CONTEXT, DECISION, compact_from_row
    from appliance.msglog.format import encode_record
    from bench.payloads import reading, synthetic_ts, topic

    definitions = decisions = 0
    for i in range(sample):
        device = f"sensor-{i % SENSORS:04d}"
        payload = reading(device, i, synthetic_ts(i))
        rejected = i % 10 == 9
        row = (i, 1_795_766_400.0 + i / RATE, device, None, f"10.0.0.{i % SENSORS}:5{i % SENSORS:04d}", 5, topic(device),
               1, False, payload, len(payload), None, "v1", "temperature", "v1", "sensor/+/temperature",
               "reject" if rejected else "accept", 153 if rejected else 0,
               '[{"check":"schema","message":"999.5 is greater than the maximum of 125","schema":"temperature:v1",'
               '"path":"/temperature"}]' if rejected else "[]", 20 + i % 200, "3f2a9c1b", False, False, None,
               not rejected, None, True)
        if i < SENSORS:
            fields = dict(zip(DECISION.names, row, strict=True))
            for kind in (CONNECTION, CONTEXT):
                definitions += len(encode_record(i + 1, kind.code, kind.encode(tuple(fields[n] for n in kind.names))))
        decisions += len(encode_record(i + 1, COMPACT_DECISION, compact_from_row(row, 1, 2)))
    return int((segment_bytes - 16 - definitions) / (decisions / sample))


def default_tail(rows: int, segment_bytes: int = SEGMENT_BYTES) -> int:
    """Records not converted yet, on average: half a segment (never more than half of `rows`)."""
    return min(decisions_per_segment(segment_bytes) // 2, rows // 2)


def generate(state_dir: Path, rows: int = ROWS, *, tail: int | None = None, segment_bytes: int = SEGMENT_BYTES,
             rows_per_file: int | None = None, row_group_rows: int | None = None, rate: float = RATE) -> AuditData:
    """Writes `rows` decisions into STATE_DIR's audit store (see the module's docstring): the last
    `tail` in the message log (default: `default_tail`), the others in Parquet as the seal helper
    converts segments of `segment_bytes` (or files of `rows_per_file`); the last one recorded now.
    Returns what it wrote."""
    from appliance.audit.layout import Watermark, make_dirs
    from appliance.audit.seal import CONVERT_ROW_GROUP_ROWS, write_views
    from bench.audit_store import write_log

    started = time.perf_counter()
    per_file = rows_per_file or decisions_per_segment(segment_bytes)
    row_groups = row_group_rows or CONVERT_ROW_GROUP_ROWS
    tail = default_tail(rows, segment_bytes) if tail is None else min(tail, rows)
    layout = Layout(state_dir)
    make_dirs(layout.log_dir)
    files = _parquet(layout, rows - tail, per_file, row_groups, rate, end=time.time() - tail / rate)
    layout.write_watermark(Watermark(files[-1][1] if files else -1, rows - tail))
    write_views(layout)
    # The log's records after the watermark: `tail` decisions, and an event every 500 records (write_log's mix).
    records = tail
    while records - len(range(0, records, 500)) < tail:
        records += 1
    if records:
        write_log(layout.log_dir, records, 86, rate=rate, first_seq=rows - tail + 1)
    return AuditData(rows=rows, tail=tail, files=len(files), rows_per_file=per_file,
                     row_group_rows=row_groups, parquet_bytes=sum(p.stat().st_size for p, _ in files),
                     generate_s=time.perf_counter() - started)


def _parquet(layout: Layout, rows: int, per_file: int, row_groups: int, rate: float, *,
             end: float) -> list[tuple[Path, int]]:
    """`rows` decisions ending at `end` as converted segments of `per_file` rows; (file, its segment's
    first seq) in order."""
    from appliance.audit.records import DECISION
    from appliance.audit.seal import connect, copy_days

    con = connect(layout, memory_limit="256MB")
    step = 1 / rate
    t0 = end - rows * step
    values: dict[str, object] = {"t0": repr(t0), "step": repr(step), "sensors": SENSORS}
    values["payload"] = _STAGE["payload"].format(**values)
    select = ", ".join(f'{_STAGE[f.name].format(**values)} AS "{f.name}"' for f in DECISION.fields)
    files: list[tuple[Path, int]] = []
    first = 1
    try:
        con.execute(DECISION.stage_ddl("stage_bench"))
        while first <= rows:
            last = min(first + per_file - 1, rows)
            con.execute("DELETE FROM stage_bench")
            con.execute(f"INSERT INTO stage_bench SELECT {select} FROM range({first - 1}, {last}) t(i)")

            def name(day: date, first_seq: int = first) -> Path:
                return layout.parquet_path("decisions", day, first_seq)

            written = copy_days(con, "stage_bench", DECISION, name, layout=layout, row_group_rows=row_groups)
            files += [(path, first) for path in written]
            first = last + 1
    finally:
        con.close()
    return files


def run_query(state_dir: Path, sql: str, *, timeout: float = 300.0) -> tuple[dict[str, float], list[str]]:
    """`appliance audit sql` once, in a process of its own: its timings and the CSV lines it printed."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, "audit", "sql", "--state-dir", str(state_dir),
                           "--format", "csv", sql], capture_output=True, text=True, timeout=timeout)
    process_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"appliance audit sql exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    timings = json.loads(done.stderr.strip().splitlines()[-1])
    figures = {"command_s": round(timings["command_s"], 4), "imports_s": round(timings["imports_s"], 4),
               # the process's start (interpreter, imports) and exit, around the command
               "start_s": round(process_s - timings["command_s"], 4), "process_s": round(process_s, 4)}
    return figures, done.stdout.strip().splitlines()


def measure(workdir: Path, rows: int = ROWS, *, tail: int | None = None, segment_bytes: int = SEGMENT_BYTES,
            runs: int = 3, rows_per_file: int | None = None, queries: dict[str, str] | None = None) -> AuditSqlFigures:
    """Generate the audit store under `workdir`, then time each query `runs` times."""
    state_dir = workdir / "audit-sql"
    data = generate(state_dir, rows, tail=tail, segment_bytes=segment_bytes, rows_per_file=rows_per_file)
    timings = []
    for name, sql in (queries or QUERIES).items():
        timing = QueryTiming(name, sql)
        try:
            for _ in range(runs):
                figures, lines = run_query(state_dir, sql)
                timing.runs.append(figures)
                timing.result_rows = len(lines) - 1  # under the CSV header
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            timing.error = str(exc)
        timings.append(timing)
    return AuditSqlFigures(data, timings)
