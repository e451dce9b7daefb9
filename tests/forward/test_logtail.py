"""The outbox's log reader and its index, on real segment files written in the log's format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.forward import pending as pending_module
from appliance.forward.logtail import LogTail
from appliance.forward.pending import Pending
from appliance.msglog.format import encode_file_header, encode_record, segment_name


def records(first: int, count: int) -> list[tuple[int, int, bytes]]:
    return [(seq, 1 + seq % 3, f"body-{seq}".encode() * (1 + seq % 5)) for seq in range(first, first + count)]


def write(directory: Path, first_seq: int, recs: list[tuple[int, int, bytes]], tail: bytes = b"") -> Path:
    path = directory / segment_name(first_seq)
    path.write_bytes(encode_file_header(first_seq) + b"".join(encode_record(*r) for r in recs) + tail)
    return path


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def seqs(located) -> list[int]:  # noqa: ANN001
    return [item.record.seq for item in located]


def test_reads_across_segments_and_says_where_each_record_is(tmp_path: Path):
    write(tmp_path, 1, records(1, 50))
    write(tmp_path, 51, records(51, 30))
    write(tmp_path, 81, records(81, 5))
    tail = LogTail(tmp_path, 0, chunk=256)  # small chunks: records straddle reads
    got = tail.read(10**9)
    assert seqs(got) == list(range(1, 86))
    for item in got:  # the position is exactly the record's bytes
        data = (tmp_path / segment_name(item.segment)).read_bytes()
        expected = encode_record(*item.record)
        assert data[item.offset:item.offset + len(expected)] == expected
    assert tail.read(10**9) == []


def test_starts_after_a_seq_stops_at_upto_and_picks_up_what_is_appended(tmp_path: Path):
    path = write(tmp_path, 1, records(1, 20))
    tail = LogTail(tmp_path, 7)
    assert seqs(tail.read(12)) == list(range(8, 13))  # upto: the log's durable_seq
    assert seqs(tail.read(100, limit=3)) == [13, 14, 15]
    assert seqs(tail.read(100)) == list(range(16, 21))
    record = encode_record(21, 1, b"x" * 100)
    append(path, record[:30])  # being written: not a record yet
    assert tail.read(100) == []
    append(path, record[30:])
    assert seqs(tail.read(100)) == [21]


def test_a_record_completed_just_before_the_roll_is_not_skipped(tmp_path: Path):
    """The reader saw a partial last record; the writer then finished it and rolled to a new
    segment. The old segment is read once more before moving on."""
    path = write(tmp_path, 1, records(1, 5))
    record = encode_record(6, 1, b"late")
    append(path, record[:10])
    tail = LogTail(tmp_path, 0)
    assert seqs(tail.read(100)) == [1, 2, 3, 4, 5]
    append(path, record[10:])
    write(tmp_path, 7, records(7, 3))
    assert seqs(tail.read(100)) == [6, 7, 8, 9]


def test_a_zero_filled_tail_is_the_end_until_written(tmp_path: Path):
    path = write(tmp_path, 1, records(1, 3), tail=bytes(4096))  # preallocated
    tail = LogTail(tmp_path, 0)
    assert seqs(tail.read(100)) == [1, 2, 3]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4096)
        f.write(encode_record(4, 1, b"four"))
    assert seqs(tail.read(100)) == [4]


def test_corruption_in_a_sealed_segment_is_reported_and_skipped(tmp_path: Path):
    first = write(tmp_path, 1, records(1, 10))
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    write(tmp_path, 11, records(11, 5))
    problems: list[tuple[str, str]] = []
    tail = LogTail(tmp_path, 0, on_problem=lambda path, offset, kind: problems.append((path.name, kind)))
    got = seqs(tail.read(100))
    assert got[0] == 1 and got[-5:] == [11, 12, 13, 14, 15] and len(got) < 15
    assert problems == [(segment_name(1), "corrupt")]


def test_damage_in_the_newest_segment_waits_and_says_so(tmp_path: Path):
    path = write(tmp_path, 1, records(1, 3))
    append(path, b"\x01" * 40)  # not a record, not zeros: written by someone else, or damaged
    tail = LogTail(tmp_path, 0)
    assert seqs(tail.read(100)) == [1, 2, 3]
    assert tail.read(100) == [] and tail.stuck is not None


def test_no_log_yet(tmp_path: Path):
    tail = LogTail(tmp_path / "log", 0)
    assert tail.read(100) == []
    (tmp_path / "log").mkdir()
    write(tmp_path / "log", 1, records(1, 2))
    assert seqs(tail.read(100)) == [1, 2]


def test_pending_out_of_order_acknowledgements_move_the_head_only_when_contiguous():
    p = Pending()
    for seq in (3, 5, 6, 9, 10):
        p.add(seq, 1000.0 + seq, 100 + seq, seq * 10)
    assert (p.messages, p.bytes, p.first_seq(), p.oldest_ts()) == (5, 533, 3, 1003.0)
    assert p.acknowledge(6) and p.acknowledge(9)
    assert not p.acknowledge(6) and not p.acknowledge(4)  # twice, or never waiting
    p.advance()
    assert p.first_seq() == 3 and p.messages == 3
    assert [e.seq for e in p.entries(0, 10)] == [3, 5, 10]  # acknowledged ones are not sent again
    assert p.acknowledge(3)
    p.advance()
    assert p.first_seq() == 5 and p.oldest_ts() == 1005.0
    assert p.acknowledge(5)
    p.advance()
    assert p.first_seq() == 10 and len(p) == 1
    with pytest.raises(ValueError):
        p.add(10, 0.0, 1, 0)


def test_pending_remove_takes_a_run_and_skips_acknowledged_ones():
    p = Pending()
    for seq in range(1, 11):
        p.add(seq, float(seq), 10, 0)
    p.acknowledge(5)
    removed = p.remove(3, 7)  # drop 3..7 while 1 and 2 are in flight: 5 was acknowledged already
    assert [e.seq for e in removed] == [3, 4, 6, 7]
    assert [e.seq for e in p.entries(0, 100)] == [1, 2, 8, 9, 10]
    assert p.messages == 5 and p.bytes == 50
    assert [e.seq for e in p.scan(2)] == [8, 9, 10]
    assert [e.seq for e in p.remove(1, 2)] == [1, 2] and p.first_seq() == 8


def test_pending_compacts_its_arrays(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pending_module, "_COMPACT_AT", 8)
    p = Pending()
    for seq in range(1, 101):
        p.add(seq, float(seq), 1, seq)
    for seq in range(1, 91):
        p.acknowledge(seq)
        p.advance()
    assert len(p._seq) < 30 and p.first_seq() == 91  # noqa: SLF001
    assert [e.seq for e in p.entries(95, 3)] == [96, 97, 98]
    assert p.messages == 10 and p.oldest_ts() == 91.0


class _CountingFiles:
    """SegmentFiles that remember how much each pread asked for (the I/O boundary)."""

    def __init__(self, directory: Path) -> None:
        from appliance.forward.logtail import SegmentFiles

        self.inner = SegmentFiles(directory)
        self.reads: list[int] = []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def pread(self, first_seq: int, offset: int, length: int) -> bytes:
        self.reads.append(length)
        return self.inner.pread(first_seq, offset, length)


def test_at_a_preallocated_tail_reads_stay_small_and_find_every_record(tmp_path: Path):
    # A live segment is preallocated: past its last record come zeros. The reader must not read
    # (and check for zeros) large parts of them at every look (this cost the forwarder ~3 ms of CPU
    # under the GIL per look); a batch larger than a read is still read whole.
    from appliance.forward.logtail import CHUNK, FIRST_READ, TAIL_READ

    path = write(tmp_path, 1, records(1, 10), tail=bytes(4 << 20))
    files = _CountingFiles(tmp_path)
    tail = LogTail(tmp_path, 0, files)  # type: ignore[arg-type]
    assert seqs(tail.read(10**9)) == list(range(1, 11))
    end = (len(encode_file_header(1)) + sum(len(encode_record(*r)) for r in records(1, 10)))
    seq = 11
    for batch in (3, 1, 40, 2, 400, 1):  # small and large batches written into the zeros
        new = records(seq, batch)
        data = b"".join(encode_record(*r) for r in new)
        with open(path, "r+b") as f:
            f.seek(end)
            f.write(data)
        end += len(data)
        files.reads.clear()
        assert seqs(tail.read(10**9)) == list(range(seq, seq + batch))
        assert all(n <= CHUNK for n in files.reads)
        seq += batch
    files.reads.clear()
    assert tail.read(10**9) == []
    assert files.reads and max(files.reads) <= FIRST_READ
    # After small batches the next look reads about twice what the last one found, not 64 KiB.
    new = records(seq, 1)
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(encode_record(*new[0]))
    assert seqs(tail.read(10**9)) == [seq]
    files.reads.clear()
    assert tail.read(10**9) == []
    assert files.reads == [TAIL_READ]


def test_zero_tail_detection_finds_a_nonzero_byte_anywhere():
    from appliance.msglog.format import is_zero

    size = 200_000  # more than one 64 KiB block
    assert is_zero(bytes(size), 0, size)
    for where in (0, 1, 65_535, 65_536, 131_071, size - 1):
        buf = bytearray(size)
        buf[where] = 1
        assert not is_zero(buf, 0, size)
        assert is_zero(buf, where + 1, size)
        assert is_zero(buf, 0, where)
