"""Removing payload bytes from disk: rewriting Parquet files and sealed log segments without them.

Both rewrites write a complete new file under a temp name, fsync it and rename it over the old one
(then fsync the directory), so a crash leaves either the old file or the new one, never a mix; a
reader that has the old file open keeps reading the old bytes, and the next reader gets the new.
Callers hold `Layout.maintenance()` so the seal helper does not convert a segment being rewritten.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import duckdb

from appliance.audit.layout import publish, sql_string, temp_name
from appliance.audit.records import COMPACT_DECISION, DECISION, Definitions, compact_from_row, decode_compact
from appliance.msglog.format import encode_file_header, encode_record
from appliance.msglog.reader import SegmentScan, read_record

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 122_880
_FIELD = {name: i for i, name in enumerate(DECISION.names)}


def files_with_rows(con: duckdb.DuckDBPyConnection, files: Sequence[Path], condition: str) -> dict[Path, int]:
    """Which of the decisions `files` hold rows matching `condition` (SQL over the columns), and
    how many."""
    if not files:
        return {}
    listed = ", ".join(sql_string(f) for f in files)
    rows = con.execute(
        f"SELECT filename, count(*) FROM read_parquet([{listed}], filename = true, hive_partitioning = false) "
        f"WHERE {condition} GROUP BY filename").fetchall()
    return {Path(name): int(count) for name, count in rows}


def drop_payloads_in_file(con: duckdb.DuckDBPyConnection, path: Path, condition: str, *,
                          row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Rewrites one decisions file with `payload` NULL where `condition` holds."""
    tmp = temp_name(path)
    source = f"read_parquet({sql_string(path)}, hive_partitioning = false)"
    con.execute(
        f"COPY (SELECT * REPLACE (CASE WHEN {condition} THEN NULL ELSE payload END AS payload) FROM {source}) "
        f"TO {sql_string(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {row_group_rows})")
    publish(tmp, path)


def drop_payloads(con: duckdb.DuckDBPyConnection, files: Sequence[Path], condition: str) -> set[int]:
    """Rewrites every file holding a payload of a row matching `condition` (SQL over the columns,
    with any values inlined: COPY takes no parameters); returns those rows' ids."""
    held = f"payload IS NOT NULL AND ({condition})"
    ids: set[int] = set()
    for path in files_with_rows(con, files, held):
        source = f"read_parquet({sql_string(path)}, hive_partitioning = false)"
        ids.update(r[0] for r in con.execute(f"SELECT id FROM {source} WHERE {held}").fetchall())
        drop_payloads_in_file(con, path, held)
    return ids


Match = Callable[[tuple[object, ...]], bool]


def _definition(log_dir: Path, seq: int) -> tuple[int, bytes] | None:
    record = read_record(log_dir, seq)
    return None if record is None else (record.kind, record.body)


def drop_payloads_in_segment(path: Path, match: Match) -> set[int]:
    """Rewrites a sealed segment with the payload of every decision record for which
    `match(row)` holds emptied (unless it is still to be forwarded: then only `payload_audited`
    is cleared, and the forwarder's copy stays until the segment goes). Returns the ids changed; the
    file is left alone when there are none. Bytes after damage in the segment are kept as they are."""
    scan = SegmentScan(path)
    parts: list[bytes] = []
    changed: set[int] = set()
    payload, audited, forward = _FIELD["payload"], _FIELD["payload_audited"], _FIELD["forward"]
    definitions = Definitions(lambda seq: _definition(path.parent, seq))
    for record in scan:
        body = record.body
        if record.kind == COMPACT_DECISION:
            row = definitions.decision(body)
            if row[payload] is not None and row[audited] and match(row):
                new = list(row)
                new[audited] = False
                if not row[forward]:
                    new[payload] = None
                c = decode_compact(body)
                body = compact_from_row(tuple(new), c[2], c[3])
                changed.add(int(row[0]))
        elif definitions.add(record.seq, record.kind, body):
            pass
        elif record.kind == DECISION.code:
            row = DECISION.decode(body)
            if row[payload] is not None and row[audited] and match(row):
                new = list(row)
                new[audited] = False
                if not row[forward]:
                    new[payload] = None
                body = DECISION.encode(tuple(new))
                changed.add(int(row[0]))
        parts.append(encode_record(record.seq, record.kind, body))
    if not changed:
        return changed
    tmp = temp_name(path)
    try:
        with open(path, "rb") as f:
            f.seek(scan.end_offset)
            rest = f.read()
        with open(tmp, "wb") as out:
            out.write(encode_file_header(scan.first_seq, scan.flags))  # a reused segment stays flagged (its stale tail)
            out.writelines(parts)
            out.write(rest)
        if not path.exists():  # removed meanwhile (the log's own retention): do not bring it back
            tmp.unlink()
            return set()
        publish(tmp, path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        with contextlib.suppress(OSError):
            if tmp.is_file():
                tmp.unlink()
        raise RewriteFailed(path, frozenset(changed), exc) from exc
    return changed


class RewriteFailed(OSError):
    """A file could not be rewritten: it still holds the payloads of `ids`."""

    def __init__(self, path: Path, ids: frozenset[int], cause: BaseException):
        super().__init__(f"{path}: {cause}")
        self.path = path
        self.ids = ids
