"""The audit journal: a small SQLite (WAL) file that makes every verdict durable before the
publisher hears back, and from which verdicts move to DuckDB in batches.

Why two stores: DuckDB is the place to query, but every DuckDB statement costs ~150 µs, so it is
written in batches of thousands, seconds apart; an acknowledged message's verdict must survive a
`kill -9` now. SQLite in WAL mode commits a batch of hundreds of rows in about a millisecond
(EVIDENCE.md), so the journal group-commits whatever accumulated while the previous commit was being
synced. A record is durable once `committed >= its sequence number`; the proxy holds the
publisher's acknowledgement until then (see proxy/acks.py).

Threads: the event loop only appends to an in-memory queue (~0.1 µs). A writer thread commits
batches and reports the committed sequence number back to the loop. A mover thread copies committed
rows to DuckDB (AuditStore.append) and then deletes them from the journal.

One writer: every write to the file goes through the writer thread (`write()`: the mover's deletes,
the outbox's deletes and drops), inside the next group commit. SQLite allows one write transaction
at a time, and a connection that finds the lock taken sleeps in its busy handler (1, 2, 5, 10 ms...):
with three connections writing, the commits that release publishers' acknowledgements waited behind
the others' (measured: a quarter of the writer's time; docs/performance.md). After a crash, the rows
still in the journal are moved on the next start; rows a crash left in both places are removed from
DuckDB first (ids only grow, so they are exactly those at or after the journal's first id).

A full disk or any other SQLite error never stops message flow: records are then released as if
committed (and counted as lost), an event says so, and `healthy` turns false until a commit works
again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from appliance.audit.records import DECISION_COLUMNS, EVENT_COLUMNS, OUTBOX_COLUMNS
from appliance.pipeline import FailedTickets

log = logging.getLogger(__name__)

MAX_BATCH = 5_000
# Rows moved to DuckDB per batch. Smaller batches keep the peak memory of a move down (the rows as
# Python tuples, then DuckDB's copies): 2,000 instead of 10,000 lowered the appliance's peak RSS by
# ~25 MB under load at no measurable cost in throughput (docs/performance.md, memory).
MOVE_BATCH = 2_000
MOVE_INTERVAL_S = 1.0
_STOP = object()
_DECISION, _EVENT, _OUTBOX = 0, 1, 2
T = TypeVar("T")


def write_transaction(conn: sqlite3.Connection, func: Callable[[sqlite3.Connection], T]) -> T:
    """`func(conn)` in a write transaction of its own: committed, or rolled back and raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = func(conn)
    except BaseException:
        if conn.in_transaction:  # SQLITE_FULL and I/O errors may have rolled it back already
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class _Write:
    """A write another thread asked for; run on the writer's connection, inside its transaction."""

    __slots__ = ("done", "error", "func", "on_done", "result")

    def __init__(self, func: Callable[[sqlite3.Connection], Any],
                 on_done: Callable[[Any, BaseException | None], None] | None = None):
        self.func = func
        self.on_done = on_done
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any, error: BaseException | None) -> None:
        """Committed (or failed): record the outcome, call on_done, wake whoever waits."""
        self.result, self.error = result, error
        if self.on_done is not None:
            try:
                self.on_done(result, error)
            except Exception:  # noqa: BLE001 - the writer thread must survive a caller's bug
                log.exception("journal write callback failed")
        self.done.set()


_DECISION_DDL = f"CREATE TABLE IF NOT EXISTS decisions ({', '.join(c + (' INTEGER PRIMARY KEY' if c == 'id' else '') for c in DECISION_COLUMNS)})"
_EVENT_DDL = f"CREATE TABLE IF NOT EXISTS events ({', '.join(c + (' INTEGER PRIMARY KEY' if c == 'id' else '') for c in EVENT_COLUMNS)})"
_OUTBOX_DDL = f"CREATE TABLE IF NOT EXISTS outbox ({', '.join(c + (' INTEGER PRIMARY KEY' if c == 'id' else '') for c in OUTBOX_COLUMNS)})"
_INSERT_OUTBOX = f"INSERT OR REPLACE INTO outbox VALUES ({', '.join('?' * len(OUTBOX_COLUMNS))})"
_INSERT_DECISION = f"INSERT OR REPLACE INTO decisions VALUES ({', '.join('?' * len(DECISION_COLUMNS))})"
_INSERT_EVENT = f"INSERT OR REPLACE INTO events VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"


