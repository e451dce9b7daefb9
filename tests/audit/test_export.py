"""Parquet exports of a time range (appliance/audit/archive.py): the Parquet store and the tail."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from appliance.audit.archive import export_range
from appliance.audit.layout import Layout, Watermark
from appliance.audit.query import AuditQuery
from appliance.audit.records import DECISION, IdClock
from appliance.msglog.log import MessageLog
from tests.audit.factory import decision, epoch, generate
from tests.audit.logfiles import log_decision


def read_back(directory: Path, table: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{directory}/{table}/*/*.parquet', "
                "hive_partitioning = true)")
    return con


def test_export_everything_partitioned_by_day(filled: AuditQuery, filled_state: Path, tmp_path: Path):
    out = tmp_path / "export"
    report = export_range(filled_state, out, since=None, until=None)
    assert (report.decisions, report.events) == (600, filled.query("SELECT count(*) FROM events").rows[0][0])
    assert report.days == (date(2026, 11, 20), date(2026, 11, 21))
    assert sorted(d.name for d in (out / "decisions").iterdir()) == ["day=2026-11-20", "day=2026-11-21"]
    assert all(f.exists() and f.is_relative_to(out) for f in report.files)
    staging = Layout(filled_state).tmp_dir
    assert not list(staging.glob("export-*"))  # the staging directory is cleaned up
    assert str(report) == (f"exported 600 decisions and {report.events} events (2026-11-20 to "
                           f"2026-11-21, {len(report.files)} Parquet files) to {out}")

    con = read_back(out, "decisions")
    exported = con.execute("SELECT day::VARCHAR, count(*) FROM t GROUP BY ALL ORDER BY 1").fetchall()
    live = filled.query("SELECT ts::DATE::VARCHAR, count(*) FROM decisions GROUP BY ALL ORDER BY 1").rows
    assert exported == live == [("2026-11-20", 320), ("2026-11-21", 280)]
    columns = [d[0] for d in con.execute("SELECT * FROM t LIMIT 1").description]
    assert columns[:24] == filled.query("SELECT * FROM decisions LIMIT 0").columns
    for order in ("", "DESC"):  # the oldest is in Parquet, the newest in the active segment
        first = con.execute(f"SELECT id, ts, reasons, payload FROM t WHERE verdict = 'reject' "
                            f"ORDER BY id {order} LIMIT 1").fetchone()
        live_first = filled.query(f"SELECT id, ts, reasons, payload FROM decisions WHERE verdict = 'reject' "
                                  f"ORDER BY id {order} LIMIT 1").rows[0]
        assert first == live_first
    events = read_back(out, "events").execute("SELECT count(*) FROM t").fetchone()
    assert events == (report.events,)


def test_export_a_range_and_again_replaces_rather_than_duplicates(filled_state: Path, tmp_path: Path):
    out = tmp_path / "export"
    since = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    until = datetime(2026, 11, 21, 0, 0)  # naive: UTC
    first = export_range(filled_state, out, since=since, until=until)
    again = export_range(filled_state, out, since=since, until=until)
    assert first.decisions == again.decisions == 240  # 12:00 to midnight, one every 3 minutes
    assert first.days == (date(2026, 11, 20),)
    con = read_back(out, "decisions")
    assert con.execute("SELECT count(*), min(ts), max(ts) < ? FROM t", [until.replace(tzinfo=UTC)]).fetchone() == (
        240, since, True)


def test_export_while_the_log_is_written(audit_state, tmp_path: Path):  # noqa: ANN001
    """No lock to fight: the appliance's log stays open and written while an export reads it, and
    the export has every record written before it started."""
    start = epoch("2026-11-20T08:00:00")
    decisions, events = generate(100, start=start, step=60.0)
    state = audit_state(decisions, events)
    log = MessageLog(state / "log", segment_max_age=None)
    log.open()
    log.start(None)
    try:
        clock = IdClock(start_after=decisions[-1][0])
        late = [decision(clock.next(start + 7000 + i), start + 7000 + i) for i in range(10)]
        last = 0
        for row in late:
            last = log.append(DECISION.code, DECISION.encode(log_decision(row)))
        assert log.wait_durable(last, timeout=30)
        report = export_range(state, tmp_path / "out", since=None, until=None)
        log.append(DECISION.code, DECISION.encode(log_decision(decision(clock.next(start + 8000), start + 8000))))
    finally:
        log.stop()
    assert report.decisions == 110


def test_export_of_an_empty_range_writes_nothing(filled_state: Path, tmp_path: Path):
    report = export_range(filled_state, tmp_path / "none", since=datetime(2030, 1, 1, tzinfo=UTC), until=None)
    assert (report.decisions, report.events, report.files) == (0, 0, ())


def test_a_large_export_stays_within_the_memory_limit(tmp_path: Path):
    """A busy day: 800,000 verdicts with payloads export under AuditQuery's memory_limit (one
    PARTITION_BY (day) COPY ordered by id ran out of memory at 600,000), in id order. The Parquet
    files are written here directly, as the seal helper lays them out (far faster than the log)."""
    layout = Layout(tmp_path)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(DECISION.table_ddl())
    con.execute(
        "INSERT INTO decisions (id, ts, client_id, topic, qos, retain, payload, payload_size, payload_sha256, verdict) "
        "SELECT i, TIMESTAMPTZ '2026-11-20 00:00:00+00' + to_microseconds(i * 200_000), 'sensor-' || (i % 100), "
        "'sensor/' || (i % 100) || '/temperature', 1, false, "
        "encode('{\"device_id\":\"sensor-' || (i % 100) || '\",\"ts\":\"2026-11-27T12:00:00.123456Z\",\"temperature\":21.5,\"n\":' || i || '}'), "
        "95, sha256(i::VARCHAR), 'accept' FROM range(800000) t(i)"
    )
    for day in (date(2026, 11, 20), date(2026, 11, 21)):
        path = layout.parquet_path("decisions", day, 1)
        path.parent.mkdir(parents=True)
        con.execute(f"COPY (SELECT * FROM decisions WHERE ts::DATE = DATE '{day}' ORDER BY id) TO '{path}' "
                    "(FORMAT parquet, COMPRESSION zstd)")
    con.close()
    layout.write_watermark(Watermark(1, 800_000))
    out = tmp_path / "export"
    report = export_range(tmp_path, out, since=None, until=None)
    assert report.decisions == 800_000 and report.days == (date(2026, 11, 20), date(2026, 11, 21))
    con = read_back(out, "decisions")
    assert con.execute("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM t").fetchone() == (800_000, 800_000, 0, 799_999)
    ids = con.execute("SELECT id FROM read_parquet(?)", [str(next((out / "decisions" / "day=2026-11-20").iterdir()))]).fetchall()
    assert [i for (i,) in ids] == sorted(i for (i,) in ids)  # in id order within the file
