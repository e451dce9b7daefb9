"""The segment format and its readers: round trips, partial input, torn and damaged segments."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from appliance.msglog import LogRecord, list_segments, read_log, read_segment
from appliance.msglog.format import (
    CORRUPT,
    END,
    FILE_HEADER_SIZE,
    INCOMPLETE,
    RECORD_HEADER_SIZE,
    ZEROS,
    FormatError,
    decode_file_header,
    encode_file_header,
    encode_record,
    parse_segment_name,
    record_header,
    scan_records,
    segment_name,
)

RECORDS = [LogRecord(1, 1, b""), LogRecord(2, 2, b"x"), LogRecord(5, 255, bytes(range(256)) * 3),
           LogRecord(6, 7, b"\0" * 40), LogRecord(2**64 - 1, 1, b"last")]


def encode_all(records: list[LogRecord]) -> bytes:
    return b"".join(encode_record(*r) for r in records)


def write_segment(directory: Path, first_seq: int, records: list[LogRecord], tail: bytes = b"") -> Path:
    path = directory / segment_name(first_seq)
    path.write_bytes(encode_file_header(first_seq) + encode_all(records) + tail)
    return path


def test_record_layout_is_the_documented_one() -> None:
    data = encode_record(7, 3, b"hello")
    crc, length, kind, seq = struct.unpack_from("<IIBQ", data)
    assert (length, kind, seq, data[17:]) == (5, 3, 7, b"hello")
    assert crc == zlib.crc32(data[4:])
    assert RECORD_HEADER_SIZE == 17 and FILE_HEADER_SIZE == 16
    assert encode_file_header(42) == b"MQLG" + struct.pack("<HHQ", 1, 0, 42)
    assert decode_file_header(encode_file_header(42)) == 42
    assert decode_file_header(b"XXXX" + bytes(12)) is None
    assert decode_file_header(encode_file_header(1)[:15]) is None
    assert segment_name(12) == "00000000000000000012.seg"
    assert parse_segment_name(segment_name(2**63)) == 2**63
    assert parse_segment_name("00000000000000000012.seg.tmp") is None
    assert record_header(7, 3, b"hello") + b"hello" == data


def test_invalid_records_are_refused() -> None:
    for seq, kind in ((1, 0), (1, 256), (0, 1), (2**64, 1)):
        with pytest.raises(FormatError):
            encode_record(seq, kind, b"")


def test_round_trip_whole() -> None:
    data = encode_all(RECORDS)
    out: list[LogRecord] = []
    scan = scan_records(data, 0, len(data), out=out)
    assert out == RECORDS
    assert scan == (len(data), 2**64 - 1, END)


def test_every_split_point_gives_the_same_records() -> None:
    data = encode_all(RECORDS)
    for cut in range(len(data) + 1):
        out: list[LogRecord] = []
        first = scan_records(data[:cut], 0, cut, out=out)
        assert first.stop in (END, INCOMPLETE, ZEROS), cut
        buf = data[first.offset:]
        second = scan_records(buf, 0, len(buf), last_seq=first.last_seq, out=out)
        assert out == RECORDS, cut
        assert second.stop == END


def test_one_byte_at_a_time() -> None:
    data = encode_all(RECORDS)
    out: list[LogRecord] = []
    buf = b""
    last_seq = 0
    for byte in data:
        buf += bytes([byte])
        scan = scan_records(buf, 0, len(buf), last_seq=last_seq, out=out)
        buf, last_seq = buf[scan.offset:], scan.last_seq
    assert out == RECORDS and buf == b""


def test_trailing_bytes_stop_the_scan() -> None:
    data = encode_all(RECORDS[:2])
    for tail, stop in ((b"\x01", INCOMPLETE), (bytes(5), INCOMPLETE), (bytes(17), ZEROS), (bytes(100), ZEROS),
                       (struct.pack("<IIBQ", 1, 2, 1, 10) + b"ab", CORRUPT), (b"\x01" * 40, INCOMPLETE), (bytes(30) + b"\x01", CORRUPT)):
        out: list[LogRecord] = []
        scan = scan_records(data + tail, 0, len(data) + len(tail), out=out)
        assert (out, scan.offset, scan.stop) == (RECORDS[:2], len(data), stop), tail


def test_from_seq_filters_and_seq_must_increase() -> None:
    data = encode_all(RECORDS)
    out: list[LogRecord] = []
    scan_records(data, 0, len(data), from_seq=5, out=out)
    assert [r.seq for r in out] == [5, 6, 2**64 - 1]
    backwards = encode_record(9, 1, b"a") + encode_record(9, 1, b"b")
    out = []
    assert scan_records(backwards, 0, len(backwards), out=out).stop == CORRUPT and len(out) == 1


def test_every_single_flipped_bit_is_detected() -> None:
    data = encode_record(3, 1, b"payload")
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            out: list[LogRecord] = []
            scan = scan_records(damaged, 0, len(damaged), out=out)
            assert out == [] and scan.stop in (CORRUPT, INCOMPLETE), (i, bit)


# --- segment files -----------------------------------------------------------------------------


def records_from(seq: int, n: int, rng: random.Random | None = None) -> list[LogRecord]:
    rng = rng or random.Random(seq)
    return [LogRecord(seq + i, 1 + i % 3, rng.randbytes(rng.randrange(0, 300))) for i in range(n)]


@pytest.mark.parametrize("chunk", [1, 17, 100, 4096, 1 << 20])
def test_segment_round_trip_in_any_chunk_size(tmp_path: Path, chunk: int) -> None:
    records = records_from(10, 200)
    path = write_segment(tmp_path, 10, records)
    scan = read_segment(path)
    scan.chunk = chunk
    assert list(scan) == records
    assert (scan.problem, scan.end_offset, scan.last_seq) == (None, path.stat().st_size, 209)


def test_empty_segment(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 10, [])
    scan = read_segment(path)
    assert list(scan) == [] and (scan.problem, scan.end_offset, scan.last_seq) == (None, 16, 9)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_truncated_anywhere_keeps_every_complete_record(tmp_path: Path, chunk: int) -> None:
    records = [LogRecord(1 + i, 1, bytes([i]) * (i * 7)) for i in range(6)]
    whole = encode_file_header(1) + encode_all(records)
    ends = [FILE_HEADER_SIZE]
    for r in records:
        ends.append(ends[-1] + RECORD_HEADER_SIZE + len(r.body))
    path = tmp_path / segment_name(1)
    for cut in range(len(whole) + 1):
        path.write_bytes(whole[:cut])
        scan = read_segment(path)
        scan.chunk = chunk
        got = list(scan)
        complete = sum(1 for e in ends[1:] if e <= cut)
        assert got == records[:complete], cut
        if cut < FILE_HEADER_SIZE:
            assert (scan.problem, scan.end_offset) == ("torn", 0)
        elif cut in ends:
            assert (scan.problem, scan.end_offset) == (None, cut)
        else:  # mid-header or mid-body: a torn tail at the end of the last complete record
            assert (scan.problem, scan.end_offset, scan.problem_offset) == ("torn", ends[complete], ends[complete])


def test_zero_filled_tail_reads_as_end(tmp_path: Path) -> None:
    records = records_from(1, 5)
    path = write_segment(tmp_path, 1, records, tail=bytes(3 << 20))
    scan = read_segment(path)
    scan.chunk = 1 << 16
    assert list(scan) == records
    assert scan.problem is None and scan.end_offset == path.stat().st_size - (3 << 20)


def test_zeros_then_data_is_damage(tmp_path: Path) -> None:
    records = records_from(1, 5)
    path = write_segment(tmp_path, 1, records, tail=bytes(70_000) + b"\x01")
    scan = read_segment(path)
    scan.chunk = 4096
    assert list(scan) == records and scan.problem == "corrupt"


def test_flipped_byte_in_a_record_stops_there(tmp_path: Path) -> None:
    records = records_from(1, 10)
    path = write_segment(tmp_path, 1, records)
    data = bytearray(path.read_bytes())
    offset = FILE_HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(r.body) for r in records[:6])
    data[offset + RECORD_HEADER_SIZE] ^= 0x40 if records[6].body else 0
    data[offset + 9] ^= 0x01 if not records[6].body else 0  # no body: damage the seq instead
    path.write_bytes(bytes(data))
    scan = read_segment(path)
    assert list(scan) == records[:6]
    assert (scan.problem, scan.problem_offset, scan.end_offset) == ("corrupt", offset, offset)


def test_damaged_file_header(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 5, records_from(5, 3))
    data = bytearray(path.read_bytes())
    data[0] = ord("X")
    path.write_bytes(bytes(data))
    scan = read_segment(path)
    assert list(scan) == [] and scan.problem == "corrupt"
    # The header must name the same first_seq as the file.
    (tmp_path / segment_name(6)).write_bytes(encode_file_header(5) + encode_all(records_from(6, 2)))
    scan = read_segment(tmp_path / segment_name(6))
    assert list(scan) == [] and scan.problem == "corrupt"


def test_list_segments_sorts_and_ignores_other_files(tmp_path: Path) -> None:
    for first in (100, 3, 20):
        write_segment(tmp_path, first, [])
    (tmp_path / "cursor").write_bytes(b"x")
    (tmp_path / "00000000000000000007.seg.tmp").write_bytes(b"x")
    assert [s.first_seq for s in list_segments(tmp_path)] == [3, 20, 100]
    assert list_segments(tmp_path / "missing") == []


def make_log(tmp_path: Path) -> tuple[list[list[LogRecord]], list[Path]]:
    segments = [records_from(1, 50), records_from(60, 40), records_from(100, 30)]
    paths = [write_segment(tmp_path, s[0].seq, s) for s in segments]
    return segments, paths


def test_read_log_across_segments_with_bounds(tmp_path: Path) -> None:
    segments, _ = make_log(tmp_path)
    everything = [r for s in segments for r in s]
    assert list(read_log(tmp_path)) == everything
    assert list(read_log(tmp_path, from_seq=55)) == [r for r in everything if r.seq >= 55]
    assert list(read_log(tmp_path, from_seq=70, upto_seq=105)) == [r for r in everything if 70 <= r.seq <= 105]
    assert list(read_log(tmp_path, upto_seq=0)) == []
    assert list(read_log(tmp_path, from_seq=10**6)) == []


def test_corruption_in_a_sealed_segment_is_reported_and_skipped(tmp_path: Path) -> None:
    segments, paths = make_log(tmp_path)
    data = bytearray(paths[1].read_bytes())
    offset = FILE_HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(r.body) for r in segments[1][:10])
    data[offset + 2] ^= 0xFF
    paths[1].write_bytes(bytes(data))
    problems: list[tuple[int, int, str]] = []
    got = list(read_log(tmp_path, on_problem=lambda s, off, what: problems.append((s.first_seq, off, what))))
    assert got == segments[0] + segments[1][:10] + segments[2]
    assert problems == [(60, offset, "corrupt")]


def test_torn_newest_segment_is_just_the_end(tmp_path: Path) -> None:
    segments, paths = make_log(tmp_path)
    with open(paths[2], "ab") as f:
        f.write(encode_record(200, 1, b"partial")[:-3])
    problems: list[object] = []
    assert list(read_log(tmp_path, on_problem=lambda *a: problems.append(a))) == [r for s in segments for r in s]
    assert problems == []


def test_reader_sees_a_record_being_written_as_end(tmp_path: Path) -> None:
    # Another process appends while we read: every prefix of the append is "end", never an error.
    path = write_segment(tmp_path, 1, records_from(1, 3))
    record = encode_record(4, 1, os.urandom(50))
    for cut in range(len(record)):
        with open(path, "ab") as f:
            f.write(record[cut:cut + 1])
        got = list(read_log(tmp_path))
        assert [r.seq for r in got] == ([1, 2, 3, 4] if cut == len(record) - 1 else [1, 2, 3])


def test_a_header_starting_with_zero_bytes_across_a_chunk_boundary(tmp_path: Path) -> None:
    # A CRC may begin with zero bytes: cut there by a read boundary, it must not look like a zero tail.
    records: list[LogRecord] = []
    seq = 1
    zero_first = 0
    while zero_first < 3:
        record = LogRecord(seq, 1, b"%d" % seq)
        if encode_record(*record)[0] == 0:
            zero_first += 1
            records.append(record)
        elif seq % 50 == 0:
            records.append(record)
        seq += 1
    path = write_segment(tmp_path, 1, records, tail=bytes(40))
    for chunk in range(1, 120):
        scan = read_segment(path)
        scan.chunk = chunk
        assert list(scan) == records, chunk
        assert scan.problem is None, chunk


def test_a_short_zero_tail_is_the_end(tmp_path: Path) -> None:
    records = records_from(1, 3)
    path = write_segment(tmp_path, 1, records, tail=bytes(5))
    scan = read_segment(path)
    assert list(scan) == records and scan.problem is None and scan.end_offset == path.stat().st_size - 5
