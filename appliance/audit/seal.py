"""Sealed log segments become Parquet: `python -m appliance.audit.seal --state-dir DIR`.

A short-lived helper process (the service starts it when a segment is sealed), so DuckDB never
lives in the service. It converts every sealed segment after the watermark, in batches of up to
`max_batch_bytes` of segments, into one zstd Parquet file per table and UTC day per batch
(layout.py), then moves the watermark past the batch, then refreshes the views file.

Crash safety: each file is written under a temp name, fsync'd, renamed and its directory fsync'd;
the watermark is written the same way only after every file of the batch is in place. Those steps
go through `layout.io` (a FileIO), so tests/audit/test_seal_powerloss.py cuts the power at each. A batch's
files are named after its first segment, and the next run starts at the same segment, so redoing a
batch after a crash at any point replaces the files the crash left instead of adding rows (a
rerun's batch holds at least the rows of the interrupted one). Readers ignore files named after
the watermark (layout.py), so they never see a row twice either.

How rows get into DuckDB (measured, docs/audit.md): records are decoded in Python and appended
with DuckDB's appender into staging tables holding the log's fields (ts a double, JSON as text),
then each day is COPY'd out with the conversions of records.py: in one run, 49k rows/s against
26k for NDJSON read back with read_json (which also ran out of the 64 MB memory limit). Decisions
are staged as the compact records hold them (records.py, version 2: two references, no repeated
strings, no SHA-256 when the payload is there) beside two small tables of connections and
contexts, and joined when copied out: a 16 MiB segment then stages in memory, where whole rows
spilled ~12 MB of temporary files per segment to disk (docs/performance.md).

After converting, finished days' small files are merged (compact_days), and the views file is
refreshed when a table got its first file or lost its last one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from appliance.audit.layout import (
    TABLES,
    Layout,
    ParquetFile,
    Watermark,
    fsync_dir,
    publish,
    sql_string,
    temp_name,
    unlink_if_exists,
    write_durably,
)
from appliance.audit.legacy import needs_upgrade
from appliance.audit.records import (
    AUDITED,
    COMPACT_DECISION,
    COMPACT_FIELDS,
    CONNECTION,
    CONTEXT,
    DECISION,
    EVENT,
    KINDS,
    RecordKind,
    compact_stage_ddl,
    compact_stage_view,
    decode_compact,
    placeholder,
)
from appliance.msglog.reader import SegmentInfo, list_segments, read_record, read_segment

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 16 << 20  # one default segment: peak RSS ~155 MB (64 MiB: ~290 MB)
ROW_GROUP_ROWS = 122_880  # DuckDB's default row group: large groups scan fastest (compacted files)
# A converted segment's row groups. The Parquet writer holds a row group in memory: a 16 MiB segment
# of compact records is ~128k decisions, and 122,880-row groups then need ~190 MB (or spill ~90 MB of
# temporary files at 96 MB); 32,768-row groups convert it in memory (96 MB limit, ~155 MB peak RSS,
# nothing but the Parquet file written). A finished day's files are merged with large groups.
CONVERT_ROW_GROUP_ROWS = 32_768
APPEND_ROWS = 10_000
MEMORY_LIMIT = "96MB"
COMPACT_ROWS = 2_000_000  # rows per file when merging a finished day's files
_DAY = 86_400
VIEWS_VERSION = 1

Checkpoint = Callable[[str], None]


@dataclass
class SealReport:
    segments: int = 0
    decisions: int = 0
    events: int = 0
    files: list[Path] = field(default_factory=list)
    watermark: Watermark = field(default_factory=Watermark)
    problems: list[str] = field(default_factory=list)
    compacted: int = 0  # files merged into one per finished day


def connect(layout: Layout, *, memory_limit: str = MEMORY_LIMIT, threads: int = 2) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB for the helper's own work (full access: this is trusted code)."""
    layout.make_dirs(layout.tmp_dir)
    con = duckdb.connect(config={
        "memory_limit": memory_limit, "threads": threads, "temp_directory": str(layout.tmp_dir),
        "autoinstall_known_extensions": False, "autoload_known_extensions": False,
    })
    con.execute("SET TimeZone = 'UTC'")
    return con


def pending_segments(layout: Layout, mark: Watermark | None = None) -> list[SegmentInfo]:
    """Sealed segments (every one but the newest) not converted yet."""
    mark = mark or layout.read_watermark()
    segments = list_segments(layout.log_dir)[:-1]
    return [s for s in segments if s.first_seq > mark.segment]


