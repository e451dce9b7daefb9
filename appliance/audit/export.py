"""Parquet exports: decisions and events for a time range, hive-partitioned by UTC day
(`decisions/day=2026-11-27/*.parquet`), readable by DuckDB, pandas or Spark without the live file.

The store's DuckDB may only write into its staging directory (external access is disabled, see
store.py), so files are written there and then moved into place. Files are named after the range,
so exporting the same range again replaces them rather than adding duplicates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from appliance.audit.errors import AuditError

TABLES = ("decisions", "events")


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
        for table in TABLES:
            target = str(staging / table).replace("'", "''")
            row = cursor.execute(
                f"COPY (SELECT *, CAST(ts AS DATE) AS day FROM {table} WHERE {where} ORDER BY id) "
                f"TO '{target}' (FORMAT parquet, PARTITION_BY (day), COMPRESSION zstd, "
                f"FILENAME_PATTERN '{pattern}', OVERWRITE_OR_IGNORE true)"
            ).fetchone()
            counts[table] = int(row[0]) if row else 0
        files, days = [], set()
        for source in sorted(staging.rglob("*.parquet")):
            relative = source.relative_to(staging)
            destination = to_dir / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, destination)
            files.append(destination)
            days.add(date.fromisoformat(relative.parent.name.removeprefix("day=")))
    except duckdb.Error as error:
        raise AuditError(f"export to {to_dir} failed: {error}") from error
    except OSError as error:
        raise AuditError(f"export to {to_dir} failed: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(to_dir, counts["decisions"], counts["events"], tuple(sorted(days)), tuple(files))
