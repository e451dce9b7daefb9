"""Where the audit log lives on disk, and the small durable-file tools every writer of it uses.

    STATE_DIR/log/                          the message log (appliance/msglog): the durable record
    STATE_DIR/audit/parquet/decisions/day=YYYY-MM-DD/{first_seq:020d}.parquet
    STATE_DIR/audit/parquet/events/day=YYYY-MM-DD/{first_seq:020d}.parquet
    STATE_DIR/audit/parquet/*/day=YYYY-MM-DD/{first_seq:020d}-{last_seq:020d}.parquet   (compacted)
    STATE_DIR/audit/converted.json          the watermark: the last log segment converted to Parquet
    STATE_DIR/audit/audit.duckdb            views over the Parquet files, for `duckdb -readonly`
    STATE_DIR/audit/maintenance.lock        held by whoever rewrites files (seal, purge, retention)

A Parquet file is named after the first seq of the batch of segments it came from. A batch's files
are all renamed into place before the watermark moves past it, so a reader that read watermark W
takes exactly the files named <= W.last_seq and reads the records after W from the log: a file a
crashed conversion left behind (named > W) is ignored until the conversion is redone, which
replaces it under the same name.

A finished day's files are compacted into one, named after the first and the last seq of the files
it replaces (`{first}-{last}.parquet`). A file whose seq range lies within another's in the same
day directory is shadowed: readers skip it, and the next seal run deletes it (it only exists if
compaction was interrupted between publishing the merged file and deleting the ones it replaces).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from appliance.msglog.fileio import FileIO, OsIO

OS_IO = OsIO()
TABLES = ("decisions", "events")
_PARQUET_NAME = re.compile(r"^(\d{20})(?:-(\d{20}))?\.parquet$")
_DAY_DIR = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True, slots=True)
class Watermark:
    segment: int = -1   # first_seq of the last segment converted (-1: none yet)
    last_seq: int = 0   # the last seq converted: the tail starts after it


@dataclass(frozen=True, slots=True)
class ParquetFile:
    path: Path
    table: str
    day: date
    first_seq: int
    last_seq: int  # the same as first_seq for a file of one batch (its name holds only the first)


class Layout:
    def __init__(self, state_dir: Path, *, io: FileIO = OS_IO):
        self.state_dir = Path(state_dir).absolute()
        self.io = io  # what writes, syncs, renames and removes its files (reads use os directly)
        self.log_dir = self.state_dir / "log"
        self.audit_dir = self.state_dir / "audit"
        self.parquet_dir = self.audit_dir / "parquet"
        self.views_file = self.audit_dir / "audit.duckdb"
        self.watermark_file = self.audit_dir / "converted.json"
        self.lock_file = self.audit_dir / "maintenance.lock"
        self.tmp_dir = self.audit_dir / "tmp"  # DuckDB spills here

    def make_dirs(self, path: Path) -> None:
        """make_dirs() of a directory in the state dir, durable all the way down from it."""
        make_dirs(path, self.io, within=self.state_dir)

    def table_dir(self, table: str) -> Path:
        return self.parquet_dir / table

    def day_dir(self, table: str, day: date) -> Path:
        return self.parquet_dir / table / f"day={day.isoformat()}"

    def parquet_path(self, table: str, day: date, first_seq: int, last_seq: int | None = None) -> Path:
        name = f"{first_seq:020d}" if last_seq is None else f"{first_seq:020d}-{last_seq:020d}"
        return self.day_dir(table, day) / f"{name}.parquet"

    def files(self, table: str, *, upto_seq: int | None = None) -> list[ParquetFile]:
        """The table's Parquet files sorted by (day, first_seq); with upto_seq, only those named
        <= upto_seq (the ones a watermark covers)."""
        found = []
        try:
            days = os.listdir(self.table_dir(table))
        except FileNotFoundError:
            return []
        for day_name in days:
            match = _DAY_DIR.match(day_name)
            if not match:
                continue
            day = date.fromisoformat(match.group(1))
            try:
                names = os.listdir(self.table_dir(table) / day_name)
            except FileNotFoundError:
                continue
            for name in names:
                named = _PARQUET_NAME.match(name)
                if named and (upto_seq is None or int(named.group(1)) <= upto_seq):
                    first = int(named.group(1))
                    last = int(named.group(2)) if named.group(2) else first
                    found.append(ParquetFile(self.table_dir(table) / day_name / name, table, day, first, last))
        found.sort(key=lambda f: (f.day, f.first_seq, -f.last_seq))
        return found

    def visible(self, table: str, *, upto_seq: int | None = None) -> list[ParquetFile]:
        """files(), less the shadowed ones (see the module's docstring)."""
        return _unshadowed(self.files(table, upto_seq=upto_seq))

    def read_watermark(self) -> Watermark:
        try:
            data = json.loads(self.watermark_file.read_text())
        except FileNotFoundError:
            return Watermark()
        return Watermark(int(data["segment"]), int(data["last_seq"]))

    def write_watermark(self, mark: Watermark) -> None:
        write_durably(self.watermark_file, json.dumps(
            {"segment": mark.segment, "last_seq": mark.last_seq}).encode() + b"\n", self.io)

    @contextmanager
    def maintenance(self) -> Iterator[None]:
        """One file rewriter at a time across processes (the seal helper, purge, retention)."""
        self.make_dirs(self.audit_dir)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _unshadowed(files: list[ParquetFile]) -> list[ParquetFile]:
    """Drops every file whose seq range lies within another's of the same day (files is sorted by
    day, first_seq, then widest range first)."""
    kept: list[ParquetFile] = []
    for f in files:
        if kept and kept[-1].day == f.day and kept[-1].last_seq >= f.last_seq:
            continue  # within the previous kept file's range (it starts no later and ends no sooner)
        kept.append(f)
    return kept


def previous_version(state_dir: Path) -> bool:
    """Whether `state_dir` holds the previous (SQLite + DuckDB) version's audit log, not imported yet:
    its journal, or a DuckDB file with tables (ours holds only views, beside its key file). Cheap:
    no DuckDB needed."""
    audit = Path(state_dir) / "audit"
    return (audit / "journal.sqlite3").exists() or (
        (audit / "audit.duckdb").exists() and not (audit / ".views-key").exists())


# The file tools below take the FileIO to go through (appliance/msglog/fileio.py): the real one by
# default, CrashIO in the power-loss tests (tests/audit/test_seal_powerloss.py). A Layout carries
# its own (`layout.io`), which the seal code and the service pass on (retention, purge and the
# upgrade call these with the default one).

def fsync_dir(path: Path, io: FileIO = OS_IO) -> None:
    io.fsync_dir(path)


def fsync_file(path: Path, io: FileIO = OS_IO) -> None:
    """Sync a file's data (and its size) to disk, whoever wrote it: DuckDB's COPY writes a Parquet
    file through its own I/O, and only this sync makes it durable."""
    fd = io.open(path)
    try:
        io.fdatasync(fd)
    finally:
        io.close(fd)


def make_dirs(path: Path, io: FileIO = OS_IO, *, within: Path | None = None) -> None:
    """mkdir -p, durably (FileIO.makedirs): every directory from `within` (the state dir; without
    it, `path`'s parent) down to `path` is fsync'd into its parent, even one that exists already: a
    process killed between its mkdir and that fsync left it behind, not durable yet."""
    io.makedirs(Path(path), within=within)


def publish(tmp: Path, final: Path, io: FileIO = OS_IO) -> None:
    """Make a fully written temp file durable under its final name: fsync, rename, fsync the dir."""
    fsync_file(tmp, io)
    io.rename(tmp, final)
    fsync_dir(final.parent, io)


def write_durably(path: Path, data: bytes, io: FileIO = OS_IO) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = io.open(tmp, create=True)
    try:
        io.truncate(fd, 0)  # a crashed run's temp file may be longer
        io.write_all(fd, data, 0)
    finally:
        io.close(fd)
    publish(tmp, path, io)


def unlink_if_exists(path: Path, io: FileIO = OS_IO) -> bool:
    try:
        io.unlink(path)
    except FileNotFoundError:
        return False
    return True


def temp_name(final: Path) -> Path:
    """A temp file beside `final` that no reader's glob (*.parquet, *.seg) matches."""
    return final.with_name(f".{final.name}.tmp")


def sql_string(text: str | Path) -> str:
    return "'" + str(text).replace("'", "''") + "'"