def _stage_name(kind: RecordKind) -> str:
    return f"stage_{kind.table}"


# The staging tables of decisions (compact form) and their definitions; `stage_decisions` is the
# view joining them (DECISION's staged fields), which copy_days reads like a table.
_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS = "stage_compact", "stage_connections", "stage_contexts"
_CONNECTION_AT = [DECISION.names.index(n) for n in CONNECTION.names]
_CONTEXT_AT = [DECISION.names.index(n) for n in CONTEXT.names]
_COMPACT_AT = {n: DECISION.names.index(n) for n in COMPACT_FIELDS if n in DECISION.names}


class _Stager:
    """Appends decoded records to the staging tables, a buffer at a time."""

    def __init__(self, con: duckdb.DuckDBPyConnection, log_dir: Path, append_rows: int):
        for ddl in compact_stage_ddl(_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS):
            con.execute(ddl)
        con.execute(EVENT.stage_ddl(_stage_name(EVENT)))
        con.execute(compact_stage_view(_stage_name(DECISION), _STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS))
        self.tables = (_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS, _stage_name(EVENT))
        self.appenders = [con.appender(t) for t in self.tables]
        self.buffers: list[list[tuple[object, ...]]] = [[], [], [], []]
        self.append_rows = append_rows
        self.log_dir = log_dir
        self.decisions = self.events = 0
        self.defined: list[set[int]] = [set(), set()]  # seqs of the connections and contexts staged
        self.wanted: list[set[int]] = [set(), set()]  # ... and those the decisions refer to
        # Version 1 decisions carry their connection and context: staged under negative numbers.
        self._v1: list[dict[tuple[object, ...], int]] = [{}, {}]

    def _add(self, table: int, row: tuple[object, ...]) -> None:
        buffer = self.buffers[table]
        buffer.append(row)
        if len(buffer) >= self.append_rows:
            appender = self.appenders[table]
            appender.append_rows(buffer)
            appender.flush()  # committed now: an appender holding a whole segment needs twice its memory
            buffer.clear()

    def record(self, seq: int, kind: int, body: bytes) -> bool:
        """Stage one record; False if it is not one the audit keeps or defines."""
        if kind == COMPACT_DECISION:
            row = decode_compact(body)
            self.wanted[0].add(row[2])
            self.wanted[1].add(row[3])
            self._add(0, row)
            self.decisions += 1
        elif kind == CONNECTION.code or kind == CONTEXT.code:
            which = 0 if kind == CONNECTION.code else 1
            if seq not in self.defined[which]:
                self.defined[which].add(seq)
                self._add(1 + which, (seq, *KINDS[kind].decode(body)))
        elif kind == EVENT.code:
            self._add(3, EVENT.decode(body))
            self.events += 1
        elif kind == DECISION.code:
            self._version1(DECISION.decode(body))
            self.decisions += 1
        else:
            return False
        return True

    def _version1(self, row: tuple[object, ...]) -> None:
        refs = []
        for which, at in enumerate((_CONNECTION_AT, _CONTEXT_AT)):
            key = tuple(row[i] for i in at)
            ref = self._v1[which].get(key)
            if ref is None:
                ref = self._v1[which][key] = -1 - len(self._v1[which])
                self._add(1 + which, (ref, *key))
            refs.append(ref)
        self._add(0, tuple(refs[0] if n == "connection" else refs[1] if n == "context" else row[_COMPACT_AT[n]]
                           for n in COMPACT_FIELDS))

    def finish(self, report: SealReport | None) -> None:
        """Stage the definitions this batch refers to but does not hold (an earlier segment's, after
        a failed write), or placeholders if the log no longer has them; flush everything."""
        for which, kind in enumerate((CONNECTION, CONTEXT)):
            for seq in sorted(self.wanted[which] - self.defined[which]):
                found = read_record(self.log_dir, seq)
                if found is not None and found.kind == kind.code:
                    self._add(1 + which, (seq, *kind.decode(found.body)))
                    continue
                problem = f"{kind.name} record {seq} is not in the log: its decisions are converted without it"
                log.warning("%s", problem)
                if report is not None:
                    report.problems.append(problem)
                self._add(1 + which, (seq, *placeholder(kind)))
        for appender, buffer in zip(self.appenders, self.buffers, strict=True):
            if buffer:
                appender.append_rows(buffer)
                buffer.clear()
            appender.flush()


