"""Segment recycling (docs/decisions/0006-segment-recycling.md): removed segments are kept as free
files and reused for new segments; what a reused file held before must never come back as records,
for any reader, after a kill or at any step of a power cut, and damage must still be detected."""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.console.follow import LogFollower
from appliance.forward.logtail import FIRST_READ, LogTail, SegmentFiles
from appliance.msglog import LogRecord, MessageLog, SegmentInfo, SegmentScan, SyncPolicy, list_segments, read_log, read_segment
from appliance.msglog.fileio import FileIO
from appliance.msglog.format import (
    FILE_HEADER_SIZE,
    FLAG_RECYCLED,
    MAX_BODY,
    MAX_SEQ,
    RECORD_HEADER_SIZE,
    decode_file_header,
    encode_file_header,
    encode_record,
    file_header_flags,
    free_name,
    parse_free_name,
    parse_segment_name,
)
from appliance.msglog.reader import list_free
from appliance.msglog.testing import CRASH_MODES, CrashIO, FaultyIO
from appliance.names import EventKind

KIND = 7
BODY = 40  # every record of the old segment: 57 bytes on disk


def fixed_body(seq: int, size: int = BODY) -> bytes:
    return seq.to_bytes(8, "little") + bytes([seq % 251]) * (size - 8)


class Scenario:
    """A log with an old segment of 300 equal records turned into a free file, and a new segment
    written over it: the records of the old one past the new ones' end are stale bytes."""

    def __init__(self, directory: Path, **kwargs: object):
        self.directory = directory
        self.events: list[tuple[EventKind, dict[str, object]]] = []
        self.log = MessageLog(directory, segment_max_age=None, on_event=lambda k, d: self.events.append((k, d)),
                              **kwargs)  # type: ignore[arg-type]
        self.log.open()
        self.log.start()
        self.known: dict[int, bytes] = {}
        self.put(300)
        self.old = self.log.seal()
        assert self.old is not None
        self.put(10)
        self.log.seal()
        assert self.log.remove_segments_before(self.old.first_seq + 300) == 1
        self.free = directory / free_name(self.old.first_seq + 300)  # named after the next segment
        assert list_free(directory) == [self.free] and not self.old.path.exists()
        self.put(5)
        self.log.seal()  # the next segment reuses the free file
        self.active = list_segments(directory)[-1]

    def put(self, n: int, size: Callable[[int], int] = lambda seq: BODY) -> list[int]:
        seqs = []
        for _ in range(n):
            seq = self.log.last_seq + 1
            body = fixed_body(seq, size(seq))
            assert self.log.append(KIND, body) == seq
            self.known[seq] = body
            seqs.append(seq)
        assert self.log.wait_durable(seqs[-1], timeout=30)
        return seqs

    def records(self) -> list[LogRecord]:
        """What the log holds: everything but the removed segment's records."""
        return [LogRecord(seq, KIND, body) for seq, body in sorted(self.known.items()) if seq > 300]


def _started_log(directory: Path, io: FileIO | None = None) -> MessageLog:
    log = MessageLog(directory, io=io, segment_max_age=None)
    log.open()
    log.start()
    return log


def _log_whose_first_segment_can_be_freed(directory: Path) -> tuple[MessageLog, SegmentInfo]:
    """Segments 1 (seqs 1..300) and 301 (301..310) sealed, 311 active; returns the log and segment 1."""
    log = _started_log(directory)
    for seq in range(1, 311):
        log.append(KIND, fixed_body(seq))
        if seq in (300, 310):
            log.seal()
    return log, list_segments(directory)[0]


def _reuse_on_read(log: MessageLog, old_ino: int) -> Callable[[int], None]:
    """A stand-in for the reader's no_readahead: once a reader holds the file `old_ino` open, segment 1
    is removed and segment 312 takes its free file (same inode) before the reader reads a byte."""
    from appliance.msglog import fileio

    def reuse_now(fd: int) -> None:
        fileio.no_readahead(fd)
        if os.fstat(fd).st_ino == old_ino:
            log.remove_segments_before(311)
            log.append(KIND, fixed_body(311))
            log.seal()  # takes the free file (the old segment's inode) for segment 312
            assert log.wait_durable(log.append(KIND, fixed_body(312)), timeout=30)
    return reuse_now


def assert_segments_hold_only_their_records(directory: Path, known: dict[int, bytes]) -> list[int]:
    """Every record read lies in its segment's seq range, was appended with this body, and seqs
    strictly increase across the log (a stale record would break one of these)."""
    segments = list_segments(directory)
    seqs: list[int] = []
    for info, after in zip(segments, segments[1:] + [None]):
        for record in SegmentScan(info.path):
            assert record.seq >= info.first_seq and (after is None or record.seq < after.first_seq), record.seq
            assert known.get(record.seq) == record.body, f"record {record.seq} was never appended so"
            seqs.append(record.seq)
    assert seqs == sorted(set(seqs))
    return seqs


