"""The audit store as the console reads it: one AuditQuery (DuckDB in this process, never in the
service) refreshed on demand, and the message log followed record by record for the live tail.

Everything here blocks (DuckDB, file reads): the web layer calls it in worker threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from appliance.audit.errors import AuditError
from appliance.audit.layout import Layout
from appliance.audit.query import AuditQuery
from appliance.audit.quarantine import conditions as quarantine_conditions
from appliance.audit.records import COMPACT_DECISION, CONNECTION, CONTEXT, DECISION, Definitions
from appliance.audit.results import QueryResult
from appliance.console.follow import LogFollower
from appliance.msglog.reader import read_record

REFRESH_AFTER_S = 1.0  # without a service to say whether the log changed
MAX_AGE_S = 60.0  # retention rewrites files without writing a record: a snapshot is never older
TAIL_KEEP = 500
GROUPS = {"reason": "reason", "topic": "topic", "client": "client_id"}


class StoreUnavailable(Exception):
    """No audit log under the state dir yet."""


class Store:
    def __init__(self, state_dir: Path, *, sync: Callable[[], int | None] | None = None):
        """`sync` asks the running appliance to make everything recorded so far readable and returns
        the log's last seq (None when no appliance runs); called before each fresh read."""
        self.state_dir = state_dir
        self._sync = sync
        self._query: AuditQuery | None = None
        self._seq: int | None = None  # the log's last seq when the snapshot was taken
        self._opened_at = 0.0
        self._stale = False
        self._layout = Layout(state_dir)
        self._lock = threading.Lock()
        self._borrowed: dict[AuditQuery, int] = {}  # snapshots in use by a reader, and by how many

    def _snapshot(self, *, fresh: bool, borrow: bool = False) -> AuditQuery:
        """The snapshot, taken again when `fresh` and the log has changed since: a record was
        written (the service says its last seq), a segment was converted (the watermark), or an
        action changed the files. Without a service: when older than REFRESH_AFTER_S. `borrow`:
        the caller holds it until `_give_back` (a new snapshot then leaves it open until then)."""
        with self._lock:
            query = self._take(fresh)
            if borrow:
                self._borrowed[query] = self._borrowed.get(query, 0) + 1
            return query

    def _take(self, fresh: bool) -> AuditQuery:
        query = self._query
        if query is not None and not fresh:
            return query
        seq = self._sync() if self._sync is not None else None
        if query is not None and not self._stale and time.monotonic() - self._opened_at < MAX_AGE_S:
            if seq is not None and seq == self._seq and self._layout.read_watermark() == query.watermark:
                return query  # nothing new: reading the tail again would give the same tables
            if seq is None and time.monotonic() - self._opened_at < REFRESH_AFTER_S:
                return query
        if query is None:
            if not (self.state_dir / "log").exists() and not (self.state_dir / "audit" / "parquet").exists():
                raise StoreUnavailable(f"no audit log under {self.state_dir} yet: has the appliance run with it?")
            query = self._query = AuditQuery(self.state_dir)
        elif query in self._borrowed:
            # A download still reads it (closing a snapshot ends its cursors' results): a new one.
            query = self._query = AuditQuery(self.state_dir)
        else:
            query.refresh()
        self._seq, self._stale, self._opened_at = seq, False, time.monotonic()
        return query

    def _give_back(self, query: AuditQuery) -> None:
        with self._lock:
            left = self._borrowed.pop(query) - 1
            if left:
                self._borrowed[query] = left
            elif query is not self._query:
                query.close()  # replaced while borrowed

    @contextmanager
    def borrowed(self) -> Iterator[AuditQuery]:
        """A fresh snapshot that stays open while the caller uses it, even across new snapshots
        taken meanwhile (a download reads for as long as its client takes)."""
        query = self._snapshot(fresh=True, borrow=True)
        try:
            yield query
        finally:
            self._give_back(query)

    def scratch_dir(self) -> Path:
        """Where the console may put temporary files (DuckDB's spill directory's parent)."""
        self._layout.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self._layout.tmp_dir

    def invalidate(self) -> None:
        """The next read takes a new snapshot (after an action changed the log or its files)."""
        with self._lock:
            self._stale = True

    @contextmanager
    def cursor(self, *, fresh: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        query = self._snapshot(fresh=fresh, borrow=True)
        try:
            cursor = query.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
        finally:
            self._give_back(query)

    def close(self) -> None:
        with self._lock:
            if self._query is not None:
                if self._query not in self._borrowed:
                    self._query.close()
                self._query = None

    # -- reads --------------------------------------------------------------------------------

    def _fetch(self, sql: str, params: list[object]) -> tuple[list[str], list[tuple[Any, ...]]]:
        """One of the console's own queries (not analyst SQL: no guard), on a fresh snapshot; once
        more on a new snapshot when a file of the old one is gone (merged or dropped meanwhile)."""
        for attempt in (1, 2):
            try:
                with self.cursor() as cursor:
                    cursor.execute(sql, params)
                    return [d[0] for d in cursor.description or ()], cursor.fetchall()
            except duckdb.IOException:
                if attempt == 2:
                    raise AuditError("the audit log's files changed during the query; try again") from None
                self.invalidate()
        raise AssertionError("unreachable")

    def sql(self, text: str, *, max_rows: int, timeout: float = 30.0) -> QueryResult:
        """Analyst SQL through the same guard as `appliance audit sql`."""
        with self.borrowed() as query:
            return query.query(text, timeout=timeout, max_rows=max_rows)

    def decision(self, decision_id: int) -> dict[str, Any] | None:
        columns, rows = self._fetch("SELECT * FROM decisions WHERE id = ?", [decision_id])
        return dict(zip(columns, rows[0])) if rows else None

    def quarantine(self, *, topic: str | None, client: str | None, reason: str | None, group: str | None,
                   limit: int) -> QueryResult:
        where, params = quarantine_conditions(topic=topic or None, reason=reason or None)
        if client:
            where.append("client_id = ?")
            params.append(client)
        inner = (
            "SELECT id, ts, client_id, topic, schema_name, schema_version, "
            "CASE WHEN len(reasons) > 0 THEN reasons[1].\"check\" || ': ' || reasons[1].message END AS reason, "
            f"len(reasons) AS reasons, payload_size FROM quarantine WHERE {' AND '.join(where)}"
        )
        if group in GROUPS:
            column = GROUPS[group]
            sql = (f"SELECT {column} AS {group}, count(*) AS messages, min(ts) AS first, max(ts) AS last, "
                   f"list(id ORDER BY id DESC)[1:200] AS ids FROM ({inner}) GROUP BY ALL ORDER BY messages DESC LIMIT ?")
        else:
            sql = f"{inner} ORDER BY id DESC LIMIT ?"
        columns, rows = self._fetch(sql, [*params, limit + 1])
        return QueryResult(columns, rows[:limit], len(rows) > limit)

    def quarantined(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        columns, rows = self._fetch("SELECT * FROM quarantine WHERE list_contains(?, id)", [ids])
        return {int(row[0]): dict(zip(columns, row)) for row in rows}

    def client_figures(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Per client: when it last connected (the audit events) and its messages and rejects since."""
        if not client_ids:
            return {}
        sql = """
            WITH connected AS (
                SELECT client_id, max(ts) AS since FROM events
                WHERE kind = 'client_connected' AND list_contains(?, client_id) GROUP BY client_id
            )
            SELECT c.client_id, c.since,
                   count(d.id) AS messages,
                   count(d.id) FILTER (WHERE d.verdict = 'reject') AS rejects
            FROM connected c LEFT JOIN decisions d ON d.client_id = c.client_id AND d.ts >= c.since
            GROUP BY ALL"""
        _columns, rows = self._fetch(sql, [client_ids])
        return {row[0]: {"since": row[1], "messages": row[2], "rejects": row[3]} for row in rows}

    def revisions(self, *, limit: int = 20) -> QueryResult:
        """The config revisions that judged messages (newest first): when each was in force, with
        which schema set, and how many messages it accepted and rejected."""
        sql = """
            SELECT config_revision AS revision, any_value(schema_set) AS schema_set,
                   min(ts) AS first, max(ts) AS last,
                   count(*) FILTER (WHERE verdict = 'accept') AS accepted,
                   count(*) FILTER (WHERE verdict = 'reject') AS rejected
            FROM decisions GROUP BY config_revision ORDER BY first DESC LIMIT ?"""
        columns, rows = self._fetch(sql, [limit])
        return QueryResult(columns, rows, False)

    def rates(self, *, since: float, bucket_s: int) -> list[tuple[float, int, int]]:
        """(bucket start, accepted, rejected) per `bucket_s` seconds since `since` (epoch seconds)."""
        sql = f"""
            SELECT floor(epoch(ts) / {bucket_s}) * {bucket_s} AS bucket,
                   count(*) FILTER (WHERE verdict = 'accept'), count(*) FILTER (WHERE verdict = 'reject')
            FROM decisions WHERE ts >= ? GROUP BY ALL ORDER BY bucket"""
        _columns, rows = self._fetch(sql, [datetime.fromtimestamp(since, UTC)])
        return [(float(r[0]), int(r[1]), int(r[2])) for r in rows]


_NAMES = DECISION.names
_PAYLOAD_AUDITED = _NAMES.index("payload_audited")


def decision_row(values: tuple[Any, ...]) -> dict[str, Any]:
    """A decision from the log (its full DECISION row), with the audit table's meaning: the payload
    only when it was recorded for the audit log, reasons parsed."""
    row = dict(zip(_NAMES, values))
    if not values[_PAYLOAD_AUDITED]:
        row["payload"] = None
    try:
        row["reasons"] = json.loads(row["reasons"]) if row.get("reasons") else []
    except ValueError:
        row["reasons"] = []
    return row


# Decisions of both record versions, and the connection and context records compact ones refer to.
_TAILED = frozenset({DECISION.code, COMPACT_DECISION, CONNECTION.code, CONTEXT.code})


class VerdictTail:
    """Follows the message log: each `poll()` returns the decisions written since the last one (the
    writer's records are readable once handed to the OS, before they are durable). At most `keep`
    per poll are decoded (the newest): the live tail is for the eye; SQL has every verdict."""

    def __init__(self, log_dir: Path, *, keep: int = TAIL_KEEP):
        self.log_dir = log_dir
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._keep = keep
        self._follower = LogFollower(log_dir)
        self._definitions = Definitions(lookup=self._lookup)

    def _lookup(self, seq: int) -> tuple[int, bytes] | None:
        """A definition written before the follower started (it starts at the newest segment's
        start, so only after a failed batch): read from the segment holding it."""
        record = read_record(self.log_dir, seq)
        return (record.kind, record.body) if record is not None else None

    def poll(self) -> list[dict[str, Any]]:
        records = self._follower.poll(lambda record: record.kind in _TAILED)
        definitions = self._definitions
        decisions = [r for r in records if not definitions.add(r.seq, r.kind, r.body)]
        new = []
        for record in decisions[-self._keep:]:
            found = definitions.row(record.seq, record.kind, record.body)
            assert found is not None
            row = decision_row(found[1])
            del row["payload"]  # the live list needs none; a message opens from the store
            new.append(row)
        if (first := self._follower.first_seq) is not None:
            definitions.forget_before(first)  # a segment's decisions refer to its own definitions
        self.recent.extend(new)
        return new
