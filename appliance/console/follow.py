"""Following the message log as the service writes it: each `poll()` reads only the bytes appended
since the last one, from the byte offset where it stopped in the newest segment (a poll costs what
was written since, not a rescan of a 16 MB segment), and moves on to the next segment once the
one it reads has been sealed.

The writer appends whole records and preallocates ahead (zeros), so a poll may stop at a record
that is only partly visible yet, or at the zeros: it simply resumes there next time.

A removed segment may be reused for a new one (docs/decisions/0006): after every read the 16-byte
file header is read again and compared with the one first seen (as msglog's SegmentScan does); if
it changed, the segment was removed meanwhile and following it ends there, as for a removed file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from appliance.msglog.format import (
    END,
    FILE_HEADER_SIZE,
    INCOMPLETE,
    LogRecord,
    decode_file_header,
    looks_like_next,
    record_length_at,
    scan_records,
)
from appliance.msglog.reader import SegmentInfo, list_segments

CHUNK = 1 << 20


class LogFollower:
    def __init__(self, log_dir: Path, *, lister: Callable[[Path], list[SegmentInfo]] = list_segments):
        self.log_dir = log_dir
        self._list = lister
        self._segment: SegmentInfo | None = None
        self._offset = FILE_HEADER_SIZE
        self._last_seq = 0
        self._head: bytes | None = None  # the segment's file header as first seen
        self._gone = False  # reused for a newer segment under us: nothing more to read in it

    @property
    def first_seq(self) -> int | None:
        """The first seq of the segment being followed (None before the first poll)."""
        return self._segment.first_seq if self._segment is not None else None

    @property
    def position(self) -> tuple[str | None, int]:
        return (self._segment.path.name if self._segment else None, self._offset)

    def poll(self, keep: Callable[[LogRecord], bool] = lambda record: True) -> list[LogRecord]:
        """The records written since the last poll (the first poll: the newest segment's) for which
        `keep` is true, in order."""
        out: list[LogRecord] = []
        segments = self._list(self.log_dir)  # listed before reading: a segment seen sealed here is complete
        if not segments:
            return out
        if self._segment is None:
            self._enter(segments[-1])
        while self._segment is not None:
            newer = [s for s in segments if s.first_seq > self._segment.first_seq]
            try:
                if not self._gone:
                    self._read(out, keep)
            except FileNotFoundError:
                pass  # removed (converted and past retention): go on with the next one
            if not newer:
                break  # the active segment: resume at the offset next time
            # Sealed before the listing: everything it will ever hold has been read (up to damage, if
            # any: what follows damage in a sealed segment is unreadable for every reader).
            self._enter(newer[0])
        return out

    def _enter(self, segment: SegmentInfo) -> None:
        self._segment = segment
        self._offset = FILE_HEADER_SIZE
        self._last_seq = max(segment.first_seq - 1, 0)
        self._head = None
        self._gone = False

    def _read(self, out: list[LogRecord], keep: Callable[[LogRecord], bool]) -> str:
        """Reads the current segment from the offset on; returns why it stopped."""
        assert self._segment is not None
        with open(self._segment.path, "rb", buffering=0) as f:
            head = os.pread(f.fileno(), FILE_HEADER_SIZE, 0)
            if self._head is None:
                first_seq = decode_file_header(head)
                if first_seq is not None and first_seq > self._segment.first_seq:
                    return self._removed()  # a newer segment's file under the old name: reused
                if first_seq != self._segment.first_seq:
                    return INCOMPLETE  # not written yet (or an older header the writer will replace)
                self._head = head
            elif head != self._head:
                return self._removed()
            want = CHUNK
            while True:
                f.seek(self._offset)
                buf = f.read(want)
                if os.pread(f.fileno(), FILE_HEADER_SIZE, 0) != self._head:
                    # Reused while we read: the writer rewrites the header before any record, so an
                    # unchanged header proves the read saw only this segment's bytes; this one did not.
                    return self._removed()
                records: list[LogRecord] = []
                scan = scan_records(buf, 0, len(buf), last_seq=self._last_seq, out=records)
                out.extend(r for r in records if keep(r))
                self._offset += scan.offset
                self._last_seq = scan.last_seq
                if scan.stop == INCOMPLETE and len(buf) == want:
                    # More of the file than one chunk: read on (the whole record when it is longer).
                    need = record_length_at(buf, scan.offset)
                    if need is not None and self._offset + need > os.fstat(f.fileno()).st_size:
                        return INCOMPLETE  # not in the file (yet): a reused segment's stale bytes can claim any length
                    if need is not None and need > len(buf) - scan.offset and not looks_like_next(
                            buf, scan.offset, self._last_seq):
                        return INCOMPLETE  # stale bytes claiming a length that fits: not read at every poll
                    want = max(CHUNK, need or CHUNK)
                    continue
                if scan.stop == END and len(buf) == want:
                    continue
                return scan.stop

    def _removed(self) -> str:
        self._gone = True
        return END
