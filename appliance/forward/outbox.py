"""The reading side of the outbox: accepted messages waiting in the audit journal's SQLite file
until the cloud broker has acknowledged them.

The journal's writer thread inserts rows (in the same transaction as each message's verdict); this
class reads them in id order, deletes them once acknowledged, and keeps the outbox within its
bounds. It has its own connection to the same WAL file, so reads never wait for the writer. Its
writes (deletes, drops) go through `write`, normally the journal's `Journal.write`, which runs them
on the journal's writer thread inside its next group commit: one writer, so nobody sleeps in
SQLite's busy handler. Without one (tools, tests) they are short transactions on this connection.

Counters: `depth()` must be cheap (status, metrics, and the reject_new check run often), so the
message and byte counts live in memory. Rows are added by another connection, so they are brought
up to date from SQL at most every `refresh_interval` seconds by counting only the rows newer than
the newest one already counted (a range scan on the primary key), and recounted in full every
`full_refresh_interval` seconds to correct any drift. Deletions made here are subtracted exactly
(DELETE ... RETURNING).

"bytes" are payload bytes plus topic bytes, the part that grows with the traffic; the file itself
needs roughly 60-100 bytes more per row (see docs/forwarding.md).

Any SQLite error (a full disk, an I/O error) is caught, kept in `last_error` and counted: reads then
return nothing, deletes leave the rows in place (they are sent again later: at-least-once).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from appliance.audit.journal import write_transaction
from appliance.audit.records import OUTBOX_COLUMNS
from appliance.forward.config import OutboxBounds

log = logging.getLogger(__name__)

_SIZE = "coalesce(length(payload), 0) + coalesce(length(CAST(topic AS BLOB)), 0)"
_DDL = f"CREATE TABLE IF NOT EXISTS outbox ({', '.join(c + (' INTEGER PRIMARY KEY' if c == 'id' else '') for c in OUTBOX_COLUMNS)})"
_SELECT = f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM outbox WHERE id > ? ORDER BY id LIMIT ?"
_DELETE_CHUNK = 500
MIN_PLAUSIBLE_TS = 1_700_000_000.0  # 2023-11-14: no real message is older than this software
_SCAN_CHUNK = 2_000
MAX_DROPS_PER_CALL = 10_000

DropReason = Literal["expired", "max_messages", "max_bytes", "too_large"]


class Done(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...


class Submitted(Protocol):
    @property
    def done(self) -> Done: ...


class Writes(Protocol):
    """Where the outbox's writes go: the audit Journal (its writer thread), or _OwnWrites."""

    def write(self, func: Callable[[sqlite3.Connection], Any]) -> Any: ...

    def submit(self, func: Callable[[sqlite3.Connection], Any],
               on_done: Callable[[Any, BaseException | None], None] | None = None) -> Submitted: ...


