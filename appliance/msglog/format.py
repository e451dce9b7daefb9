"""The message log's on-disk format, without I/O (docs/decisions/0004-message-log.md).

A segment file is a 16-byte file header followed by records:

    file header  <4sHHQ   magic b"MQLG", version (1), flags, first_seq
    record       <IIBQ    crc32, body length, kind (1..255), seq   then `length` body bytes

flags (the u16 that was "reserved, 0"): FLAG_RECYCLED (1) marks a segment written over a recycled
file (a removed segment kept as `free-*.recycle` and renamed to the new segment's name): past its
last record the file holds the old segment's bytes until the segment is cut at seal, stop or open.
Those stale bytes read as the end, never as records, by the rule every reader already applies: a
segment's records have seq >= its first_seq and strictly increasing, and every stale record is from
an older segment, so its seq is below first_seq (a stale record that starts exactly at the end
fails the seq check; stale bytes from the middle of an old record fail the CRC). Readers of version
1 ignore the flags, so older builds read recycled segments the same way (docs/decisions/0006).

The CRC (zlib.crc32) covers everything after the CRC field: length, kind, seq and body, so a record
whose length field was torn fails its CRC instead of sending a reader off into the body. A kind of 0
is never written: a zero-filled region (a preallocated or half-persisted tail) therefore reads as
"end" rather than as a record.

`scan_records` parses a buffer that may end anywhere (partial input is normal: it answers how far it
got and why it stopped), so the same code serves whole files, chunked reads and a reader tailing a
file that another process is still writing.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

MAGIC = b"MQLG"
VERSION = 1
FILE_HEADER = struct.Struct("<4sHHQ")
FILE_HEADER_SIZE = FILE_HEADER.size  # 16
RECORD_HEADER = struct.Struct("<IIBQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 17
# The part of the header the CRC covers (length, kind, seq), packed on its own to seed the CRC.
_CRC_PREFIX = struct.Struct("<IBQ")
MAX_BODY = (1 << 31) - 1  # a length above this is damage, not a record
MAX_SEQ = (1 << 64) - 1
SEGMENT_SUFFIX = ".seg"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
FLAG_RECYCLED = 1
# A removed segment kept for reuse: no reader's glob (*.seg) or parse_segment_name matches it.
_FREE_NAME = re.compile(r"^free-(\d{20})\.recycle$")


class LogRecord(NamedTuple):
    seq: int
    kind: int
    body: bytes


class FormatError(ValueError):
    """The caller asked for something the format cannot hold (kind 0, a seq out of range...)."""


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first_seq a segment file name declares, or None for any other file."""
    match = _SEGMENT_NAME.match(name)
    return int(match.group(1)) if match else None


def free_name(first_seq: int) -> str:
    """The name a removed segment (this first_seq) is kept under until a new segment reuses it."""
    return f"free-{first_seq:020d}.recycle"


def parse_free_name(name: str) -> int | None:
    match = _FREE_NAME.match(name)
    return int(match.group(1)) if match else None


def encode_file_header(first_seq: int, flags: int = 0) -> bytes:
    return FILE_HEADER.pack(MAGIC, VERSION, flags, first_seq)


def file_header_flags(data: bytes | bytearray | memoryview) -> int:
    """The flags of a segment's file header (0 if the header is missing or not ours)."""
    if decode_file_header(data) is None:
        return 0
    return int(FILE_HEADER.unpack_from(data, 0)[2])


def decode_file_header(data: bytes | bytearray | memoryview) -> int | None:
    """first_seq from a segment's file header, or None if the header is missing or not ours."""
    if len(data) < FILE_HEADER_SIZE:
        return None
    magic, version, _flags, first_seq = FILE_HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        return None
    return int(first_seq)


def record_header(seq: int, kind: int, body: bytes, *, _prefix: Callable[..., bytes] = _CRC_PREFIX.pack,
                  _pack: Callable[..., bytes] = RECORD_HEADER.pack, _crc: Callable[..., int] = zlib.crc32) -> bytes:
    """The 17 header bytes of a record (the hot path: the writer appends header + body)."""
    length = len(body)
    return _pack(_crc(body, _crc(_prefix(length, kind, seq))), length, kind, seq)


def encode_record(seq: int, kind: int, body: bytes) -> bytes:
    check_record(seq, kind, body)
    return record_header(seq, kind, body) + body


def check_record(seq: int, kind: int, body: bytes) -> None:
    if not 1 <= kind <= 255:
        raise FormatError(f"record kind must be 1..255, not {kind!r}")
    if not 0 < seq <= MAX_SEQ:
        raise FormatError(f"seq out of range: {seq!r}")
    if len(body) > MAX_BODY:
        raise FormatError(f"record body too long: {len(body)} bytes")


# Why scan_records stopped.
END = "end"  # the buffer ends exactly at a record boundary
ZEROS = "zeros"  # an all-zero header, and only zeros after it to the end of the buffer (a preallocated tail?)
INCOMPLETE = "incomplete"  # a record starts but the buffer ends inside it (need more data, or torn)
CORRUPT = "corrupt"  # a complete record fails its CRC, has kind 0 or does not increase the seq


