"""Measurements behind the Parquet audit store (figures in docs/audit.md).

    python -m bench.audit_store codec
    python -m bench.audit_store seal  --dir DIR [--records 300000] [--payload 100]
    python -m bench.audit_store query --dir DIR [--rows 10000000] [--files 100]
    python -m bench.audit_store ingest --method appender|ndjson [--records 100000] [--memory-limit 64MB]

`seal` writes a message log of realistic decisions in 16 MiB segments, runs the seal helper as its
own process and reports rows/s and the helper's peak RSS. `ingest` compares how the helper could get decoded records into DuckDB (the appender into a
staging table, or NDJSON written with orjson and read back with read_json), in a process of its
own, reporting rows/s and peak RSS. `query` generates `rows` decisions as
Parquet files laid out as the helper writes them (in DuckDB, not through the log: quicker), then
times a GROUP BY over them through appliance.audit.query.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from appliance.audit.records import (
    COMPACT_DECISION,
    CONNECTION,
    CONTEXT,
    DECISION,
    EVENT,
    compact_from_row,
    payload_sha256,
)

SEGMENT_BYTES = 16 << 20


def _decision(i: int, t0: float, rng: random.Random, payload_bytes: int, rate: float) -> tuple[object, ...]:
    device = f"sensor-{i % 100:04d}"
    payload = json.dumps({"device_id": device, "temperature": round(rng.uniform(-10, 40), 2),
                          "unit": "C", "battery": rng.randrange(100)}).encode()
    payload = payload[:payload_bytes].ljust(payload_bytes)
    rejected = i % 10 == 9
    ts = t0 + i / rate
    return ((int(ts * 1000) << 20) + (i & 0xFFFFF), ts, device, None, "10.0.0.7:51234", 5,
            f"sensor/{device}/temperature", 1, False, payload, len(payload), payload_sha256(payload),
            "v3", "temperature", "v1", "sensor/+/temperature", "reject" if rejected else "accept",
            153 if rejected else 0,
            '[{"check":"schema","message":"/temperature: too hot","schema":"temperature:v1",'
            '"path":"/temperature"}]' if rejected else "[]",
            rng.randrange(10, 500), "3f2a9c1b", False, False, None, not rejected, None, True)


def write_log(log_dir: Path, records: int, payload_bytes: int, *, rate: float = 1000.0, compact: bool = True,
              first_seq: int = 1) -> int:
    """A log of `records` messages (an event every 500), version 2 records unless not `compact`,
    the first with seq `first_seq`, the last one recorded now; returns the last seq."""
    from appliance.msglog.format import encode_file_header, encode_record, segment_name

    log_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    t0 = time.time() - records / rate
    seq, first, parts, size = first_seq - 1, first_seq, [encode_file_header(first_seq)], 16
    connections: dict[tuple[object, ...], int] = {}
    contexts: dict[tuple[object, ...], int] = {}
    for i in range(records):
        seq += 1
        if i % 500 == 0:
            body = EVENT.encode(((int((t0 + i / rate) * 1000) << 20) + 0xFFFFF, t0 + i / rate,
                                 "client_connected", "sensor-0001", "10.0.0.7:1", '{"keepalive":60}'))
            kind = EVENT.code
        else:
            row = _decision(i, t0, rng, payload_bytes, rate)
            if compact:  # as the sink writes them: definitions once per segment, then references
                refs = []
                for table, definition in ((connections, CONNECTION), (contexts, CONTEXT)):
                    key = tuple(row[DECISION.names.index(n)] for n in definition.names)
                    if key not in table:
                        record = encode_record(seq, definition.code, definition.encode(key))
                        parts.append(record)
                        size += len(record)
                        table[key] = seq
                        seq += 1
                    refs.append(table[key])
                body, kind = compact_from_row(row, refs[0], refs[1]), COMPACT_DECISION
            else:
                body, kind = DECISION.encode(row), DECISION.code
        record = encode_record(seq, kind, body)
        parts.append(record)
        size += len(record)
        if size >= SEGMENT_BYTES:
            (log_dir / segment_name(first)).write_bytes(b"".join(parts))
            first, parts, size = seq + 1, [encode_file_header(seq + 1)], 16
            connections.clear()
            contexts.clear()
    (log_dir / segment_name(first)).write_bytes(b"".join(parts))
    return seq


def bench_seal(directory: Path, records: int, payload_bytes: int, extra: list[str]) -> dict[str, object]:
    shutil.rmtree(directory, ignore_errors=True)
    write_log(directory / "log", records, payload_bytes)
    log_bytes = sum(p.stat().st_size for p in (directory / "log").iterdir())
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "appliance.audit.seal", "--state-dir", str(directory), *extra],
                         check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(out.strip().splitlines()[-1])
    rows = summary["decisions"] + summary["events"]
    parquet = sum(p.stat().st_size for p in (directory / "audit" / "parquet").rglob("*.parquet"))
    return {"rows": rows, "segments": summary["segments"], "seconds": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed), "helper_peak_rss_mb": round(after.ru_maxrss / 1024, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
            "log_bytes_per_row": round(log_bytes / max(rows, 1), 1),
            "parquet_bytes_per_row": round(parquet / max(rows, 1), 1), "options": extra}


def generate_parquet(directory: Path, rows: int, files: int, *, row_group_rows: int = 122_880,
                     days: int = 10) -> None:
    """`rows` decisions without payloads over `days` days, in `files` files named as the helper
    names them, plus a watermark covering them."""
    import duckdb

    from appliance.audit.layout import Layout, Watermark, make_dirs
    from appliance.audit.seal import write_views

    layout = Layout(directory)
    shutil.rmtree(layout.audit_dir, ignore_errors=True)
    con = duckdb.connect(config={"memory_limit": "1GB", "threads": 2})
    con.execute("SET TimeZone = 'UTC'")
    per_file = rows // files
    t0 = time.time() - days * 86400
    span = days * 86400 / rows
    for f in range(files):
        first = f * per_file + 1
        ts0 = t0 + f * per_file * span
        day = time.strftime("%Y-%m-%d", time.gmtime(ts0))
        target = layout.parquet_path("decisions", __import__("datetime").date.fromisoformat(day), first)
        make_dirs(target.parent)
        con.execute(f"""
            COPY (SELECT (CAST(({ts0} + i * {span}) * 1000 AS BIGINT) << 20) + i AS id,
                    to_timestamp({ts0} + i * {span}) AS ts,
                    'sensor-' || lpad(CAST(i % 500 AS VARCHAR), 4, '0') AS client_id,
                    CAST(NULL AS VARCHAR) AS username, '10.0.0.7:51234' AS peer, CAST(5 AS UTINYINT) AS mqtt_version,
                    'sensor/sensor-' || lpad(CAST(i % 500 AS VARCHAR), 4, '0') || '/temperature' AS topic,
                    CAST(1 AS UTINYINT) AS qos, false AS retain, CAST(NULL AS BLOB) AS payload,
                    CAST(90 + i % 20 AS INTEGER) AS payload_size, md5(CAST(i AS VARCHAR)) || md5(CAST(i + 1 AS VARCHAR)) AS payload_sha256,
                    'v3' AS schema_set, CASE i % 3 WHEN 0 THEN 'temperature' WHEN 1 THEN 'humidity' ELSE 'pressure' END AS schema_name,
                    'v1' AS schema_version, 'sensor/+/temperature' AS topic_filter,
                    CASE WHEN i % 10 = 9 THEN 'reject' ELSE 'accept' END AS verdict,
                    CAST(CASE WHEN i % 10 = 9 THEN 153 ELSE 0 END AS UTINYINT) AS reason_code,
                    CASE WHEN i % 10 = 9 THEN [{{'check': 'schema', 'message': '/temperature: too hot', 'schema': 'temperature:v1', 'path': '/temperature'}}]
                         ELSE [] END::STRUCT("check" VARCHAR, message VARCHAR, "schema" VARCHAR, path VARCHAR)[] AS reasons,
                    CAST(10 + hash(i) % 490 AS INTEGER) AS latency_us, '3f2a9c1b' AS config_revision,
                    false AS dry_run, false AS is_will, CAST(NULL AS BIGINT) AS released_from
                  FROM range({first}, {first + per_file}) t(i))
            TO '{target}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {row_group_rows})""")
    con.close()
    make_dirs(layout.log_dir)
    layout.write_watermark(Watermark(files * per_file, files * per_file))
    write_views(layout)


