"""SQL downloads, streamed: an analyst query's rows go from DuckDB to the HTTP response a bounded
step at a time, so the console's memory does not grow with the result (on a Pi the whole service
has ~80 MB).

- **CSV** is written as the rows come: each step fetches as many rows as make about CHUNK_BYTES of
  text (judged by the step before; at most MAX_FETCH_ROWS, at least one) and hands the text on.
- **Parquet** cannot be: its footer describes the whole file, and the snapshot's DuckDB, which runs
  analyst SQL, may not write files. Each step's rows are appended to a table in a DuckDB database
  file of its own (its memory limit makes it spill to that file), which is then copied to a
  Parquet file beside it; the database is removed at once, the file sent in FILE_PIECE pieces and
  removed. The staging may take at most STAGE_MAX_BYTES on disk, and stops while less than
  STAGE_RESERVE_BYTES would be left free (a viewer must not fill the state dir's disk). Staging
  directories are named with the console's pid: `sweep_stale` removes those of a console that died
  (SIGKILL, OOM) before it could.

The query goes through the same guard as `appliance audit sql` (check_query, then the locked-down
snapshot: no file access, no writes, in a transaction that is rolled back), under a time limit
that runs until its last row is fetched, and stops after `max_rows` rows.

Everything here blocks (DuckDB, files): the web layer opens a download and takes each piece in a
worker thread, and closes it when the response ends or the client goes away.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import duckdb

from appliance.audit.errors import AuditError, QueryRefused, QueryTimeout
from appliance.audit.guard import check_query
from appliance.audit.layout import sql_string
from appliance.audit.results import csv_cells
from appliance.console.store import Store

CHUNK_BYTES = 256 * 1024
FIRST_ROWS = 16  # before any row's size is known: 16 rows of 64 kB are still only 1 MB
MAX_FETCH_ROWS = 10_000
FILE_PIECE = 64 * 1024
STAGE_MEMORY = "24MB"  # with 4 MB row groups: enough for 2 kB rows (measured; 16 MB was not)
STAGE_MAX_BYTES = 256 * 1024 * 1024  # a Parquet download's staging on disk, at most (docs/console.md)
STAGE_RESERVE_BYTES = 64 * 1024 * 1024  # free space a Parquet download's staging leaves on the state dir's disk
STAGE_PREFIX = "download-"
TOO_LARGE = "too large for a Parquet download: use CSV or narrow the query"

T = TypeVar("T")


class Download(Protocol):
    media_type: str
    filename: str
    rows: int  # rows sent (CSV: so far)
    pieces: int  # pieces handed out so far
    largest_piece: int  # bytes

    @property
    def truncated(self) -> bool:
        """Stopped at the row limit (CSV: known only once its last row was fetched)."""

    def next_piece(self) -> bytes | None:
        """The next piece of the file, None at its end; raises AuditError when the query fails
        (e.g. its time limit) after the first piece."""

    def close(self) -> None:
        """Ends the query (if still running) and removes what the download left on disk."""


class GuardedRows:
    """One analyst query's rows from a cursor of a borrowed snapshot (it stays open however long
    the client takes), fetched step by step, at most `max_rows` of them."""

    def __init__(self, store: Store, text: str, *, timeout: float, max_rows: int):
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._expired = threading.Event()
        self.timeout = timeout
        self.left = max_rows
        self.truncated = False
        try:
            query = self._stack.enter_context(store.borrowed())
            self._cursor = cursor = query.cursor()
            self._stack.callback(cursor.close)
            checked = check_query(cursor, text)
            timer = threading.Timer(timeout, self._interrupt)
            timer.daemon = True
            timer.start()
            self._stack.callback(timer.cancel)
            self._call(cursor.begin)  # second layer: whatever got past the check is rolled back
            self._stack.callback(self._rollback)
            self._call(cursor.execute, checked)
            description = cursor.description or ()
            self.columns = [str(d[0]) for d in description]
            self.types = [str(d[1]) for d in description]
        except BaseException:
            self._stack.close()
            raise

    def _interrupt(self) -> None:
        self._expired.set()
        self._cursor.interrupt()

    def _rollback(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self._cursor.rollback()

    def _call(self, func: Callable[..., T], *args: Any) -> T:
        try:
            return func(*args)
        except duckdb.Error as error:
            raise self._refusal(error) from None

    def _refusal(self, error: duckdb.Error) -> AuditError:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if self._expired.is_set():
            return QueryTimeout(f"the query ran longer than {self.timeout:g} s and was stopped: narrow the time "
                                "range (WHERE ts >= ...) or add a LIMIT")
        if isinstance(error, duckdb.IOException) and ("No such file" in first or "No files found" in first):
            return QueryRefused("the audit log's files changed during the query; run it again")
        if isinstance(error, duckdb.PermissionException):
            return QueryRefused(f"reading or writing files is not allowed ({first})")
        return QueryRefused(f"the query failed: {first}")

    def fetch(self, wanted: int) -> list[tuple[Any, ...]]:
        """Up to `wanted` more rows ([] at the end, or once `max_rows` were fetched)."""
        with self._lock:
            if self.left <= 0:
                return []
            # Asking for the last rows allowed, ask for one more: whether the result goes on.
            rows = self._call(self._cursor.fetchmany, wanted if wanted < self.left else self.left + 1)
            if len(rows) > self.left:
                self.truncated = True
                del rows[self.left:]
            self.left -= len(rows)
            if self.truncated:
                self.left = 0
            return rows

    def close(self) -> None:
        if not self._lock.acquire(blocking=False):  # a fetch is running in another thread: stop it
            self._cursor.interrupt()
            self._lock.acquire()
        try:
            self._stack.close()
        finally:
            self._lock.release()


def _next_step(rows: int, size: int) -> int:
    """How many rows the next step fetches: about CHUNK_BYTES' worth, judged by the last step."""
    if rows == 0 or size == 0:
        return FIRST_ROWS
    return max(1, min(MAX_FETCH_ROWS, rows * CHUNK_BYTES // size))


class CsvDownload:
    media_type = "text/csv"
    filename = "audit-query.csv"

    def __init__(self, rows: GuardedRows):
        """Fetches the first piece: most failures of a query come with its first rows, and are
        better told with a 400 than by a download cut short."""
        self._rows = rows
        self._step = FIRST_ROWS
        self._header: list[str] | None = rows.columns
        self._done = False
        self.rows = self.pieces = self.largest_piece = 0
        try:
            self._first = self._piece()
        except BaseException:
            rows.close()
            raise

    def next_piece(self) -> bytes | None:
        if self._first is not None:
            piece, self._first = self._first, None
            return piece
        return self._piece()

    def _piece(self) -> bytes | None:
        if self._done:
            return None
        batch = self._rows.fetch(self._step)
        self._done = len(batch) < self._step
        if not batch and self._header is None:
            return None
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if self._header is not None:
            writer.writerow(self._header)
            self._header = None
        writer.writerows(csv_cells(row) for row in batch)
        piece = out.getvalue().encode("utf-8")
        self._step = _next_step(len(batch), len(piece))
        self.rows += len(batch)
        self.pieces += 1
        self.largest_piece = max(self.largest_piece, len(piece))
        return piece

    @property
    def truncated(self) -> bool:
        return self._rows.truncated

    def close(self) -> None:
        self._rows.close()


def _estimate(row: tuple[Any, ...]) -> int:
    """A row's size in memory, roughly: its text and bytes, 16 bytes for anything else."""
    return sum(len(v) if isinstance(v, (str, bytes)) else len(str(v)) if isinstance(v, (list, dict)) else 16
               for v in row)


class ParquetDownload:
    media_type = "application/vnd.apache.parquet"

    def __init__(self, rows: GuardedRows, scratch_root: Path, *, max_bytes: int = STAGE_MAX_BYTES,
                 reserve_bytes: int = STAGE_RESERVE_BYTES):
        """Runs the query to its end (into the staging database), then writes the Parquet file.
        Raises AuditError when the staging would take more than `max_bytes` on disk or leave less
        than `reserve_bytes` free."""
        self.rows = self.pieces = self.largest_piece = 0
        self._truncated = False
        self.filename = "audit-query.parquet"
        self._file: io.BufferedReader | None = None
        self._scratch: Path | None = None
        try:
            self._scratch = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=scratch_root))
            target = self._scratch / "result.parquet"
            self._stage(rows, target, max_bytes, reserve_bytes)
            self._truncated = rows.truncated
            if self._truncated:
                self.filename = f"audit-query-first-{self.rows}-rows.parquet"
            self._file = open(target, "rb")  # noqa: SIM115 - read piece by piece until close()
            target.unlink()  # the open file stays readable; gone from the directory already
        except BaseException:
            self.close()
            raise
        finally:
            rows.close()

    def _stage(self, rows: GuardedRows, target: Path, max_bytes: int, reserve_bytes: int) -> None:
        assert self._scratch is not None
        database = self._scratch / "stage.duckdb"
        try:
            self._stage_in(database, rows, target, max_bytes, reserve_bytes)
        finally:
            # It holds a copy of the rows (payloads, maybe): gone as soon as the Parquet file is written.
            for path in (database, database.with_name(database.name + ".wal")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _check_room(self, max_bytes: int, reserve_bytes: int) -> None:
        """After each step: the staging's files (database, WAL, spill) within `max_bytes`, and
        `reserve_bytes` still free on their disk."""
        assert self._scratch is not None
        used = sum(p.stat().st_size for p in self._scratch.rglob("*") if p.is_file())
        if used > max_bytes:
            raise AuditError(f"the result is {TOO_LARGE} (its staging passed {max_bytes >> 20} MB "
                             f"after {self.rows:,} rows)")
        disk = os.statvfs(self._scratch)
        if disk.f_bavail * disk.f_frsize < reserve_bytes:
            raise AuditError(f"the state dir's disk is nearly full ({reserve_bytes >> 20} MB must stay free): "
                             f"the result is {TOO_LARGE}")

    def _stage_in(self, database: Path, rows: GuardedRows, target: Path, max_bytes: int, reserve_bytes: int) -> None:
        assert self._scratch is not None
        names: list[str] = []
        for name in rows.columns:  # Parquet columns need distinct names
            unique, n = name, 1
            while unique in names:
                n += 1
                unique = f"{name}_{n}"
            names.append(unique)
        columns = ", ".join(f'"{n.replace(chr(34), chr(34) * 2)}" {"VARCHAR" if t == "NULL" else t}'
                            for n, t in zip(names, rows.types))
        con = duckdb.connect(str(database),
                             config={"threads": 1, "memory_limit": STAGE_MEMORY, "preserve_insertion_order": True,
                                     "temp_directory": str(self._scratch), "max_temp_directory_size": f"{max_bytes}B",
                                     "autoinstall_known_extensions": False, "autoload_known_extensions": False})
        try:
            con.execute(f"CREATE TABLE result ({columns})")
            appender = con.appender("result")
            step = FIRST_ROWS
            while batch := rows.fetch(step):
                appender.append_rows(batch)
                appender.flush()
                self.rows += len(batch)
                self._check_room(max_bytes, reserve_bytes)
                step = _next_step(len(batch), sum(_estimate(r) for r in batch))
            con.execute(f"COPY result TO {sql_string(target)} (FORMAT parquet, COMPRESSION zstd, "
                        "ROW_GROUP_SIZE_BYTES '4MB')")
        except duckdb.Error as error:
            if isinstance(error, duckdb.OutOfMemoryException) or "max_temp_directory_size" in str(error):
                raise AuditError(f"the result is {TOO_LARGE} (its staging passed {max_bytes >> 20} MB "
                                 f"after {self.rows:,} rows)") from None
            raise AuditError(f"the Parquet file could not be written: {error}") from None
        finally:
            con.close()

    @property
    def truncated(self) -> bool:
        return self._truncated

    def next_piece(self) -> bytes | None:
        assert self._file is not None
        piece = self._file.read(FILE_PIECE)
        if not piece:
            return None
        self.pieces += 1
        self.largest_piece = max(self.largest_piece, len(piece))
        return piece

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def sweep_stale(scratch_root: Path) -> list[Path]:
    """Removes the staging directories of consoles no longer running (killed before they could);
    returns them. Those of a running console (another one on the same state dir) stay."""
    swept = []
    for path in scratch_root.glob(f"{STAGE_PREFIX}*"):
        pid = path.name[len(STAGE_PREFIX):].partition("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        swept.append(path)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


FORMATS = ("csv", "parquet")


def open_download(store: Store, text: str, fmt: str, *, max_rows: int, timeout: float,
                  stage_max_bytes: int = STAGE_MAX_BYTES, stage_reserve_bytes: int = STAGE_RESERVE_BYTES) -> Download:
    """The download of one analyst query in `fmt` (FORMATS). A refused or failing query raises
    AuditError here, before anything is sent."""
    if fmt not in FORMATS:
        raise QueryRefused(f"unknown format {fmt!r}: csv or parquet")
    rows = GuardedRows(store, text, timeout=timeout, max_rows=max_rows)
    if fmt == "parquet":
        try:
            scratch = store.scratch_dir()
        except BaseException:
            rows.close()
            raise
        return ParquetDownload(rows, scratch, max_bytes=stage_max_bytes, reserve_bytes=stage_reserve_bytes)
    return CsvDownload(rows)