@pytest.mark.parametrize("sizes", ["aligned", "mid-record"])
def test_stale_bytes_after_the_end_of_a_reused_segment_read_as_the_end(tmp_path: Path, sizes: str) -> None:
    """aligned: the new records are as long as the old ones, so the next old record (valid CRC,
    older seq) starts exactly at the end; mid-record: the end falls inside an old record."""
    directory = tmp_path / "log"
    s = Scenario(directory)
    assert s.log.stats["recycled"] == 1
    assert s.active.path.stat().st_ino != 0 and not s.free.exists()
    size = (lambda seq: BODY) if sizes == "aligned" else (lambda seq: 23 + seq % 5)
    new = s.put(12, size)
    head = s.active.path.read_bytes()[:FILE_HEADER_SIZE]
    assert decode_file_header(head) == s.active.first_seq and file_header_flags(head) & FLAG_RECYCLED
    end = FILE_HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(s.known[seq]) for seq in new)
    assert s.active.path.stat().st_size > end  # the old records are still there, past the end
    if sizes == "aligned":  # the stale record at the end is whole and checks out, but for its seq
        stale = s.active.path.read_bytes()[end:end + RECORD_HEADER_SIZE + BODY]
        assert stale == encode_record(13, KIND, fixed_body(13))

    problems: list[object] = []
    assert list(read_log(directory, on_problem=lambda *a: problems.append(a))) == s.records()
    assert problems == []
    scan = read_segment(s.active.path)
    assert [r.seq for r in scan] == new and scan.end_offset == end and scan.flags & FLAG_RECYCLED
    # The forwarder's tail (in-process, right behind the writer) stops at the durable end, no damage:
    tail = LogTail(directory, after_seq=0)
    assert [located.record for located in tail.read(s.log.durable_seq)] == s.records()
    assert tail.last_seq == s.log.durable_seq  # so the outbox reports no "damaged record"
    # The console's follower (another process in production) reads the newest segment:
    assert [r.seq for r in LogFollower(directory).poll()] == new

    # Killed now (the OS keeps what was written): the copy is what a restart finds.
    killed = tmp_path / "killed"
    shutil.copytree(directory, killed)
    events: list[tuple[EventKind, dict[str, object]]] = []
    again = MessageLog(killed, on_event=lambda k, d: events.append((k, d)))
    report = again.open()
    assert report.last_seq == new[-1] and report.torn_tail is None and report.corrupt == []
    newest = killed / s.active.path.name
    assert report.stale_tail is not None and report.stale_tail[:2] == (newest, end)
    assert events == []  # not reported as a torn tail or as corruption
    assert newest.stat().st_size == end
    again.start()
    assert again.append(KIND, b"after") == new[-1] + 1
    again.stop()
    assert list(read_log(killed)) == [*s.records(), LogRecord(new[-1] + 1, KIND, b"after")]

    # Sealed: cut to its records, so readers of sealed segments never meet the stale bytes.
    s.log.seal()
    assert s.active.path.stat().st_size == end
    assert list(read_log(directory, on_problem=lambda *a: problems.append(a))) == s.records()
    s.log.stop()
    assert problems == [] and s.events == []