class Scan(NamedTuple):
    offset: int  # where parsing stopped: the end of the last good record
    last_seq: int  # seq of the last good record (the `last_seq` passed in if none)
    stop: str  # END, ZEROS, INCOMPLETE or CORRUPT


_ZERO_BLOCK = bytes(1 << 16)


def is_zero(buf: bytes | bytearray | memoryview, start: int, end: int) -> bool:
    # Compared as bytes (a copy and a memcmp): comparing a memoryview goes item by item, ~20x slower
    # (3 ms per MiB on the 2-core VM, under the GIL; measured in docs/performance.md).
    view = memoryview(buf)
    step = len(_ZERO_BLOCK)
    for pos in range(start, end, step):
        stop = min(pos + step, end)
        if view[pos:stop].tobytes() != _ZERO_BLOCK[:stop - pos]:
            return False
    return True


def scan_records(buf: bytes | bytearray | memoryview, offset: int, end: int, *, last_seq: int = 0,
                 from_seq: int = 0, out: list[LogRecord] | None = None) -> Scan:
    """Parse records from buf[offset:end], appending those with seq >= from_seq to `out`.

    Partial input is normal: a record cut by `end` stops the scan with INCOMPLETE at its start, and
    the caller decides whether more data can come (read on) or not (a torn tail).
    """
    unpack = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    view = memoryview(buf)
    append = out.append if out is not None else None
    header = RECORD_HEADER_SIZE
    pos = offset
    while True:
        if pos + header > end:
            # A partial header is INCOMPLETE even if its bytes are zeros: a CRC can start with zero
            # bytes, so only the caller, knowing whether more data can come, can call it the end.
            return Scan(pos, last_seq, END if pos == end else INCOMPLETE)
        crc, length, kind, seq = unpack(view, pos)
        if kind == 0:
            if crc == 0 and length == 0 and seq == 0 and is_zero(view, pos, end):
                return Scan(pos, last_seq, ZEROS)
            return Scan(pos, last_seq, CORRUPT)
        stop = pos + header + length
        if stop > end:
            return Scan(pos, last_seq, INCOMPLETE)
        if crc32(view[pos + 4:stop]) != crc or seq <= last_seq:
            return Scan(pos, last_seq, CORRUPT)
        if append is not None and seq >= from_seq:
            append(LogRecord(seq, kind, bytes(view[pos + header:stop])))
        last_seq = seq
        pos = stop


def record_length_at(buf: bytes | bytearray | memoryview, offset: int) -> int | None:
    """Total bytes of the record whose header starts at `offset`, or None if the header is cut."""
    if len(buf) - offset < RECORD_HEADER_SIZE:
        return None
    return RECORD_HEADER_SIZE + int(RECORD_HEADER.unpack_from(buf, offset)[1])


def next_record_at(buf: bytes | bytearray | memoryview, last_seq: int, *, probe: int = 4) -> int | None:
    """Where a record of ours lies in the bytes cut off after the record `last_seq`, or None.

    For a reused segment's cut tail (docs/decisions/0006): stale records all have seqs below the
    segment's first_seq, so a header carrying one of the next `probe` seqs is ours. Right at the
    start (offset 0) a complete header with seq last_seq + 1 and a kind is enough (a record torn or
    damaged in its body); further on the record must check out (its CRC), so that chance bytes in
    an old record do not match.
    """
    header = RECORD_HEADER_SIZE
    data = bytes(buf)
    if len(data) >= header:
        _crc, _length, kind, seq = RECORD_HEADER.unpack_from(data, 0)
        if kind != 0 and seq == last_seq + 1:
            return 0
    seq_at = header - 8  # the seq is the header's last 8 bytes
    for k in range(1, probe + 1):
        if last_seq + k > MAX_SEQ:
            break
        key = struct.pack("<Q", last_seq + k)
        i = data.find(key, seq_at)
        while i != -1:
            pos = i - seq_at
            crc, length, kind, _seq = RECORD_HEADER.unpack_from(data, pos)
            stop = pos + header + length
            if kind != 0 and stop <= len(data) and zlib.crc32(data[pos + 4:stop]) == crc:
                return pos
            i = data.find(key, i + 1)
    return None


# Seqs skipped inside a segment: a failed batch's range is never written, the next batch goes on
# after it. A record header claiming a seq further ahead than this is taken as not ours.
SEQ_GAP = 1 << 24


def looks_like_next(buf: bytes | bytearray | memoryview, offset: int, last_seq: int) -> bool:
    """Could the record header at `offset` (the one after `last_seq`) be ours? Used before reading a
    record longer than a chunk: past the end of a reused segment lie old bytes whose "length" can be
    anything that fits the file, and a follower at the tail would read it again at every poll.
    Ours has a kind and a seq above last_seq (normally last_seq + 1; more after a failed batch)."""
    if len(buf) - offset < RECORD_HEADER_SIZE:
        return False
    _crc, _length, kind, seq = RECORD_HEADER.unpack_from(buf, offset)
    return bool(kind != 0 and last_seq < seq <= last_seq + SEQ_GAP)
