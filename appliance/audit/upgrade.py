"""Upgrade on first start: a state directory of the previous version becomes the new layout.

The previous version kept verdicts and events in `audit/audit.duckdb` (tables), with the newest
ones (and, after a crash, some of those again) in the SQLite journal `audit/journal.sqlite3`, whose
`outbox` table held accepted messages not forwarded yet. `upgrade()`:

1. writes every decision and event to Parquet by UTC day, in id order, as files named
   `00000000000000000000.parquet` (seq 0: before any log record, so every reader takes them). Rows
   a crash left in both stores are taken from the journal only, as the old start-up did (it
   dropped DuckDB's rows at or above the journal's first id before moving);
2. appends each outbox row to the message log as a FORWARD_ONLY record (in id order, so the
   forwarder sends them first), skipping ids a previous, interrupted upgrade already appended, and
   waits until they are durable;
3. renames the old files to `*.migrated` (kept, for the operator to delete) and writes the views file.

Progress is remembered in `audit/upgrade.json` after steps 1 and 2, so an upgrade interrupted at any
point is redone from where it stopped: nothing is lost and nothing is imported twice.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import duckdb

from appliance.audit.layout import (
    Layout,
    fsync_dir,
    publish,
    sql_string,
    temp_name,
    write_durably,
)
from appliance.audit.legacy import JOURNAL_FILE, legacy_duckdb, needs_upgrade
from appliance.audit.records import DECISION, EVENT, FORWARD_ONLY, RecordKind
from appliance.audit.seal import connect, write_views

log = logging.getLogger(__name__)

MIGRATED = ".migrated"
# Parquet files of the upgrade: named as if from seq 0, so watermark filters always include them.
UPGRADE_SEQ = 0


class Log(Protocol):
    """What the upgrade needs of the message log (appliance.msglog.log.MessageLog, started)."""

    directory: Path

    def append(self, kind: int, body: bytes) -> int: ...

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool: ...


@dataclass
class UpgradeReport:
    decisions: int = 0
    events: int = 0
    forward_only: int = 0
    files: int = 0
    renamed: tuple[str, ...] = ()
    # The largest decision or event id imported (0 if none, or when a resumed upgrade had already
    # written its Parquet files): a new IdClock starts after it.
    max_id: int = 0


def upgrade(state_dir: Path, log_: Log, *, durable_timeout: float = 60.0,
            checkpoint: Callable[[str], None] | None = None) -> UpgradeReport | None:
    """Imports a previous version's state dir; None when there is nothing to import."""
    layout = Layout(state_dir)
    progress_file = layout.audit_dir / "upgrade.json"
    if not needs_upgrade(layout):
        if progress_file.exists():  # interrupted after the last rename: only the tidying is left
            write_views(layout)
            progress_file.unlink()
            fsync_dir(layout.audit_dir)
        return None
    report = UpgradeReport()
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    journal = layout.audit_dir / JOURNAL_FILE
    old = layout.views_file if legacy_duckdb(layout.views_file) else None

    with layout.maintenance():
        if not progress.get("parquet"):
            con = connect(layout)
            try:
                _to_parquet(con, layout, journal if journal.exists() else None, old, report, checkpoint)
            finally:
                con.close()
            progress["parquet"] = True
            write_durably(progress_file, json.dumps(progress).encode())
            _step(checkpoint, "parquet_done")
        if not progress.get("outbox"):
            if journal.exists():
                report.forward_only = _outbox_to_log(journal, log_, durable_timeout)
            progress["outbox"] = True
            write_durably(progress_file, json.dumps(progress).encode())
            _step(checkpoint, "outbox_done")
        report.renamed = _rename_old(layout, journal, checkpoint)
    write_views(layout)
    progress_file.unlink()
    fsync_dir(layout.audit_dir)
    log.info("audit: imported the previous version's audit log: %s", report)
    return report


def _step(checkpoint: Callable[[str], None] | None, name: str) -> None:
    if checkpoint is not None:
        checkpoint(name)


