"""Reading the message log: from any thread, or from another process while the writer runs.

A reader never writes. It stops a segment at the first record that is incomplete or fails its CRC:
in the newest segment that is just "end" (a torn tail after a crash, the record the writer is
writing right now, or a recycled file's stale bytes); in a sealed segment it is corruption, reported
through `on_problem` and the logger, after which the rest of that segment is skipped and reading
goes on with the next segment.

A removed segment may be kept as a free file and reused for a new segment (docs/decisions/0006):
a reader that opened it before it was removed would then read the new segment's records under
the old name. So after every read a SegmentScan checks that the file header is still the one it
started with (the writer rewrites the header before it writes any record into a reused file): if
not, the segment was removed meanwhile and reading it ends there, as for a removed file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .fileio import no_readahead
from .format import (
    CORRUPT,
    END,
    FILE_HEADER_SIZE,
    FLAG_RECYCLED,
    INCOMPLETE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    ZEROS,
    LogRecord,
    decode_file_header,
    file_header_flags,
    is_zero,
    parse_free_name,
    parse_segment_name,
    record_length_at,
    scan_records,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TORN = "torn"
CORRUPTION = "corrupt"


@dataclass(frozen=True)
class SegmentInfo:
    path: Path
    first_seq: int


def list_segments(directory: Path, *, listdir: Callable[[Path], list[str]] = os.listdir) -> list[SegmentInfo]:
    """The segment files in `directory`, sorted by first_seq ([] if the directory does not exist)."""
    try:
        names = listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        first_seq = parse_segment_name(name)
        if first_seq is not None:
            found.append(SegmentInfo(Path(directory) / name, first_seq))
    found.sort(key=lambda info: info.first_seq)
    return found


def list_free(directory: Path, *, listdir: Callable[[Path], list[str]] = os.listdir) -> list[Path]:
    """The free files (removed segments kept for reuse) in `directory`, oldest first."""
    try:
        names = listdir(directory)
    except FileNotFoundError:
        return []
    found = sorted((seq, name) for name in names if (seq := parse_free_name(name)) is not None)
    return [Path(directory) / name for _seq, name in found]


class SegmentScan:
    """Iterate once over a segment's records; afterwards `end_offset` is the end of the last good
    record (where a writer would cut a torn tail), `last_seq` its seq (first_seq - 1 if none),
    `problem` is None, "torn" (a record or the file header runs past the end of the file) or
    "corrupt" (damage that a partial write does not explain), at `problem_offset`. `flags` are the
    file header's (format.FLAG_RECYCLED); `reused` is True if the file was removed and reused for
    a newer segment while it was being read (the scan ended there: its records are gone on purpose)."""

    def __init__(self, path: Path, *, from_seq: int = 0, upto_seq: int | None = None, chunk: int = CHUNK):
        self.path = Path(path)
        named = parse_segment_name(self.path.name)
        self.first_seq = named if named is not None else 0
        self.from_seq = from_seq
        self.upto_seq = upto_seq
        self.chunk = chunk
        self.end_offset = 0
        self.last_seq = max(self.first_seq - 1, 0)
        self.records = 0
        self.size = 0
        self.problem: str | None = None
        self.problem_offset: int | None = None
        self.reached_upto = False  # stopped at a record above upto_seq
        self.flags = 0
        self.reused = False
        self._head = b""
        self._used = False

    def __repr__(self) -> str:
        return (f"SegmentScan({self.path.name}, end_offset={self.end_offset}, last_seq={self.last_seq}, "
                f"problem={self.problem!r}@{self.problem_offset})")

    def _stop(self, problem: str | None, offset: int) -> None:
        self.end_offset = offset
        if problem is not None:
            self.problem, self.problem_offset = problem, offset

    def __iter__(self) -> Iterator[LogRecord]:
        if self._used:
            raise RuntimeError("a SegmentScan can be iterated once")
        self._used = True
        with open(self.path, "rb", buffering=0) as f:
            no_readahead(f.fileno())  # it may be the active segment (fileio.no_readahead)
            size = self.size = os.fstat(f.fileno()).st_size
            head = f.read(FILE_HEADER_SIZE)
            first_seq = decode_file_header(head)
            if (first_seq is not None and self.first_seq and first_seq > self.first_seq
                    and file_header_flags(head) & FLAG_RECYCLED):
                # Removed and reused for a newer segment between the open and this read: its records
                # are gone on purpose, as for a file removed meanwhile.
                self.reused = True
                return
            if first_seq is None or (first_seq != self.first_seq and self.first_seq):
                # A header that was never completely written (created just before a crash) is torn;
                # anything else is not our file or damaged.
                torn = len(head) < FILE_HEADER_SIZE or is_zero(head, 0, len(head))
                self._stop(TORN if torn else CORRUPTION, 0)
                return
            self.first_seq = first_seq
            self.flags = file_header_flags(head)
            self._head = head
            self.end_offset = FILE_HEADER_SIZE
            yield from self._records(f, size)

    def _reused_under_us(self, f: BinaryIO) -> bool:
        """Checked after each read, before its records are used: the writer rewrites a reused file's
        header before writing any record into it, so if the header is still ours, so was the read."""
        if os.pread(f.fileno(), FILE_HEADER_SIZE, 0) == self._head:
            return False
        self.reused = True
        return True

    def _records(self, f: BinaryIO, size: int) -> Iterator[LogRecord]:
        base = FILE_HEADER_SIZE  # file offset of buf[0]
        buf = f.read(min(self.chunk, size - base)) if size > base else b""
        read_to = base + len(buf)
        pos = 0
        if buf and self._reused_under_us(f):
            self._stop(None, base)
            return
        last_seq = max(self.first_seq - 1, 0)
        upto = self.upto_seq
        while True:
            out: list[LogRecord] = []
            scan = scan_records(buf, pos, len(buf), last_seq=last_seq, from_seq=self.from_seq, out=out)
            for record in out:
                if upto is not None and record.seq > upto:
                    # end_offset is left at the last chunk boundary: only a full scan sets it exactly.
                    self.reached_upto = True
                    self.last_seq = last_seq
                    return
                self.records += 1
                last_seq = record.seq
                yield record
            last_seq = self.last_seq = scan.last_seq
            pos = scan.offset
            at_eof = read_to >= size
            if scan.stop == CORRUPT:
                self._stop(CORRUPTION, base + pos)
                return
            if scan.stop == ZEROS:
                self._stop(None if self._zeros_to_eof(f, read_to, size) else CORRUPTION, base + pos)
                return
            if scan.stop == END and at_eof:
                self._stop(None, base + pos)
                return
            if scan.stop == INCOMPLETE:
                need = record_length_at(buf, pos)
                if at_eof and is_zero(buf, pos, len(buf)):  # fewer zeros than a header: a zero tail
                    self._stop(None, base + pos)
                    return
                if at_eof or (need is not None and base + pos + need > size):
                    self._stop(TORN, base + pos)
                    return
                if need is not None and not _may_follow(buf, pos, last_seq):
                    # Kind 0 or a seq that does not increase: corrupt once read whole, so not read
                    # (a reused segment's stale bytes can claim any length that fits the file).
                    self._stop(CORRUPTION, base + pos)
                    return
            else:
                need = None
            # Read on: keep the unparsed rest and add at least a chunk (or the whole record).
            want = max(self.chunk, (need or RECORD_HEADER_SIZE) - (len(buf) - pos))
            more = f.read(min(want, size - read_to))
            if not more:  # the file shrank under us: whatever we have is the end
                self._stop(TORN if pos < len(buf) else None, base + pos)
                return
            if self._reused_under_us(f):
                self._stop(None, base + pos)
                return
            read_to += len(more)
            buf = buf[pos:] + more
            base += pos
            pos = 0

    def _zeros_to_eof(self, f: BinaryIO, read_to: int, size: int) -> bool:
        while read_to < size:
            more = f.read(min(self.chunk, size - read_to))
            if not more:
                return True
            if not is_zero(more, 0, len(more)):
                return self._reused_under_us(f)
            read_to += len(more)
        return True


def _may_follow(buf: bytes, pos: int, last_seq: int) -> bool:
    _crc, _length, kind, seq = RECORD_HEADER.unpack_from(buf, pos)
    return bool(kind != 0 and seq > last_seq)


def read_segment(path: Path, *, from_seq: int = 0) -> SegmentScan:
    return SegmentScan(path, from_seq=from_seq)


ProblemCallback = Callable[[SegmentInfo, int, str], None]


def read_log(directory: Path, *, from_seq: int = 0, upto_seq: int | None = None,
             on_problem: ProblemCallback | None = None) -> Iterator[LogRecord]:
    """Every record with from_seq <= seq <= upto_seq, in seq order, across segments.

    Damage in a sealed segment is reported (on_problem(segment, offset, "torn"|"corrupt") and a
    warning) and reading continues with the next segment; in the newest segment it is the end.
    """
    segments = list_segments(directory)
    start = 0
    for i, info in enumerate(segments):
        if info.first_seq <= from_seq:
            start = i
    for i in range(start, len(segments)):
        info = segments[i]
        if upto_seq is not None and info.first_seq > upto_seq:
            return
        scan = SegmentScan(info.path, from_seq=from_seq, upto_seq=upto_seq)
        try:
            yield from scan
        except FileNotFoundError:
            continue  # removed by retention while we listed: its records are gone on purpose
        if scan.reached_upto or (upto_seq is not None and scan.last_seq >= upto_seq):
            return
        if scan.problem is not None and i < len(segments) - 1:
            log.warning("message log: %s segment %s at offset %d; skipping the rest of it",
                        scan.problem, info.path, scan.problem_offset)
            if on_problem is not None:
                on_problem(info, scan.problem_offset or 0, scan.problem)


def read_record(directory: Path, seq: int) -> LogRecord | None:
    """The record with this seq, if a segment still holds it (one segment is scanned)."""
    holder = None
    for info in list_segments(directory):
        if info.first_seq > seq:
            break
        holder = info
    if holder is None:
        return None
    try:
        for record in SegmentScan(holder.path, from_seq=seq, upto_seq=seq):
            return record if record.seq == seq else None
    except FileNotFoundError:
        return None
    return None
