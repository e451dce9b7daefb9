"""The outbox: the messages in the message log that the cloud broker has not acknowledged yet.

Nothing is copied or deleted per message. The log (appliance/msglog) already holds every accepted
message durably; the outbox is a position in it and an index after that position:

- A durable **cursor** (appliance/msglog/cursor.py): every record at or before it has been
  acknowledged by the cloud broker, or dropped by the bounds. On start the outbox reads the log from
  the cursor and rebuilds its index (pending.py); the forwarder then sends from there.
- Only records the publisher was told are stored are read: seq <= the log's `durable_seq`. Only
  DECISION records marked `forward` and FORWARD_ONLY records (an old outbox's rows, imported) are
  messages to forward; everything else is passed over.
- Acknowledgements may arrive out of order inside the forwarder's window: the cursor moves to the
  highest seq below which everything is acknowledged (or dropped).
- The cursor is saved at most every `save_interval` seconds, or after `save_every`
  acknowledgements, whichever comes first, and on close: each save is an `fdatasync`, i.e. SD-card
  wear. After a crash the forwarder starts over from the last saved cursor, so what was acknowledged
  after that save is sent again: duplicates (at-least-once), never a loss.
- The log keeps what the outbox still needs: `needed_from()` is the first seq after the *saved*
  cursor (what a restart would read from); the log's segment cleaner removes only segments below
  min(needed_from(), the audit sealer's watermark).

Counters (`depth()`) are kept in memory and read without a lock (status, metrics, the reject_new
check): messages, bytes and the oldest message's receive time. "bytes" are the messages' bytes in
the log (record header and body: what their part of the log costs on disk).

Threads: the forwarder's thread does the reading, acknowledging and bounding; the event loop reads
`depth()`/`is_full()` and calls `on_durable()` (a listener of the log) to wake the forwarder.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

from appliance.audit.records import (
    COMPACT_DECISION,
    CONNECTION,
    CONTEXT,
    DECISION,
    FORWARD_ONLY,
    Definitions,
    RecordKind,
    compact_forward_fields,
    compact_ts_forward,
)
from appliance.config.upstream import OutboxBounds
from appliance.forward.logtail import LogTail, SegmentFiles
from appliance.forward.pending import Entry, Pending
from appliance.msglog import LogRecord
from appliance.msglog.cursor import Cursor
from appliance.msglog.format import MAX_SEQ, RECORD_HEADER, RECORD_HEADER_SIZE
from appliance.msglog.reader import read_record

log = logging.getLogger(__name__)

MIN_PLAUSIBLE_TS = 1_700_000_000.0  # 2023-11-14: no real message is older than this software
MAX_DROPS_PER_CALL = 10_000
SAVE_INTERVAL_S = 1.0
SAVE_EVERY = 10_000
READ_SPAN = 1 << 20  # one pread covers at most this much of a segment
# Records indexed per log read while catching up. Each read holds its records' bodies in memory at
# once: 50,000 of them were ~20 MB, the service's peak RSS under a backlog (docs/performance.md).
CATCH_UP_BATCH = 2_000
# The bodies of the messages the last reads of the log found, kept until they are sent (at most
# this many, and bytes): live messages are sent right after they were indexed, and reading them
# back (a pread, a stat of the segment, the headers checked again) cost more than decoding them.
FRESH_MESSAGES = 1_000
# What decoding a damaged body (one with a right CRC: written so) raises; struct.error is not a ValueError.
_UNDECODABLE = (ValueError, IndexError, UnicodeDecodeError, struct.error)
FRESH_BYTES = 1 << 20

DropReason = Literal["expired", "max_messages", "max_bytes", "too_large"]

_DECISION, _FORWARD_ONLY = DECISION.code, FORWARD_ONLY.code
_D = {name: i for i, name in enumerate(DECISION.names)}
_F = {name: i for i, name in enumerate(FORWARD_ONLY.names)}


class CursorStore(Protocol):
    """appliance.msglog.cursor.Cursor: a durable seq."""

    def load(self) -> int: ...

    def save(self, seq: int) -> None: ...

    def close(self) -> None: ...


class OutboxRow(NamedTuple):
    """One message to send. A NamedTuple, not a frozen dataclass: one is built per message on
    the forwarder's thread, and a frozen dataclass's __init__ costs four times as much."""

    seq: int  # the record's position in the log: what the forwarder acknowledges
    id: int  # the verdict's id (the `message-id` user property; joins with the audit log)
    ts: float
    client_id: str
    topic: str
    payload: bytes
    qos: int | None  # QoS towards the cloud (the mapping's forward_qos); None: upstream.qos
    retain: bool
    schema: str | None
    size: int  # bytes of the record in the log


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    messages: int
    bytes: int
    oldest_ts: float | None  # ts of the oldest message waiting; None when empty


@dataclass(frozen=True, slots=True)
class Dropped:
    seq: int
    id: int
    ts: float
    client_id: str
    topic: str
    size: int
    reason: DropReason


_VARIABLE_TYPES = ("str", "text", "bytes", "sha256")


def _fixed_fields_reader(kind: RecordKind, names: tuple[str, ...]) -> Callable[[bytes], tuple[Any, ...]]:
    """Reads a few fixed-size fields of a body without decoding it (0.7 µs instead of ~5 µs for a
    decision: the outbox reads every record of the log once). The body's struct comes first, fields
    in declaration order after the null mask (records.py); checked here on a sample, with the full
    decode as the fallback should that layout ever change."""
    fixed = [f.name for f in kind.fields if f.type not in _VARIABLE_TYPES]
    positions = [1 + fixed.index(name) for name in names]
    unpack = kind.head.unpack_from

    def peek(body: bytes) -> tuple[Any, ...]:
        values = unpack(body)
        return tuple(values[i] for i in positions)

    def decode(body: bytes) -> tuple[Any, ...]:
        row = kind.decode(body)
        return tuple(row[kind.names.index(name)] for name in names)

    samples = {"i64": 7, "f64": 1.5, "i32": 3, "u8": 2, "bool": True, "verdict": "accept", "str": "s",
               "text": "t", "bytes": b"b", "sha256": "ab" * 32}
    try:
        body = kind.encode(tuple(samples[f.type] for f in kind.fields))
        if peek(body) == decode(body) and all(not f.nullable for f in kind.fields if f.name in names):
            return peek
    except (KeyError, ValueError, IndexError):
        pass
    log.warning("outbox: %s record layout not as expected; decoding records in full", kind.name)
    return decode


_decision_peek = _fixed_fields_reader(DECISION, ("ts", "forward"))
_forward_only_peek = _fixed_fields_reader(FORWARD_ONLY, ("ts",))


def forward_ts(kind: int, body: bytes) -> float | None:
    """The receive time of a record that is a message to forward; None for any other record."""
    if kind == COMPACT_DECISION:
        ts, forward = compact_ts_forward(body)
        return ts if forward else None
    if kind == _DECISION:
        ts, forward = _decision_peek(body)
        return ts if forward else None
    if kind == _FORWARD_ONLY:
        received: float = _forward_only_peek(body)[0]
        return received
    return None


def to_row(seq: int, kind: int, body: bytes, definitions: Definitions | None = None) -> OutboxRow:
    """The message of a decision (either version; a compact one's references are looked up in
    `definitions`) or a FORWARD_ONLY record."""
    return MessageReader(definitions or Definitions()).row(seq, kind, body)


_N_CLIENT_ID, _X_TOPIC = CONNECTION.names.index("client_id"), CONTEXT.names.index("topic")
_X_FORWARD_QOS = CONTEXT.names.index("forward_qos")
_X_SCHEMA_NAME, _X_SCHEMA_VERSION = CONTEXT.names.index("schema_name"), CONTEXT.names.index("schema_version")
_Sender = tuple[str, str, int | None, str | None]  # client_id, topic, forward_qos, schema


class MessageReader:
    """Builds the OutboxRow of a record to forward. A compact decision is decoded only for the
    fields the forwarder sends (`compact_forward_fields`: no reasons, no SHA-256, no 27-field
    DECISION row), and what its two definitions give (client id, topic, QoS towards the cloud,
    schema) is worked out once per pair of definitions, not per message."""

    def __init__(self, definitions: Definitions):
        self.definitions = definitions
        self._senders: dict[tuple[int, int], _Sender] = {}

    def forget_before(self, seq: int) -> None:
        """Definitions below `seq` are gone (Definitions.forget_before)."""
        for key in [k for k in self._senders if k[0] < seq or k[1] < seq]:
            del self._senders[key]

    def _sender(self, connection: int, context: int) -> _Sender:
        n = self.definitions.get(connection, CONNECTION)
        x = self.definitions.get(context, CONTEXT)
        name, version = x[_X_SCHEMA_NAME], x[_X_SCHEMA_VERSION]
        schema = None if name is None else name if version is None else f"{name}:{version}"
        sender = self._senders[connection, context] = (n[_N_CLIENT_ID], x[_X_TOPIC], x[_X_FORWARD_QOS], schema)
        return sender

    def row(self, seq: int, kind: int, body: bytes) -> OutboxRow:
        size = RECORD_HEADER_SIZE + len(body)
        if kind == COMPACT_DECISION:
            id_, ts, connection, context, retain, payload = compact_forward_fields(body)
            sender = self._senders.get((connection, context)) or self._sender(connection, context)
            return OutboxRow(seq, id_, ts, sender[0], sender[1], b"" if payload is None else payload, sender[2],
                             retain, sender[3], size)
        if kind == _DECISION:
            r = DECISION.decode(body)
            name, version = r[_D["schema_name"]], r[_D["schema_version"]]
            schema = None if name is None else name if version is None else f"{name}:{version}"
            payload = r[_D["payload"]]
            return OutboxRow(seq, r[_D["id"]], r[_D["ts"]], r[_D["client_id"]], r[_D["topic"]],
                             b"" if payload is None else payload, r[_D["forward_qos"]], r[_D["retain"]], schema, size)
        if kind == _FORWARD_ONLY:
            r = FORWARD_ONLY.decode(body)
            return OutboxRow(seq, r[_F["id"]], r[_F["ts"]], r[_F["client_id"]], r[_F["topic"]], r[_F["payload"]],
                             r[_F["qos"]], bool(r[_F["retain"]]), r[_F["schema"]], size)
        raise ValueError(f"record kind {kind} is not a message to forward")


class Outbox:
    def __init__(
        self,
        directory: Path,
        bounds: OutboxBounds,
        *,
        cursor: CursorStore,
        durable_seq: Callable[[], int] | None = None,
        synced_seq: Callable[[], int] | None = None,
        save_interval: float = SAVE_INTERVAL_S,
        save_every: int = SAVE_EVERY,
    ):
        """`directory`: the message log's; `durable_seq`: the log's durable_seq (None: every complete
        record on disk counts, for a log no writer is appending to); `synced_seq`: the highest seq
        the log has fdatasync'd (default: durable_seq), the most the saved cursor may say."""
        self.directory = Path(directory)
        self.bounds = bounds
        self.save_interval = save_interval
        self.save_every = save_every
        self.last_error: str | None = None
        self._failing: str | None = None
        self.errors = 0  # read, decode and cursor-save errors since start
        self.waiter: Callable[[], None] | None = None  # the forwarder's wake(), while it runs
        self._cursor = cursor
        self._durable_seq = durable_seq or (lambda: MAX_SEQ)
        self._synced_seq = synced_seq or self._durable_seq
        self._lock = threading.RLock()
        self._files = SegmentFiles(self.directory)
        self._pending = Pending()
        self._segments: list[int] = []  # first_seq of each segment holding a pending message
        self._saved = cursor.load()
        if durable_seq is not None and self._saved > (end := durable_seq()):
            # A cursor beyond the end of the log belongs to another log (the log directory was
            # replaced or emptied, and seqs start over): following it would skip every message
            # until the new log caught up. Forward what this log holds instead.
            self._error("cursor", f"outbox: the saved cursor ({self._saved}) is beyond the end of the log ({end}): "
                                  "it belongs to another log; forwarding this log from its start")
            self._saved = self._forget_saved_cursor()
        self._saved_at = time.monotonic()
        self._moved_since_save = 0  # acknowledgements and drops not in the saved cursor yet
        # The connection and context records the pending messages refer to (version 2 records).
        self._definitions = Definitions(self._definition)
        self._messages = MessageReader(self._definitions)
        self._tail = self._new_tail(self._saved)
        self._full = False
        self._stale = False  # a read found a segment that changed under the index
        # seq -> (kind, body) of messages just indexed, not yet read for sending (FRESH_MESSAGES),
        # in seq order; only seqs above the highest next_batch handed out (the others are not
        # asked for again on this connection)
        self._fresh: dict[int, tuple[int, bytes]] = {}
        self._fresh_bytes = 0
        self._handed_out = 0
        self._depth = OutboxDepth(0, 0, None)
        with self._lock:
            self._catch_up()

    @classmethod
    def for_log(cls, message_log: Any, cursor: CursorStore, bounds: OutboxBounds, **options: Any) -> Outbox:
        """An outbox over a running MessageLog: reads up to its durable_seq, and is told (wakes
        the forwarder) whenever that advances."""
        outbox = cls(message_log.directory, bounds, cursor=cursor, durable_seq=lambda: message_log.durable_seq,
                     synced_seq=lambda: message_log.synced_seq, **options)
        message_log.add_listener(outbox.on_durable)
        return outbox

    def close(self) -> None:
        with self._lock:
            self.checkpoint(force=True)
            self._files.close()
            self._cursor.close()

    def on_durable(self, durable_seq: int) -> None:
        """A listener of the log (event loop): new records are durable, wake the forwarder."""
        waiter = self.waiter
        if waiter is not None:
            waiter()

    # -- reading and acknowledging ---------------------------------------------------------------

    def next_batch(self, after_seq: int, limit: int) -> list[OutboxRow]:
        """Up to `limit` messages waiting, with seq > after_seq, oldest first."""
        with self._lock:
            self._catch_up()
            self._forget_fresh(after_seq)
            entries = self._pending.entries(after_seq, limit)
            rows = self._read(entries)
            if len(rows) < len(entries) and self._stale:
                self.reload()  # a segment was rewritten under us: index it again, then read
                rows = self._read(self._pending.entries(after_seq, limit))
            if rows and rows[-1].seq > self._handed_out:
                self._handed_out = rows[-1].seq
            return rows

    def acknowledge(self, seqs: Iterable[int]) -> int:
        """The cloud broker has these messages: returns how many were waiting (a message dropped
        meanwhile, or acknowledged already, is not counted)."""
        with self._lock:
            pending = self._pending
            count = pending.acknowledge_many(seqs)
            if count:
                pending.advance()
                self._moved_since_save += count
                self._changed()
            self.checkpoint()
            return count

    def drop(self, row: OutboxRow, reason: DropReason) -> Dropped | None:
        """Give up on one message (the forwarder: too large for the cloud broker). None if it was
        not waiting any more."""
        with self._lock:
            if not self._pending.acknowledge(row.seq):
                return None
            self._pending.advance()
            self._moved_since_save += 1
            self._changed()
            return Dropped(row.seq, row.id, row.ts, row.client_id, row.topic, row.size, reason)

    # -- the cursor ------------------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """Every record at or before this seq is acknowledged or dropped (in memory)."""
        with self._lock:
            first = self._pending.first_seq()
            return first - 1 if first is not None else self._tail.last_seq

    @property
    def saved_cursor(self) -> int:
        return self._saved

    def needed_from(self) -> int:
        """The first seq a restart would read: the log must keep the segments from here on."""
        return self._saved + 1

    def checkpoint(self, *, force: bool = False) -> bool:
        """Save the cursor if it moved and a save is due (save_interval elapsed, or save_every
        acknowledgements), or whenever it moved with `force`. True if it was saved."""
        with self._lock:
            now = time.monotonic()
            if not force and self._moved_since_save < self.save_every and now - self._saved_at < self.save_interval:
                return False
            # Never past what the log has synced: under os_buffered a power cut can take records
            # that were forwarded already, and the log then hands their seqs out again; a cursor
            # beyond them would skip the new records. Up to it, they are sent again instead.
            position = min(self.cursor, self._synced_seq())
            if position <= self._saved:
                self._saved_at = now
                return False
            try:
                self._cursor.save(position)
            except OSError as exc:
                self._error("cursor", f"outbox cursor save failed: {exc}")
                self._saved_at, self._moved_since_save = now, 0  # retry when due again, not on every ack
                return False
            self._saved, self._saved_at, self._moved_since_save = position, now, 0
            self._release_segments()
            self._ok("cursor")
            return True

    def _forget_saved_cursor(self) -> int:
        """Remove the cursor file (a Cursor never goes backwards: its saves would be ignored up to
        the stale seq, and a later restart would follow it again)."""
        old = self._cursor
        if isinstance(old, Cursor):  # a file to remove (a test's in-memory store has none)
            path, io = old.path, old.io
            try:
                io.unlink(path)
                io.fsync_dir(path.parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error("cursor", f"outbox: cannot remove the stale cursor {path}: {exc}")
            # A fresh one: Cursor.load() of a missing file leaves the old position in memory.
            old.close()
            self._cursor = Cursor(path, io)
        return self._cursor.load()

    def _release_segments(self) -> None:
        """Forget (and close) the segments before the oldest pending message's."""
        first, segments = self._pending.first_seq(), self._segments
        if first is None:
            segments.clear()
        elif (keep := bisect_right(segments, first) - 1) > 0:
            del segments[:keep]
        oldest = segments[0] if segments else self._tail.segment
        if oldest is not None:
            self._files.close_before(oldest)
            # A segment's messages refer to definitions in it: older ones are not needed any more.
            self._definitions.forget_before(oldest)
            self._messages.forget_before(oldest)

    # -- counters --------------------------------------------------------------------------------

    def depth(self) -> OutboxDepth:
        """Messages waiting, their bytes and the oldest one's receive time (no lock, no I/O): up to
        date as of the forwarder's last look at the log (at least once a second)."""
        return self._depth

    def refresh(self) -> OutboxDepth:
        """Read what the log has made durable since the last look, now."""
        with self._lock:
            self._catch_up()
            return self._depth

    def is_full(self) -> bool:
        """reject_new policy: true while a bound is reached; the pipeline then refuses new messages.
        Never true under drop_oldest."""
        return self._full

    def _changed(self) -> None:
        p, b = self._pending, self.bounds
        self._depth = OutboxDepth(p.messages, p.bytes, p.oldest_ts())
        self._full = b.policy == "reject_new" and (
            (b.max_messages is not None and p.messages >= b.max_messages)
            or (b.max_bytes is not None and p.bytes >= b.max_bytes)
        )

    # -- bounds ----------------------------------------------------------------------------------

    def enforce(self, now: float | None = None, *, handed_out: int = 0) -> list[Dropped]:
        """Apply the bounds: expired messages are always dropped; beyond max_messages or max_bytes
        the oldest are dropped under drop_oldest (under reject_new nothing is: `is_full()` turns
        true). Messages with seq up to `handed_out` are being sent: they are left alone, since they
        would arrive anyway. Drops at most MAX_DROPS_PER_CALL; call again while it returns that
        many. Also saves the cursor when due."""
        now = time.time() if now is None else now
        with self._lock:
            self._catch_up()
            victims: list[tuple[Entry, DropReason]] = []
            b = self.bounds
            scan = self._pending.scan(handed_out)
            entry: Entry | None = next(scan, None)
            if b.max_age is not None:
                cutoff = now - b.max_age.total_seconds()
                # Receive times grow with seq, so the expired messages are a prefix. A time before
                # MIN_PLAUSIBLE_TS means the clock was wrong then (no RTC, before NTP): age unknown.
                while entry is not None and MIN_PLAUSIBLE_TS <= entry.ts < cutoff and len(victims) < MAX_DROPS_PER_CALL:
                    victims.append((entry, "expired"))
                    entry = next(scan, None)
            if b.policy == "drop_oldest":
                messages = self._pending.messages - len(victims)
                size = self._pending.bytes - sum(e.size for e, _ in victims)
                while entry is not None and len(victims) < MAX_DROPS_PER_CALL:
                    if b.max_messages is not None and messages > b.max_messages:
                        reason: DropReason = "max_messages"
                    elif b.max_bytes is not None and size > b.max_bytes:
                        reason = "max_bytes"
                    else:
                        break
                    victims.append((entry, reason))
                    messages -= 1
                    size -= entry.size
                    entry = next(scan, None)
            dropped = self._drop(victims)
            self.checkpoint()
            return dropped

    def _drop(self, victims: list[tuple[Entry, DropReason]]) -> list[Dropped]:
        if not victims:
            return []
        rows = {row.seq: row for row in self._read([e for e, _ in victims])}  # who they were, for the event
        removed = {e.seq for e in self._pending.remove(victims[0][0].seq, victims[-1][0].seq)}
        self._moved_since_save += len(removed)
        self._changed()
        dropped = []
        for entry, reason in victims:
            if entry.seq not in removed:
                continue
            row = rows.get(entry.seq)
            if row is None:  # unreadable (reported): still dropped, with what the index knows
                dropped.append(Dropped(entry.seq, 0, entry.ts, "", "", entry.size, reason))
            else:
                dropped.append(Dropped(entry.seq, row.id, row.ts, row.client_id, row.topic, row.size, reason))
        return dropped

    # -- the log ---------------------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Index the messages the log made durable since the last call."""
        tail, pending, segments, fresh = self._tail, self._pending, self._segments, self._fresh
        handed_out = self._handed_out
        upto = self._durable_seq()
        if upto <= tail.last_seq:
            return
        while True:
            try:
                located = tail.read(upto, CATCH_UP_BATCH)
            except OSError as exc:
                self._error("read", f"outbox read failed: {exc}")
                self._changed()
                return
            definitions, add = self._definitions, pending.add
            for (seq, kind, body), segment, offset in located:
                # Most records are compact decisions: they are not definitions, look at them first.
                if kind != COMPACT_DECISION and definitions.add(seq, kind, body):
                    continue
                try:
                    if kind == COMPACT_DECISION:
                        ts, forward = compact_ts_forward(body)
                        if not forward:
                            continue
                    else:
                        found = forward_ts(kind, body)
                        if found is None:
                            continue
                        ts = found
                except _UNDECODABLE as exc:
                    self._error("decode", f"outbox: record {seq} cannot be decoded, not forwarded: {exc}")
                    continue
                if not segments or segments[-1] != segment:
                    segments.append(segment)
                size = RECORD_HEADER_SIZE + len(body)
                add(seq, ts, size, offset)
                if seq > handed_out and len(fresh) < FRESH_MESSAGES and self._fresh_bytes + size <= FRESH_BYTES:
                    fresh[seq] = (kind, body)
                    self._fresh_bytes += size
            if len(located) < CATCH_UP_BATCH:
                break
        if tail.stuck is not None and tail.last_seq < upto < MAX_SEQ:
            # Durable records lie beyond: this is not a record being written, it is damage.
            segment, offset = tail.stuck
            self._error("read", f"outbox: damaged record in the newest log segment {segment} at offset {offset}: "
                        "forwarding waits there")
        else:
            self._ok("read")
        self._changed()

    def _read(self, entries: list[Entry]) -> list[OutboxRow]:
        """The messages at these index entries: as the last reads of the log found them when they
        all were (live messages), else read back from the log (one pread per span)."""
        fresh, row = self._fresh, self._messages.row
        if fresh:
            found = [fresh.pop(entry.seq, None) for entry in entries]
            if None not in found:
                if self._rewritten(entries):  # the bodies in memory may hold what a purge removed
                    fresh.clear()
                    self._fresh_bytes = 0
                    self._stale = True
                    return []
                self._fresh_bytes -= sum(entry.size for entry in entries)
                try:
                    return [row(entry.seq, *item) for entry, item in zip(entries, found, strict=True) if item is not None]
                except _UNDECODABLE:
                    return self._decoded(entries, found)  # one at a time, passing over the bad ones
            fresh.clear()  # not the newest messages (a new connection, a drop): read them back
            self._fresh_bytes = 0
        rows: list[OutboxRow] = []
        segments, files = self._segments, self._files
        i = 0
        while i < len(entries):
            k = bisect_right(segments, entries[i].seq)
            segment = segments[k - 1]
            next_segment = segments[k] if k < len(segments) else MAX_SEQ + 1
            start = entries[i].offset
            j = i + 1
            while j < len(entries) and entries[j].seq < next_segment and entries[j].offset + entries[j].size - start <= READ_SPAN:
                j += 1
            end = entries[j - 1].offset + entries[j - 1].size
            if files.replaced(segment):  # rewritten (a purge?): what the index says is stale
                self._stale = True
                return rows
            try:
                buf = files.pread(segment, start, end - start)
            except OSError as exc:
                self._error("read", f"outbox read failed: {exc}")
                return rows
            for entry in entries[i:j]:
                at = entry.offset - start
                if len(buf) < at + entry.size:
                    self._error("read", f"outbox: message {entry.seq} is missing from log segment {segment}")
                    self._stale = True
                    return rows
                _, length, kind, seq = RECORD_HEADER.unpack_from(buf, at)
                if seq != entry.seq or RECORD_HEADER_SIZE + length != entry.size:
                    self._error("read", f"outbox: log segment {segment} changed under the outbox at offset {entry.offset}")
                    self._stale = True
                    return rows
                try:
                    rows.append(row(seq, kind, buf[at + RECORD_HEADER_SIZE : at + entry.size]))
                except _UNDECODABLE as exc:
                    self._undecodable(seq, exc)
            i = j
        return rows

    def _forget_fresh(self, upto: int) -> None:
        """Drop the bodies kept for seqs up to `upto`: the reader has gone past them."""
        fresh = self._fresh
        while fresh:
            seq = next(iter(fresh))  # the lowest: kept in seq order
            if seq > upto:
                return
            self._fresh_bytes -= RECORD_HEADER_SIZE + len(fresh.pop(seq)[1])

    def _decoded(self, entries: list[Entry], found: list[tuple[int, bytes] | None]) -> list[OutboxRow]:
        rows: list[OutboxRow] = []
        for entry, item in zip(entries, found, strict=True):
            if item is not None:
                try:
                    rows.append(self._messages.row(entry.seq, *item))
                except _UNDECODABLE as exc:
                    self._undecodable(entry.seq, exc)
        return rows

    def _undecodable(self, seq: int, exc: Exception) -> None:
        """A message indexed (its receive time read) but refused when read for sending: reported,
        and out of the outbox, as if acknowledged (every later read would refuse it too)."""
        self._error("decode", f"outbox: record {seq} cannot be decoded, not forwarded: {exc}")
        if self._pending.acknowledge(seq):
            self._pending.advance()
            self._moved_since_save += 1
            self._changed()

    def _rewritten(self, entries: list[Entry]) -> bool:
        """Whether a segment holding one of these entries was replaced since it was read (one
        stat and fstat per segment)."""
        segments, files = self._segments, self._files
        i = 0
        while i < len(entries):
            k = bisect_right(segments, entries[i].seq)
            if files.replaced(segments[k - 1]):
                return True
            if k == len(segments):
                return False
            i = bisect_left(entries, segments[k], i, key=lambda entry: entry.seq)
        return False

    def reload(self) -> None:
        """Forget the index and the open segment files, and read the log again from the cursor:
        after something rewrote segments the outbox still needs (a purge). Messages acknowledged
        out of order and not yet behind the cursor are sent again."""
        with self._lock:
            start = self.cursor
            self._files.close()
            self._files = SegmentFiles(self.directory)
            self._pending = Pending()
            self._segments = []
            self._definitions = Definitions(self._definition)
            self._messages = MessageReader(self._definitions)
            self._tail = self._new_tail(start)
            self._stale = False
            self._fresh.clear()
            self._fresh_bytes = 0
            self._catch_up()

    def _new_tail(self, after_seq: int) -> LogTail:
        return LogTail(self.directory, after_seq, self._files, on_problem=self._damaged, on_skipped=self._skipped)

    def _skipped(self, record: LogRecord) -> None:
        self._definitions.add(record.seq, record.kind, record.body)

    def _definition(self, seq: int) -> tuple[int, bytes] | None:
        """A definition the tail did not pass us (it is in a segment read before we started)."""
        record = read_record(self.directory, seq)
        return None if record is None else (record.kind, record.body)

    def _damaged(self, path: Path, offset: int, kind: str) -> None:
        self._error("damage", f"outbox: {kind} log segment {path.name} at offset {offset}: the rest of it is skipped")

    # -- errors ----------------------------------------------------------------------------------

    def _error(self, what: str, message: str) -> None:
        """`what` failed ("read", "cursor"): counted, logged once, shown until `what` works again."""
        self.errors += 1
        if message != self.last_error:
            log.error("%s (%s)", message, self.directory)
        self.last_error, self._failing = message, what

    def _ok(self, what: str) -> None:
        if self.last_error is not None and self._failing == what:
            log.warning("outbox %s works again", what)
            self.last_error = self._failing = None