class CountingFiles(SegmentFiles):
    """The forwarder's segment files, remembering how much each pread asked for."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.reads: list[int] = []

    def pread(self, first_seq: int, offset: int, length: int) -> bytes:
        self.reads.append(length)
        return super().pread(first_seq, offset, length)


def test_the_forwarders_reads_stay_small_at_a_reused_segments_tail(tmp_path: Path) -> None:
    """Stale bytes can claim any length: the tail must neither take them for a backlog (reading
    256 KiB at every look) nor try to read a "record" of up to 2 GiB."""
    directory = tmp_path / "log"
    s = Scenario(directory)
    new = s.put(5)
    files = CountingFiles(directory)
    tail = LogTail(directory, after_seq=0, files=files)
    assert [located.record for located in tail.read(s.log.durable_seq)] == s.records()
    scan = read_segment(s.active.path)
    assert [r.seq for r in scan] == new
    end = scan.end_offset
    with open(s.active.path, "r+b") as f:  # an old record's middle that looks like a huge header
        f.seek(end)
        f.write(struct.pack("<IIBQ", 0xDEADBEEF, MAX_BODY - 1, 1, 1 << 60))
    for _ in range(3):
        files.reads.clear()
        for upto in (s.log.durable_seq, MAX_SEQ):
            assert tail.read(upto) == [] and tail.last_seq == new[-1]
        assert files.reads and max(files.reads) <= FIRST_READ
    s.log.stop()
    files.close()


def test_the_consoles_follower_does_not_read_a_stale_huge_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.console import follow

    directory = tmp_path / "log"
    log = _started_log(directory)
    for seq in range(1, 30_001):  # 3.5 MB of old records, to lie past the end of a reused file
        log.append(KIND, fixed_body(seq, 100))
    log.seal()
    log.append(KIND, fixed_body(30_001))
    log.seal()
    assert log.remove_segments_before(30_001) == 1
    log.append(KIND, fixed_body(30_002))
    log.seal()
    new = [log.append(KIND, fixed_body(seq)) for seq in range(30_003, 30_006)]
    assert log.wait_durable(new[-1], timeout=30) and log.stats["recycled"] == 1
    active = list_segments(directory)[-1]
    scan = read_segment(active.path)
    assert [r.seq for r in scan] == new and active.path.stat().st_size > scan.end_offset + follow.CHUNK
    with open(active.path, "r+b") as f:  # an old record's middle that looks like a huge header
        f.seek(scan.end_offset)
        f.write(struct.pack("<IIBQ", 0xDEADBEEF, MAX_BODY - 1, 1, 1 << 60))
    reads: list[int] = []

    class Counting:
        def __init__(self, path: Path, mode: str, buffering: int) -> None:
            self.f = open(path, mode, buffering=buffering)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def __getattr__(self, name: str) -> object:
            return getattr(self.f, name)

        def read(self, n: int) -> bytes:
            reads.append(n)
            return bytes(self.f.read(n))

    monkeypatch.setattr(follow, "open", Counting, raising=False)
    follower = LogFollower(directory)
    assert [r.seq for r in follower.poll()] == new
    for _ in range(3):
        reads.clear()
        assert follower.poll() == []
        assert reads and max(reads) <= follow.CHUNK
    log.stop()


def test_only_a_few_free_files_are_kept_and_a_clean_stop_cuts_the_stale_tail(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = MessageLog(directory, segment_max_age=None, recycle=2)
    log.open()
    log.start()
    for _ in range(5):
        for i in range(20):
            log.append(KIND, fixed_body(i))
        log.seal()
    assert len(list_segments(directory)) == 6
    assert log.remove_segments_before(log.last_seq + 1) == 5
    assert [parse_free_name(p.name) for p in list_free(directory)] == [21, 41]  # the rest deleted
    free_bytes = sum(p.stat().st_size for p in list_free(directory))
    assert (log.stats["free_files"], log.stats["free_bytes"]) == (2, free_bytes) and free_bytes > 0
    assert sorted(os.listdir(directory)) == sorted([free_name(21), free_name(41), list_segments(directory)[0].path.name])
    for i in range(3):
        log.append(KIND, fixed_body(i))
    log.seal()
    log.append(KIND, b"x")
    log.stop()
    assert log.stats["recycled"] == 1 and list_free(directory) == [directory / free_name(41)]
    newest = list_segments(directory)[-1]
    assert newest.path.stat().st_size == FILE_HEADER_SIZE + RECORD_HEADER_SIZE + 1  # stop cut the old bytes
    assert [r.seq for r in read_log(directory)] == list(range(101, 105))
    # A later run that keeps fewer deletes the extra ones on open.
    fewer = MessageLog(directory, recycle=0)
    fewer.open()
    fewer.stop()
    assert list_free(directory) == []


def test_a_reader_of_a_segment_reused_under_it_stops_there(tmp_path: Path) -> None:
    """A reader in another process (audit sql, replay) that opened a sealed segment before it was
    removed must not go on reading the records a reuse writes over it."""
    directory = tmp_path / "log"
    log = _started_log(directory)
    for seq in range(1, 301):
        log.append(KIND, fixed_body(seq))
    old = log.seal()
    assert old is not None
    for seq in range(301, 311):
        log.append(KIND, fixed_body(seq))
    log.seal()
    scan = SegmentScan(old.path, chunk=256)
    reading = iter(scan)
    seen = [next(reading).seq for _ in range(3)]
    log.remove_segments_before(311)
    log.append(KIND, fixed_body(311))
    log.seal()  # reuses the old segment's file
    new = [log.append(KIND, fixed_body(seq)) for seq in range(312, 500)]
    assert log.wait_durable(new[-1], timeout=30)
    seen += [record.seq for record in reading]
    log.stop()
    assert seen == list(range(1, len(seen) + 1)) and len(seen) < 300
    assert scan.reused and scan.problem is None


def test_a_segment_reused_between_the_open_and_the_header_read_is_reused_not_corrupt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reuse lands after the reader opened the file, before it read the header: the header is a
    newer segment's (FLAG_RECYCLED, first_seq above the name's): reused, no problem, no records."""
    import appliance.msglog.reader as reader_mod
    from appliance.msglog import fileio
    directory = tmp_path / "log"
    log, old = _log_whose_first_segment_can_be_freed(directory)
    old_ino = old.path.stat().st_ino
    real = fileio.no_readahead
    monkeypatch.setattr(reader_mod, "no_readahead", _reuse_on_read(log, old_ino))
    scan = SegmentScan(old.path)
    assert list(scan) == [] and scan.reused and scan.problem is None
    monkeypatch.setattr(reader_mod, "no_readahead", real)
    log.stop()
    assert os.stat(list_segments(directory)[-1].path).st_ino == old_ino  # it was reused


def test_damage_in_a_reused_segment_is_still_detected(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    s = Scenario(directory)
    new = s.put(40, lambda seq: 10 + seq % 31)
    s.log.seal()
    s.put(3)
    s.log.stop()
    reused = s.active
    # A flipped byte in a record of the sealed, reused segment: reported there, records before kept.
    data = bytearray(reused.path.read_bytes())
    at = FILE_HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(s.known[seq]) for seq in new[:20])
    data[at + RECORD_HEADER_SIZE + 2] ^= 0x40
    reused.path.write_bytes(bytes(data))
    problems: list[tuple[object, ...]] = []
    seqs = [r.seq for r in read_log(directory, on_problem=lambda *a: problems.append(a))]
    assert problems == [(reused, at, "corrupt")]
    assert set(new[:20]) <= set(seqs) and not set(new[20:]) & set(seqs)
    events: list[tuple[EventKind, dict[str, object]]] = []
    report = MessageLog(directory, on_event=lambda k, d: events.append((k, d))).open()
    assert report.corrupt == [(reused.path, at, "corrupt")] and events[0][0] is EventKind.LOG_CORRUPTION