def _fetch_yielding(cursor: sqlite3.Cursor, size: int = 200) -> list[Any]:
    """fetchall() in steps of `size` rows, yielding the GIL in between: turning rows into Python
    tuples holds it (~2 µs a row), and the event loop should not wait for a whole batch."""
    rows: list[Any] = []
    while chunk := cursor.fetchmany(size):
        rows += chunk
        time.sleep(0)
    return rows


class Destination(Protocol):
    """Where committed rows go (the DuckDB AuditStore)."""

    def append(self, decisions: Sequence[tuple[Any, ...]], events: Sequence[tuple[Any, ...]] = ()) -> None: ...

    def delete_from(self, first_decision_id: int | None, first_event_id: int | None) -> None: ...


# Small commits (a few rows, one per QoS 1 round trip) rewrite whole pages into the WAL: smaller
# pages mean fewer bytes written per message on an SD card.
PAGE_SIZE = 1024


# Checkpoints (copying WAL pages back into the file) run on the mover thread after each move, as
# PASSIVE ones that never block the writer, so a page rewritten by many commits in between (the
# table's last leaf, pages emptied by deletes) is copied once: ~20 % fewer bytes written than
# SQLite's default of a checkpoint every 1,000 pages in the committing thread, and no checkpoint
# in the path of a publisher's acknowledgement. The writer's own autocheckpoint stays as a backstop
# (a mover stuck on DuckDB errors must not let the WAL grow without bound).
AUTOCHECKPOINT_PAGES = 16_384
CHECKPOINT_INTERVAL_S = 2.0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect when the file is created
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not just a crash
    conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
    # Debian builds SQLite with SECURE_DELETE: every deleted row would be zeroed on disk, rewriting
    # each page a move or a forward empties (~40 % of the journal's bytes). The rows live on in
    # DuckDB or were delivered; nothing here needs erasing.
    conn.execute("PRAGMA secure_delete=OFF")
    return conn


