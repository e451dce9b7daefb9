"""The writer: appends, group commit and its triggers, segments, recovery on open, failures."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.msglog import (
    FormatError,
    LogClosed,
    LogRecord,
    MessageLog,
    SegmentInfo,
    SyncPolicy,
    list_segments,
    read_log,
)
from appliance.msglog.format import FILE_HEADER_SIZE, encode_record
from appliance.msglog.testing import FaultyIO
from tests.helpers import wait_until

HOUR = 3600.0
# A policy that never syncs by itself: only max_pending_bytes or request_sync() trigger a sync.
PATIENT = SyncPolicy(window=HOUR, max_pending_bytes=1 << 30)


def body(seq: int) -> bytes:
    return f"record {seq} ".encode() * (seq % 7 + 1)


class Recorder:
    """Everything a log reports, from whichever thread it reports it."""

    def __init__(self, log: MessageLog):
        self.durable: list[int] = []
        self.failed: list[tuple[int, int, str]] = []
        self.threads: set[str] = set()
        log.add_listener(self.on_durable)
        log.add_failure_listener(self.on_failed)

    def on_durable(self, seq: int) -> None:
        self.durable.append(seq)
        self.threads.add(threading.current_thread().name)

    def on_failed(self, first: int, last: int, error: str) -> None:
        self.failed.append((first, last, error))


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "state" / "log"


def started(directory: Path, **kwargs: object) -> MessageLog:
    log = MessageLog(directory, **kwargs)  # type: ignore[arg-type]
    log.open()
    log.start()
    return log


@pytest.fixture
def running(directory: Path) -> Iterator[MessageLog]:
    log = started(directory)
    yield log
    log.stop()


def test_appends_are_durable_and_read_back_in_order(directory: Path) -> None:
    log = started(directory)
    recorder = Recorder(log)
    seqs = [log.append(1 + i % 3, body(i)) for i in range(1, 501)]
    assert seqs == list(range(1, 501)) and log.last_seq == 500
    assert log.wait_durable(500, timeout=30)
    log.stop()
    assert recorder.durable[-1] == 500 and recorder.durable == sorted(recorder.durable)
    assert recorder.threads == {"msglog-writer"}  # no loop: listeners run on the writer thread
    assert list(read_log(directory)) == [LogRecord(i, 1 + i % 3, body(i)) for i in range(1, 501)]
    assert log.stats["records"] == 500 and log.stats["syncs"] >= 1 and log.durable_seq == 500
    assert log.stats["bytes_appended"] == sum(17 + len(body(i)) for i in range(1, 501))


def test_reopen_continues_after_the_last_record(directory: Path) -> None:
    log = started(directory)
    for i in range(10):
        log.append(1, b"a")
    log.stop()
    again = MessageLog(directory)
    report = again.open()
    assert (report.last_seq, report.torn_tail, report.corrupt, report.created) == (10, None, [], False)
    assert again.durable_seq == 10
    again.start()
    assert again.append(2, b"b") == 11
    again.stop()
    assert [r.seq for r in read_log(directory)] == list(range(1, 12))


def test_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "log"
    report = MessageLog(directory).open()
    assert report.created and directory.is_dir() and [s.first_seq for s in list_segments(directory)] == [1]


def test_append_refuses_before_open(directory: Path) -> None:
    log = MessageLog(directory)
    with pytest.raises(LogClosed):
        log.append(1, b"too early")
    log.stop()  # nothing to stop


def test_append_validates_and_refuses_after_stop(running: MessageLog) -> None:
    with pytest.raises(FormatError):
        running.append(0, b"")
    with pytest.raises(FormatError):
        running.append(256, b"")
    running.stop()
    with pytest.raises(LogClosed):
        running.append(1, b"late")


def test_nothing_syncs_before_the_window_unless_asked(directory: Path) -> None:
    log = started(directory, policy=PATIENT)
    seq = log.append(1, b"waiting")
    assert not log.wait_durable(seq, timeout=0)
    log.request_sync()
    assert log.wait_durable(seq, timeout=30)
    log.stop()


def test_max_pending_bytes_triggers_a_sync(directory: Path) -> None:
    log = started(directory, policy=SyncPolicy(window=HOUR, max_pending_bytes=1000))
    first = log.append(1, b"x" * 100)
    assert not log.wait_durable(first, timeout=0)
    seqs = [log.append(1, b"x" * 100) for _ in range(10)]
    assert log.wait_durable(seqs[-1], timeout=30)
    log.stop()


def test_the_window_elapsing_triggers_a_sync(directory: Path) -> None:
    log = started(directory, policy=SyncPolicy(window=0.01, max_pending_bytes=1 << 30))
    assert log.wait_durable(log.append(1, b"x"), timeout=30)
    log.stop()


def test_records_after_a_sync_are_synced_by_the_window_without_waking_the_writer(directory: Path) -> None:
    # After a sync the writer looks again a window later by itself, so append() does not wake it;
    # once a look finds nothing it is idle and the next append() wakes it again. Either way every
    # record becomes durable within the window, without request_sync().
    log = started(directory, policy=SyncPolicy(window=0.02, max_pending_bytes=1 << 30))
    for round_ in range(5):
        seqs = [log.append(1, b"r%d-%d" % (round_, i)) for i in range(3)]
        assert log.wait_durable(seqs[-1], timeout=30)
    wait_until(lambda: log._tick_at is None, message="the writer idle after a look found nothing")  # noqa: SLF001
    assert log.wait_durable(log.append(1, b"after idle"), timeout=30)
    log.stop()
    bodies = [r.body for r in read_log(directory)]
    assert len(bodies) == 16 and bodies[-1] == b"after idle"


def test_stop_syncs_what_is_pending(directory: Path) -> None:
    log = started(directory, policy=PATIENT)
    recorder = Recorder(log)
    for _ in range(5):
        log.append(1, b"pending")
    log.stop()
    assert recorder.durable == [5] and log.stats["syncs"] == 1
    assert len(list(read_log(directory))) == 5


def test_listeners_run_on_the_loop(directory: Path) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        log = MessageLog(directory)
        log.open()
        recorder = Recorder(log)
        log.start(loop)
        seq = log.append(1, b"x")
        wait_until(lambda: recorder.durable and recorder.durable[-1] == seq, message="durable on the loop")
        assert recorder.threads == {"test-loop"}
        assert wait_until(lambda: log.durable_seq == seq)
        log.stop()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_os_buffered_is_durable_once_written_and_synced_later(directory: Path) -> None:
    log = started(directory, policy=SyncPolicy(mode="os_buffered", interval=HOUR))
    seq = log.append(1, b"x")
    assert log.wait_durable(seq, timeout=30)
    assert log.stats["syncs"] == 0 and log.synced_seq == 0
    log.stop()  # stop syncs
    assert log.stats["syncs"] == 1 and log.synced_seq == seq


def test_os_buffered_syncs_every_interval(directory: Path) -> None:
    log = started(directory, policy=SyncPolicy(mode="os_buffered", interval=0.01))
    seq = log.append(1, b"x")
    wait_until(lambda: log.synced_seq == seq, message="periodic sync")
    log.stop()


def test_segments_roll_by_size_and_seal_in_order(directory: Path) -> None:
    sealed: list[SegmentInfo] = []
    log = started(directory, segment_bytes=1024, on_seal=sealed.append,
                  policy=SyncPolicy(window=0, max_pending_bytes=1))
    for i in range(1, 201):
        log.append(1, body(i))
        if i % 10 == 0:
            assert log.wait_durable(i, timeout=30)
    log.stop()
    segments = list_segments(directory)
    assert len(segments) > 3 and log.stats["segments"] == len(segments)
    assert sealed == segments[:-1]
    for info in segments[:-1]:
        assert info.path.stat().st_size >= 1024
    assert list(read_log(directory)) == [LogRecord(i, 1, body(i)) for i in range(1, 201)]
    for info, after in zip(segments, segments[1:]):
        assert max(r.seq for r in read_log(directory, from_seq=info.first_seq, upto_seq=after.first_seq - 1)) \
            == after.first_seq - 1


def test_segments_roll_by_age_only_when_not_empty(directory: Path) -> None:
    sealed: list[SegmentInfo] = []
    log = started(directory, segment_max_age=0.01, on_seal=sealed.append)
    assert log.wait_durable(log.append(1, b"old"), timeout=30)
    wait_until(lambda: sealed, message="an age roll")
    assert sealed[0].first_seq == 1
    assert log.seal() is None  # the new segment is empty: nothing to roll
    log.stop()
    assert len(sealed) == 1 and [s.first_seq for s in list_segments(directory)] == [1, 2]


def test_seal_and_remove_segments_before(directory: Path) -> None:
    log = started(directory)
    for i in range(1, 11):
        log.append(1, body(i))
    first = log.seal()
    assert first == SegmentInfo(directory / "00000000000000000001.seg", 1)
    for i in range(11, 21):
        log.append(1, body(i))
    assert log.seal() is not None
    log.append(1, body(21))
    assert [s.first_seq for s in list_segments(directory)] == [1, 11, 21]
    assert log.remove_segments_before(10) == 0  # segment 1 still holds seq 10
    assert log.remove_segments_before(11) == 1
    assert log.remove_segments_before(10**9) == 1  # never the active segment
    assert [s.first_seq for s in list_segments(directory)] == [21]
    log.stop()
    assert [r.seq for r in read_log(directory)] == [21]
    assert log.stats["segments"] == 1


# --- recovery on open ---------------------------------------------------------------------------


def write_log(directory: Path, n: int, **kwargs: object) -> MessageLog:
    log = started(directory, **kwargs)
    for i in range(1, n + 1):
        log.append(1, body(i))
    log.stop()
    return log


@pytest.mark.parametrize("cut", [1, 10, 17, 18, 30])
def test_torn_tail_is_cut_on_open(directory: Path, cut: int) -> None:
    write_log(directory, 20)
    newest = list_segments(directory)[-1].path
    good = newest.stat().st_size
    with open(newest, "ab") as f:
        f.write(encode_record(21, 1, b"y" * 20)[:cut])
    events: list[tuple[str, dict[str, object]]] = []
    log = MessageLog(directory, on_event=lambda kind, detail: events.append((kind, detail)))
    report = log.open()
    assert report.torn_tail == (newest, good, cut) and report.last_seq == 20
    assert newest.stat().st_size == good
    assert [kind for kind, _ in events] == ["log_torn_tail"]
    log.start()
    assert log.append(1, body(21)) == 21
    log.stop()
    assert list(read_log(directory)) == [LogRecord(i, 1, body(i)) for i in range(1, 22)]


def test_flipped_byte_in_the_newest_segment_cuts_from_there(directory: Path) -> None:
    write_log(directory, 20)
    newest = list_segments(directory)[-1].path
    data = bytearray(newest.read_bytes())
    offset = FILE_HEADER_SIZE + sum(17 + len(body(i)) for i in range(1, 16))
    data[offset + 20] ^= 0x10
    newest.write_bytes(bytes(data))
    log = MessageLog(directory)
    report = log.open()
    assert report.torn_tail == (newest, offset, len(data) - offset) and report.last_seq == 15
    log.stop()
    assert [r.seq for r in read_log(directory)] == list(range(1, 16))


def test_zero_filled_tail_is_cut_silently(directory: Path) -> None:
    write_log(directory, 5)
    newest = list_segments(directory)[-1].path
    good = newest.stat().st_size
    with open(newest, "ab") as f:
        f.write(bytes(10000))
    log = MessageLog(directory)
    report = log.open()
    assert report.torn_tail is None and newest.stat().st_size == good and report.last_seq == 5
    log.stop()


def test_newest_segment_with_a_torn_file_header(directory: Path) -> None:
    write_log(directory, 5)
    (directory / "00000000000000000009.seg").write_bytes(b"MQL")
    log = MessageLog(directory)
    report = log.open()
    assert report.last_seq == 8 and report.torn_tail is not None
    log.start()
    assert log.append(1, b"z") == 9
    log.stop()
    assert [r.seq for r in read_log(directory)] == [1, 2, 3, 4, 5, 9]


def test_corruption_in_a_sealed_segment_is_reported_and_later_segments_still_read(directory: Path) -> None:
    log = started(directory)
    for i in range(1, 31):
        log.append(1, body(i))
        if i % 10 == 0:
            log.seal()
    log.stop()
    segments = list_segments(directory)
    data = bytearray(segments[1].path.read_bytes())
    offset = FILE_HEADER_SIZE + sum(17 + len(body(i)) for i in range(11, 14))
    data[offset + 5] ^= 0x01
    segments[1].path.write_bytes(bytes(data))
    events: list[tuple[str, dict[str, object]]] = []
    again = MessageLog(directory, on_event=lambda kind, detail: events.append((kind, detail)))
    report = again.open()
    assert report.corrupt == [(segments[1].path, offset, "corrupt")] and report.last_seq == 30
    assert events == [("log_corruption", {"segment": str(segments[1].path), "offset": offset, "problem": "corrupt"})]
    again.start()
    assert again.append(1, body(31)) == 31
    again.stop()
    assert [r.seq for r in read_log(directory)] == list(range(1, 14)) + list(range(21, 32))


@pytest.mark.parametrize("preallocate", ["fallocate", "zeros"])
def test_preallocated_segments_read_and_reopen(directory: Path, preallocate: str) -> None:
    log = started(directory, preallocate=preallocate, preallocate_bytes=64 * 1024, segment_bytes=32 * 1024)
    for i in range(1, 301):
        log.append(1, body(i))
        if i % 50 == 0:
            assert log.wait_durable(i, timeout=30)
            active = list_segments(directory)[-1].path
            assert active.stat().st_size >= 64 * 1024  # the zero tail reads as end meanwhile
            assert [r.seq for r in read_log(directory)] == list(range(1, i + 1))
    log.stop()
    for info in list_segments(directory):  # sealed and closed segments are cut to their last record
        assert info.path.stat().st_size < 64 * 1024
    assert [r.seq for r in read_log(directory)] == list(range(1, 301))


# --- failures -------------------------------------------------------------------------------------


def test_disk_full_fails_the_batch_and_recovers_by_itself(directory: Path) -> None:
    io = FaultyIO()
    events: list[tuple[str, dict[str, object]]] = []
    log = MessageLog(directory, io=io, policy=SyncPolicy(window=0),
                     on_event=lambda kind, detail: events.append((kind, detail)))
    log.open()
    recorder = Recorder(log)
    log.start()
    assert log.wait_durable(log.append(1, body(1)), timeout=30)
    good_end = FILE_HEADER_SIZE + 17 + len(body(1))
    io.space = 10  # room for a few bytes: a short write, then ENOSPC
    seq = log.append(1, body(2))
    assert not log.wait_durable(seq, timeout=30)
    assert recorder.failed == [(2, 2, "OSError: No space left on device")]
    assert not log.healthy and log.lost == 1 and log.stats["failed_batches"] == 1
    assert events == [("log_degraded", {"error": "OSError: No space left on device"})]
    assert list_segments(directory)[-1].path.stat().st_size == good_end  # cut back to the last good end
    io.space = None  # space is freed: the writer's probe notices without any new append
    wait_until(lambda: log.healthy, message="recovery")
    assert events[-1] == ("log_recovered", {})
    assert log.wait_durable(log.append(1, body(3)), timeout=30)
    log.stop()
    assert 2 not in recorder.durable
    assert list(read_log(directory)) == [LogRecord(1, 1, body(1)), LogRecord(3, 1, body(3))]


def test_failed_sync_fails_the_batch_in_power_safe_mode(directory: Path) -> None:
    io = FaultyIO()
    log = MessageLog(directory, io=io, policy=SyncPolicy(window=0))
    log.open()
    recorder = Recorder(log)
    log.start()
    io.sync_error = errno.EIO
    seqs = [log.append(1, body(i)) for i in range(1, 4)]
    assert not log.wait_durable(seqs[-1], timeout=30)
    assert not log.healthy and recorder.failed and all(error.startswith("OSError") for *_, error in recorder.failed)
    assert sum(last - first + 1 for first, last, _ in recorder.failed) == 3 == log.lost
    io.sync_error = None
    assert log.wait_durable(log.append(1, body(4)), timeout=30)
    assert log.healthy
    log.stop()
    assert list(read_log(directory)) == [LogRecord(4, 1, body(4))]


def test_failed_sync_in_os_buffered_mode_degrades_but_fails_nothing(directory: Path) -> None:
    io = FaultyIO()
    events: list[str] = []
    log = MessageLog(directory, io=io, policy=SyncPolicy(mode="os_buffered", interval=0.01),
                     on_event=lambda kind, detail: events.append(kind))
    log.open()
    recorder = Recorder(log)
    log.start()
    io.sync_error = errno.EIO
    seq = log.append(1, b"x")
    assert log.wait_durable(seq, timeout=30)
    wait_until(lambda: not log.healthy, message="degraded")
    assert log.synced_seq == 0 and recorder.failed == [] and log.lost == 0
    io.sync_error = None
    wait_until(lambda: log.healthy, message="recovered")
    assert log.synced_seq == seq and events == ["log_degraded", "log_recovered"]
    log.stop()


def test_segment_creation_failing_fails_batches_until_it_works(directory: Path) -> None:
    io = FaultyIO()
    log = MessageLog(directory, io=io, segment_bytes=100, policy=SyncPolicy(window=0))
    log.open()
    recorder = Recorder(log)
    log.start()
    assert log.wait_durable(log.append(1, b"x" * 100), timeout=30)
    io.create_error = errno.ENOSPC
    seq = log.append(1, b"y")  # the segment is full: rolling needs a new file, which fails
    assert not log.wait_durable(seq, timeout=30)
    assert recorder.failed[0][:2] == (seq, seq) and not log.healthy
    io.create_error = None
    wait_until(lambda: log.healthy, message="recovery")
    assert log.wait_durable(log.append(1, b"z"), timeout=30)
    log.stop()
    assert [r.body for r in read_log(directory)] == [b"x" * 100, b"z"]


def test_wait_durable_from_many_threads(directory: Path) -> None:
    log = started(directory, policy=SyncPolicy(window=0.002))
    results: list[bool] = []

    def producer() -> None:
        for i in range(200):
            results.append(log.wait_durable(log.append(1, body(i)), timeout=30))

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.stop()
    assert results == [True] * 800
    assert [r.seq for r in read_log(directory)] == list(range(1, 801))


def test_a_segment_rolled_by_age_between_batches_names_the_next_record(directory: Path) -> None:
    # segment_max_age=0: every timer check rolls, so rolls race with batches being taken and written.
    sealed: list[SegmentInfo] = []
    log = started(directory, segment_max_age=0.0, on_seal=sealed.append, policy=SyncPolicy(window=0))
    for i in range(1, 301):
        log.append(1, body(i))
        if i % 3 == 0:
            assert log.wait_durable(i, timeout=30)
    log.stop()
    assert len(sealed) > 10
    assert list(read_log(directory)) == [LogRecord(i, 1, body(i)) for i in range(1, 301)]


@pytest.mark.parametrize("preallocate", ["none", "zeros"])
def test_a_reader_follows_the_log_while_it_is_written(directory: Path, preallocate: str) -> None:
    log = started(directory, segment_bytes=4096, preallocate=preallocate, preallocate_bytes=8192,
                  policy=SyncPolicy(window=0.001))
    total = 3000

    def produce() -> None:
        for i in range(1, total + 1):
            log.append(1, body(i))
            if i % 100 == 0:
                log.wait_durable(i, timeout=30)

    producer = threading.Thread(target=produce)
    producer.start()
    seen: list[LogRecord] = []
    problems: list[object] = []
    while len(seen) < total:  # reads as fast as it can: every pass sees a prefix of the log
        after = seen[-1].seq if seen else 0
        seen.extend(read_log(directory, from_seq=after + 1, on_problem=lambda *a: problems.append(a)))
    producer.join()
    log.stop()
    assert problems == []
    assert seen == [LogRecord(i, 1, body(i)) for i in range(1, total + 1)]


def test_on_seal_may_remove_segments(directory: Path) -> None:
    # on_seal runs on the writer thread; calling back into the log from there must not deadlock.
    removed: list[int] = []
    holder: list[MessageLog] = []
    log = started(directory, on_seal=lambda info: removed.append(holder[0].remove_segments_before(10**9)))
    holder.append(log)
    for _ in range(3):
        log.append(1, b"x")
        log.seal()
    log.stop()
    assert removed == [1, 1, 1] and len(list_segments(directory)) == 1


def test_an_age_roll_that_cannot_create_a_segment_waits_for_the_probe(directory: Path) -> None:
    io = FaultyIO()
    sealed: list[SegmentInfo] = []
    log = MessageLog(directory, io=io, segment_max_age=0.0, on_seal=sealed.append)
    log.open()
    log.start()
    io.create_error = errno.ENOSPC
    assert log.wait_durable(log.append(1, b"x"), timeout=30)
    wait_until(lambda: sealed and not log.healthy, message="a failed roll")
    failures = io.failures
    seq = log.append(1, b"y")
    assert not log.wait_durable(seq, timeout=30)  # no segment to write to: the batch fails
    assert io.failures <= failures + 2, "the writer must not spin on a segment it cannot create"
    io.create_error = None
    wait_until(lambda: log.healthy, message="recovery")
    assert log.wait_durable(log.append(1, b"z"), timeout=30)
    log.stop()
    assert [r.body for r in read_log(directory)] == [b"x", b"z"]