def test_a_torn_record_at_the_end_of_a_reused_segment_is_cut_at_its_start(tmp_path: Path) -> None:
    """A record torn past the reused file's old size: cut at its start and reported as a torn tail,
    as in a segment that was not reused (its header, with the next seq, says it is ours)."""
    directory = tmp_path / "log"
    s = Scenario(directory, preallocate="none")
    old_size = s.active.path.stat().st_size
    kept = s.put(3)
    big = s.put(1, lambda seq: old_size)  # runs past the old end
    s.log.stop()
    data = s.active.path.read_bytes()
    s.active.path.write_bytes(data[:-5])  # torn inside the record, at the end of the file
    events: list[tuple[EventKind, dict[str, object]]] = []
    report = MessageLog(directory, on_event=lambda k, d: events.append((k, d))).open()
    end = FILE_HEADER_SIZE + 3 * (RECORD_HEADER_SIZE + BODY)
    assert report.torn_tail == (s.active.path, end, len(data) - 5 - end) and report.stale_tail is None
    assert report.last_seq == kept[-1] == big[0] - 1
    assert [k for k, _d in events] == [EventKind.LOG_TORN_TAIL]
    assert [r.seq for r in read_log(directory)][-3:] == kept


def test_an_older_header_under_a_newer_name_is_never_read_as_its_records(tmp_path: Path) -> None:
    """The safety net for a reused file whose new header did not reach the disk (the writer syncs
    it before the rename, so this needs a disk that reorders): the old records stay unread."""
    directory = tmp_path / "log"
    directory.mkdir()
    old = encode_file_header(1) + b"".join(encode_record(seq, KIND, fixed_body(seq)) for seq in range(1, 50))
    (directory / "00000000000000000100.seg").write_bytes(old)
    assert list(read_log(directory)) == []
    report = MessageLog(directory).open()
    assert report.last_seq == 99 and report.stale_tail == (directory / "00000000000000000100.seg", 0, len(old))
    assert (directory / "00000000000000000100.seg").read_bytes() == encode_file_header(100)


def test_a_state_dir_of_the_version_before_recycling_opens_and_then_recycles(tmp_path: Path) -> None:
    """Segments without flags and a preallocated tail of zeros, no free files: as the previous
    version leaves them."""
    directory = tmp_path / "log"
    directory.mkdir()
    first = encode_file_header(1) + b"".join(encode_record(seq, KIND, fixed_body(seq)) for seq in range(1, 101))
    second = encode_file_header(101) + b"".join(encode_record(seq, KIND, fixed_body(seq)) for seq in range(101, 121))
    (directory / "00000000000000000001.seg").write_bytes(first)
    (directory / "00000000000000000101.seg").write_bytes(second + bytes(1 << 16))
    log = MessageLog(directory, segment_max_age=None)
    report = log.open()
    assert (report.last_seq, report.torn_tail, report.stale_tail, report.corrupt) == (120, None, None, [])
    log.start()
    log.seal()
    assert log.remove_segments_before(101) == 1 and list_free(directory) == [directory / free_name(101)]
    log.append(KIND, fixed_body(121))
    log.seal()
    log.append(KIND, fixed_body(122))
    log.stop()
    assert log.stats["recycled"] == 1
    assert [r.seq for r in read_log(directory)] == list(range(101, 123))


def test_disk_full_while_taking_a_free_file_fails_cleanly_and_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    io = FaultyIO()
    log = _started_log(directory, io)
    failed: list[tuple[int, int, str]] = []
    log.add_failure_listener(lambda first, last, error: failed.append((first, last, error)))
    for seq in range(1, 51):
        log.append(KIND, fixed_body(seq))
    log.seal()
    log.append(KIND, fixed_body(51))
    log.seal()
    log.remove_segments_before(51)
    assert len(list_free(directory)) == 1
    log.append(KIND, fixed_body(52))
    assert log.wait_durable(52, timeout=30)
    io.space = 0  # the model refuses any write, even over allocated blocks
    log.seal()
    assert not log.healthy
    refused = log.append(KIND, fixed_body(53))
    assert not log.wait_durable(refused, timeout=30)
    io.space = None
    seq = log.append(KIND, fixed_body(54))
    assert log.wait_durable(seq, timeout=30) and log.healthy
    log.stop()
    assert failed and failed[0][0] == 53
    assert [r.seq for r in read_log(directory)] == [51, 52, 54]