class SegmentReused(RuntimeError):
    """A segment being converted was removed and its file reused under the reader."""


def load_records(con: duckdb.DuckDBPyConnection, segments: list[SegmentInfo], *,
                 append_rows: int = APPEND_ROWS, report: SealReport | None = None,
                 log_dir: Path | None = None) -> int:
    """Decodes the segments' audited records into the staging tables (created empty; decisions
    are read through the view `stage_decisions`); returns the last seq read (0 if none)."""
    stager = _Stager(con, log_dir or (segments[0].path.parent if segments else Path(".")), append_rows)
    last_seq = 0
    for info in segments:
        scan = read_segment(info.path)
        for record in scan:
            if not stager.record(record.seq, record.kind, record.body) and record.kind not in KINDS:
                log.warning("segment %s: seq %d has unknown kind %d; skipped", info.path, record.seq, record.kind)
        if scan.reused:
            # Removed and reused for a newer segment while we read it (docs/decisions/0006): only part
            # of it was read. Never converted (nor the watermark moved) on a part.
            raise SegmentReused(f"{info.path} was removed and reused while it was being converted")
        last_seq = max(last_seq, scan.last_seq)
        if scan.problem is not None and report is not None:
            report.problems.append(f"{info.path}: {scan.problem} at offset {scan.problem_offset}")
            log.warning("sealed segment %s: %s at offset %s; the rest of it is skipped",
                        info.path, scan.problem, scan.problem_offset)
    stager.finish(report)
    if report is not None:
        report.decisions += stager.decisions
        report.events += stager.events
    return last_seq


def drop_stage(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"DROP VIEW IF EXISTS {_stage_name(DECISION)}")
    for table in (_STAGE_COMPACT, _STAGE_CONNECTIONS, _STAGE_CONTEXTS, _stage_name(EVENT)):
        con.execute(f"DROP TABLE IF EXISTS {table}")


def copy_days(con: duckdb.DuckDBPyConnection, source: str, kind: RecordKind, target: Callable[[date], Path],
              *, layout: Layout, row_group_rows: int = ROW_GROUP_ROWS,
              checkpoint: Checkpoint | None = None) -> list[Path]:
    """COPYs the staged rows of `source` (log fields) out as the audit table's columns, one Parquet
    file per UTC day in `target(day)`, each published durably: DuckDB writes the temp file, then
    `layout.io` syncs and renames it."""
    days = [int(d) for (d,) in con.execute(
        f"SELECT DISTINCT CAST(floor(ts / {_DAY}) AS BIGINT) AS d FROM {source} ORDER BY d").fetchall()]
    written = []
    for number in days:
        day = datetime.fromtimestamp(number * _DAY, UTC).date()
        final = target(day)
        layout.make_dirs(final.parent)
        tmp = temp_name(final)
        con.execute(
            f"COPY (SELECT {kind.select_from_stage()} FROM {source} "
            f"WHERE ts >= {number * _DAY} AND ts < {(number + 1) * _DAY}) "
            f"TO {sql_string(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {row_group_rows})")
        if checkpoint:
            checkpoint("file_written")
        publish(tmp, final, layout.io)
        if checkpoint:
            checkpoint("file_published")
        written.append(final)
    return written


def convert_pending(layout: Layout, *, max_batch_bytes: int = MAX_BATCH_BYTES,
                    row_group_rows: int = CONVERT_ROW_GROUP_ROWS, memory_limit: str = MEMORY_LIMIT,
                    threads: int = 2, compact: bool = True, checkpoint: Checkpoint | None = None) -> SealReport:
    """Converts every sealed, unconverted segment; returns what it did. `checkpoint(step)` is
    called after each durable step (tests inject crashes there)."""
    report = SealReport()
    with layout.maintenance():
        mark = layout.read_watermark()
        report.watermark = mark
        remove_orphans(layout, mark)
        con = connect(layout, memory_limit=memory_limit, threads=threads)
        try:
            while pending := pending_segments(layout, mark):
                batch: list[SegmentInfo] = []
                size = 0
                for info in pending:
                    if batch and size + _size(info.path) > max_batch_bytes:
                        break
                    batch.append(info)
                    size += _size(info.path)
                last_seq = load_records(con, batch, report=report, log_dir=layout.log_dir)
                first = batch[0].first_seq
                for kind in AUDITED:
                    report.files += copy_days(
                        con, _stage_name(kind), kind, _namer(layout, kind.table, first),
                        layout=layout, row_group_rows=row_group_rows, checkpoint=checkpoint)
                drop_stage(con)
                mark = Watermark(batch[-1].first_seq, max(mark.last_seq, last_seq))
                layout.write_watermark(mark)
                report.watermark = mark
                report.segments += len(batch)
                if checkpoint:
                    checkpoint("watermark_written")
            if compact:
                report.compacted = compact_days(layout, con, before=datetime.now(UTC).date(),
                                                mark=mark, checkpoint=checkpoint)
        finally:
            con.close()
        write_views(layout)
        if checkpoint:
            checkpoint("views_written")
    return report


