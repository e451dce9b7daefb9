"""Where recorded traffic comes from. Every source streams `Row` batches (replay/rows.py) with the
filters applied, so memory stays bounded however large the recording is.

- `appliance_recording`: an appliance's state dir, running or stopped: its Parquet files
  (`STATE_DIR/audit/parquet/`) and, after them, the decisions of its message log not converted yet.
- `DuckDBSource`: a previous version's `audit.duckdb` (tables), opened read-only.
- `ParquetSource`: files from `appliance audit export` (or anything with the same columns).
- `NdjsonSource`: one JSON object per line, as `replay capture` writes.
- `DecisionRowsSource`: rows in the audit log's DECISION_COLUMNS order from any iterable (a log
  tail); `ChainedSource`: several parts replayed as one recording (Parquet files, then a tail).

SQL sources push the time, topic and client filters into DuckDB and stream with `fetchmany`;
sampling and the limit are applied while streaming, in recording order.

`work()` is what the engine consumes. A Parquet source returns *units* (`ParquetRange`: a row
range of one file, with its SELECT and WHERE) that worker processes read themselves, so reading is
spread over the cores and no rows cross a process boundary; the others return batches of rows read
here. With `--sample` or `--limit`, which count positions in the whole recording, Parquet is read
here as well.
"""

from __future__ import annotations

import base64
import glob
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import orjson

from appliance.audit.records import DECISION_COLUMNS
from appliance.mqtt.topics import topic_filter_regex
from replay.errors import ReplayInputError
from replay.rows import COLUMNS, Filters, Row


class Unit(Protocol):
    """A piece of a recording that a worker process reads by itself: small and picklable (a file
    name and a row range, not rows), so the parent process sends descriptions, not data."""

    @property
    def rows(self) -> int:
        """At most this many rows."""

    def batches(self, size: int) -> Iterator[list[Row]]: ...


# What the engine judges: units that workers read, or batches of rows the parent read.
Work = Unit | list[Row]


class Source(Protocol):
    description: str

    def count(self) -> int | None:
        """How many rows `batches()` will yield, when cheap to know (for the progress bar)."""

    def batches(self, size: int) -> Iterator[list[Row]]: ...

    def work(self, size: int, pieces: int) -> Iterator[Work]:
        """The recording in recording order, as units (about `pieces` of them, when the source can
        be split) or as batches of `size` rows."""

    def close(self) -> None: ...

    # Notes for the user (unmoved journal rows, ...), shown with the report.
    notes: list[str]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _sample_and_limit(batches: Iterator[list[Row]], filters: Filters, size: int) -> Iterator[list[Row]]:
    """Keep every `sample`th row and stop after `limit` rows, re-batching to `size`."""
    sample, limit = filters.sample, filters.limit
    if sample == 1 and limit is None:
        yield from batches
        return
    seen = kept = 0
    out: list[Row] = []
    for batch in batches:
        if sample > 1:
            start = (sample - 1 - seen) % sample
            picked = batch[start::sample]
            seen += len(batch)
        else:
            picked = batch
        if limit is not None and kept + len(picked) >= limit:
            out.extend(picked[: limit - kept])
            yield out
            return
        kept += len(picked)
        out.extend(picked)
        if len(out) >= size:
            yield out
            out = []
    if out:
        yield out


def _expected(total: int, filters: Filters) -> int:
    total = math.ceil(total / filters.sample) if filters.sample > 1 else total
    return min(total, filters.limit) if filters.limit is not None else total


def _select_list(present: set[str]) -> str:
    """The SELECT list that turns a relation with (some of) the audit columns into `Row`s."""
    select = []
    for name in COLUMNS:
        if name not in present:
            select.append("NULL")
        elif name == "ts":
            select.append("epoch(ts)")
        elif name in ("qos", "mqtt_version"):
            select.append(f"CAST({name} AS INTEGER)")
        elif name == "verdict" and "dry_run" in present:
            # A dry run delivered its rejected messages: what the device experienced, and so the
            # reference to compare with, is "accept" (else enforcing that set would look harmless).
            select.append("CASE WHEN dry_run AND verdict = 'reject' THEN 'accept' ELSE verdict END")
        else:
            select.append(f'"{name}"')
    return ", ".join(select)