def test_a_full_disk_gives_the_free_files_space_back(tmp_path: Path) -> None:
    """When preallocation (or a write) fails for want of space, the free files are deleted: their
    space is the log's reserve, not something to keep while publishes are refused."""
    directory = tmp_path / "log"
    io = FaultyIO()
    log = MessageLog(directory, io=io, segment_max_age=None, preallocate_bytes=4096)
    log.open()
    log.start()
    for seq in range(1, 101):
        log.append(KIND, fixed_body(seq))
    log.seal()
    log.append(KIND, fixed_body(101))
    log.seal()  # the active segment is a new file: the free one comes after
    assert log.remove_segments_before(101) == 1 and len(list_free(directory)) == 1
    assert log.wait_durable(log.last_seq, timeout=30)
    io.space = 3000  # preallocating 4 KiB no longer fits; the records themselves still do
    seqs = [log.append(KIND, fixed_body(seq)) for seq in range(102, 140)]
    assert log.wait_durable(seqs[-1], timeout=30)
    assert list_free(directory) == [] and log.healthy
    log.stop()
    assert [r.seq for r in read_log(directory)] == list(range(101, 140))


def _body(seq: int, round_: int = 0) -> bytes:
    """`round_` tells a record from one appended with the same seq in another round (after a power
    cut a seq that never became durable is handed out again): a resurrected old one reads wrong."""
    size = 30 + seq % 13
    return seq.to_bytes(8, "little") + round_.to_bytes(2, "little") + bytes([seq % 251]) * (size - 10)


def _power_cut_while_reusing(root: Path, rng: random.Random, mode: str, step: int) -> bool:
    """Cut the power at the step-th FileIO operation of: sealing the active segment, turning the
    free file into the new one, and appending records into it. Returns whether the cut happened."""
    io = CrashIO(root, rng=rng)
    io.crash_mode = mode
    directory = root / "log"
    log = MessageLog(directory, io=io, segment_max_age=None, policy=SyncPolicy(window=0.0))
    log.open()
    log.start()
    known: dict[int, bytes] = {}

    def put(n: int) -> None:
        for _ in range(n):
            seq = log.last_seq + 1
            known[seq] = _body(seq)
            log.append(KIND, known[seq])
        assert log.wait_durable(log.last_seq, timeout=30)

    put(60)
    log.seal()
    put(5)
    log.seal()
    assert log.remove_segments_before(61) == 1
    put(4)
    required = set(known)
    io.crash_at = io.ops + step
    try:
        log.seal()
    except OSError:
        pass
    for _ in range(30):
        if io.frozen:
            break
        seq = log.last_seq + 1
        known[seq] = _body(seq)
        log.append(KIND, known[seq])
        if log.wait_durable(seq, timeout=30):
            required.add(seq)
    cut = io.frozen
    if not cut:
        io.crash(mode)  # after the whole sequence: what was synced survives all the same
    io.crash_at = None
    log.stop()
    io.revive()
    assert all(parse_segment_name(n) is not None or parse_free_name(n) is not None for n in os.listdir(directory))
    again = MessageLog(directory, io=io)
    report = again.open()
    assert report.corrupt == []
    seqs = assert_segments_hold_only_their_records(directory, known)
    assert required - set(seqs) <= set(range(1, 61)), "durable records lost"  # 1..60 were removed on purpose
    assert not set(seqs) & set(range(1, 61)) or not list_free(directory), "a removed segment is both back and free"
    again.start()
    seq = again.append(KIND, _body(report.last_seq + 1))
    known[seq] = _body(seq)
    again.stop()
    assert_segments_hold_only_their_records(directory, known)
    return cut


@pytest.mark.parametrize("mode", CRASH_MODES)
def test_a_power_cut_at_every_step_of_reusing_a_free_file(tmp_path: Path, mode: str) -> None:
    rng = random.Random(mode)
    step = 1
    while _power_cut_while_reusing(tmp_path / str(step), rng, mode, step):
        step += 1
    assert step > 20  # the sequence has that many operations: every one of them was cut at


@pytest.mark.parametrize("seed", range(3))
def test_power_cuts_while_segments_are_removed_and_reused(tmp_path: Path, seed: int) -> None:
    """Random rounds of appends, seals, removals and reuses, each ended by a power cut at a random
    operation: nothing reported durable and not removed on purpose is lost, nothing stale is read."""
    rng = random.Random(13 + seed)
    io = CrashIO(tmp_path / "state", rng=rng)
    directory = tmp_path / "state" / "log"
    known: dict[int, bytes] = {}
    required: set[int] = set()
    removed_below = 0
    reused = 0
    for round_ in range(1, 31):
        log = MessageLog(directory, io=io, segment_max_age=None, segment_bytes=rng.choice([600, 2048, 4096]),
                         policy=SyncPolicy(window=rng.choice([0.0, 0.001])),
                         preallocate=rng.choice(["none", "fallocate", "zeros"]), preallocate_bytes=512)
        io.crash_at = io.ops + rng.randrange(1, 1500)
        try:
            log.open()
        except OSError:
            io.revive()
            continue
        seqs = assert_segments_hold_only_their_records(directory, known)
        missing = required - set(seqs)
        assert all(seq < removed_below for seq in missing), f"durable records lost: {sorted(missing)[:5]}"
        log.start()
        appended: list[int] = []
        for i in range(rng.randrange(50, 600)):
            if io.frozen:
                break
            seq = log.last_seq + 1
            known[seq] = _body(seq, round_)
            log.append(KIND, known[seq])
            appended.append(seq)
            roll = rng.random()
            if roll < 0.05:
                log.request_sync()
            elif roll < 0.08:
                log.seal()  # a failing roll degrades the log, it does not raise
            if rng.random() < 0.03:
                segments = list_segments(directory)
                if len(segments) > 2:
                    removed_below = max(removed_below, segments[-2].first_seq)
                    try:
                        log.remove_segments_before(segments[-2].first_seq)
                    except OSError:
                        break
        if not io.frozen:
            io.crash()
        io.crash_at = None
        reused += log.stats["recycled"]
        log.stop()
        io.revive()
        required |= {seq for seq in appended if log.wait_durable(seq, timeout=0)}
    assert reused >= 10 and io.crashes >= 20, (reused, io.crashes)


