"""Reading the message log forward from a position, for the outbox: each call reads only what was
appended since the last one, and says where every record is (segment, offset), so the outbox can
read a message again later with one `pread` instead of scanning its segment.

The rules are the log's (appliance/msglog/reader.py): in the newest segment an incomplete or
damaged record is "not written yet" (the writer may be writing it right now); once a newer segment
exists, the older one is sealed and complete, so it is read once more (a record may have been
completed between our read and the roll) and damage in it is corruption: reported, the rest of that
segment skipped. The caller passes `upto_seq` (the log's durable_seq): a record above it is left for
a later call, since its publisher has not been told it is stored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from appliance.msglog import LogRecord, list_segments
from appliance.msglog.fileio import no_readahead
from appliance.msglog.format import (
    CORRUPT,
    FILE_HEADER_SIZE,
    INCOMPLETE,
    RECORD_HEADER_SIZE,
    decode_file_header,
    record_length_at,
    scan_records,
    segment_name,
)

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # a backlog is read in reads this large (about what the outbox indexes per read)
FIRST_READ = 64 * 1024  # at the tail a read finds a few records: do not copy a preallocated MiB each time
# The smallest read at the tail. What lies past the last record there is the segment's preallocated
# zeros: every byte read of it is copied and checked for zeros, under the GIL. Reading twice what the
# last call found (at least this) keeps that small; a batch larger than the read is read on ("more").
TAIL_READ = 8 * 1024


class Located(NamedTuple):
    record: LogRecord
    segment: int  # first_seq of the segment holding it
    offset: int  # where its header starts in that segment file


class SegmentFiles:
    """Open segment files by first_seq, for positioned reads. A removed segment is not guaranteed to
    stay readable through an open descriptor: its file may be kept as a free file and reused for a
    new segment (docs/decisions/0006), so only segments at or above the forwarder's saved cursor
    (never removed) are read through it; `replaced()` tells a file renamed over or removed."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._fds: dict[int, int] = {}
        self._paths: dict[int, str] = {}  # of the open ones: no Path built per look (replaced())

    def fd(self, first_seq: int) -> int:
        fd = self._fds.get(first_seq)
        if fd is None:
            path = self._paths[first_seq] = str(self.directory / segment_name(first_seq))
            try:
                fd = self._fds[first_seq] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                del self._paths[first_seq]
                raise
            no_readahead(fd)
        return fd

    def pread(self, first_seq: int, offset: int, length: int) -> bytes:
        return os.pread(self.fd(first_seq), length, offset)

    def replaced(self, first_seq: int) -> bool:
        """The open file is no longer the one under its name (rewritten and renamed over, or removed)."""
        fd = self._fds.get(first_seq)
        if fd is None:
            return False
        try:
            return os.stat(self._paths[first_seq]).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            return True

    def close_before(self, first_seq: int) -> None:
        """Close the segments below this one (nothing there is needed any more)."""
        for seq in [s for s in self._fds if s < first_seq]:
            os.close(self._fds.pop(seq))
            del self._paths[seq]

    def close(self) -> None:
        self.close_before(2**64)


ProblemCallback = Callable[[Path, int, str], None]