def bench_query(directory: Path, rows: int, files: int, row_group_rows: int, regenerate: bool) -> dict[str, object]:
    from appliance.audit.query import AuditQuery

    if regenerate or not (directory / "audit" / "parquet").exists():
        started = time.perf_counter()
        generate_parquet(directory, rows, files, row_group_rows=row_group_rows)
        print(f"generated {rows:,} rows in {files} files in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    started = time.perf_counter()
    query = AuditQuery(directory)
    opened = time.perf_counter() - started
    results: dict[str, object] = {"rows": rows, "files": files, "row_group_rows": row_group_rows, "open_s": round(opened, 3)}
    sqls = {
        "group_by_verdict": "SELECT verdict, count(*) FROM decisions GROUP BY verdict",
        "group_by_client": "SELECT client_id, count(*) FILTER (WHERE verdict = 'reject') FROM decisions GROUP BY client_id",
        "group_by_hour": "SELECT date_trunc('hour', ts) AS h, count(*), avg(latency_us) FROM decisions GROUP BY h",
    }
    for name, sql in sqls.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            query.query(sql)
            times.append(time.perf_counter() - started)
        results[name + "_s"] = round(min(times), 3)
    query.close()
    results["parquet_mb"] = round(sum(p.stat().st_size for p in (directory / "audit" / "parquet").rglob("*.parquet")) / 1e6, 1)
    return results


def bench_ingest(directory: Path, method: str, records: int, memory_limit: str) -> dict[str, object]:
    """Runs in this process: call it through `main` in a fresh interpreter for a clean peak RSS."""
    import duckdb
    import orjson

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    t0 = time.time()
    bodies = [DECISION.encode(_decision(i, t0, rng, 100, 1000.0)) for i in range(records)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": 2, "temp_directory": str(directory / "spill")})
    con.execute("SET TimeZone = 'UTC'")
    decode = DECISION.decode
    started = time.perf_counter()
    if method == "appender":
        con.execute(DECISION.stage_ddl("stage", temp=False))
        appender = con.appender("stage")
        for start in range(0, records, 10_000):
            appender.append_rows([decode(b) for b in bodies[start:start + 10_000]])
        appender.flush()
        source = "stage"
    else:
        payload = DECISION.names.index("payload")
        path = directory / "rows.ndjson"
        with open(path, "wb") as out:
            for body in bodies:
                row = list(decode(body))
                row[payload] = None if row[payload] is None else row[payload].hex()
                out.write(orjson.dumps(row) + b"\n")
        columns = ", ".join(
            f"unhex(j->>{i}) AS payload" if f.name == "payload" else f"CAST(j->>{i} AS {f.stage_sql or f.sql}) AS \"{f.name}\""
            for i, f in enumerate(DECISION.fields))
        source = f"(SELECT {columns} FROM (SELECT json AS j FROM read_json_objects('{path}')))"
    loaded = time.perf_counter()
    con.execute(f"COPY (SELECT {DECISION.select_from_stage()} FROM {source}) TO '{directory}/out.parquet' "
                "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)")
    done = time.perf_counter()
    return {"method": method, "records": records, "memory_limit": memory_limit,
            "load_rows_per_s": round(records / (loaded - started)), "rows_per_s": round(records / (done - started)),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_duckdb_mb": round(base / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["codec", "seal", "query", "ingest"])
    parser.add_argument("--method", choices=["appender", "ndjson"], default="appender")
    parser.add_argument("--memory-limit", default="64MB")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/audit-bench"))
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--row-group-rows", type=int, default=122_880)
    parser.add_argument("--regenerate", action="store_true")
    args, extra = parser.parse_known_args()
    if args.what == "codec":
        from appliance.audit.records import _benchmark
        _benchmark()
    elif args.what == "ingest":
        print(json.dumps(bench_ingest(args.dir, args.method, args.records, args.memory_limit)))
    elif args.what == "seal":
        print(json.dumps(bench_seal(args.dir, args.records, args.payload, extra)))
    else:
        print(json.dumps(bench_query(args.dir, args.rows, args.files, args.row_group_rows, args.regenerate)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