def test_the_audit_tail_and_replay_never_see_a_reused_segments_old_decisions(tmp_path: Path) -> None:
    """`appliance audit sql` (AuditQuery's tail) and `replay` (its log tail) decode the segments
    after the watermark in their own process: a reused segment's stale decisions stay unread."""
    from appliance.audit.layout import Watermark
    from appliance.audit.query import AuditQuery
    from appliance.audit.records import DECISION_COLUMNS
    from replay.sources import _tail_rows
    from tests.audit.test_compact import _record, _sink

    state = tmp_path / "state"
    log = _started_log(state / "log")
    sink = _sink(log)
    for i in range(200):
        _record(sink, i)
    log.seal()
    for i in range(200, 210):
        _record(sink, i)
    log.seal()
    assert log.remove_segments_before(list_segments(state / "log")[1].first_seq) == 1
    for i in range(210, 215):
        _record(sink, i)
    log.seal()  # reuses the first segment's file
    for i in range(215, 218):
        assert log.wait_durable(_record(sink, i), timeout=30)
    assert log.stats["recycled"] == 1
    newest = list_segments(state / "log")[-1]
    scan = read_segment(newest.path)
    assert len(list(scan)) > 3 and newest.path.stat().st_size > scan.end_offset + 1000  # stale decisions follow

    expected = sorted(b'{"t": %d}' % i for i in range(200, 218))
    payload = _tail_rows(state, Watermark(0, 0))
    at = list(DECISION_COLUMNS).index("payload")
    assert sorted(row[at] for row in payload) == expected
    query = AuditQuery(state)
    try:
        result = query.query("SELECT payload FROM decisions ORDER BY id")
    finally:
        query.close()
    log.stop()
    assert sorted(row[0] for row in result.rows) == expected


def test_a_purged_reused_segment_keeps_its_flag(tmp_path: Path) -> None:
    from appliance.audit.records import DECISION_COLUMNS
    from appliance.audit.rewrite import drop_payloads_in_segment
    from tests.audit.test_compact import _record, _sink

    directory = tmp_path / "log"
    log = _started_log(directory)
    sink = _sink(log, forward=False)
    for i in range(50):
        _record(sink, i)
    log.seal()
    _record(sink, 50)
    log.seal()
    log.remove_segments_before(list_segments(directory)[1].first_seq)
    _record(sink, 51)
    log.seal()  # the next segment is written over the free file
    for i in range(52, 80):
        _record(sink, i)
    reused = log.seal()
    log.stop()
    assert reused is not None and log.stats["recycled"] == 1
    verdict = list(DECISION_COLUMNS).index("verdict")
    assert drop_payloads_in_segment(reused.path, lambda row: row[verdict] == "reject")
    head = reused.path.read_bytes()[:FILE_HEADER_SIZE]
    assert decode_file_header(head) == reused.first_seq and file_header_flags(head) & FLAG_RECYCLED


def _restarted_over_free_files(directory: Path) -> MessageLog:
    """A log whose segment 1..1000 became a free file, then whose segments were all removed (the log
    directory emptied: seqs start over at 1, forward/outbox.py), the free file left behind."""
    log = _started_log(directory)
    for seq in range(1, 1011):
        log.append(KIND, fixed_body(seq))
        if seq == 1000:
            log.seal()
    assert log.wait_durable(1010, timeout=30)
    log.seal()
    assert log.remove_segments_before(1001) == 1
    log.stop()
    assert list_free(directory) == [directory / free_name(1001)]  # every seq in it is below 1001
    for info in list_segments(directory):
        info.path.unlink()
    again = MessageLog(directory, segment_max_age=None)
    report = again.open()
    assert report.last_seq == 0
    again.start()
    return again


def test_seqs_restart_with_free_files_left_over_read_no_old_records(tmp_path: Path) -> None:
    """The old records' seqs (1..1000) are above the new ones: in a reused file they would read as
    records of the new history (equal sizes: the 6th old record starts right at the end)."""
    directory = tmp_path / "log"
    log = _restarted_over_free_files(directory)
    assert log.stats["recycled"] == 0 and list_free(directory) == []  # refused and deleted
    new = [log.append(KIND, fixed_body(seq, BODY)[:8] + b"n" * (BODY - 8)) for seq in range(1, 6)]
    assert log.wait_durable(new[-1], timeout=30)
    assert [r.seq for r in read_log(directory)] == new
    assert [r.seq for r in LogFollower(directory).poll()] == new
    killed = tmp_path / "killed"
    shutil.copytree(directory, killed)  # what a kill -9 leaves
    log.stop()
    report = MessageLog(killed).open()
    assert (report.last_seq, report.stale_tail, report.torn_tail) == (5, None, None)
    assert [r.seq for r in read_log(killed)] == new