class _OwnWrites:
    """Writes in a transaction of their own on the outbox's connection, in the calling thread (no
    journal writer: tools and tests). The caller holds Outbox._lock or is the only user."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def write(self, func: Callable[[sqlite3.Connection], Any]) -> Any:
        return write_transaction(self._conn, func)

    def submit(self, func: Callable[[sqlite3.Connection], Any],
               on_done: Callable[[Any, BaseException | None], None] | None = None) -> Submitted:
        result, error = None, None
        try:
            result = self.write(func)
        except Exception as exc:  # noqa: BLE001 - reported through on_done, as the journal does
            error = exc
        if on_done is not None:
            on_done(result, error)
        return _Finished()


class _Finished:
    done = threading.Event()
    done.set()


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    ts: float
    client_id: str
    topic: str
    payload: bytes
    qos: int | None  # QoS towards the cloud (the mapping's forward_qos); None: upstream.qos
    retain: bool
    schema: str | None

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic.encode())


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    messages: int
    bytes: int
    oldest_ts: float | None  # ts of the oldest message waiting; None when empty


@dataclass(frozen=True, slots=True)
class Dropped:
    id: int
    ts: float
    client_id: str
    topic: str
    size: int
    reason: DropReason


class Outbox:
    def __init__(
        self,
        path: Path,
        bounds: OutboxBounds,
        *,
        refresh_interval: float = 1.0,
        full_refresh_interval: float = 60.0,
        busy_timeout: float = 5.0,
        journal: Writes | None = None,
    ):
        self.path = path
        self.bounds = bounds
        self.refresh_interval = refresh_interval
        self.full_refresh_interval = full_refresh_interval
        self.last_error: str | None = None
        self.errors = 0  # SQLite errors since start
        self._lock = threading.RLock()  # delete_later's callback takes it, on _OwnWrites in the same call
        self._messages = 0
        self._bytes = 0
        self._oldest_ts: float | None = None
        self._counted_to = 0  # rows with id <= this are in the counters
        self._refreshed_at = float("-inf")
        self._full_refreshed_at = float("-inf")
        self._full = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self._conn.execute("PRAGMA journal_mode=WAL")
        # A delete lost to a power cut only means the message is sent again (at-least-once), so
        # this connection's commits need not wait for fsync; the journal's inserts still do.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA secure_delete=OFF")  # as the journal's connections (journal._connect)
        self._conn.execute(_DDL)
        self._writes: Writes = journal or _OwnWrites(self._conn)
        self._pending_delete: Done | None = None  # the last delete_later() not yet committed
        # Finished delete_later() calls, appended on the writer thread, applied under _lock.
        self._deleted: deque[tuple[list[tuple[int, int]] | None, BaseException | None]] = deque()
        with self._lock:
            self._refresh_locked(full=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- reading and acknowledging ---------------------------------------------------------------

    def next_batch(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Up to `limit` rows with id > after_id, oldest first."""
        with self._lock:
            self._apply_deletes()
            try:
                rows = self._conn.execute(_SELECT, (after_id, limit)).fetchall()
            except sqlite3.Error as exc:
                self._error("read", exc)
                return []
        return [
            OutboxRow(r[0], r[1], r[2], r[3], b"" if r[4] is None else bytes(r[4]), r[5], bool(r[6]), r[7])
            for r in rows
        ]

    def delete_later(self, ids: Iterable[int], on_deleted: Callable[[int], None],
                     on_failed: Callable[[list[int]], None]) -> None:
        """Remove acknowledged rows without waiting for the commit: `on_deleted(count)` or, when the
        delete failed (the rows stay and are sent again), `on_failed(ids)` runs once it is done, on
        the journal's writer thread. settle() waits for every delete queued so far."""
        ids = list(ids)
        if not ids:
            return

        def done(removed: list[tuple[int, int]] | None, error: BaseException | None) -> None:
            # On the writer thread: never take self._lock here. Its holders may be waiting for this
            # very thread (enforce() drops through Journal.write) or reading a big outbox, and every
            # verdict commit would wait with them. The counters catch up in _apply_deletes().
            self._deleted.append((removed, error))
            if error is not None or removed is None:
                on_failed(ids)
            else:
                on_deleted(len(removed))

        with self._lock:
            self._pending_delete = self._writes.submit(self._delete_in(ids), done).done

    def settle(self) -> None:
        """Wait until every delete_later() so far is committed (or failed): they run in order."""
        pending = self._pending_delete
        if pending is not None:
            pending.wait()
        with self._lock:
            self._apply_deletes()

    def _apply_deletes(self) -> None:
        """Bring the counters and last_error up to date with finished delete_later() calls (under _lock)."""
        while self._deleted:
            removed, error = self._deleted.popleft()
            if error is not None or removed is None:
                self._error("delete", error if isinstance(error, sqlite3.Error) else sqlite3.Error(str(error)))
            else:
                self._forget(removed)
                self._ok()

    def delete(self, ids: Iterable[int]) -> int:
        """Remove acknowledged rows; returns how many existed (an id dropped meanwhile is skipped)."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            try:
                removed = self._delete_ids(ids)
            except sqlite3.Error as exc:
                self._error("delete", exc)
                return 0
            self._forget(removed)
            self._ok()
            return len(removed)

    # -- counters --------------------------------------------------------------------------------

    def depth(self) -> OutboxDepth:
        """The in-memory counters, refreshed from SQL when older than refresh_interval."""
        with self._lock:
            self._apply_deletes()
            if time.monotonic() - self._refreshed_at >= self.refresh_interval:
                self._refresh_locked()
            return OutboxDepth(self._messages, self._bytes, self._oldest_ts)

    def refresh(self, *, full: bool = False) -> OutboxDepth:
        """Bring the counters up to date now (full: recount every row)."""
        with self._lock:
            self._apply_deletes()
            self._refresh_locked(full=full)
            return OutboxDepth(self._messages, self._bytes, self._oldest_ts)

    def is_full(self) -> bool:
        """reject_new policy: true while a bound is reached; the pipeline then refuses new messages.
        Never true under drop_oldest. Up to date within refresh_interval (enforce() refreshes)."""
        return self._full

    def _refresh_locked(self, *, full: bool = False) -> None:
        now = time.monotonic()
        full = full or now - self._full_refreshed_at >= self.full_refresh_interval
        try:
            if full:
                count, size, newest = self._conn.execute(f"SELECT count(*), coalesce(sum({_SIZE}), 0), max(id) FROM outbox").fetchone()
                self._messages, self._bytes = count, size
                self._full_refreshed_at = now
            else:
                count, size, newest = self._conn.execute(
                    f"SELECT count(*), coalesce(sum({_SIZE}), 0), max(id) FROM outbox WHERE id > ?", (self._counted_to,)
                ).fetchone()
                self._messages += count
                self._bytes += size
            if newest is not None:
                self._counted_to = max(self._counted_to, newest) if not full else newest
            oldest = self._conn.execute("SELECT ts FROM outbox ORDER BY id LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            self._error("count", exc)
            return
        self._oldest_ts = oldest[0] if oldest else None
        if self._messages == 0:
            self._bytes = 0
        self._refreshed_at = now
        self._update_full()

    def _forget(self, removed: list[tuple[int, int]]) -> None:
        for row_id, size in removed:
            if row_id <= self._counted_to:  # newer rows were never counted
                self._messages -= 1
                self._bytes -= size
        self._messages = max(self._messages, 0)
        self._bytes = max(self._bytes, 0)
        if removed:
            self._refreshed_at = float("-inf")  # the oldest row may have changed
        self._update_full()

    def _update_full(self) -> None:
        b = self.bounds
        self._full = b.policy == "reject_new" and (
            (b.max_messages is not None and self._messages >= b.max_messages)
            or (b.max_bytes is not None and self._bytes >= b.max_bytes)
        )

    # -- bounds ----------------------------------------------------------------------------------

    def enforce(self, now: float | None = None, *, handed_out: int = 0) -> list[Dropped]:
        """Apply the bounds: expired rows are always dropped; beyond max_messages or max_bytes the
        oldest are dropped under drop_oldest (under reject_new nothing is, `is_full()` turns true).
        Rows with ids up to `handed_out` are being sent (in flight or read ahead): they are left
        alone, since they would arrive anyway. Drops at most MAX_DROPS_PER_CALL rows; call again
        while it returns that many."""
        now = time.time() if now is None else now
        dropped: list[Dropped] = []
        pending = self._pending_delete
        if pending is not None:
            pending.wait()  # acknowledged rows still being deleted count against no bound
        with self._lock:
            self._apply_deletes()
            self._refresh_locked()
            try:
                if self.bounds.max_age is not None:
                    dropped += self._drop_expired(now - self.bounds.max_age.total_seconds(), handed_out)
                if self.bounds.policy == "drop_oldest":
                    dropped += self._drop_beyond_bounds(MAX_DROPS_PER_CALL - len(dropped), handed_out)
            except sqlite3.Error as exc:
                self._error("enforce bounds", exc)
            self._refresh_locked()
        return dropped

    def _scan(self, after_id: int) -> list[tuple[int, float, str, str, int]]:
        return self._conn.execute(
            f"SELECT id, ts, client_id, topic, {_SIZE} FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after_id, _SCAN_CHUNK)
        ).fetchall()

    def _drop_expired(self, cutoff: float, after: int = 0) -> list[Dropped]:
        # ids grow with time, so expired rows are a prefix: stop at the first young one.
        victims: list[Dropped] = []
        while len(victims) < MAX_DROPS_PER_CALL:
            rows = self._scan(after)
            for row_id, ts, client_id, topic, size in rows:
                # A receive time before MIN_PLAUSIBLE_TS means the gateway's clock was wrong then (no
                # RTC, before NTP): its age is unknown, so it is not expired.
                if ts is None or ts >= cutoff or ts < MIN_PLAUSIBLE_TS or len(victims) >= MAX_DROPS_PER_CALL:
                    return self._delete_victims(victims)
                victims.append(Dropped(row_id, ts, client_id, topic, size, "expired"))
            if len(rows) < _SCAN_CHUNK:
                break
            after = rows[-1][0]
        return self._delete_victims(victims)

    def _drop_beyond_bounds(self, limit: int, after: int = 0) -> list[Dropped]:
        b = self.bounds
        excess_messages = self._messages - b.max_messages if b.max_messages is not None else 0
        excess_bytes = self._bytes - b.max_bytes if b.max_bytes is not None else 0
        victims: list[Dropped] = []
        while (excess_messages > 0 or excess_bytes > 0) and len(victims) < limit:
            rows = self._scan(after)
            if not rows:
                break
            for row_id, ts, client_id, topic, size in rows:
                if not (excess_messages > 0 or excess_bytes > 0) or len(victims) >= limit:
                    break
                reason: DropReason = "max_messages" if excess_messages > 0 else "max_bytes"
                victims.append(Dropped(row_id, ts, client_id, topic, size, reason))
                excess_messages -= 1
                excess_bytes -= size
            after = rows[-1][0]
        return self._delete_victims(victims)

    def _delete_ids(self, ids: list[int]) -> list[tuple[int, int]]:
        """Delete these rows in one transaction; returns (id, size) of the rows that existed."""
        removed: list[tuple[int, int]] = self._writes.write(self._delete_in(ids))
        return removed

    @staticmethod
    def _delete_in(ids: list[int]) -> Callable[[sqlite3.Connection], list[tuple[int, int]]]:
        def delete(conn: sqlite3.Connection) -> list[tuple[int, int]]:
            removed: list[tuple[int, int]] = []
            for start in range(0, len(ids), _DELETE_CHUNK):
                chunk = ids[start : start + _DELETE_CHUNK]
                removed += conn.execute(
                    f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))}) RETURNING id, {_SIZE}", chunk
                ).fetchall()
            return removed

        return delete

    def _delete_victims(self, victims: list[Dropped]) -> list[Dropped]:
        if not victims:
            return []
        removed = self._delete_ids([v.id for v in victims])
        self._forget(removed)
        gone = {row_id for row_id, _ in removed}  # a row acknowledged meanwhile was not dropped
        return [v for v in victims if v.id in gone]

    # -- errors ----------------------------------------------------------------------------------

    def _error(self, action: str, exc: sqlite3.Error) -> None:
        self.errors += 1
        message = f"outbox {action} failed: {exc}"
        if message != self.last_error:
            log.error("%s (%s)", message, self.path)
        self.last_error = message

    def _ok(self) -> None:
        if self.last_error is not None:
            log.warning("outbox %s works again", self.path)
            self.last_error = None