def _conditions(present: set[str], filters: Filters) -> tuple[str, list[object]]:
    """The WHERE clause (and its parameters) for the filters, on a relation with `present` columns."""
    where: list[str] = ["topic IS NOT NULL"]  # a glob may also match exported `events` files
    params: list[object] = []
    if "released_from" in present:
        where.append("released_from IS NULL")  # a release re-judges a message already recorded
    if (filters.since is not None or filters.until is not None) and "ts" not in present:
        where.append("FALSE")  # one file without times, among others with them: nothing of it is in the range
    if filters.since is not None:
        where.append("ts >= CAST(? AS TIMESTAMPTZ)")
        params.append(filters.since.isoformat())
    if filters.until is not None:
        where.append("ts < CAST(? AS TIMESTAMPTZ)")
        params.append(filters.until.isoformat())
    if filters.topic is not None:
        where.append("regexp_full_match(topic, ?)")
        params.append(topic_filter_regex(filters.topic))
    if filters.client is not None:
        where.append("client_id = ?")
        params.append(filters.client)
    return " AND ".join(where), params


class SqlSource:
    """Rows from a DuckDB relation (`decisions` or `read_parquet(...)`) with the audit columns."""

    def __init__(self, con: duckdb.DuckDBPyConnection, relation: str, description: str, filters: Filters):
        self.description = description
        self.notes: list[str] = []
        self._con = con
        self._relation = relation
        self._filters = filters
        try:
            described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
        except duckdb.Error as error:
            raise ReplayInputError(f"cannot read {description}: {_first_line(error)}") from None
        present = {row[0] for row in described}
        missing = {"topic", "payload"} - present
        if missing:
            raise ReplayInputError(
                f"{description} is not a recording of decisions: no {' or '.join(sorted(missing))} column"
            )
        self._select = _select_list(present)
        self._where, self._params = _conditions(present, filters)
        if (filters.since or filters.until) and "ts" not in present:
            raise ReplayInputError(f"{description} has no ts column: --since and --until cannot apply")

    def count(self) -> int | None:
        try:
            row = self._con.execute(f"SELECT count(*) FROM {self._relation} WHERE {self._where}", self._params).fetchone()
        except duckdb.Error as error:
            raise ReplayInputError(f"cannot read {self.description}: {_first_line(error)}") from None
        return _expected(int(row[0]) if row else 0, self._filters)

    def batches(self, size: int) -> Iterator[list[Row]]:
        filters = self._filters
        sql = f"SELECT {self._select} FROM {self._relation} WHERE {self._where}"
        if filters.sample == 1 and filters.limit is not None:
            sql += f" LIMIT {int(filters.limit)}"
        yield from _sample_and_limit(self._fetch(sql, size), filters, size)

    def work(self, size: int, pieces: int) -> Iterator[Work]:
        yield from self.batches(size)

    def _fetch(self, sql: str, size: int) -> Iterator[list[Row]]:
        cursor = self._con.cursor()
        try:
            try:
                cursor.execute(sql, self._params)
                while batch := cursor.fetchmany(size):
                    yield batch
            except duckdb.Error as error:
                raise ReplayInputError(f"cannot read {self.description}: {_first_line(error)}") from None
        finally:
            cursor.close()

    def close(self) -> None:
        self._con.close()