def test_seqs_restart_open_deletes_free_files_named_above_the_log(tmp_path: Path) -> None:
    """open() keeps only free files a segment after the log's last seq may take."""
    directory = tmp_path / "log"
    log = _restarted_over_free_files(directory)
    log.stop()
    (directory / free_name(1001)).write_bytes(b"x" * 100)  # as if left by the run before
    (directory / free_name(1)).write_bytes(b"x" * 100)  # at or below last_seq + 1: may be taken
    (directory / "free-junk.recycle").write_bytes(b"x")
    reopened = MessageLog(directory, segment_max_age=None)
    assert reopened.open().last_seq == 0
    assert sorted(os.listdir(directory)) == sorted([free_name(1), list_segments(directory)[0].path.name])
    reopened.stop()


def test_a_free_file_named_above_the_new_segment_is_not_reused(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = _restarted_over_free_files(directory)
    (directory / free_name(50)).write_bytes(encode_file_header(40) + encode_record(45, KIND, fixed_body(45)))
    log._free = [directory / free_name(50)]  # appeared while running (the check is at reuse, too)
    for seq in range(1, 11):
        log.append(KIND, fixed_body(seq))
    log.seal()
    log.stop()
    assert log.stats["recycled"] == 0 and list_free(directory) == []
    assert [r.seq for r in read_log(directory)] == list(range(1, 11))


@pytest.mark.parametrize("where", ["body", "seq"])
def test_damage_amid_the_records_of_a_reused_newest_segment_is_reported(tmp_path: Path, where: str) -> None:
    """A bit flipped in record 11 of 100 acknowledged records of a reused newest segment: the cut is
    reported (torn tail: the damaged record's header is ours; corruption: our records lie beyond
    the cut), never as a stale tail at info level. Stale tails themselves stay quiet (the tests
    above)."""
    directory = tmp_path / "log"
    s = Scenario(directory)
    acked = s.put(100, lambda seq: 23 + seq % 5)
    s.log.stop()  # a clean stop cuts only what is past the last record: the damage comes after
    data = bytearray(s.active.path.read_bytes())
    at = FILE_HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(s.known[seq]) for seq in acked[:10])
    data[at + (RECORD_HEADER_SIZE + 3 if where == "body" else RECORD_HEADER_SIZE - 8)] ^= 0x01
    data += encode_record(5, KIND, fixed_body(5)) * 3  # and a stale tail after it, as a reused file has
    s.active.path.write_bytes(bytes(data))
    events: list[EventKind] = []
    report = MessageLog(directory, on_event=lambda k, d: events.append(k)).open()
    assert report.last_seq == acked[9] and report.stale_tail is None
    if where == "body":
        assert report.torn_tail == (s.active.path, at, len(data) - at) and events == [EventKind.LOG_TORN_TAIL]
    else:
        assert report.corrupt == [(s.active.path, at, "corrupt")] and events == [EventKind.LOG_CORRUPTION]


def test_next_record_at_tells_our_records_from_stale_ones() -> None:
    """format.next_record_at over what recovery cuts: stale records (seqs below), ours (a CRC that
    checks out), a chance match of our seq in an old body (no CRC: not ours)."""
    from appliance.msglog.format import next_record_at
    stale = b"".join(encode_record(seq, KIND, fixed_body(seq)) for seq in range(1, 40))
    assert next_record_at(stale, 100) is None
    assert next_record_at(stale[5:], 100) is None
    assert next_record_at(encode_record(101, KIND, b"x")[:-1], 100) == 0  # torn, but ours
    chance = encode_record(3, KIND, (103).to_bytes(8, "little") * 4)
    assert next_record_at(b"junk" + chance, 100) is None
    ours = encode_record(102, KIND, b"y" * 30)
    assert next_record_at(b"\xff" * 20 + stale + ours + stale, 100) == 20 + len(stale)
    assert next_record_at(b"\xff" * 20 + stale + ours[:-1], 100) is None  # not whole: cannot check


