"""Retention over the Parquet store (policy fields as retention.py's RetentionPolicy).

Verdicts go by whole UTC days: `verdicts_max_age` deletes the day directories (decisions and events
alike) that ended before the cutoff; `verdicts_max_bytes` deletes the oldest days until the Parquet
files' real size on disk fits. Payload and quarantine limits rewrite the files that hold payloads to
drop (rewrite.py): older than max_age, then the oldest beyond max_bytes; the verdicts stay.

Records not yet converted (the tail, minutes old) are left to the next run; the log's own segments
go once they are converted and forwarded (the service removes them).
"""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb

from appliance.audit.layout import TABLES, Layout, ParquetFile, fsync_dir, sql_string
from appliance.audit.retention import RetentionPolicy, RetentionReport
from appliance.audit.rewrite import drop_payloads
from appliance.audit.seal import connect, write_views


def enforce_retention(state_dir: Path, policy: RetentionPolicy, *, now: datetime | None = None) -> RetentionReport:
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    layout = Layout(state_dir)
    deleted = {t: 0 for t in TABLES}
    payloads = quarantined = 0
    with layout.maintenance():
        con = connect(layout)
        try:
            if policy.verdicts_max_age is not None:
                cutoff = now - policy.verdicts_max_age
                for day in _days(layout):
                    if datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1) <= cutoff:
                        _drop_day(con, layout, day, deleted)
            payloads = _drop_payloads(con, layout, "accept", now, policy.payloads_max_age, policy.payloads_max_bytes)
            quarantined = _drop_payloads(con, layout, "reject", now, policy.quarantine_max_age,
                                         policy.quarantine_max_bytes)
            if policy.verdicts_max_bytes is not None:
                sizes: dict[date, int] = {}
                for table in TABLES:
                    for f in layout.files(table):
                        sizes[f.day] = sizes.get(f.day, 0) + _size(f.path)
                total = sum(sizes.values())
                for day in sorted(sizes):
                    if total <= policy.verdicts_max_bytes:
                        break
                    _drop_day(con, layout, day, deleted)
                    total -= sizes[day]
        finally:
            con.close()
        write_views(layout)  # a table may have lost its last file
    return RetentionReport(deleted["decisions"], deleted["events"], payloads, quarantined, False)


def _days(layout: Layout) -> list[date]:
    return sorted({f.day for t in TABLES for f in layout.files(t)})


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _rows(con: duckdb.DuckDBPyConnection, files: list[ParquetFile]) -> int:
    if not files:
        return 0
    listed = ", ".join(sql_string(f.path) for f in files)
    row = con.execute(f"SELECT count(*) FROM read_parquet([{listed}], hive_partitioning = false)").fetchone()
    return int(row[0]) if row else 0


def _drop_day(con: duckdb.DuckDBPyConnection, layout: Layout, day: date, deleted: dict[str, int]) -> None:
    for table in TABLES:
        files = [f for f in layout.files(table) if f.day == day]
        deleted[table] += _rows(con, files)
        directory = layout.day_dir(table, day)
        if directory.exists():
            shutil.rmtree(directory)
            fsync_dir(directory.parent)


def _drop_payloads(con: duckdb.DuckDBPyConnection, layout: Layout, verdict: str, now: datetime,
                   max_age: timedelta | None, max_bytes: int | None) -> int:
    dropped = 0
    files = layout.files("decisions")
    if max_age is not None:
        cutoff = now - max_age
        old = [f.path for f in files if f.day <= cutoff.date()]
        dropped += len(drop_payloads(con, old, f"verdict = '{verdict}' AND ts < TIMESTAMPTZ '{cutoff.isoformat()}'"))
    if max_bytes is not None and files:
        listed = ", ".join(sql_string(f.path) for f in files)
        held = (f"FROM read_parquet([{listed}], hive_partitioning = false) "
                f"WHERE verdict = '{verdict}' AND payload IS NOT NULL")  # dry-run rows hold bytes too
        row = con.execute(f"SELECT coalesce(sum(payload_size), 0) {held}").fetchone()
        if row and row[0] > max_bytes:
            keep = con.execute(
                f"SELECT min(id) FROM (SELECT id, sum(payload_size) OVER (ORDER BY id DESC ROWS UNBOUNDED "
                f"PRECEDING) AS newer {held}) WHERE newer <= ?", [max_bytes]).fetchone()
            keep_from = keep[0] if keep and keep[0] is not None else None
            condition = f"verdict = '{verdict}'" + (f" AND id < {int(keep_from)}" if keep_from is not None else "")
            dropped += len(drop_payloads(con, [f.path for f in files], condition))
    return dropped