class Journal:
    def __init__(
        self,
        path: Path,
        destination: Destination | None = None,
        *,
        on_event: Callable[[str, dict[str, object]], None] | None = None,
        max_bytes: int | None = None,
    ):
        self.path = path
        self._destination = destination
        self._on_event = on_event or (lambda kind, detail: None)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._writer: threading.Thread | None = None
        self._mover: threading.Thread | None = None
        self._stopping = threading.Event()
        self._moved = threading.Condition()
        self._move_lock = threading.Lock()  # one mover at a time: the thread, a flush, shutdown
        self._accepting = threading.Lock()  # write() vs stop(): nothing is queued after _STOP
        self._writing = False  # the writer thread takes write() requests
        self._checkpointed_at = 0.0  # monotonic time of the mover's last checkpoint
        self.last_seq = 0  # sequence number of the last record added (event loop only)
        self.committed = 0  # highest sequence number known durable (event loop only)
        self.healthy = True
        self.lost = 0  # records that could not be made durable (disk full, I/O errors)
        self._failed = FailedTickets()  # their sequence numbers (event loop only)
        self.moved = 0  # rows moved to DuckDB since start
        self.outbox_added = 0  # outbox rows committed since start
        # Called on the writer thread after a commit that added outbox rows (wakes the forwarder).
        self.on_outbox_commit: Callable[[], None] | None = None
        self.pending_rows = 0  # rows in the journal not yet moved (approximate, for metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        with self._connect() as conn:
            conn.execute(_DECISION_DDL)
            conn.execute(_EVENT_DDL)
            conn.execute(_OUTBOX_DDL)
            self.pending_rows = conn.execute("SELECT (SELECT count(*) FROM decisions) + (SELECT count(*) FROM events)").fetchone()[0]
        conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        if self._max_bytes is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(16, self._max_bytes // page_size)}")
        return conn

    def max_ids(self) -> tuple[int, int]:
        """The largest ids still in the journal (0 when empty), so ids keep growing across restarts."""
        conn = self._connect()
        try:
            row = conn.execute("SELECT (SELECT max(id) FROM decisions), (SELECT max(id) FROM events)").fetchone()
        finally:
            conn.close()
        return row[0] or 0, row[1] or 0

    # -- event loop side ---------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """`listener(committed_seq)` runs on the event loop after every commit."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int], None]) -> None:
        self._listeners.remove(listener)

    def add_decision(self, row: tuple[Any, ...]) -> int:
        self.last_seq += 1
        self._queue.put((self.last_seq, _DECISION, row))
        return self.last_seq

    def add_event(self, row: tuple[Any, ...]) -> int:
        self.last_seq += 1
        self._queue.put((self.last_seq, _EVENT, row))
        return self.last_seq

    def add_outbox(self, row: tuple[Any, ...]) -> int:
        """An accepted message to forward (records.OUTBOX_COLUMNS); committed with its verdict."""
        self.last_seq += 1
        self._queue.put((self.last_seq, _OUTBOX, row))
        return self.last_seq

    def failed(self, seq: int) -> bool:
        """Whether the record numbered `seq` could not be committed (its ack must not say success)."""
        return seq in self._failed

    def _on_failure(self, first: int, last: int, seq: int) -> None:
        self._failed.add(first, last)
        self._on_commit(seq)

    def _on_commit(self, seq: int) -> None:
        if seq > self.committed:
            self.committed = seq
            for listener in list(self._listeners):
                listener(seq)

    def write(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Run `func(conn)` as a write to the journal file and return its result once committed
        (any thread but the event loop's: it blocks). See submit()."""
        request = self.submit(func)
        request.done.wait()
        if request.error is not None:
            raise request.error
        result: T = request.result
        return result

    def submit(self, func: Callable[[sqlite3.Connection], Any],
               on_done: Callable[[Any, BaseException | None], None] | None = None) -> _Write:
        """Queue `func(conn)` as a write to the journal file without waiting: `on_done(result,
        error)` runs once it is committed or failed, and the returned request's `done` event is set
        after that. While the writer thread runs, `func` runs there, inside the next group commit
        and in a savepoint of its own: an exception undoes only its own changes. Otherwise (before
        start, after stop) it runs now, in this thread, in a transaction of its own."""
        request = _Write(func, on_done)
        with self._accepting:
            queued = self._writing
            if queued:
                self._queue.put(request)
        if queued:
            return request
        result, error = None, None
        conn = self._connect()
        try:
            result = write_transaction(conn, func)
        except Exception as exc:  # noqa: BLE001 - reported through the request, as on the writer
            error = exc
        finally:
            conn.close()
        request.finish(result, error)
        return request

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._writer = threading.Thread(target=self._write_loop, name="audit-journal-writer", daemon=True)
        with self._accepting:
            self._writing = True
        self._writer.start()
        if self._destination is not None:
            self._mover = threading.Thread(target=self._move_loop, name="audit-journal-mover", daemon=True)
            self._mover.start()

    def stop(self, *, move: bool = True) -> None:
        """Commit what is queued, move what is committed (unless move=False), stop both threads."""
        if self._writer is not None:
            with self._accepting:
                self._writing = False
                self._queue.put(_STOP)
            self._writer.join()
        self._stopping.set()
        with self._moved:
            self._moved.notify_all()
        if self._mover is not None:
            self._mover.join()
        if move and self._destination is not None:
            self.move_all()

    # -- writer thread -----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                item = self._queue.get()
                items = [item]
                while len(items) < MAX_BATCH:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(entry is _STOP for entry in items)
                records = [entry for entry in items if entry is not _STOP and type(entry) is not _Write]
                writes = [entry for entry in items if type(entry) is _Write]
                if records or writes:
                    try:
                        if conn is None:
                            conn = self._connect()  # again after a failure: the disk may be back
                        self._commit(conn, records, writes)
                    except Exception as exc:  # noqa: BLE001 - a dead writer would hold every ack forever
                        log.exception("audit journal writer failed on a batch; its %d records are lost", len(records))
                        self.lost += len(records)
                        if records:
                            self._call_on_loop(self._on_failure, records[0][0], records[-1][0], records[-1][0])
                        for write in writes:
                            if not write.done.is_set():
                                write.finish(None, exc)
                        if conn is None and self.healthy:
                            self.healthy = False
                            self._call_on_loop(self._on_event, "audit_degraded", {"error": str(exc)})
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _commit(self, conn: sqlite3.Connection, records: list[tuple[int, int, tuple[Any, ...]]], writes: Sequence[_Write] = ()) -> None:
        """One transaction: the other threads' writes first (deletes: they free space), each in a
        savepoint of its own, then the records in one more savepoint. When the disk is full the
        records fail (lost, as below) but the deletes still commit, so space comes back."""
        decisions = [row for _, kind, row in records if kind == _DECISION]
        events = [row for _, kind, row in records if kind == _EVENT]
        outbox = [row for _, kind, row in records if kind == _OUTBOX]
        failure: sqlite3.Error | None = None  # why the records could not be stored
        try:
            conn.execute("BEGIN")
            outcomes = self._run_writes(conn, writes)
            if records:
                conn.execute("SAVEPOINT records")
                try:
                    if decisions:
                        conn.executemany(_INSERT_DECISION, decisions)
                    if events:
                        conn.executemany(_INSERT_EVENT, events)
                    if outbox:
                        conn.executemany(_INSERT_OUTBOX, outbox)
                except sqlite3.Error as exc:
                    failure = exc
                    if conn.in_transaction:
                        conn.execute("ROLLBACK TO records")
                        conn.execute("RELEASE records")
                    else:  # SQLITE_FULL and I/O errors roll back the whole transaction: redo the writes
                        conn.execute("BEGIN")
                        outcomes = self._run_writes(conn, writes)
                else:
                    conn.execute("RELEASE records")
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - also a value sqlite3 cannot bind: never leave the transaction open
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for write in writes:
                write.finish(None, exc)
            failure = exc if isinstance(exc, sqlite3.Error) else sqlite3.Error(f"{type(exc).__name__}: {exc}")
        else:
            for write, (result, error) in zip(writes, outcomes, strict=True):
                write.finish(result, error)
        if not records:
            return
        if failure is not None:
            self.lost += len(records)
            if self.healthy:
                self.healthy = False
                log.error("audit journal %s: cannot commit (%s); verdicts are not being recorded", self.path, failure)
                self._call_on_loop(self._on_event, "audit_degraded", {"error": str(failure)})
        else:
            self.pending_rows += len(decisions) + len(events)
            self.outbox_added += len(outbox)
            on_outbox_commit = self.on_outbox_commit  # read once: stop() may clear it meanwhile
            if outbox and on_outbox_commit is not None:
                try:
                    on_outbox_commit()
                except Exception:  # noqa: BLE001 - the records are committed; a wake-up is not worth losing them
                    log.exception("waking the forwarder failed")
            if not self.healthy:
                self.healthy = True
                log.warning("audit journal %s: commits work again (%d records lost meanwhile)", self.path, self.lost)
                self._call_on_loop(self._on_event, "audit_recovered", {"lost": self.lost})
            if self.pending_rows >= MOVE_BATCH:
                with self._moved:
                    self._moved.notify_all()
        if failure is not None:
            # Settled, not durable: their acks must not claim success (proxy/acks.py).
            self._call_on_loop(self._on_failure, records[0][0], records[-1][0], records[-1][0])
        else:
            self._call_on_loop(self._on_commit, records[-1][0])

    @staticmethod
    def _run_writes(conn: sqlite3.Connection, writes: Sequence[_Write]) -> list[tuple[Any, BaseException | None]]:
        outcomes: list[tuple[Any, BaseException | None]] = []
        for write in writes:
            conn.execute("SAVEPOINT write")
            try:
                outcomes.append((write.func(conn), None))
            except Exception as exc:  # noqa: BLE001 - reported to the thread that asked
                outcomes.append((None, exc))
                if not conn.in_transaction:
                    raise  # the error rolled back the whole transaction: nothing of this batch stays
                conn.execute("ROLLBACK TO write")
            conn.execute("RELEASE write")
        return outcomes

    def _call_on_loop(self, func: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(func, *args)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                pass

    # -- mover thread ------------------------------------------------------------------------------

    def _move_loop(self) -> None:
        while not self._stopping.is_set():
            with self._moved:
                self._moved.wait(MOVE_INTERVAL_S)
            if self._stopping.is_set():
                return
            try:
                self.move_batch()
            except Exception:  # noqa: BLE001 - keep moving later; the rows stay in the journal
                log.exception("moving audit records to DuckDB failed; will retry")
                time.sleep(MOVE_INTERVAL_S)
            if time.monotonic() - self._checkpointed_at >= CHECKPOINT_INTERVAL_S:
                self.checkpoint()

    def checkpoint(self) -> None:
        """Copy committed WAL pages into the journal file without waiting for the writer (PASSIVE)."""
        try:
            conn = self._connect()
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
            self._checkpointed_at = time.monotonic()
        except sqlite3.Error as exc:  # the writer's autocheckpoint is the backstop
            log.debug("audit journal checkpoint failed: %s", exc)

    def recover(self) -> None:
        """Before the first move after a start: drop from DuckDB what an interrupted move left there."""
        assert self._destination is not None
        conn = self._connect()
        try:
            first_decision, first_event = conn.execute("SELECT (SELECT min(id) FROM decisions), (SELECT min(id) FROM events)").fetchone()
        finally:
            conn.close()
        if first_decision is not None or first_event is not None:
            self._destination.delete_from(first_decision, first_event)

    def move_batch(self, limit: int = MOVE_BATCH) -> int:
        """Move up to `limit` committed rows of each table to the destination; returns rows moved."""
        with self._move_lock:
            return self._move_batch(limit)

    def _move_batch(self, limit: int) -> int:
        assert self._destination is not None
        conn = self._connect()
        try:
            decisions = _fetch_yielding(conn.execute(f"SELECT * FROM decisions ORDER BY id LIMIT {int(limit)}"))
            events = _fetch_yielding(conn.execute(f"SELECT * FROM events ORDER BY id LIMIT {int(limit)}"))
            if not decisions and not events:
                return 0
        finally:
            conn.close()
        self._destination.append(decisions, events)

        def delete_moved(conn: sqlite3.Connection) -> None:
            if decisions:
                conn.execute("DELETE FROM decisions WHERE id <= ?", (decisions[-1][0],))
            if events:
                conn.execute("DELETE FROM events WHERE id <= ?", (events[-1][0],))

        try:
            self.write(delete_moved)
        except sqlite3.Error:
            # The rows stay in the journal and will be moved again: take them back out of DuckDB.
            self._destination.delete_from(decisions[0][0] if decisions else None, events[0][0] if events else None)
            raise
        moved = len(decisions) + len(events)
        self.moved += moved
        self.pending_rows = max(0, self.pending_rows - moved)
        return moved

    def move_all(self) -> int:
        total = 0
        while moved := self.move_batch():
            total += moved
        return total
