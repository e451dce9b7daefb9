"""Where recorded traffic comes from. Every source streams `Row` batches (replay/rows.py) with the
filters applied, so memory stays bounded however large the recording is.

- `ApplianceSource`: a running appliance, asked over its admin socket to export Parquet into a
  temporary directory (a second process cannot open the live DuckDB file), then read as Parquet.
- `DuckDBSource`: a stopped appliance's `STATE_DIR/audit/audit.duckdb`, opened read-only.
- `ParquetSource`: files from `appliance audit export` (or anything with the same columns).
- `NdjsonSource`: one JSON object per line, as `replay capture` writes.

SQL sources push the time, topic and client filters into DuckDB and stream with `fetchmany`;
sampling and the limit are applied while streaming, in recording order.
"""

from __future__ import annotations

import base64
import glob
import math
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import orjson

from replay.errors import ReplayInputError
from replay.rows import COLUMNS, Filters, Row, topic_filter_regex


class Source(Protocol):
    description: str

    def count(self) -> int | None:
        """How many rows `batches()` will yield, when cheap to know (for the progress bar)."""

    def batches(self, size: int) -> Iterator[list[Row]]: ...

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
        self._select = ", ".join(select)
        where, params = ["topic IS NOT NULL"], []  # a glob may also match exported `events` files
        if "released_from" in present:
            where.append("released_from IS NULL")  # a release re-judges a message already recorded
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
        if (filters.since or filters.until) and "ts" not in present:
            raise ReplayInputError(f"{description} has no ts column: --since and --until cannot apply")
        self._where = " AND ".join(where)
        self._params = params

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


class ParquetSource(SqlSource):
    def __init__(self, patterns: Sequence[str], filters: Filters, description: str | None = None):
        files = parquet_files(patterns)
        listed = ", ".join(_sql_string(f) for f in files)
        relation = f"read_parquet([{listed}], hive_partitioning = true, union_by_name = true)"
        what = description or (f"Parquet recording {patterns[0]}" if len(patterns) == 1 else f"Parquet recording ({len(files)} files)")
        super().__init__(_connect(), relation, what, filters)


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


class ApplianceSource(ParquetSource):
    """A running appliance's recording: exported to Parquet in a temporary directory, read, removed."""

    def __init__(self, state_dir: Path, filters: Filters, export_dir: Path):
        self._export_dir = export_dir
        decisions = export_dir / "decisions"
        if not decisions.is_dir() or not any(decisions.rglob("*.parquet")):
            shutil.rmtree(export_dir, ignore_errors=True)
            window = "" if not (filters.since or filters.until) else " in the --since/--until range"
            raise ReplayInputError(f"nothing to replay: the appliance on {state_dir} has recorded no messages{window}")
        super().__init__([str(decisions)], filters, description=f"the running appliance on {state_dir}")

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._export_dir, ignore_errors=True)


def appliance_recording(state_dir: Path, filters: Filters) -> SqlSource:
    """The running appliance's recording when one answers on `state_dir`, else the stopped one's."""
    from appliance import admin, exchange

    # The appliance exports into a directory under the state dir, which we read and remove: it may
    # not see our /tmp (PrivateTmp in its unit).
    try:
        export_dir, _ = exchange.export(
            state_dir,
            since=filters.since.isoformat() if filters.since else None,
            until=filters.until.isoformat() if filters.until else None,
        )
    except admin.AdminUnavailable:
        return stopped_appliance(state_dir, filters)
    except admin.AdminError as error:
        raise ReplayInputError(f"the appliance on {state_dir} could not export its recording: {error}") from None
    return ApplianceSource(state_dir, filters, export_dir)


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
        from appliance.governance.topics import TopicTrie

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
                    if since is not None and ts < since or until is not None and ts >= until:  # type: ignore[operator]
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

    def close(self) -> None:
        pass


NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".json")


def open_recording(
    sources: Sequence[str], state_dir: Path | None, filters: Filters
) -> SqlSource | NdjsonSource:
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