def compact_days(layout: Layout, con: duckdb.DuckDBPyConnection, *, before: date, mark: Watermark,
                 checkpoint: Checkpoint | None = None, target_rows: int = COMPACT_ROWS,
                 row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Merges the converted files of each day before `before` into files of up to `target_rows`
    rows, so that a query over months opens a few files per day, not one per segment (at 10 msg/s
    a segment is sealed every 10 minutes). Files of at least half the target stay as they are (they
    would only be rewritten). Each merged file takes consecutive files (in seq order), so its name's
    seq range holds exactly the files it replaces. Returns how many files were merged away; a merge
    that fails (memory, disk) is logged and left for the next run: it is only an optimisation."""
    merged = 0
    for table in TABLES:
        by_day: dict[date, list[ParquetFile]] = {}
        for f in layout.visible(table, upto_seq=mark.last_seq):
            if f.day < before:
                by_day.setdefault(f.day, []).append(f)
        for day, files in sorted(by_day.items()):
            if len(files) < 2:
                continue
            listed = ", ".join(sql_string(f.path) for f in files)
            rows = {Path(name): int(n) for name, n in con.execute(
                f"SELECT file_name, num_rows FROM parquet_file_metadata([{listed}])").fetchall()}
            for run in _runs(files, rows, target_rows):
                try:
                    _merge(layout, con, table, day, run, row_group_rows, checkpoint)
                except duckdb.Error as error:
                    log.warning("compacting %s of %s failed (%s); left as it is", table, day,
                                str(error).splitlines()[0])
                    unlink_if_exists(temp_name(layout.parquet_path(table, day, run[0].first_seq, run[-1].last_seq)),
                                     layout.io)
                    continue
                merged += len(run)
    return merged


def _runs(files: list[ParquetFile], rows: Mapping[Path, int], target_rows: int) -> list[list[ParquetFile]]:
    """Consecutive small files grouped up to target_rows; big files break runs."""
    runs: list[list[ParquetFile]] = []
    run: list[ParquetFile] = []
    total = 0
    for f in files:
        count = rows.get(f.path, 0)
        if count >= target_rows // 2 or (run and total + count > target_rows):
            if len(run) > 1:
                runs.append(run)
            run, total = [], 0
            if count >= target_rows // 2:
                continue
        run.append(f)
        total += count
    if len(run) > 1:
        runs.append(run)
    return runs


def _merge(layout: Layout, con: duckdb.DuckDBPyConnection, table: str, day: date, run: list[ParquetFile],
           row_group_rows: int, checkpoint: Checkpoint | None) -> None:
    final = layout.parquet_path(table, day, run[0].first_seq, run[-1].last_seq)
    tmp = temp_name(final)
    listed = ", ".join(sql_string(f.path) for f in run)
    # One thread: with two, keeping the rows in order buffered more than the 64 MB memory limit
    # (a day of 1M rows ran out; one thread: 145 MB peak RSS).
    con.execute("SET threads = 1")
    try:
        con.execute(f"COPY (SELECT * FROM read_parquet([{listed}], hive_partitioning = false)) "
                    f"TO {sql_string(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {row_group_rows})")
    finally:
        con.execute("RESET threads")
    publish(tmp, final, layout.io)  # from here on readers take it and skip the files it replaces
    if checkpoint:
        checkpoint("compacted")
    for f in run:
        layout.io.unlink(f.path)
    fsync_dir(final.parent, layout.io)


def remove_orphans(layout: Layout, mark: Watermark) -> int:
    """Deletes the files an interrupted run left past the watermark (their records are still in the
    log, and this run writes them again) and those an interrupted compaction left shadowed, so tools
    globbing the directory do not count their rows twice."""
    covered = {(t, f.path) for t in TABLES for f in layout.visible(t, upto_seq=mark.last_seq)}
    removed = 0
    for table in TABLES:
        for f in layout.files(table):
            if (table, f.path) not in covered:
                layout.io.unlink(f.path)
                fsync_dir(f.path.parent, layout.io)
                removed += 1
    return removed


def _namer(layout: Layout, table: str, first_seq: int) -> Callable[[date], Path]:
    def name(day: date) -> Path:
        return layout.parquet_path(table, day, first_seq)
    return name


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- the views file ---------------------------------------------------------------------------------

def view_statements(layout: Layout, sources: Mapping[str, str | None]) -> list[str]:
    """CREATE VIEW statements: each table over its source (a SQL FROM item), or typed and empty."""
    statements = []
    for kind in AUDITED:
        source = sources.get(kind.table)
        body = f"SELECT * FROM {source}" if source else kind.empty_select()
        statements.append(f"CREATE OR REPLACE VIEW {kind.table} AS {body}")
    statements += [
        "CREATE OR REPLACE VIEW accepted AS SELECT * FROM decisions WHERE verdict = 'accept'",
        "CREATE OR REPLACE VIEW rejected AS SELECT * FROM decisions WHERE verdict = 'reject'",
        # A dry run delivered its "rejected" messages: nothing was withheld, nothing is quarantined.
        ("CREATE OR REPLACE VIEW quarantine AS SELECT * FROM decisions "
         "WHERE verdict = 'reject' AND payload IS NOT NULL AND NOT dry_run"),
    ]
    return statements


def glob_source(layout: Layout, table: str) -> str:
    pattern = str(layout.table_dir(table) / "*" / "*.parquet")
    return f"read_parquet({sql_string(pattern)}, hive_partitioning = false)"


def write_views(layout: Layout) -> bool:
    """(Re)writes STATE_DIR/audit/audit.duckdb when its views must change (a table got its first
    file or lost its last one); returns whether it did. Written under a temp name and renamed, so a
    `duckdb -readonly` session open on the old file keeps working."""
    sources = {t: glob_source(layout, t) if layout.files(t) else None for t in TABLES}
    key = json.dumps({"version": VIEWS_VERSION, "dir": str(layout.parquet_dir),
                      "files": {t: bool(s) for t, s in sources.items()}}, sort_keys=True)
    key_file = layout.audit_dir / ".views-key"
    if layout.views_file.exists() and key_file.exists() and key_file.read_text() == key:
        return False  # (checked first: it saves opening the file to tell it from an old version's)
    if needs_upgrade(layout):
        log.warning("%s is an audit log of the previous version: not replaced before the upgrade "
                    "imports it", layout.views_file)
        return False
    layout.make_dirs(layout.audit_dir)
    tmp = temp_name(layout.views_file)
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        unlink_if_exists(stale, layout.io)
    con = duckdb.connect(str(tmp), config={"autoinstall_known_extensions": False,
                                           "autoload_known_extensions": False})
    try:
        for statement in view_statements(layout, sources):
            con.execute(statement)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    publish(tmp, layout.views_file, layout.io)
    write_durably(key_file, key.encode(), layout.io)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.audit.seal",
                                     description="Convert sealed message-log segments to Parquet.")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--max-batch-bytes", type=int, default=MAX_BATCH_BYTES)
    parser.add_argument("--row-group-rows", type=int, default=CONVERT_ROW_GROUP_ROWS)
    parser.add_argument("--memory-limit", default=MEMORY_LIMIT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compact", dest="compact", action="store_false",
                        help="Do not merge the files of finished days.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="seal: %(levelname)s %(message)s")
    started = time.monotonic()
    report = convert_pending(Layout(args.state_dir), max_batch_bytes=args.max_batch_bytes,
                             row_group_rows=args.row_group_rows, memory_limit=args.memory_limit,
                             threads=args.threads, compact=args.compact)
    summary = {"segments": report.segments, "decisions": report.decisions, "events": report.events,
               "files": len(report.files), "compacted": report.compacted, "watermark": report.watermark.last_seq,
               "problems": report.problems, "seconds": round(time.monotonic() - started, 3)}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
