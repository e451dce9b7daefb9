"""The message log's writer: one thread appends records to the newest segment and group-commits them
under a SyncPolicy; append() only encodes the record and hands it over (docs/decisions/0004-message-log.md).

Threads: append() may be called from any thread (the event loop, normally) and never touches the
disk; everything on disk is done by the "msglog-writer" thread (or by the caller before start() and
after stop()). Durability is reported, never read back: append() returns the record's seq (a
ticket); listeners get the new durable_seq on the event loop after each sync, failure listeners get
the seq range of a batch that could not be written. A seq at or below durable_seq is durable unless
it was reported failed first (failures are delivered before any durable_seq that passes them).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from appliance.names import EventKind

from .fileio import FileIO, OsIO
from .format import (
    _CRC_PREFIX,
    FILE_HEADER_SIZE,
    FLAG_RECYCLED,
    RECORD_HEADER,
    MAX_BODY,
    MAX_SEQ,
    FormatError,
    decode_file_header,
    encode_file_header,
    free_name,
    next_record_at,
    parse_free_name,
    segment_name,
)
from .reader import SegmentInfo, SegmentScan, list_free, list_segments

log = logging.getLogger(__name__)
T = TypeVar("T")

_pack_header = RECORD_HEADER.pack
_pack_prefix = _CRC_PREFIX.pack
_crc32 = zlib.crc32
_monotonic = time.monotonic

SyncMode = Literal["power_safe", "os_buffered"]
POWER_SAFE: SyncMode = "power_safe"
OS_BUFFERED: SyncMode = "os_buffered"
RETRY_INTERVAL = 1.0
_PAGE = 4096  # while unhealthy, probe the disk at least this often
PREALLOCATE_MODES = ("none", "fallocate", "zeros")
# An unhealthy log counts as recovered only once its file system has this much free, or two full
# batches if more, but never more than MAX_HEADROOM: a large sync_bytes must not keep it unhealthy
# on a disk with room to spare (see _recovered).
MIN_HEADROOM = 128 * 1024
MAX_HEADROOM = 8 * 1024 * 1024


@dataclass(frozen=True)
class SyncPolicy:
    """When a record counts as durable, and how syncs are batched.

    power_safe: durable once fdatasync'd. A sync happens when the oldest unsynced record has waited
        `window` seconds, when `max_pending_bytes` are pending, or when request_sync() is called.
    os_buffered: durable once written to the OS (survives the process being killed, not a power cut);
        written as soon as the writer wakes, fdatasync'd every `interval` seconds, so a power cut
        loses at most the last `interval` of records that were reported durable.
    """

    mode: SyncMode = POWER_SAFE
    window: float = 0.020
    max_pending_bytes: int = 64 * 1024
    interval: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in (POWER_SAFE, OS_BUFFERED):
            raise ValueError(f"sync mode must be {POWER_SAFE!r} or {OS_BUFFERED!r}, not {self.mode!r}")
        if self.window < 0 or self.interval <= 0 or self.max_pending_bytes < 1:
            raise ValueError(f"invalid sync policy {self!r}")


@dataclass
class RecoveryReport:
    """What open() found: the damage it reported or cut, and where the log continues."""

    directory: Path
    segments: int = 0
    last_seq: int = 0
    created: bool = False  # the directory had no segment yet
    torn_tail: tuple[Path, int, int] | None = None  # (segment, offset cut at, bytes cut)
    # A recycled newest segment's bytes past its last record, cut: the old segment's, expected
    # after a crash or kill (not reported as a torn tail); (segment, offset cut at, bytes cut).
    stale_tail: tuple[Path, int, int] | None = None
    corrupt: list[tuple[Path, int, str]] = field(default_factory=list)  # sealed segments: (path, offset, problem)


class LogClosed(RuntimeError):
    """append() after stop(), or after the writer thread died of a bug."""


class EpochChanged(RuntimeError):
    """append(..., epoch=E) when the log's epoch is no longer E: the record would not land in the
    segment (or after the records) the caller expected; see MessageLog.epoch."""


Listener = Callable[[int], None]
FailureListener = Callable[[int, int, str], None]
EventCallback = Callable[[EventKind, dict[str, Any]], None]


class MessageLog:
    """The writer. Lifecycle: open() (recovery), start(loop), append()... from any thread, stop().

    preallocate: "fallocate" (the default: posix_fallocate ahead of the end), "zeros" (write zero
    pages ahead of the end) or "none" (plain appends), `preallocate_bytes` at a time; a
    preallocated tail reads as the end of the segment and is cut at seal, stop and open. Measured in
    docs/decisions/0004-message-log.md: same bytes as plain appends by /proc/self/io, fewer on the
    device (fewer journal commits).

    recycle: how many removed segments to keep as free files (`free-*.recycle`) for new segments to
    reuse instead of creating a file (0: delete them). Overwriting blocks that were written before
    needs no metadata at fdatasync, so the device writes what /proc/self/io counts, no journal
    commit per sync (docs/decisions/0006-segment-recycling.md: 11.2 -> 4.1 device bytes per payload
    byte at 1,000 records/s). A free file keeps its disk space (up to `recycle` x segment_bytes).
    """

    def __init__(self, directory: Path, *, policy: SyncPolicy = SyncPolicy(), segment_bytes: int = 16 << 20,
                 segment_max_age: float | None = 600.0, io: FileIO | None = None,
                 on_event: EventCallback | None = None, on_seal: Callable[[SegmentInfo], None] | None = None,
                 preallocate: str = "fallocate", preallocate_bytes: int = 1 << 20, recycle: int = 2):
        if preallocate not in PREALLOCATE_MODES:
            raise ValueError(f"preallocate must be one of {PREALLOCATE_MODES}, not {preallocate!r}")
        if recycle < 0:
            raise ValueError(f"recycle must be >= 0, not {recycle!r}")
        self.directory = Path(directory)
        self.policy = policy
        self.segment_bytes = segment_bytes
        self.segment_max_age = segment_max_age
        self.io = io or OsIO()
        self.on_event = on_event
        self.on_seal = on_seal
        self.preallocate = preallocate
        self.preallocate_bytes = preallocate_bytes
        self.recycle = recycle
        self._free: list[Path] = []  # free files (removed segments kept for reuse), oldest first
        self._power_safe = policy.mode == POWER_SAFE
        self._window = policy.window if self._power_safe else 0.0
        self._max_pending = policy.max_pending_bytes

        # Shared with append(): guarded by _lock.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._buf = bytearray()
        self._buf_first = 0
        self._since = 0.0
        self._next_seq = 1
        self._sync_requested = False
        # power_safe with a window: after each batch it took, the writer looks again `window` later
        # (before any record appended since has waited `window`), so append() need not wake it: the
        # first append after a sync no longer pays a futex wake-up and a GIL hand-over on the event
        # loop (append() 11-12 -> 7 µs on average at 1,000 records/s). Syncs happen exactly as before.
        # None: idle (a look found nothing), append() wakes it.
        self._tick_at: float | None = None
        self._stopping = False
        self._epoch = 0
        self._closed = True  # until open(): append() refuses (no seq can be handed out before the scan)
        self._commands: list[tuple[Callable[[], Any], _Waiter]] = []

        # Writer state (the writer thread, or the caller before start()/after stop()).
        self._fd: int | None = None
        self._segment: SegmentInfo | None = None
        self._segment_opened = 0.0
        self._end = 0  # end of the last record written to the active segment
        self._allocated = 0  # file size when preallocating
        self._unsynced = False  # os_buffered: written since the last fdatasync
        self._roll_after = False  # the batch being written fills the segment: roll after it
        self._last_sync = 0.0
        self._next_probe = 0.0
        self._segments = 0
        self._stats = {"records": 0, "bytes_appended": 0, "syncs": 0, "failed_batches": 0, "recycled": 0}

        # Durability, as the writer knows it (wait_durable) and as the loop knows it (durable_seq).
        self._dcond = threading.Condition()
        self._durable_w = 0
        self._failed_first: list[int] = []
        self._failed_last: list[int] = []
        self.durable_seq = 0
        # Highest seq known to be fdatasync'd (= durable in power_safe; lags by up to `interval` in
        # os_buffered): what survives a power cut. Written by the writer thread.
        self.synced_seq = 0
        self._written_seq = 0
        self.healthy = True
        self.lost = 0
        self._listeners: list[Listener] = []
        self._failure_listeners: list[FailureListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._opened = False

    # --- public API ----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The last seq handed out by append()."""
        return self._next_seq - 1

    @property
    def epoch(self) -> int:
        """Changes whenever records appended from now on may not land in the same segment as (or
        may not follow) those appended before: the writer is about to roll the segment, or a batch
        failed and the records after it were failed with it. A caller whose records refer to
        earlier ones (the audit sink's definitions) passes the epoch it wrote those in to append(),
        which refuses the record (EpochChanged) once it changed: the caller then writes its
        definitions again. So a segment holds every definition its records refer to."""
        return self._epoch

    @property
    def stats(self) -> dict[str, int]:
        """Counters, plus the free files kept for reuse now (`free_files`, `free_bytes`: disk space
        the log holds beyond its segments)."""
        free_bytes = 0
        free = list(self._free)  # the writer thread may change the list meanwhile
        for path in free:
            try:
                free_bytes += os.stat(path).st_size
            except OSError:
                pass
        return {**self._stats, "segments": self._segments, "free_files": len(free), "free_bytes": free_bytes}

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def add_failure_listener(self, fn: FailureListener) -> None:
        self._failure_listeners.append(fn)

    def open(self) -> RecoveryReport:
        """Create the directory (durably), scan the segments, cut a torn tail off the newest one and
        note damage in sealed ones; appends continue after the last record on disk."""
        if self._opened:
            raise RuntimeError("MessageLog.open() called twice")
        io = self.io
        io.makedirs(self.directory)
        report = RecoveryReport(self.directory)
        self._free = list_free(self.directory, listdir=io.listdir)
        segments = list_segments(self.directory, listdir=self.io.listdir)
        last_seq = 0
        for info in segments[:-1]:
            scan = SegmentScan(info.path, from_seq=MAX_SEQ + 1)
            for _ in scan:
                pass
            last_seq = max(last_seq, scan.last_seq, info.first_seq - 1)
            if scan.problem is not None:
                report.corrupt.append((info.path, scan.problem_offset or 0, scan.problem))
                log.warning("message log: %s sealed segment %s at offset %d: records after it are unreadable",
                            scan.problem, info.path, scan.problem_offset)
                self._event(EventKind.LOG_CORRUPTION, {"segment": str(info.path), "offset": scan.problem_offset,
                                               "problem": scan.problem}, direct=True)
        if segments:
            newest = segments[-1]
            last_seq = max(last_seq, self._recover_newest(newest, report))
        else:
            report.created = True
            self._create_segment(last_seq + 1)
        self._keep_free(last_seq)
        self._segments = len(list_segments(self.directory, listdir=self.io.listdir))
        report.segments = self._segments
        report.last_seq = last_seq
        self._next_seq = last_seq + 1
        self._durable_w = self.durable_seq = self.synced_seq = self._written_seq = last_seq
        self._last_sync = time.monotonic()
        self._opened = True
        with self._lock:
            self._closed = False
        return report

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the writer thread; listeners and events run on `loop` (on the writer thread if None)."""
        if not self._opened:
            self.open()
        if self._thread is not None:
            raise RuntimeError("MessageLog.start() called twice")
        self._loop = loop
        if not self._has_headroom():  # started on a full disk: unhealthy until the probe finds room
            self._degraded(f"less than {self._headroom()} bytes free in {self.directory}")
        self._thread = threading.Thread(target=self._run, name="msglog-writer", daemon=True)
        self._thread.start()

    def append(self, kind: int, body: bytes, epoch: int | None = None) -> int:
        """Queue one record; returns its seq. Never waits for the disk. With `epoch`, raises
        EpochChanged unless that is still the log's epoch (see `epoch`)."""
        if not 0 < kind < 256 or len(body) > MAX_BODY:
            raise FormatError(f"bad record: kind {kind!r}, {len(body)} bytes")
        with self._lock:
            if self._closed:
                raise LogClosed("message log is not open, or stopped")
            if epoch is not None and epoch != self._epoch:
                raise EpochChanged(f"epoch {epoch} is over (now {self._epoch})")
            seq = self._next_seq
            self._next_seq = seq + 1
            length = len(body)
            header = _pack_header(_crc32(body, _crc32(_pack_prefix(length, kind, seq))), length, kind, seq)
            buf = self._buf
            if not buf:
                self._buf_first = seq
                self._since = _monotonic()
                buf += header
                buf += body
                if self._tick_at is None:
                    self._wake.notify()
            else:
                before = len(buf)
                buf += header
                buf += body
                if before < self._max_pending <= len(buf):
                    self._wake.notify()
        return seq

    def request_sync(self) -> None:
        """Someone is blocked on what is pending (a publisher's in-flight window is full): sync now."""
        with self._lock:
            if self._buf:
                self._sync_requested = True
                self._wake.notify()

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Block (another thread, not the loop) until `seq` is durable: False if it failed or timed out."""
        with self._dcond:
            self._dcond.wait_for(lambda: self._durable_w >= seq or self._failed(seq) or self._closed_w, timeout)
            return self._durable_w >= seq and not self._failed(seq)

    def seal(self) -> SegmentInfo | None:
        """Roll the active segment now, if it holds any record; returns the segment sealed."""
        return self._command(self._roll_now)

    def remove_segments_before(self, seq: int) -> int:
        """Delete the sealed segments whose every record is below `seq`; returns how many."""
        return self._command(lambda: self._remove_before(seq))

    def stop(self) -> None:
        """Write and sync what is pending, close the segment, join the writer."""
        with self._lock:
            if self._closed:  # never opened, or already stopped
                return
            self._closed = True
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        elif self._opened:
            self._finish()

    # --- the writer ----------------------------------------------------------------------------

    _closed_w = False

    def _run(self) -> None:
        try:
            while True:
                batch, first, last, final, commands = self._next_work()
                if batch:
                    self._write_batch(batch, first, last)
                    if self._roll_after:
                        self._roll_after = False
                        if self._fd is not None and self._end > FILE_HEADER_SIZE:
                            self._roll()
                self._timers()
                for fn, waiter in commands:  # after the batch: seal() covers what was appended before
                    waiter.run(fn)
                if final:
                    self._finish()
                    return
        except BaseException as exc:  # a bug: never leave appenders waiting forever
            log.exception("message log writer died")
            self._died(exc)
            raise

    def _next_work(self) -> tuple[bytearray | None, int, int, bool, list[tuple[Callable[[], Any], _Waiter]]]:
        power_safe = self._power_safe
        window = self._window
        with self._lock:
            while True:
                now = time.monotonic()
                if self._stopping:
                    return self._take(), self._buf_first, self._next_seq - 1, True, self._take_commands()
                if self._commands:
                    return self._take(), self._buf_first, self._next_seq - 1, False, self._take_commands()
                timeout: float | None = None
                tick = self._tick_at
                if self._buf:
                    if (not power_safe or window <= 0 or self._sync_requested or len(self._buf) >= self._max_pending
                            or now >= self._since + window):
                        first = self._buf_first
                        if self._fd is not None and self._end + len(self._buf) >= self.segment_bytes:
                            # The batch that fills the segment is its last: what is appended from
                            # now on goes to the next one (a new epoch), so roll right after it.
                            self._epoch += 1
                            self._roll_after = True
                        if power_safe and window > 0:
                            self._tick_at = now + window
                        return self._take(), first, self._next_seq - 1, False, []
                    timeout = self._since + window - now
                elif tick is not None:
                    if now >= tick:
                        self._tick_at = None  # nothing came for a whole window: idle
                    else:
                        timeout = tick - now
                deadline = self._timer_deadline()
                if deadline is not None:
                    if deadline <= now:
                        return None, 0, 0, False, []
                    timeout = deadline - now if timeout is None else min(timeout, deadline - now)
                self._wake.wait(timeout)

    def _take(self) -> bytearray | None:
        if not self._buf:
            return None
        batch = self._buf
        self._buf = bytearray()
        self._sync_requested = False
        return batch

    def _take_commands(self) -> list[tuple[Callable[[], Any], _Waiter]]:
        commands, self._commands = self._commands, []
        return commands

    def _timer_deadline(self) -> float | None:
        deadlines = []
        if self._unsynced:
            deadlines.append(self._last_sync + self.policy.interval)
        if self.segment_max_age is not None and self._end > FILE_HEADER_SIZE:
            deadlines.append(self._segment_opened + self.segment_max_age)
        if not self.healthy:
            deadlines.append(self._next_probe)
        return min(deadlines) if deadlines else None

    def _timers(self) -> None:
        now = time.monotonic()
        if self._unsynced and now >= self._last_sync + self.policy.interval:
            self._sync_buffered()
        if (self.segment_max_age is not None and self._end > FILE_HEADER_SIZE
                and now >= self._segment_opened + self.segment_max_age):
            self._roll_now()
        if not self.healthy and now >= self._next_probe:
            self._probe()

    def _write_batch(self, batch: bytearray, first: int, last: int) -> None:
        self._stats["records"] += last - first + 1
        self._stats["bytes_appended"] += len(batch)
        if self._fd is None and not self._reopen(first):
            self._fail(first, last, self._last_error)
            return
        fd = self._fd
        assert fd is not None
        offset = self._end
        io = self.io
        try:
            if self.preallocate != "none" and offset + len(batch) > self._allocated:
                try:
                    self._grow(fd, offset + len(batch) - self._allocated)
                except OSError as exc:
                    # A nearly full disk may still take the batch itself: preallocation is only an
                    # optimisation, so fall back to a plain append (and retry it next time).
                    log.debug("message log: preallocation failed: %s", exc)
                    self._release_free(exc)
                    self._allocated = max(self._end, io.size(fd))
            io.write_all(fd, batch, offset)
            if self._power_safe:
                io.fdatasync(fd)
        except OSError as exc:
            self._cut_back(offset)
            self._release_free(exc)
            self._fail(first, last, _describe(exc))
            return
        self._end = offset + len(batch)
        self._written_seq = last
        if self._power_safe:
            self._stats["syncs"] += 1
            self._last_sync = time.monotonic()
            self.synced_seq = last
        else:
            self._unsynced = True
        self._recovered()
        self._durable(last)

    def _grow(self, fd: int, needed: int) -> None:
        """Preallocate at least `needed` more bytes (preallocate_bytes at a time) past _allocated.

        "fallocate" reserves unwritten extents: the first write into each one still changes extent
        metadata, so each sync also commits the file system journal. "zeros" writes the blocks
        (page by page, and then drops them from the cache) so that later syncs overwrite initialized
        blocks and touch no metadata at all. Page-sized writes matter: one large write leaves the
        file in large folios, and then every small write dirties (and is accounted as) a whole folio
        (docs/decisions/0004-message-log.md has the measurements)."""
        start = self._allocated
        grow = max(self.preallocate_bytes, needed)
        if self.preallocate == "fallocate":
            self.io.fallocate(fd, start, grow)
        else:
            end = -(-(start + grow) // _PAGE) * _PAGE
            zeros = bytes(_PAGE)
            offset = start
            while offset < end:
                step = _PAGE - offset % _PAGE
                self.io.write_all(fd, zeros[:step], offset)
                offset += step
            self.io.fdatasync(fd)
            self.io.drop_cache(fd, start, end - start)
            grow = end - start
        self._allocated = start + grow

    def _sync_buffered(self) -> None:
        """os_buffered: the periodic fdatasync. Its records were already reported durable, so a failure
        fails nothing; it makes the log unhealthy until a sync works again."""
        if self._fd is None:
            self._unsynced = False
            return
        written = self._written_seq
        try:
            self.io.fdatasync(self._fd)
        except OSError as exc:
            self._degraded(_describe(exc))
            self._last_sync = time.monotonic()
            return
        self.synced_seq = written
        self._unsynced = False
        self._last_sync = time.monotonic()
        self._stats["syncs"] += 1
        self._recovered()

    def _cut_back(self, good_end: int) -> None:
        """After a failed write or sync: cut the segment back to its last good end, so the failed
        records cannot come back, and make that cut durable (best effort: the disk is failing)."""
        if self._fd is None:
            return
        try:
            self.io.truncate(self._fd, good_end)
            self._allocated = good_end
            self.io.fdatasync(self._fd)
        except OSError as exc:
            # Writing goes on at good_end (pwrite), overwriting what is there; a stale tail past the
            # last record is cut at the next open or seal.
            log.warning("message log: cannot cut %s back to %d: %s", self._segment, good_end, exc)

    def _fail(self, first: int, last: int, error: str) -> None:
        # What was appended after the failed batch may refer to records in it: it fails too, and
        # appends from now on belong to a new epoch (their definitions are written again).
        with self._lock:
            self._epoch += 1
            rest = self._take()
            if rest:
                last = self._next_seq - 1
        self._stats["failed_batches"] += 1
        self.lost += last - first + 1
        self._degraded(error)
        self._call(self._deliver_failure, first, last, error)
        with self._dcond:
            self._failed_first.append(first)
            self._failed_last.append(last)
            if len(self._failed_first) > 100_000:
                del self._failed_first[:50_000], self._failed_last[:50_000]
            self._dcond.notify_all()

    def _degraded(self, error: str) -> None:
        self._next_probe = time.monotonic() + RETRY_INTERVAL
        if self.healthy:
            self.healthy = False
            log.error("message log degraded: %s", error)
            self._event(EventKind.LOG_DEGRADED, {"error": error})

    def _recovered(self) -> None:
        """A write or sync worked. Unhealthy until the file system also has headroom again: on a
        full disk, cutting back a failed batch frees just enough for the next small write, and
        counting that as recovered made the log flap (degraded, recovered 21 ms later, degraded)
        while QoS 1/2 publishes were accepted only to fail."""
        if not self.healthy:
            if not self._has_headroom():
                return
            self.healthy = True
            log.warning("message log recovered")
            self._event(EventKind.LOG_RECOVERED, {})

    def _headroom(self) -> int:
        """Free bytes needed to count as recovered: room for two full batches (a preallocation
        step is not needed: a failed one falls back to plain appends), within the bounds above."""
        return min(max(2 * self._max_pending, MIN_HEADROOM), MAX_HEADROOM)

    def _has_headroom(self) -> bool:
        """What this process can still write: as root, ext4's reserved blocks too (its default
        reserved-blocks user is root), so f_bfree, not f_bavail. A disk quota (EDQUOT) is not seen
        here: under one, the first write that fails is what turns the log unhealthy."""
        try:
            fs = os.statvfs(self.directory)
        except OSError:
            return True  # cannot tell (a test's in-memory directory): the probe's write decides
        free = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
        return free * fs.f_frsize >= self._headroom()

    def _probe(self) -> None:
        """Unhealthy and nothing to write: check whether the file system has headroom again and
        the disk takes a page (written and synced, then cut off)."""
        self._next_probe = time.monotonic() + RETRY_INTERVAL
        if self._unsynced:
            self._sync_buffered()
            return
        if not self._has_headroom():
            log.debug("message log: still less than %d bytes free in %s", self._headroom(), self.directory)
            return
        if self._fd is None:
            if self._reopen(self._written_seq + 1):
                self._recovered()
            return
        try:
            self.io.write_all(self._fd, bytes(4096), self._end)
            self.io.fdatasync(self._fd)
        except OSError as exc:
            self._cut_back(self._end)
            log.info("message log: still failing: %s", _describe(exc))
            return
        self._cut_back(self._end)
        self._recovered()

    def _durable(self, seq: int) -> None:
        self._call(self._deliver_durable, seq)
        with self._dcond:
            self._durable_w = seq
            self._dcond.notify_all()

    def _failed(self, seq: int) -> bool:
        i = bisect.bisect_right(self._failed_first, seq) - 1
        return i >= 0 and seq <= self._failed_last[i]

    # --- segments ------------------------------------------------------------------------------

    _last_error = ""

    def _create_segment(self, first_seq: int) -> None:
        """Create (or reuse a free file for) and durably name a new, empty active segment starting at
        first_seq."""
        path = self.directory / segment_name(first_seq)
        io = self.io
        reused = self._reuse_free(path, first_seq) if self._free else None
        if reused is not None:
            fd, allocated = reused
        else:
            fd = io.open(path, create=True)
            try:
                io.truncate(fd, 0)
                io.write_all(fd, encode_file_header(first_seq), 0)
                io.fdatasync(fd)
                io.fsync_dir(self.directory)
            except OSError:
                io.close(fd)
                try:
                    io.unlink(path)
                    io.fsync_dir(self.directory)
                except OSError:
                    pass
                raise
            allocated = FILE_HEADER_SIZE
        self._fd = fd
        self._segment = SegmentInfo(path, first_seq)
        self._segment_opened = time.monotonic()
        self._end = FILE_HEADER_SIZE
        self._allocated = max(allocated, FILE_HEADER_SIZE)  # a reused file's old bytes are overwritten, not grown
        self._segments += 1

    def _reuse_free(self, path: Path, first_seq: int) -> tuple[int, int] | None:
        """Turn the oldest free file into the new segment `path`: (fd, its size), or None if that
        failed (the caller creates a file instead).

        The header first, durably, and only then the name: a power cut can leave a free file with a
        new header (harmless: free files are never read), never the new name over the old header.
        The old bytes after the header stay until overwritten: they read as the end (format.py).
        The file's cached pages are dropped first: a segment read in large chunks (the seal
        helper) leaves large folios, and each small append into one would be written and counted
        whole (the preallocation trap in docs/decisions/0004)."""
        io = self.io
        free = self._free.pop(0)
        below = parse_free_name(free.name)
        if below is None or below > first_seq:
            # Its old records may have seqs at or above first_seq (the log's seqs started over): they
            # would read as this segment's records. Not reusable; its space returns.
            log.warning("message log: %s may hold seqs from %d on: deleted, not reused", free, first_seq)
            self._unlink_best_effort([free])
            return None
        try:
            fd = io.open(free)
        except OSError as exc:
            log.warning("message log: cannot reuse %s: %s", free, _describe(exc))
            return None
        try:
            size = io.size(fd)
            io.drop_cache(fd, 0, size)
            io.write_all(fd, encode_file_header(first_seq, FLAG_RECYCLED), 0)
            io.fdatasync(fd)
            io.rename(free, path)
            io.fsync_dir(self.directory)
        except OSError as exc:
            io.close(fd)
            log.warning("message log: cannot reuse %s: %s", free, _describe(exc))
            for name in (free, path):  # whichever name it has now: a new file is created instead
                try:
                    io.unlink(name)
                except OSError:
                    pass
            return None
        self._stats["recycled"] += 1
        return fd, size

    def _keep_free(self, last_seq: int) -> None:
        """open(): keep the free files a new segment may take, at most `recycle` of them. A free file
        named above last_seq + 1 holds seqs the log will hand out again (its segments were removed
        or replaced and seqs started over); one whose name does not parse cannot be checked; the
        rest beyond `recycle` were kept by a run with a larger `recycle`."""
        odd = [self.directory / name for name in self.io.listdir(self.directory)
               if name.startswith("free-") and name.endswith(".recycle") and parse_free_name(name) is None]
        stale = [path for path in self._free if (parse_free_name(path.name) or 0) > last_seq + 1]
        if stale:
            log.warning("message log: %d free file(s) hold seqs above the log's last (%d): deleted",
                        len(stale), last_seq)
        keep = [path for path in self._free if path not in stale]
        self._free = keep[:self.recycle]
        self._unlink_best_effort(odd + stale + keep[self.recycle:])

    def _unlink_best_effort(self, paths: list[Path]) -> None:
        """Delete free files and sync the directory, best effort: a free file left behind is checked
        again before it is reused."""
        if not paths:
            return
        for path in paths:
            try:
                self.io.unlink(path)
            except OSError as exc:
                log.warning("message log: cannot delete %s: %s", path, _describe(exc))
        try:
            self.io.fsync_dir(self.directory)
        except OSError as exc:
            log.warning("message log: cannot sync %s: %s", self.directory, _describe(exc))

    def _release_free(self, exc: OSError) -> None:
        """The disk is full: the free files' space is worth more to the active segment (and to the
        seal helper's Parquet files) than the journal commits reusing them would save."""
        if exc.errno != errno.ENOSPC or not self._free:
            return
        for path in self._free:
            try:
                self.io.unlink(path)
            except OSError:
                pass
        log.warning("message log: the disk is full: deleted %d free segment file(s)", len(self._free))
        self._free = []
        try:
            self.io.fsync_dir(self.directory)
        except OSError:
            pass

    def _reopen(self, first_seq: int) -> bool:
        """No active segment (creating one failed): try again."""
        try:
            self._create_segment(first_seq)
        except OSError as exc:
            self._last_error = _describe(exc)
            return False
        return True

    def _roll_now(self) -> SegmentInfo | None:
        """Seal the active segment now (seal(), its age): what was appended so far is written to it
        first, and later appends belong to a new epoch (they go to the next segment)."""
        with self._lock:
            batch = self._take()
            first, last = self._buf_first, self._next_seq - 1
            self._epoch += 1
        if batch:
            self._write_batch(batch, first, last)
        if self._fd is not None and self._end > FILE_HEADER_SIZE:
            return self._roll()
        return None

    def _roll(self, first_seq: int | None = None) -> SegmentInfo | None:
        """Seal the active segment (synced, cut to its last record) and start a new one, named after
        the first seq it may hold: `first_seq`, or the one after the last record written (a batch
        already taken but not yet written must still fit in it)."""
        old = self._segment
        if self._fd is not None:
            if self._unsynced:
                self._sync_buffered()
            try:
                if self._allocated > self._end:
                    self.io.truncate(self._fd, self._end)
                    self.io.fdatasync(self._fd)
            except OSError as exc:
                log.warning("message log: cannot cut preallocated tail of %s: %s", old, exc)
            self.io.close(self._fd)
            self._fd = None
            self._segment = None
            self._end = self._allocated = 0  # no active segment until one is created
        if not self._reopen(first_seq if first_seq is not None else self._written_seq + 1):
            self._degraded(self._last_error)
        if old is not None and self.on_seal is not None:
            try:
                self.on_seal(old)
            except Exception:
                log.exception("message log: on_seal failed for %s", old.path)
        return old

    def _remove_before(self, seq: int) -> int:
        segments = list_segments(self.directory, listdir=self.io.listdir)
        removed = 0
        for info, after in zip(segments, segments[1:]):
            if after.first_seq > seq or (self._segment is not None and info.first_seq >= self._segment.first_seq):
                break
            if len(self._free) < self.recycle:
                # Kept for a new segment to write over (no journal commit per sync: docs/decisions/0006).
                # Named after the segment that followed it: every seq in it is below that one, so a
                # new segment may take it only if it starts at or above (seqs can start over).
                free = self.directory / free_name(after.first_seq)
                try:
                    self.io.rename(info.path, free)
                except OSError as exc:  # ENOSPC (a directory block), EIO...: removed the old way
                    log.warning("message log: cannot keep %s as a free file: %s", info.path, _describe(exc))
                    self.io.unlink(info.path)
                else:
                    self._free.append(free)
            else:
                self.io.unlink(info.path)
            removed += 1
        if removed:
            self.io.fsync_dir(self.directory)
            self._segments -= removed
        return removed

    def _recover_newest(self, newest: SegmentInfo, report: RecoveryReport) -> int:
        """Scan the newest segment, cut a torn tail (or a stale preallocated one) and reopen it for
        appending; returns its last seq."""
        scan = SegmentScan(newest.path, from_seq=MAX_SEQ + 1)
        for _ in scan:
            pass
        io = self.io
        if scan.end_offset < FILE_HEADER_SIZE:  # the file header itself never made it to disk
            if scan.problem == "corrupt" and self._stale_header(newest):
                # An older segment's header under a newer name: a reused file whose new header never
                # reached the disk (the writer syncs it before renaming: a safety net). Its records are
                # an older segment's: never this one's. Start the segment empty.
                fd = io.open(newest.path)
                io.truncate(fd, 0)
                io.write_all(fd, encode_file_header(newest.first_seq), 0)
                io.fdatasync(fd)
                report.stale_tail = (newest.path, 0, scan.size)
                log.warning("message log: %s holds an older segment's header: started it empty", newest.path)
            elif scan.problem == "corrupt" or scan.reused:
                # Not ours, or damaged beyond a torn write (or a newer segment's header, which the
                # writer never puts under an older name): keep it for inspection, start a new one.
                aside = newest.path.with_name(newest.path.name + ".corrupt")
                io.rename(newest.path, aside)
                io.fsync_dir(self.directory)
                report.corrupt.append((aside, 0, "corrupt"))
                self._event(EventKind.LOG_CORRUPTION, {"segment": str(aside), "offset": 0, "problem": "corrupt"},
                            direct=True)
                self._create_segment(newest.first_seq)
                return newest.first_seq - 1
            else:
                fd = io.open(newest.path)
                io.truncate(fd, 0)
                io.write_all(fd, encode_file_header(newest.first_seq), 0)
                io.fdatasync(fd)
                report.torn_tail = (newest.path, 0, scan.size)
        else:
            fd = io.open(newest.path)
            if scan.size > scan.end_offset:
                ours: int | None = 0
                if scan.problem is not None and scan.flags & FLAG_RECYCLED:
                    # Past the last record of a reused file lie its old bytes, expected after a crash
                    # or kill. The cut point is classified, not the file: a record of ours at the
                    # cut, or further on, means damage to records that may have been acknowledged.
                    ours = next_record_at(io.pread(fd, scan.size - scan.end_offset, scan.end_offset),
                                          scan.last_seq)
                io.truncate(fd, scan.end_offset)
                io.fdatasync(fd)
                if scan.problem is not None and ours is None:
                    report.stale_tail = (newest.path, scan.end_offset, scan.size - scan.end_offset)
                    log.info("message log: cut %d stale bytes off recycled segment %s at offset %d",
                             scan.size - scan.end_offset, newest.path, scan.end_offset)
                elif scan.problem is not None and ours:
                    report.corrupt.append((newest.path, scan.end_offset, "corrupt"))
                    log.warning("message log: corrupt record at offset %d of %s, record %d of ours found "
                                "%d bytes further: cut %d bytes (records after the damage are lost)",
                                scan.end_offset, newest.path, scan.last_seq + 1, ours,
                                scan.size - scan.end_offset)
                    self._event(EventKind.LOG_CORRUPTION, {"segment": str(newest.path), "offset": scan.end_offset,
                                                           "problem": "corrupt"}, direct=True)
                elif scan.problem is not None:
                    report.torn_tail = (newest.path, scan.end_offset, scan.size - scan.end_offset)
                    log.warning("message log: cut a torn tail of %d bytes off %s at offset %d",
                                scan.size - scan.end_offset, newest.path, scan.end_offset)
                    self._event(EventKind.LOG_TORN_TAIL, {"segment": str(newest.path), "offset": scan.end_offset,
                                                  "bytes": scan.size - scan.end_offset}, direct=True)
        self._fd = fd
        self._segment = newest
        self._segment_opened = time.monotonic()
        self._end = self._allocated = max(scan.end_offset, FILE_HEADER_SIZE)
        return max(scan.last_seq, newest.first_seq - 1)

    def _stale_header(self, info: SegmentInfo) -> bool:
        """The segment's file header is a valid one of an older segment (first_seq below its name's)."""
        fd = self.io.open(info.path)
        try:
            first_seq = decode_file_header(self.io.pread(fd, FILE_HEADER_SIZE, 0))
        finally:
            self.io.close(fd)
        return first_seq is not None and first_seq < info.first_seq

    def _finish(self) -> None:
        """Stop: write what is pending, sync, close (on the writer thread, or the caller's)."""
        with self._lock:
            batch = self._take()
            first, last = self._buf_first, self._next_seq - 1
            commands = self._take_commands()
        if batch:
            self._write_batch(batch, first, last)
        for fn, waiter in commands:
            waiter.run(fn)
        if self._unsynced:
            self._sync_buffered()
        if self._fd is not None:
            try:
                if self._allocated > self._end:
                    self.io.truncate(self._fd, self._end)
                    self.io.fdatasync(self._fd)
            except OSError as exc:
                log.warning("message log: cannot cut preallocated tail: %s", exc)
            self.io.close(self._fd)
            self._fd = None
        with self._dcond:
            self._closed_w = True
            self._dcond.notify_all()

    def _died(self, exc: BaseException) -> None:
        with self._lock:
            self._closed = True
            batch = self._take()
            first, last = self._buf_first, self._next_seq - 1
            commands = self._take_commands()
        for _fn, waiter in commands:
            waiter.fail(exc)
        if batch:
            self._fail(first, last, f"writer died: {exc!r}")
        with self._dcond:
            self._closed_w = True
            self._dcond.notify_all()

    def _command(self, fn: Callable[[], T]) -> T:
        """Run fn on the writer thread (which owns the directory) and wait for it."""
        if threading.current_thread() is self._thread:  # from on_seal: we are the writer already
            return fn()
        waiter = _Waiter()
        with self._lock:
            running = self._thread is not None and self._thread.is_alive() and not self._stopping
            if running:
                self._commands.append((fn, waiter))
                self._wake.notify()
        if not running:
            if not self._opened:
                raise RuntimeError("message log is not open")
            return fn()
        result: T = waiter.result()
        return result

    # --- delivery to the loop ------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(fn, *args)
                return
            except RuntimeError:  # the loop is closed: nobody is listening there any more
                return
        fn(*args)

    def _deliver_durable(self, seq: int) -> None:
        if seq > self.durable_seq:
            self.durable_seq = seq
        for fn in self._listeners:
            try:
                fn(seq)
            except Exception:
                log.exception("message log: durable listener failed")

    def _deliver_failure(self, first: int, last: int, error: str) -> None:
        for fn in self._failure_listeners:
            try:
                fn(first, last, error)
            except Exception:
                log.exception("message log: failure listener failed")

    def _event(self, kind: EventKind, detail: dict[str, Any], *, direct: bool = False) -> None:
        if self.on_event is None:
            return
        if direct:
            self.on_event(kind, detail)
        else:
            self._call(self.on_event, kind, detail)


class _Waiter:
    """A command's result, handed from the writer thread to the caller."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to the caller, who raises it
            self._error = exc
        self._done.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def _describe(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}" if exc.errno else f"{type(exc).__name__}: {exc}"
