"""The console's log follower against the real message log writer: only what was appended since the
last poll, across sealed segments, from a preallocated active segment."""

from __future__ import annotations

from pathlib import Path

from appliance.console.follow import LogFollower
from appliance.msglog import MessageLog


def writer(directory: Path, **options: object) -> MessageLog:
    log = MessageLog(directory, **options)  # type: ignore[arg-type]
    log.open()
    log.start(None)
    return log


def append(log: MessageLog, *bodies: bytes, kind: int = 1) -> None:
    seq = 0
    for body in bodies:
        seq = log.append(kind, body)
    assert log.wait_durable(seq, timeout=30)


def test_each_poll_returns_only_what_was_appended_since(tmp_path: Path) -> None:
    log = writer(tmp_path / "log")
    try:
        append(log, b"a", b"b")
        follower = LogFollower(tmp_path / "log")
        assert [r.body for r in follower.poll()] == [b"a", b"b"]  # the first poll: the newest segment
        assert follower.poll() == []
        append(log, b"c")
        append(log, b"x", kind=2)
        assert [r.body for r in follower.poll(lambda r: r.kind == 1)] == [b"c"]
        segment, offset = follower.position
        assert follower.poll() == [] and follower.position == (segment, offset)
    finally:
        log.stop()


def test_the_follower_moves_on_to_the_next_segment_after_a_seal(tmp_path: Path) -> None:
    log = writer(tmp_path / "log")
    try:
        append(log, b"one")
        follower = LogFollower(tmp_path / "log")
        assert [r.body for r in follower.poll()] == [b"one"]
        append(log, b"two")
        log.seal()
        append(log, b"three", b"four")
        log.seal()
        append(log, b"five")
        assert [r.body for r in follower.poll()] == [b"two", b"three", b"four", b"five"]
        seqs = [r.seq for r in follower.poll()]
        assert seqs == []
    finally:
        log.stop()


def test_a_record_bigger_than_a_read_chunk_is_read_whole(tmp_path: Path) -> None:
    log = writer(tmp_path / "log")
    try:
        follower = LogFollower(tmp_path / "log")
        append(log, b"small")
        assert len(follower.poll()) == 1
        big = bytes(range(256)) * 12_000  # ~3 MB: three read chunks
        append(log, big, b"after")
        assert [len(r.body) for r in follower.poll()] == [len(big), 5]
    finally:
        log.stop()


def test_a_removed_segment_is_skipped(tmp_path: Path) -> None:
    log = writer(tmp_path / "log")
    try:
        append(log, b"one")
        follower = LogFollower(tmp_path / "log")
        assert len(follower.poll()) == 1
        append(log, b"two")
        sealed = log.seal()
        assert sealed is not None
        append(log, b"three")
        log.remove_segments_before(log.last_seq)  # what retention does once converted and forwarded
        bodies = [r.body for r in follower.poll()]
        assert bodies[-1] == b"three"
    finally:
        log.stop()