class LogTail:
    """Reads records with seq > after_seq, in order, across segments, a bit more on every call."""

    def __init__(self, directory: Path, after_seq: int, files: SegmentFiles | None = None, *,
                 chunk: int = CHUNK, on_problem: ProblemCallback | None = None,
                 on_skipped: Callable[[LogRecord], None] | None = None):
        """`on_skipped(record)`: each record of a segment read that lies at or below after_seq
        (the outbox takes the definitions its messages refer to from them)."""
        self.directory = Path(directory)
        self.last_seq = after_seq  # the last record returned (or skipped: at or below after_seq)
        self.files = files or SegmentFiles(directory)
        self.chunk = chunk
        self.on_problem = on_problem
        self.on_skipped = on_skipped
        self._segment: int | None = None  # first_seq of the segment being read
        self._offset = 0  # where the next record starts in it
        self._segment_last = 0  # the last seq read in it (scan_records insists on increasing seqs)
        self._sealed = False  # a newer segment exists: this one is complete
        self._read_size = FIRST_READ  # grows to `chunk` while there is a backlog to read
        self.stuck: tuple[int, int] | None = None  # (segment, offset) of damage in the newest segment

    @property
    def segment(self) -> int | None:
        return self._segment

    def read(self, upto_seq: int, limit: int = 100_000) -> list[Located]:
        """Up to `limit` records with last_seq < seq <= upto_seq, oldest first."""
        out: list[Located] = []
        while len(out) < limit and self.last_seq < upto_seq:
            if self._segment is None and not self._open_first():
                break
            stop = self._read_segment(upto_seq, limit, out)
            if stop == "more":
                continue
            if stop in ("upto", "limit") or not self._next_segment(stop):
                break
        return out

    # -- one segment -----------------------------------------------------------------------------

    def _read_segment(self, upto: int, limit: int, out: list[Located]) -> str:
        """Read on in the current segment: "upto"/"limit" (stopped on purpose), "more" (records were
        read, call again), or why there is nothing more here: "end", "incomplete", "corrupt"."""
        assert self._segment is not None
        segment = self._segment
        size = min(self._read_size, self.chunk)
        try:
            buf = self.files.pread(segment, self._offset, size)
        except FileNotFoundError:
            return "end"  # removed by retention: its records are gone on purpose
        records: list[LogRecord] = []
        scan = scan_records(buf, 0, len(buf), last_seq=self._segment_last, out=records)
        # Past the last record of a reused segment lie an older segment's bytes (docs/decisions/0006),
        # whose "length" can be anything: only a durable record still to come (seq <= upto) makes a
        # cut read a backlog, and a record is read whole only if it fits in the file.
        if records and len(buf) == size and scan.stop == INCOMPLETE and records[-1].seq < upto:
            self._read_size = self.chunk  # a record cut by the read: a backlog, read on in large chunks
        else:
            # At the tail: the rest of the buffer was zeros (preallocated) or the file's end. A
            # preallocated segment always fills the read, so its size must not depend on that.
            found = scan.offset
            self._read_size = min(FIRST_READ, max(TAIL_READ, -(-2 * found // TAIL_READ) * TAIL_READ))
        if not records and scan.stop == INCOMPLETE and self.last_seq < upto:
            need = record_length_at(buf, 0)
            if need is not None and len(buf) < need <= self._size(segment) - self._offset:  # bigger than a chunk
                buf = self.files.pread(segment, self._offset, need)
                scan = scan_records(buf, 0, len(buf), last_seq=self._segment_last, out=records)
        # Positions are kept in locals and stored once (this runs for every record of the log).
        position, last_seq, segment_last, room = self._offset, self.last_seq, self._segment_last, limit - len(out)
        stop = "more"
        try:
            for record in records:
                seq = record.seq
                if seq > upto:
                    stop = "upto"
                    break
                if room <= 0:
                    stop = "limit"
                    break
                if seq > last_seq:
                    out.append(Located(record, segment, position))
                    last_seq = seq
                    room -= 1
                elif self.on_skipped is not None:
                    self.on_skipped(record)
                position += RECORD_HEADER_SIZE + len(record.body)
                segment_last = seq
        finally:
            self._offset, self.last_seq, self._segment_last = position, last_seq, segment_last
        if stop != "more":
            return stop
        if records:
            self.stuck = None
            return "more"
        return "corrupt" if scan.stop == CORRUPT else "incomplete" if scan.stop == INCOMPLETE else "end"

    # -- moving between segments -----------------------------------------------------------------

    def _open_first(self) -> bool:
        segments = list_segments(self.directory)
        if not segments:
            return False
        start = self.last_seq + 1
        chosen = segments[0]
        for info in segments:
            if info.first_seq <= start:
                chosen = info
        if chosen.first_seq > start and self.last_seq > 0:
            log.warning("message log: records %d..%d are no longer in %s (segments removed); "
                        "reading on from %d", start, chosen.first_seq - 1, self.directory, chosen.first_seq)
        return self._enter(chosen.first_seq, sealed=chosen is not segments[-1])

    def _enter(self, first_seq: int, *, sealed: bool) -> bool:
        try:
            head = self.files.pread(first_seq, 0, FILE_HEADER_SIZE)
        except FileNotFoundError:  # removed meanwhile (retention): nothing to read in it
            self._segment, self._sealed, self._offset = first_seq, True, FILE_HEADER_SIZE
            return True
        if decode_file_header(head) != first_seq:
            if not sealed:
                return False  # being created right now: look again later
            self._problem(first_seq, 0, "corrupt")  # then skip it: read on from its end
            self._segment, self._sealed = first_seq, True
            self._offset = self._size(first_seq)
            return True
        self._segment, self._sealed = first_seq, sealed
        self._offset = FILE_HEADER_SIZE
        self._segment_last = max(first_seq - 1, 0)
        return True

    def _next_segment(self, stop: str) -> bool:
        """Nothing more in the current segment: go on with the next one if it is sealed; True if
        there may be more to read now."""
        current = self._segment
        assert current is not None
        newer = [info for info in list_segments(self.directory) if info.first_seq > current]
        if not newer:
            if stop != "end":
                self.stuck = (current, self._offset)
            return False  # the newest segment: what is not there yet comes later
        if not self._sealed:
            self._sealed = True  # complete now: read it once more before leaving it
            return True
        if stop != "end" and self._offset < self._size(current):
            self._problem(current, self._offset, "corrupt" if stop == "corrupt" else "torn")
        return self._enter(newer[0].first_seq, sealed=len(newer) > 1)

    def _size(self, first_seq: int) -> int:
        try:
            return os.fstat(self.files.fd(first_seq)).st_size
        except FileNotFoundError:
            return 0

    def _problem(self, first_seq: int, offset: int, kind: str) -> None:
        path = self.directory / segment_name(first_seq)
        log.error("message log: %s segment %s at offset %d; skipping the rest of it", kind, path, offset)
        if self.on_problem is not None:
            self.on_problem(path, offset, kind)
