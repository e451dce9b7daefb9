"""Parquet exports: decisions and events for a time range, hive-partitioned by UTC day
(`decisions/day=2026-11-27/*.parquet`), readable by DuckDB, pandas or Spark without the appliance.

`export_parquet` runs on a cursor of any DuckDB that has the `decisions` and `events` tables
(archive.py gives it AuditQuery's: the Parquet store plus the log's tail). Files are written into a
staging directory and moved into place once all of them were written, so a failed export leaves no
partial files in the target. Files are named after the range, so exporting the same range again
replaces them rather than adding duplicates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb

from appliance.audit.errors import AuditError

TABLES = ("decisions", "events")
# Rows per Parquet row group: what the writer buffers. DuckDB's default (122,880) of ~300-byte rows
# is more than a 64 MB memory limit (AuditQuery's) holds next to everything else (30,000 did not;
# 20,000 did).
ROW_GROUP_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class ExportReport:
    to_dir: Path
    decisions: int
    events: int
    days: tuple[date, ...]
    files: tuple[Path, ...]

    def __str__(self) -> str:
        days = (f"{self.days[0]} to {self.days[-1]}" if len(self.days) > 1
                else str(self.days[0]) if self.days else "no days")
        return (f"exported {self.decisions} decisions and {self.events} events ({days}, "
                f"{len(self.files)} Parquet files) to {self.to_dir}")


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _stamp(moment: datetime | None, default: str) -> str:
    return _utc(moment).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") if moment else default


def export_parquet(
    cursor: duckdb.DuckDBPyConnection,
    staging: Path,
    to_dir: Path,
    *,
    since: datetime | None,
    until: datetime | None,
) -> ExportReport:
    conditions = ["TRUE"]
    if since is not None:
        conditions.append(f"ts >= TIMESTAMPTZ '{_utc(since).isoformat()}'")
    if until is not None:
        conditions.append(f"ts < TIMESTAMPTZ '{_utc(until).isoformat()}'")
    where = " AND ".join(conditions)
    pattern = f"audit_{_stamp(since, 'start')}_{_stamp(until, 'end')}_{{i}}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts = {}
    try:
        cursor.begin()  # one snapshot for every COPY below: a purge meanwhile changes none of them
        for table in TABLES:
            counts[table] = 0
            # One COPY per day into its day=... directory, rather than one PARTITION_BY (day) COPY
            # ordered by id: that one buffers whole partitions and sorts, and ran out of the store's
            # memory limit at a few hundred thousand rows. Rows are stored in id order (the log's
            # order, kept by the Parquet files and the tail), and a plain scan keeps that order.
            days_in_range = cursor.execute(
                f"SELECT DISTINCT CAST(ts AS DATE) FROM {table} WHERE {where} ORDER BY 1"
            ).fetchall()
            for (day,) in days_in_range:
                directory = staging / table / f"day={day.isoformat()}"
                directory.mkdir(parents=True, exist_ok=True)
                target = str(directory / f"{pattern.format(i=0)}.parquet").replace("'", "''")
                start = datetime(day.year, day.month, day.day, tzinfo=UTC)
                row = cursor.execute(
                    f"COPY (SELECT * FROM {table} WHERE {where} AND ts >= TIMESTAMPTZ '{start.isoformat()}' "
                    f"AND ts < TIMESTAMPTZ '{(start + timedelta(days=1)).isoformat()}') "
                    f"TO '{target}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_ROWS})"
                ).fetchone()
                counts[table] += int(row[0]) if row else 0
        cursor.commit()
        files, days = [], set()
        for source in sorted(staging.rglob("*.parquet")):
            relative = source.relative_to(staging)
            destination = to_dir / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, destination)
            files.append(destination)
            days.add(date.fromisoformat(relative.parent.name.removeprefix("day=")))
    except duckdb.Error as error:
        try:
            cursor.rollback()
        except duckdb.Error:
            pass  # no transaction left to end
        raise AuditError(f"export to {to_dir} failed: {error}") from error
    except OSError as error:
        raise AuditError(f"export to {to_dir} failed: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(to_dir, counts["decisions"], counts["events"], tuple(sorted(days)), tuple(files))
