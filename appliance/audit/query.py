"""`AuditQuery`: the audit tables as analysts see them, in a DuckDB of its own (in memory, in the
process that asks: `appliance audit sql`, export, quarantine listings), never in the service.

`decisions` and `events` are views over the Parquet files the watermark covers plus the tail: the
records after the watermark (sealed segments not converted yet and the active segment), read from
the log and decoded with records.py when the query opens. A record written to the log is thus
visible to the next query as soon as the writer has handed it to the OS. `accepted`, `rejected`
and `quarantine` are defined as in the views file (seal.py), with the same columns and types as the
DuckDB store had (reasons a STRUCT list, detail JSON, ts TIMESTAMPTZ shown in UTC).

Analyst SQL goes through the guard (guard.py) and runs in a transaction that is rolled back; behind
it the connection has external access disabled and its configuration locked, with only the Parquet
directory readable: even SQL that got past the guard cannot read other files, write any, attach
databases or load extensions.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import duckdb

from appliance.audit import quarantine as _quarantine
from appliance.audit.errors import AuditError, QueryRefused, QueryTimeout
from appliance.audit.guard import check_query
from appliance.audit.layout import TABLES, Layout, Watermark, sql_string
from appliance.audit.records import (
    COMPACT_DECISION,
    CONNECTION,
    CONTEXT,
    DECISION,
    EVENT,
    KINDS,
    decode_compact_staged,
    placeholder,
    tail_stage_select,
    tail_stage_ddl,
)
from appliance.audit.results import QueryResult
from appliance.audit.seal import view_statements
from appliance.msglog.reader import list_segments, read_record, read_segment

_log = logging.getLogger(__name__)

MEMORY_LIMIT = "64MB"
_ATTEMPTS = 5


def _tail_table(table: str) -> str:
    return f"_tail_{table}"


# The tail's staging tables (query.py's own: `_tail_decisions` and `_tail_events` read them).
_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS = "_tail_compact", "_tail_connections", "_tail_contexts"
_STAGE_V1, _STAGE_EVENTS = "_tail_v1", "_tail_stage_events"
_STAGES = (_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS, _STAGE_V1, _STAGE_EVENTS)


def load_tail(con: duckdb.DuckDBPyConnection, layout: Layout, mark: Watermark, *,
              chunk: int = 10_000) -> int:
    """Reads the records of every segment after the watermark's into tables `_tail_decisions` and
    `_tail_events` (the audit columns); returns how many records it loaded.

    Compact decisions are staged as their bodies hold them (records.decode_compact_staged), beside
    the connection and context records they refer to, and made rows in SQL, as the seal helper
    makes them for Parquet: a record reads the same here as from its file (tests/audit/test_tail.py)."""
    # One thread: for half a segment's rows a second one cost more than it gave (0.38 against
    # 0.34 s for 63k records on the 2-core VM under load).
    threads = con.execute("SELECT current_setting('threads')").fetchone()
    con.execute("SET threads = 1")
    try:
        return _load_tail(con, layout, mark, chunk)
    finally:
        con.execute(f"SET threads = {int(threads[0]) if threads else 1}")


def _load_tail(con: duckdb.DuckDBPyConnection, layout: Layout, mark: Watermark, chunk: int) -> int:
    for statement in (*tail_stage_ddl(_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS),
                      DECISION.stage_ddl(_STAGE_V1, temp=False), EVENT.stage_ddl(_STAGE_EVENTS, temp=False)):
        con.execute(statement)
    appenders = [con.appender(table) for table in _STAGES]
    compact: list[tuple[object, ...]] = []
    connections: list[tuple[object, ...]] = []
    contexts: list[tuple[object, ...]] = []
    v1: list[tuple[object, ...]] = []
    events: list[tuple[object, ...]] = []
    defined: set[int] = set()  # seqs of the definitions staged
    loaded = 0
    after = mark.last_seq
    decode = decode_compact_staged
    for info in list_segments(layout.log_dir):
        if info.first_seq <= mark.segment:
            continue
        try:
            # From the segment's start: the definitions before the watermark are needed too.
            for seq, kind, body in read_segment(info.path):
                if kind == COMPACT_DECISION:
                    if seq > after:
                        compact.append(decode(body))
                        if len(compact) >= chunk:
                            appenders[0].append_rows(compact)
                            loaded += len(compact)
                            compact.clear()
                elif kind == CONNECTION.code or kind == CONTEXT.code:
                    if seq not in defined:
                        defined.add(seq)
                        (connections if kind == CONNECTION.code else contexts).append((seq, *KINDS[kind].decode(body)))
                elif seq <= after:
                    continue
                elif kind == EVENT.code:
                    events.append(EVENT.decode(body))
                elif kind == DECISION.code:
                    v1.append(DECISION.decode(body))
        except FileNotFoundError:
            continue  # converted and removed meanwhile: the caller sees the watermark move
    loaded += len(compact) + len(v1) + len(events)
    for appender, buffer in zip(appenders, (compact, connections, contexts, v1, events), strict=True):
        if buffer:
            appender.append_rows(buffer)
        appender.flush()
    _stage_missing(con, layout)
    decisions = f"({tail_stage_select(_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS)})"
    selects = {DECISION.table: f"SELECT {DECISION.select_from_stage()} FROM {decisions} UNION ALL "
                               f"SELECT {DECISION.select_from_stage()} FROM {_STAGE_V1}",
               EVENT.table: f"SELECT {EVENT.select_from_stage()} FROM {_STAGE_EVENTS}"}
    for table, select in selects.items():
        # A table, not a view: the join would run again in every statement, and an export's COPY
        # over a view with a join ran out of the memory limit.
        con.execute(f"CREATE OR REPLACE TABLE {_tail_table(table)} AS {select}")
    for stage in _STAGES:
        con.execute(f"DROP TABLE {stage}")
    return loaded


def _stage_missing(con: duckdb.DuckDBPyConnection, layout: Layout) -> None:
    """Stages the definitions the tail's decisions refer to but the tail does not hold (written
    before a failed write, in a segment converted since): read from the log, or placeholders if
    the log no longer has them, as records.Definitions reads them."""
    for kind, table, ref in ((CONNECTION, _STAGE_CONNECTIONS, "connection"), (CONTEXT, _STAGE_CONTEXTS, "context")):
        missing = con.execute(f'SELECT DISTINCT d."{ref}" FROM {_STAGE_COMPACT} d ANTI JOIN {table} t '
                              f'ON t."{ref}" = d."{ref}" ORDER BY 1').fetchall()
        if not missing:
            continue
        rows: list[tuple[object, ...]] = []
        for (seq,) in missing:
            record = read_record(layout.log_dir, seq)
            if record is not None and record.kind == kind.code:
                rows.append((seq, *kind.decode(record.body)))
                continue
            _log.warning("%s record %d is not in the message log: decisions referring to it read as %r",
                         kind.name, seq, placeholder(kind))
            rows.append((seq, *placeholder(kind)))
        appender = con.appender(table)
        appender.append_rows(rows)
        appender.flush()


def parquet_source(paths: Sequence[Path]) -> str:
    listed = ", ".join(sql_string(p) for p in paths)
    return f"read_parquet([{listed}], hive_partitioning = false)"


class AuditQuery:
    """A snapshot of the audit log: Parquet files + tail as of when it was opened."""

    def __init__(self, state_dir: Path, *, memory_limit: str = MEMORY_LIMIT, threads: int = 2,
                 locked: bool = True):
        self.layout = Layout(state_dir)
        self._scratch = self.layout.tmp_dir / f"query-{os.getpid()}-{id(self)}"
        self._lock = threading.Lock()
        self._scratch.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "memory_limit": memory_limit, "threads": threads, "temp_directory": str(self._scratch),
            "autoinstall_known_extensions": False, "autoload_known_extensions": False,
        }
        self._config, self._locked = config, locked
        try:
            self._con = self._open(config, locked)
        except BaseException:
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise

    def refresh(self) -> None:
        """Takes a new snapshot: files and tail as they are now."""
        with self._lock:
            old, self._con = self._con, self._open(self._config, self._locked)
        old.close()

    def _open(self, config: dict[str, Any], locked: bool) -> duckdb.DuckDBPyConnection:
        for _ in range(_ATTEMPTS):
            mark = self.layout.read_watermark()
            files = {t: [f.path for f in self.layout.visible(t, upto_seq=mark.last_seq)] for t in TABLES}
            con = duckdb.connect(":memory:", config=config)
            try:
                con.execute("SET GLOBAL TimeZone = 'UTC'")
                self.tail_records = load_tail(con, self.layout, mark)
            except BaseException:
                con.close()
                raise
            if self.layout.read_watermark() != mark:
                con.close()  # a conversion finished meanwhile: its segments may be gone; start again
                continue
            try:
                self._define_views(con, files, locked)
            except duckdb.IOException as error:
                con.close()
                if _gone(error):
                    continue  # a file listed was merged or dropped meanwhile (a compaction): again
                raise
            except BaseException:
                con.close()
                raise
            self.watermark = mark
            self.files = files
            return con
        raise AuditError("the audit log kept changing while it was being opened; try again")

    def _define_views(self, con: duckdb.DuckDBPyConnection, files: dict[str, list[Path]], locked: bool) -> None:
        sources: dict[str, str | None] = {}
        for table in TABLES:
            tail = f"(SELECT * FROM {_tail_table(table)})"
            sources[table] = (f"(SELECT * FROM {parquet_source(files[table])} UNION ALL BY NAME "
                              f"SELECT * FROM {_tail_table(table)})") if files[table] else tail
        for statement in view_statements(self.layout, sources):
            con.execute(statement)
        if locked:
            allowed = sql_string(str(self.layout.parquet_dir) + os.sep)
            con.execute(f"SET allowed_directories = [{allowed}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for a thread (DuckDB cursors must not be shared between threads)."""
        with self._lock:
            return self._con.cursor()

    def query(self, sql: str, *, timeout: float = 30.0, max_rows: int = 100_000) -> QueryResult:
        """Runs one analyst SELECT through the guard, read-only, cut off after `timeout` seconds.
        When a file of the snapshot is gone (merged or dropped by retention since), it takes a
        new snapshot and runs the query once more."""
        for attempt in (1, 2):
            cursor = self.cursor()
            try:
                return run_guarded(cursor, sql, timeout=timeout, max_rows=max_rows)
            except _FilesChanged:
                if attempt == 2:
                    raise QueryRefused("the audit log's files changed during the query; run it again") from None
            finally:
                cursor.close()
            self.refresh()
        raise AssertionError("unreachable")

    def quarantine_list(self, *, topic: str | None = None, since: datetime | None = None,
                        reason: str | None = None, limit: int = 100) -> QueryResult:
        cursor = self.cursor()
        try:
            return _quarantine.list_held(cursor, topic=topic, since=since, reason=reason, limit=limit)
        finally:
            cursor.close()

    def quarantine_get(self, decision_id: int) -> dict[str, Any] | None:
        cursor = self.cursor()
        try:
            return _quarantine.get(cursor, decision_id)
        finally:
            cursor.close()

    def max_ids(self) -> tuple[int, int]:
        """The largest decision and event ids (0 when none): where a new IdClock starts after."""
        cursor = self.cursor()
        try:
            row = cursor.execute(
                "SELECT (SELECT coalesce(max(id), 0) FROM decisions), (SELECT coalesce(max(id), 0) FROM events)"
            ).fetchone()
        finally:
            cursor.close()
        assert row is not None
        return int(row[0]), int(row[1])

    def close(self) -> None:
        with self._lock:
            self._con.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_guarded(cursor: duckdb.DuckDBPyConnection, sql: str, *, timeout: float, max_rows: int) -> QueryResult:
    text = check_query(cursor, sql)
    expired = threading.Event()

    def interrupt() -> None:
        expired.set()
        cursor.interrupt()

    timer = threading.Timer(timeout, interrupt)
    timer.daemon = True
    timer.start()
    try:
        # Second layer: whatever got past the check runs in a transaction that is rolled back.
        cursor.begin()
        cursor.execute(text)
        columns = [d[0] for d in cursor.description or ()]
        rows = cursor.fetchmany(max_rows + 1)
    except duckdb.Error as error:
        if expired.is_set():
            raise QueryTimeout(
                f"the query ran longer than {timeout:g} s and was stopped: narrow the time range "
                "(WHERE ts >= ...) or add a LIMIT") from None
        if isinstance(error, duckdb.IOException) and _gone(error):
            raise _FilesChanged from None
        if isinstance(error, duckdb.PermissionException):
            raise QueryRefused(f"reading or writing files is not allowed ({_first(error)})") from None
        raise QueryRefused(f"the query failed: {_first(error)}") from None
    finally:
        timer.cancel()
        try:
            cursor.rollback()
        except duckdb.Error:
            pass  # no transaction open (begin failed)
    return QueryResult(columns, rows[:max_rows], len(rows) > max_rows)


class _FilesChanged(Exception):
    pass


def _gone(error: BaseException) -> bool:
    text = str(error)
    return "No such file" in text or "No files found" in text or "does not exist" in text


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
