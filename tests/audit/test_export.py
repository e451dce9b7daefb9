from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from appliance.audit.store import AuditStore


def read_back(directory: Path, table: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{directory}/{table}/*/*.parquet', "
                "hive_partitioning = true)")
    return con


def test_export_everything_partitioned_by_day(filled: AuditStore, tmp_path: Path):
    out = tmp_path / "export"
    report = filled.export_parquet(out, since=None, until=None)
    assert (report.decisions, report.events) == (600, filled.query("SELECT count(*) FROM events").rows[0][0])
    assert report.days == (date(2026, 11, 20), date(2026, 11, 21))
    assert sorted(d.name for d in (out / "decisions").iterdir()) == ["day=2026-11-20", "day=2026-11-21"]
    assert all(f.exists() and f.is_relative_to(out) for f in report.files)
    assert not filled.export_dir.exists()  # the staging directory is cleaned up
    assert str(report) == (f"exported 600 decisions and {report.events} events (2026-11-20 to "
                           f"2026-11-21, {len(report.files)} Parquet files) to {out}")

    con = read_back(out, "decisions")
    exported = con.execute("SELECT day::VARCHAR, count(*) FROM t GROUP BY ALL ORDER BY 1").fetchall()
    live = filled.query("SELECT ts::DATE::VARCHAR, count(*) FROM decisions GROUP BY ALL ORDER BY 1").rows
    assert exported == live == [("2026-11-20", 320), ("2026-11-21", 280)]
    columns = [d[0] for d in con.execute("SELECT * FROM t LIMIT 1").description]
    assert columns[:24] == filled.query("SELECT * FROM decisions LIMIT 0").columns
    first = con.execute("SELECT id, ts, reasons, payload FROM t WHERE verdict = 'reject' ORDER BY id LIMIT 1").fetchone()
    live_first = filled.query(
        "SELECT id, ts, reasons, payload FROM decisions WHERE verdict = 'reject' ORDER BY id LIMIT 1").rows[0]
    assert first == live_first
    events = read_back(out, "events").execute("SELECT count(*) FROM t").fetchone()
    assert events == (report.events,)


def test_export_a_range_and_again_replaces_rather_than_duplicates(filled: AuditStore, tmp_path: Path):
    out = tmp_path / "export"
    since = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    until = datetime(2026, 11, 21, 0, 0)  # naive: UTC
    first = filled.export_parquet(out, since=since, until=until)
    again = filled.export_parquet(out, since=since, until=until)
    assert first.decisions == again.decisions == 240  # 12:00 to midnight, one every 3 minutes
    assert first.days == (date(2026, 11, 20),)
    con = read_back(out, "decisions")
    assert con.execute("SELECT count(*), min(ts), max(ts) < ? FROM t", [until.replace(tzinfo=UTC)]).fetchone() == (
        240, since, True)


def test_export_from_a_read_only_store(filled: AuditStore, tmp_path: Path):
    path = filled.path
    filled.close()
    with AuditStore(path, read_only=True) as reader:
        report = reader.export_parquet(tmp_path / "out", since=None, until=None)
    assert report.decisions == 600


def test_export_of_an_empty_range_writes_nothing(filled: AuditStore, tmp_path: Path):
    report = filled.export_parquet(tmp_path / "none", since=datetime(2030, 1, 1, tzinfo=UTC),
                                   until=None)
    assert (report.decisions, report.events, report.files) == (0, 0, ())


def test_a_large_export_stays_within_the_memory_limit(tmp_path: Path):
    """A busy day: 800,000 verdicts with payloads export under the store's memory_limit (one
    PARTITION_BY (day) COPY ordered by id ran out of memory at 600,000), in id order."""
    store = AuditStore(tmp_path / "audit.duckdb")
    with store._transaction() as con:  # noqa: SLF001 - bulk rows, far faster than the journal
        con.execute(
            "INSERT INTO decisions (id, ts, client_id, topic, qos, retain, payload, payload_size, payload_sha256, verdict) "
            "SELECT i, TIMESTAMPTZ '2026-11-20 00:00:00+00' + to_microseconds(i * 200_000), 'sensor-' || (i % 100), "
            "'sensor/' || (i % 100) || '/temperature', 1, false, "
            "encode('{\"device_id\":\"sensor-' || (i % 100) || '\",\"ts\":\"2026-11-27T12:00:00.123456Z\",\"temperature\":21.5,\"n\":' || i || '}'), "
            "95, sha256(i::VARCHAR), 'accept' FROM range(800000) t(i)"
        )
    out = tmp_path / "export"
    report = store.export_parquet(out, since=None, until=None)
    assert report.decisions == 800_000 and report.days == (date(2026, 11, 20), date(2026, 11, 21))
    con = read_back(out, "decisions")
    assert con.execute("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM t").fetchone() == (800_000, 800_000, 0, 799_999)
    ids = con.execute("SELECT id FROM read_parquet(?)", [str(next((out / "decisions" / "day=2026-11-20").iterdir()))]).fetchall()
    assert [i for (i,) in ids] == sorted(i for (i,) in ids)  # in id order within the file
    store.close()
