"""`AuditStore`: the DuckDB file behind the audit log.

One writer (the thread that moves batches out of the SQLite journal) appends through `append()`;
everything that changes the file goes through one connection under one lock. Readers (analyst SQL,
quarantine listings, exports) each get their own cursor, so they run concurrently with appends and see
a consistent snapshot; DuckDB cursors must not be shared between threads.

The file is opened with external access disabled and the configuration locked, except for one
staging directory that exports write into (`<file>.exports/`): even SQL that got past the guard
cannot read or write other files, attach databases or load extensions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import duckdb

from appliance.audit import quarantine as _quarantine
from appliance.audit.errors import AuditError, QueryRefused, QueryTimeout
from appliance.audit.export import ExportReport, export_parquet
from appliance.audit.guard import check_query
from appliance.audit.records import DECISION_COLUMNS, EVENT_COLUMNS
from appliance.audit.results import QueryResult, format_result
from appliance.audit.retention import RetentionPolicy, RetentionReport, enforce_retention
from appliance.audit.schema import REASON_TYPE, check_version, file_version, migrate

__all__ = [
    "AuditError", "AuditStore", "ExportReport", "QueryRefused", "QueryResult", "QueryTimeout",
    "RetentionPolicy", "RetentionReport", "format_result",
]

_RUNNING_HINT = (
    "the appliance is running: use `appliance audit sql` (it goes through the running appliance)"
)

# Rows are appended as they come (ts a float, reasons/detail JSON text) into a connection-private
# staging table, then converted by one INSERT ... SELECT: ~5 µs/row for 10k-row batches, against
# ~8 µs/row converting in Python (datetime + json.loads per row) and appending directly.
_STAGE_DECISIONS = "audit_stage_decisions"
_STAGE_EVENTS = "audit_stage_events"
_STAGE_TYPES = {"ts": "DOUBLE", "reasons": "VARCHAR", "detail": "VARCHAR"}
_CONVERT = {
    "ts": "to_timestamp(ts)",
    "reasons": f"CAST(CAST(reasons AS JSON) AS {REASON_TYPE})",
    "detail": "CAST(detail AS JSON)",
}


def _stage_ddl(stage: str, table: str, columns: Sequence[str], con: duckdb.DuckDBPyConnection) -> str:
    types = dict(con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE table_name = ? AND schema_name = 'main' AND database_name = current_database()",
        [table],
    ).fetchall())
    fields = ", ".join(f'"{c}" {_STAGE_TYPES.get(c, types[c])}' for c in columns)
    return f"CREATE OR REPLACE TEMP TABLE {stage} ({fields})"


def _insert_sql(stage: str, table: str, columns: Sequence[str]) -> str:
    select = ", ".join(_CONVERT.get(c, f'"{c}"') for c in columns)
    names = ", ".join(f'"{c}"' for c in columns)
    return f"INSERT INTO {table} ({names}) SELECT {select} FROM {stage}"


# DuckDB's buffer pool, not a cap on everything it allocates. Its default is 80 % of RAM; a gateway
# has 0.5-4 GB. 64 MB: appends need little, and bigger analyst queries spill to disk.
MEMORY_LIMIT = "64MB"
# The appender converts Python rows holding the GIL, ~4 µs a row: 2,000 rows in one call kept the
# event loop waiting up to ~8 ms. Appending 200 at a time and yielding in between took the max
# latency at 1k msg/s from ~10 ms to ~5 ms and p99 from 1.4-1.9 to 1.2-1.4 ms (3 A/B pairs).
YIELD_EVERY = 200


def _malloc_trim() -> Callable[[], None]:
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0) and None


# DuckDB allocates with the process's malloc; glibc keeps what a batch freed (tens of MB across its
# arenas) instead of giving it back. Trimming after each batch (~1 ms, once a second at most)
# keeps the resident size near what is in use (docs/performance.md, memory).
release_free_memory = _malloc_trim()


def _open(path: Path, read_only: bool, export_dir: Path) -> duckdb.DuckDBPyConnection:
    config: dict[str, str | bool | int | float | list[str]] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        # A gateway has little memory: DuckDB's default is 80% of RAM. Bigger queries spill to disk.
        "memory_limit": MEMORY_LIMIT,
        "threads": 2,
    }
    try:
        con = duckdb.connect(str(path), read_only=read_only, config=config)
    except duckdb.IOException as error:
        if "lock" in str(error).lower():
            raise AuditError(f"cannot open the audit log {path}: {_RUNNING_HINT}") from None
        raise AuditError(f"cannot open the audit log {path}: {error}") from None
    except duckdb.ConnectionException as error:
        raise AuditError(
            f"cannot open the audit log {path}: it is already open in this process "
            f"({str(error).splitlines()[0]})"
        ) from None
    except duckdb.Error as error:
        raise AuditError(f"cannot open the audit log {path}: {error}") from None
    try:
        # GLOBAL so every cursor shows and buckets times in UTC (days in exports are UTC days).
        con.execute("SET GLOBAL TimeZone = 'UTC'")
        allowed = _sql_string(str(export_dir) + os.sep)
        con.execute(f"SET allowed_directories = [{allowed}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class AuditStore:
    def __init__(self, path: Path, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.export_dir = self.path.with_name(self.path.name + ".exports")
        if read_only and not self.path.exists():
            raise AuditError(f"no audit log at {self.path} (is --state-dir right?)")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = _open(self.path, read_only, self.export_dir)
        self._lock = threading.Lock()  # the writer connection: appends, deletes, retention
        self._cursor_lock = threading.Lock()
        self._export_lock = threading.Lock()
        try:
            if read_only:
                version = file_version(self._con)
                check_version(version, str(self.path))
                if version == 0:
                    raise AuditError(f"{self.path} is not an audit log (no schema_migrations)")
            else:
                migrate(self._con, str(self.path))
                self._con.execute(_stage_ddl(_STAGE_DECISIONS, "decisions", DECISION_COLUMNS, self._con))
                self._con.execute(_stage_ddl(_STAGE_EVENTS, "events", EVENT_COLUMNS, self._con))
            # Readers' cursors are spawned from this one, never from the busy writer connection.
            self._root = self._con.cursor()
        except BaseException:
            self._con.close()
            raise
        self._insert_decisions = _insert_sql(_STAGE_DECISIONS, "decisions", DECISION_COLUMNS)
        self._insert_events = _insert_sql(_STAGE_EVENTS, "events", EVENT_COLUMNS)

    # -- writing (one writer thread; the lock also serializes purges and retention) ---------------

    @contextmanager
    def _writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.read_only:
            raise AuditError(f"{self.path} is open read-only")
        with self._lock:
            yield self._con

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._writer() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    def append(self, decisions: Sequence[tuple[Any, ...]], events: Sequence[tuple[Any, ...]] = ()) -> None:
        """Stores a batch in one transaction: all of it or, on error, none of it."""
        if not decisions and not events:
            return
        try:
            with self._transaction() as con:
                for rows, stage, insert in (
                    (decisions, _STAGE_DECISIONS, self._insert_decisions),
                    (events, _STAGE_EVENTS, self._insert_events),
                ):
                    if rows:
                        appender = con.appender(stage)
                        for start in range(0, len(rows), YIELD_EVERY):
                            appender.append_rows(rows[start:start + YIELD_EVERY])
                            time.sleep(0)  # let the event loop have the GIL (see YIELD_EVERY)
                        appender.flush()
                        con.execute(insert)
                        con.execute(f"DELETE FROM {stage}")
        except duckdb.Error as error:
            raise AuditError(
                f"could not store a batch of {len(decisions)} decisions and {len(events)} events: "
                f"{str(error).splitlines()[0]}"
            ) from error
        finally:
            release_free_memory()

    def delete_from(self, first_decision_id: int | None, first_event_id: int | None) -> None:
        """Drops rows with ids at or above the given ones (None: leave that table alone), to redo
        a move from the journal that was interrupted after DuckDB committed."""
        with self._transaction() as con:
            if first_decision_id is not None:
                con.execute("DELETE FROM decisions WHERE id >= ?", [first_decision_id])
            if first_event_id is not None:
                con.execute("DELETE FROM events WHERE id >= ?", [first_event_id])

    def max_ids(self) -> tuple[int, int]:
        with self._reader() as cursor:
            row = cursor.execute(
                "SELECT (SELECT coalesce(max(id), 0) FROM decisions), "
                "(SELECT coalesce(max(id), 0) FROM events)"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    # -- reading (any thread: each call gets its own cursor) ---------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._cursor_lock:
            cursor = self._root.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    def query(self, sql: str, *, timeout: float = 30.0, max_rows: int = 100_000) -> QueryResult:
        """Runs one analyst SELECT, read-only, cut off after `timeout` seconds."""
        with self._reader() as cursor:
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
                        f"the query ran longer than {timeout:g} s and was stopped: narrow the time "
                        "range (WHERE ts >= ...) or add a LIMIT"
                    ) from None
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

    def quarantine_list(
        self,
        *,
        topic: str | None = None,
        since: datetime | None = None,
        reason: str | None = None,
        limit: int = 100,
    ) -> QueryResult:
        with self._reader() as cursor:
            return _quarantine.list_held(cursor, topic=topic, since=since, reason=reason, limit=limit)

    def quarantine_get(self, decision_id: int) -> dict[str, Any] | None:
        with self._reader() as cursor:
            return _quarantine.get(cursor, decision_id)

    def quarantine_purge(self, ids: Sequence[int] | None = None) -> int:
        with self._transaction() as con:
            return _quarantine.purge(con, ids)

    def quarantine_size_bytes(self) -> int:
        with self._reader() as cursor:
            return _quarantine.size_bytes(cursor)

    def size_bytes(self) -> int:
        """Bytes on disk: the database file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    # -- maintenance --------------------------------------------------------------------------------

    def export_parquet(
        self, to_dir: Path, *, since: datetime | None, until: datetime | None
    ) -> ExportReport:
        with self._export_lock, self._reader() as cursor:
            return export_parquet(cursor, self.export_dir, Path(to_dir), since=since, until=until)

    def enforce_retention(
        self, policy: RetentionPolicy, *, now: datetime | None = None
    ) -> RetentionReport:
        with self._writer() as con:
            return enforce_retention(con, policy, now=now)

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