def test_the_consoles_follower_stops_at_a_segment_reused_while_it_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower opens a sealed segment by name; before its read, the segment is removed and its
    file reused for a new segment: the read sees the new records under the old name. They must not
    be returned as the old segment's (duplicates, out of order): it stops there as if removed."""
    import builtins

    import appliance.console.follow as follow_mod
    directory = tmp_path / "log"
    log = _started_log(directory)
    for seq in range(1, 301):
        log.append(KIND, fixed_body(seq))
    assert log.wait_durable(300, timeout=30)
    follower = LogFollower(directory)
    assert [r.seq for r in follower.poll()] == list(range(1, 301))  # at the end of segment 1 (active)
    old = list_segments(directory)[0]
    for seq in range(301, 311):
        log.append(KIND, fixed_body(seq))
    log.seal()
    log.append(KIND, fixed_body(311))
    log.seal()  # 1 and 301 sealed, 312 active
    real_open = builtins.open

    def racing_open(path: object, *args: object, **kwargs: object) -> object:
        f = real_open(path, *args, **kwargs)  # type: ignore[call-overload]
        if Path(str(path)) == old.path:
            log.remove_segments_before(311)  # segment 1 becomes a free file
            log.append(KIND, fixed_body(312))
            log.seal()  # 313 reuses segment 1's file
            for seq in range(313, 713):
                log.append(KIND, fixed_body(seq))
            assert log.wait_durable(712, timeout=30)
        return f

    monkeypatch.setattr(follow_mod, "open", racing_open, raising=False)
    got = [r.seq for r in follower.poll()]
    monkeypatch.setattr(follow_mod, "open", real_open, raising=False)
    got += [r.seq for r in follower.poll()]
    log.stop()
    assert got == list(range(311, 713)), got[:20]  # 301..310 were removed too (below 311)


def test_stale_bytes_claiming_a_length_that_fits_are_not_read_at_every_poll(tmp_path: Path) -> None:
    """Past a reused segment's end, an old record's middle claims 8 MiB, which fits the ~16 MiB
    file: an idle follower read it at every poll, and a SegmentScan of the newest segment once per
    scan. A record longer than a chunk is read whole only if its header looks like ours; one of ours
    (the next seq) still is."""
    from appliance.console import follow
    from appliance.msglog import reader

    directory = tmp_path / "log"
    directory.mkdir()
    records = b"".join(encode_record(seq, KIND, fixed_body(seq)) for seq in range(1001, 1011))
    stale = struct.pack("<IIBQ", 0x12345678, 8 << 20, KIND, 99) + b"\x01" * (16 << 20)
    path = directory / "00000000000000001001.seg"
    path.write_bytes(encode_file_header(1001, FLAG_RECYCLED) + records + stale)
    follower = LogFollower(directory)
    assert [r.seq for r in follower.poll()] == list(range(1001, 1011))
    rchar = _rchar()
    for _ in range(5):
        assert follower.poll() == []
    assert _rchar() - rchar < 5 * 2 * follow.CHUNK
    rchar = _rchar()
    scan = read_segment(path)
    assert [r.seq for r in scan] == list(range(1001, 1011)) and scan.problem == "corrupt"
    assert _rchar() - rchar < 2 * reader.CHUNK + (1 << 16)
    # A long record of ours at the tail is still read whole, by both.
    big = encode_record(1011, KIND, b"b" * (3 << 20))
    with open(path, "r+b") as f:
        f.seek(FILE_HEADER_SIZE + len(records))
        f.write(big)
    assert [r.seq for r in follower.poll()] == [1011]
    assert [r.seq for r in read_segment(path)][-1] == 1011


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_the_seal_helper_never_converts_a_segment_reused_under_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_records on a segment that is removed and reused while it reads: a failure (the watermark
    must not move past a segment converted in part), not a quiet partial conversion."""
    import duckdb

    import appliance.msglog.reader as reader_mod
    from appliance.audit.seal import SegmentReused, load_records
    directory = tmp_path / "log"
    log, old = _log_whose_first_segment_can_be_freed(directory)
    monkeypatch.setattr(reader_mod, "no_readahead", _reuse_on_read(log, old.path.stat().st_ino))
    con = duckdb.connect()
    try:
        with pytest.raises(SegmentReused):
            load_records(con, [old], log_dir=directory)
    finally:
        con.close()
        log.stop()


def test_a_removed_segment_that_cannot_be_renamed_to_a_free_file_is_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    io = FaultyIO()
    log = _started_log(directory, io)
    for seq in range(1, 52):
        log.append(KIND, fixed_body(seq))
        if seq in (50, 51):
            log.seal()
    io.rename_error = errno.ENOSPC
    assert log.remove_segments_before(51) == 1
    io.rename_error = None
    assert list_free(directory) == [] and [s.first_seq for s in list_segments(directory)] == [51, 52]
    log.append(KIND, fixed_body(52))
    log.seal()
    log.stop()
    assert log.stats["recycled"] == 0 and [r.seq for r in read_log(directory)] == [51, 52]


def test_open_deletes_extra_free_files_even_if_the_directory_sync_fails(tmp_path: Path) -> None:
    """Deleting surplus free files on open is housekeeping: a failing directory fsync after it is
    logged, and the log opens (a free file that comes back is checked again before any reuse)."""

    class DirSyncFailsAfterUnlink(FaultyIO):
        armed = False

        def unlink(self, path: Path) -> None:
            super().unlink(path)
            self.armed = True

        def fsync_dir(self, path: Path) -> None:
            if self.armed:
                self.armed = False
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            super().fsync_dir(path)

    directory = tmp_path / "log"
    directory.mkdir()
    (directory / "00000000000000000100.seg").write_bytes(encode_file_header(100))
    for seq in (10, 20, 30):
        (directory / free_name(seq)).write_bytes(b"x" * 64)
    log = MessageLog(directory, io=DirSyncFailsAfterUnlink(), recycle=2)
    assert log.open().last_seq == 99
    assert list_free(directory) == [directory / free_name(10), directory / free_name(20)]
    log.stop()