def _connect(path: str = ":memory:", *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    config: dict[str, Any] = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    return duckdb.connect(path, read_only=read_only, config=config)


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def parquet_files(patterns: Sequence[str]) -> list[str]:
    """Expand paths, directories (their `decisions/` when it is an export) and globs to files."""
    files: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            root = path / "decisions" if (path / "decisions").is_dir() else path
            found = sorted(glob.glob(str(root / "**" / "*.parquet"), recursive=True))
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif path.is_file():
            found = [pattern]
        else:
            raise ReplayInputError(f"{pattern}: no such file or directory")
        if not found:
            raise ReplayInputError(f"nothing to replay: no Parquet files match {pattern!r}")
        files.extend(found)
    return files


UNIT_ROWS = (5_000, 200_000)  # bounds of a unit's size; between them, `pieces` decides


@dataclass(frozen=True, slots=True)
class ParquetRange:
    """Rows `first` to `end` (exclusive) of one Parquet file, filtered: a unit a worker reads with a
    DuckDB connection of its own. DuckDB skips the row groups outside the range."""

    file: str
    first: int
    end: int
    select: str
    where: str
    params: tuple[object, ...]

    @property
    def rows(self) -> int:
        return self.end - self.first

    def batches(self, size: int) -> Iterator[list[Row]]:
        sql = (f"SELECT {self.select} FROM read_parquet({_sql_string(self.file)}, file_row_number = true) "
               f"WHERE file_row_number >= {int(self.first)} AND file_row_number < {int(self.end)} AND {self.where}")
        cursor = unit_connection().cursor()
        try:
            cursor.execute(sql, list(self.params))
            while batch := cursor.fetchmany(size):
                yield batch
        except duckdb.Error as error:
            raise ReplayInputError(f"cannot read {self.file}: {_first_line(error)}") from None
        finally:
            cursor.close()


_unit_connection: duckdb.DuckDBPyConnection | None = None


def unit_connection(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """This process's connection for reading units (`threads` given: set it, e.g. 1 in a worker
    process, where the other workers have the other cores)."""
    global _unit_connection
    if _unit_connection is None:
        _unit_connection = _connect()
        _unit_connection.execute("SET TimeZone = 'UTC'")
    if threads is not None:
        _unit_connection.execute(f"SET threads = {int(threads)}")
    return _unit_connection


def _top_level_columns(schema: list[tuple[str, str, int | None]]) -> dict[str, set[str]]:
    """file → its top-level column names, from `parquet_schema()` rows (a tree in depth-first order:
    each file's root, then every column with `num_children` of its own)."""
    columns: dict[str, set[str]] = {}
    pending: list[int] = []  # children still to come, per open level; [0] is the root's
    for file, name, children in schema:
        if not pending:  # a root
            columns[file] = set()
            pending = [children or 0]
            continue
        if len(pending) == 1:
            columns[file].add(name)
        pending[-1] -= 1
        if children:
            pending.append(children)
        while pending and pending[-1] == 0:
            pending.pop()
            if not pending:
                break
    return columns


class ParquetSource(SqlSource):
    def __init__(self, patterns: Sequence[str], filters: Filters, description: str | None = None):
        files = parquet_files(patterns)
        self._files = files
        listed = ", ".join(_sql_string(f) for f in files)
        relation = f"read_parquet([{listed}], hive_partitioning = true, union_by_name = true)"
        what = description or (f"Parquet recording {patterns[0]}" if len(patterns) == 1 else f"Parquet recording ({len(files)} files)")
        super().__init__(_connect(), relation, what, filters)

    def work(self, size: int, pieces: int) -> Iterator[Work]:
        """Row ranges of the files, for workers to read themselves; batches read here when every
        Nth row or the first N are wanted (positions in the whole recording)."""
        filters = self._filters
        if filters.sample > 1 or filters.limit is not None:
            yield from self.batches(size)
            return
        yield from self.units(pieces)

    def units(self, pieces: int) -> list[ParquetRange]:
        listed = "[" + ", ".join(_sql_string(f) for f in self._files) + "]"
        try:
            sizes = dict(self._con.execute(f"SELECT file_name, num_rows FROM parquet_file_metadata({listed})").fetchall())
            schema = self._con.execute(f"SELECT file_name, name, num_children FROM parquet_schema({listed})").fetchall()
        except duckdb.Error as error:
            raise ReplayInputError(f"cannot read {self.description}: {_first_line(error)}") from None
        columns = _top_level_columns(schema)
        files = [f for f in self._files if "topic" in columns.get(f, ())]  # not the `events` of an export
        total = sum(sizes.get(f, 0) for f in files)
        low, high = UNIT_ROWS
        unit_rows = min(high, max(low, -(-total // max(pieces, 1))))
        # The last quarter in quarter-size units: the processes then run out of work close together.
        tail_rows, tail_from = max(low // 2, unit_rows // 4), total - total // 4
        units: list[ParquetRange] = []
        offset = 0
        for file in files:
            rows, present = int(sizes.get(file, 0)), columns[file]
            select = _select_list(present)
            where, params = _conditions(present, self._filters)
            first = 0
            while first < rows:
                size = unit_rows if offset + first < tail_from else tail_rows
                end = rows if rows - first < size * 3 // 2 else first + size  # no sliver at the end of a file
                units.append(ParquetRange(file, first, end, select, where, tuple(params)))
                first = end
            offset += rows
        return units


class DuckDBSource(SqlSource):
    def __init__(self, path: Path, filters: Filters, *, description: str | None = None):
        if not path.is_file():
            raise ReplayInputError(f"no audit log at {path} (is --state-dir right? has the appliance run with it?)")
        try:
            con = _connect(str(path), read_only=True)
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise ReplayInputError(
                    f"cannot open the audit log {path}: another process (the appliance?) holds it, "
                    "and no appliance answered on the state dir's admin socket"
                ) from None
            raise ReplayInputError(f"cannot open the audit log {path}: {_first_line(error)}") from None
        except duckdb.Error as error:
            raise ReplayInputError(f"cannot open the audit log {path}: {_first_line(error)}") from None
        try:
            con.execute("SET TimeZone = 'UTC'")
            super().__init__(con, "decisions", description or f"audit log {path}", filters)
        except BaseException:
            con.close()
            raise


def pending_journal_rows(journal: Path) -> int:
    """Records an unclean shutdown left in the journal (not in DuckDB until the appliance starts)."""
    if not journal.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM decisions").fetchone()[0])
    except sqlite3.Error:
        return 0


def stopped_appliance(state_dir: Path, filters: Filters) -> DuckDBSource:
    audit = state_dir / "audit"
    source = DuckDBSource(audit / "audit.duckdb", filters, description=f"the audit log of {state_dir} (appliance stopped)")
    pending = pending_journal_rows(audit / "journal.sqlite3")
    if pending:
        source.notes.append(
            f"{pending} decisions from an unclean shutdown are still in {audit / 'journal.sqlite3'} and are not "
            "replayed; they move to the audit log when the appliance next starts"
        )
    return source


def _tail_rows(state_dir: Path, after: Any) -> list[tuple[Any, ...]]:
    """The decisions in the message log after the Parquet watermark, as audit rows (the payload
    only where the audit shows it), read and decoded here."""
    from appliance.audit.layout import Layout
    from appliance.audit.records import DECISION, Definitions
    from appliance.msglog import list_segments, read_segment
    from appliance.msglog.reader import read_record

    width = len(DECISION_COLUMNS)
    payload_at = DECISION.names.index("payload")
    audited_at = DECISION.names.index("payload_audited")
    log_dir = Layout(state_dir).log_dir

    def lookup(seq: int) -> tuple[int, bytes] | None:
        record = read_record(log_dir, seq)
        return None if record is None else (record.kind, record.body)

    definitions = Definitions(lookup)  # version 2 decisions refer to connection and context records
    rows = []
    for info in list_segments(log_dir):
        if info.first_seq <= after.segment:
            continue
        try:
            for record in read_segment(info.path):  # from the start: definitions before `after` count
                if record.seq <= after.last_seq:
                    definitions.add(record.seq, record.kind, record.body)
                    continue
                found = definitions.row(record.seq, record.kind, record.body)
                if found is not None and found[0] is DECISION:
                    row = found[1]
                    if not row[audited_at] and row[payload_at] is not None:
                        row = (*row[:payload_at], None, *row[payload_at + 1:])
                    rows.append(row[:width])
        except FileNotFoundError:
            continue  # converted and removed meanwhile: the caller sees the watermark move
    return rows


def appliance_recording(state_dir: Path, filters: Filters) -> Source:
    """What the appliance on `state_dir` recorded, running or not: its Parquet files and the
    decisions in its message log not converted yet, read here (no export, nothing through /tmp)."""
    from appliance import admin
    from appliance.audit.layout import Layout, previous_version

    if previous_version(state_dir):  # this version imports it on its first start; until then, read it
        return stopped_appliance(state_dir, filters)
    try:  # a running appliance makes what it recorded so far readable first
        admin.call(state_dir, "audit_sync", timeout=60.0)
    except admin.AdminUnavailable:
        pass
    except admin.AdminError as error:
        raise ReplayInputError(f"the appliance on {state_dir} could not sync its log: {error}") from None
    layout = Layout(state_dir)
    for _ in range(5):
        mark = layout.read_watermark()
        files = [str(f.path) for f in layout.visible("decisions", upto_seq=mark.last_seq)]
        tail = _tail_rows(state_dir, mark)
        if layout.read_watermark() == mark:
            break
    else:
        raise ReplayInputError(f"the audit log of {state_dir} kept changing while it was read; try again")
    if not files and not tail:
        window = "" if not (filters.since or filters.until) else " in the --since/--until range"
        raise ReplayInputError(f"nothing to replay: the appliance on {state_dir} has recorded no messages{window}")
    description = f"the audit log of {state_dir}"
    parts: list[Source] = []
    if files:
        parts.append(ParquetSource(files, filters.unsampled(), description=f"{description} (Parquet)"))
    if tail:
        parts.append(DecisionRowsSource(tail, filters.unsampled(), f"{description} (log tail)", count=len(tail)))
    return ChainedSource(parts, filters, description)


# -- NDJSON -----------------------------------------------------------------------------------------


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("ts must be an ISO 8601 time or epoch seconds")  # noqa: TRY004 - a bad line, reported as such
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    raise ValueError("ts must be an ISO 8601 time or epoch seconds")


def parse_ndjson_line(line: bytes) -> Row:
    """One captured message; ValueError says what is wrong with it."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")  # noqa: TRY004 - a bad line, reported as such
    topic = obj.get("topic")
    if not isinstance(topic, str) or not topic:
        raise ValueError("needs a `topic` string")
    if "payload_b64" in obj:
        try:
            payload = base64.b64decode(obj["payload_b64"], validate=True)
        except (ValueError, TypeError):
            raise ValueError("`payload_b64` is not valid base64") from None
    elif "payload" in obj:
        text = obj["payload"]
        payload = text.encode() if isinstance(text, str) else orjson.dumps(text)
    else:
        raise ValueError("needs `payload_b64` (base64) or `payload` (text)")
    verdict = obj.get("verdict")
    if verdict not in (None, "accept", "reject"):
        raise ValueError(f"`verdict` must be \"accept\" or \"reject\", got {verdict!r}")
    qos = obj.get("qos", 0)
    if qos not in (0, 1, 2):
        raise ValueError(f"`qos` must be 0, 1 or 2, got {qos!r}")
    try:
        ts = _timestamp(obj.get("ts"))
    except ValueError as exc:
        raise ValueError(f"`ts`: {exc}") from None
    return (
        topic, payload, qos, bool(obj.get("retain", False)), str(obj.get("client_id") or ""),
        obj.get("username"), str(obj.get("peer") or ""), int(obj.get("mqtt_version") or 4),
        verdict, ts, bool(obj.get("is_will", False)), obj.get("schema_set"), obj.get("topic_filter"),
    )


class NdjsonSource:
    def __init__(self, paths: Sequence[str], filters: Filters):
        self.notes: list[str] = []
        self._paths = [Path(p) for p in paths]
        for path in self._paths:
            if not path.is_file():
                raise ReplayInputError(f"{path}: no such file")
        self.description = f"NDJSON capture {paths[0]}" if len(paths) == 1 else f"NDJSON captures ({len(paths)} files)"
        self._filters = filters

    def count(self) -> int | None:
        return None

    def _rows(self, size: int) -> Iterator[list[Row]]:
        from appliance.mqtt.topics import TopicTrie

        filters = self._filters
        since = filters.since.timestamp() if filters.since else None
        until = filters.until.timestamp() if filters.until else None
        trie: TopicTrie[None] | None = None
        if filters.topic is not None:
            trie = TopicTrie()
            trie.insert(filters.topic, None)
        batch: list[Row] = []
        for path in self._paths:
            with path.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        row = parse_ndjson_line(line)
                    except ValueError as exc:
                        raise ReplayInputError(f"{path}:{number}: {exc}") from None
                    ts = row[9]
                    if (since is not None or until is not None) and ts is None:
                        raise ReplayInputError(f"{path}:{number}: no `ts`, so --since/--until cannot apply")
                    if ts is not None and (since is not None and ts < since or until is not None and ts >= until):
                        continue
                    if trie is not None and not trie.match(row[0]):
                        continue
                    if filters.client is not None and row[4] != filters.client:
                        continue
                    batch.append(row)
                    if len(batch) >= size:
                        yield batch
                        batch = []
        if batch:
            yield batch

    def batches(self, size: int) -> Iterator[list[Row]]:
        yield from _sample_and_limit(self._rows(size), self._filters, size)

    def work(self, size: int, pieces: int) -> Iterator[Work]:
        yield from self.batches(size)

    def close(self) -> None:
        pass


# -- decision rows in memory, and recordings in several parts ---------------------------------------

_DECISION_INDEX = {name: index for index, name in enumerate(DECISION_COLUMNS)}


class DecisionRowsSource:
    """Rows in `appliance.audit.records.DECISION_COLUMNS` order (`ts` as epoch seconds), from any
    iterable: the not-yet-sealed tail of the audit log as its reader decodes it, for example. They
    are read in this process and sent to the workers in batches; the filters apply here."""

    def __init__(self, rows: Iterable[Sequence[Any]], filters: Filters, description: str, *, count: int | None = None):
        self.description = description
        self.notes: list[str] = []
        self._rows = rows
        self._filters = filters
        self._count = count

    def count(self) -> int | None:
        return _expected(self._count, self._filters) if self._count is not None else None

    def _batches(self, size: int) -> Iterator[list[Row]]:
        from appliance.mqtt.topics import TopicTrie

        filters = self._filters
        since = filters.since.timestamp() if filters.since else None
        until = filters.until.timestamp() if filters.until else None
        trie: TopicTrie[None] | None = None
        if filters.topic is not None:
            trie = TopicTrie()
            trie.insert(filters.topic, None)
        client = filters.client
        i = _DECISION_INDEX
        (topic_i, payload_i, qos_i, retain_i, client_i, user_i, peer_i, version_i, verdict_i, ts_i, will_i,
         set_i, filter_i, dry_i, released_i) = (
            i["topic"], i["payload"], i["qos"], i["retain"], i["client_id"], i["username"], i["peer"], i["mqtt_version"],
            i["verdict"], i["ts"], i["is_will"], i["schema_set"], i["topic_filter"], i["dry_run"], i["released_from"])
        batch: list[Any] = []  # Rows: the columns are not typed on the way in
        for rec in self._rows:
            topic, ts = rec[topic_i], rec[ts_i]
            if topic is None or rec[released_i] is not None:
                continue
            if since is not None and (ts is None or ts < since) or until is not None and (ts is None or ts >= until):
                continue
            if trie is not None and not trie.match(topic) or client is not None and rec[client_i] != client:
                continue
            verdict = rec[verdict_i]
            if verdict == "reject" and rec[dry_i]:
                verdict = "accept"  # a dry run delivered it (see SqlSource)
            qos, version = rec[qos_i], rec[version_i]
            batch.append((topic, rec[payload_i], int(qos) if qos is not None else None, rec[retain_i], rec[client_i],
                          rec[user_i], rec[peer_i], int(version) if version is not None else None, verdict,
                          float(ts) if ts is not None else None, rec[will_i], rec[set_i], rec[filter_i]))
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    def batches(self, size: int) -> Iterator[list[Row]]:
        yield from _sample_and_limit(self._batches(size), self._filters, size)

    def work(self, size: int, pieces: int) -> Iterator[Work]:
        yield from self.batches(size)

    def close(self) -> None:
        pass


class ChainedSource:
    """One recording in several parts, replayed in the order given (sealed Parquet files, then the
    tail of the log). Build the parts with `filters.unsampled()`: sampling and the limit apply to the
    whole recording, here."""

    def __init__(self, parts: Sequence[Source], filters: Filters, description: str):
        self.description = description
        self.notes = [note for part in parts for note in part.notes]
        self._parts = parts
        self._filters = filters

    def count(self) -> int | None:
        counts = [part.count() for part in self._parts]
        if any(count is None for count in counts):
            return None
        return _expected(sum(c for c in counts if c is not None), self._filters)

    def batches(self, size: int) -> Iterator[list[Row]]:
        parts = (batch for part in self._parts for batch in part.batches(size))
        yield from _sample_and_limit(parts, self._filters, size)

    def work(self, size: int, pieces: int) -> Iterator[Work]:
        if self._filters.sample > 1 or self._filters.limit is not None:
            yield from self.batches(size)
            return
        for part in self._parts:
            yield from part.work(size, pieces)

    def close(self) -> None:
        for part in self._parts:
            part.close()


NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".json")


def open_recording(
    sources: Sequence[str], state_dir: Path | None, filters: Filters
) -> Source:
    """`--from` files (NDJSON, Parquet or an audit .duckdb), else the appliance on `state_dir`."""
    if sources:
        kinds = set()
        for item in sources:
            lower = item.lower()
            kinds.add("ndjson" if lower.endswith(NDJSON_SUFFIXES) else "duckdb" if lower.endswith(".duckdb") else "parquet")
        if len(kinds) > 1:
            raise ReplayInputError(f"--from: mixed kinds of recording ({', '.join(sorted(kinds))}); replay one kind at a time")
        kind = kinds.pop()
        if kind == "ndjson":
            return NdjsonSource(sources, filters)
        if kind == "duckdb":
            if len(sources) > 1:
                raise ReplayInputError("--from: one audit .duckdb file at a time")
            return DuckDBSource(Path(sources[0]), filters)
        return ParquetSource(sources, filters)
    assert state_dir is not None
    return appliance_recording(state_dir, filters)