def _journal_rows(journal: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        exists = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
        return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall() if exists else []
    finally:
        conn.close()


def _stage_journal(con: duckdb.DuckDBPyConnection, kind: RecordKind, rows: list[tuple[object, ...]]) -> str:
    """The journal's rows (the audit columns, SQLite-typed) in a staging table of the log's fields."""
    stage = f"journal_{kind.table}"
    con.execute(kind.stage_ddl(stage))
    booleans = [i for i, f in enumerate(kind.fields) if f.type == "bool" and f.audit]
    extra: tuple[object, ...] = (False, None, True) if kind is DECISION else ()
    staged = []
    for row in rows:
        values = list(row)
        for i in booleans:
            values[i] = None if values[i] is None else bool(values[i])
        staged.append((*values, *extra))
    if staged:
        appender = con.appender(stage)
        appender.append_rows(staged)
        appender.flush()
    return f"(SELECT {kind.select_from_stage()} FROM {stage})"


def _to_parquet(con: duckdb.DuckDBPyConnection, layout: Layout, journal: Path | None, old: Path | None,
                report: UpgradeReport, checkpoint: Callable[[str], None] | None) -> None:
    if old is not None:
        con.execute(f"ATTACH {sql_string(old)} AS old (READ_ONLY)")
    for kind in (DECISION, EVENT):
        rows = _journal_rows(journal, kind.table) if journal is not None else []
        sources = []
        if old is not None:
            keep_below = f" WHERE id < {int(rows[0][0])}" if rows else ""
            columns = ", ".join(f'"{c}"' for c in kind.columns)
            sources.append(f"SELECT {columns} FROM old.main.{kind.table}{keep_below}")
        if rows:
            sources.append(f"SELECT * FROM {_stage_journal(con, kind, rows)}")
        if not sources:
            continue
        con.execute(f"CREATE OR REPLACE TEMP VIEW import_{kind.table} AS {' UNION ALL '.join(sources)}")
        top = con.execute(f"SELECT coalesce(max(id), 0) FROM import_{kind.table}").fetchone()
        report.max_id = max(report.max_id, int(top[0]) if top else 0)
        days = [d for (d,) in con.execute(
            f"SELECT DISTINCT CAST(ts AS DATE) AS d FROM import_{kind.table} ORDER BY d").fetchall()]
        for day in days:
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            final = layout.parquet_path(kind.table, day, UPGRADE_SEQ)
            layout.make_dirs(final.parent)
            tmp = temp_name(final)
            row = con.execute(
                f"COPY (SELECT * FROM import_{kind.table} WHERE ts >= TIMESTAMPTZ '{start.isoformat()}' "
                f"AND ts < TIMESTAMPTZ '{(start + timedelta(days=1)).isoformat()}' ORDER BY id) "
                f"TO {sql_string(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)").fetchone()
            publish(tmp, final)
            report.files += 1
            count = int(row[0]) if row else 0
            if kind is DECISION:
                report.decisions += count
            else:
                report.events += count
            _step(checkpoint, "file_published")
    if old is not None:
        con.execute("DETACH old")


def _outbox_to_log(journal: Path, log_: Log, timeout: float) -> int:
    from appliance.msglog.reader import read_log

    already = {FORWARD_ONLY.decode(r.body)[0] for r in read_log(log_.directory) if r.kind == FORWARD_ONLY.code}
    last = 0
    appended = 0
    for row in _journal_rows(journal, "outbox"):
        if row[0] in already:
            continue
        values = list(row)
        values[6] = bool(values[6])  # retain: 0/1 in SQLite
        last = log_.append(FORWARD_ONLY.code, FORWARD_ONLY.encode(tuple(values)))
        appended += 1
    if last and not log_.wait_durable(last, timeout):
        raise OSError(f"the message log did not make the {appended} imported outbox messages durable")
    return appended


def _rename_old(layout: Layout, journal: Path, checkpoint: Callable[[str], None] | None) -> tuple[str, ...]:
    renamed = []
    if journal.exists():
        # Fold the WAL into the file, so the renamed journal is complete on its own.
        conn = sqlite3.connect(journal)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    candidates = [journal, journal.with_name(JOURNAL_FILE + "-wal"), journal.with_name(JOURNAL_FILE + "-shm")]
    if legacy_duckdb(layout.views_file):
        candidates += [layout.views_file, layout.views_file.with_name(layout.views_file.name + ".wal")]
    for path in candidates:
        if path.exists():
            target = path.with_name(path.name.replace(JOURNAL_FILE, JOURNAL_FILE + MIGRATED)
                                    if JOURNAL_FILE in path.name else
                                    path.name.replace("audit.duckdb", "audit.duckdb" + MIGRATED))
            os.replace(path, target)
            renamed.append(target.name)
            fsync_dir(path.parent)
            _step(checkpoint, "renamed")
    return tuple(renamed)
