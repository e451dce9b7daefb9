"""Power cuts and process kills, on real files, with CrashIO modelling what was not synced.

Each round opens the log (recovering from the previous cut), appends from a thread while the writer
group-commits, and cuts the power at a random FileIO operation: mid-write, mid-sync, mid-roll or in
the middle of recovery itself. The next round checks that every record ever reported durable is
still there, intact and in order, and that nothing else (no foreign or damaged record) is.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from appliance.msglog import LogRecord, MessageLog, SyncPolicy, read_log
from appliance.msglog.testing import CRASH_MODES, CrashIO


def random_body(rng: random.Random, seq: int) -> bytes:
    return seq.to_bytes(8, "little") + rng.randbytes(rng.randrange(0, 200))


class Round:
    """One process lifetime: what it appended and what it was told."""

    def __init__(self) -> None:
        self.appended: dict[int, tuple[int, bytes]] = {}
        self.durable = 0
        self.failed: list[tuple[int, int, str]] = []
        self.synced_seq = 0

    def on_durable(self, seq: int) -> None:
        self.durable = max(self.durable, seq)

    def on_failed(self, first: int, last: int, error: str) -> None:
        self.failed.append((first, last, error))

    def reported_durable(self) -> set[int]:
        failed = {s for first, last, _ in self.failed for s in range(first, last + 1)}
        return {s for s in self.appended if s <= self.durable and s not in failed}


Known = dict[int, tuple[int, bytes]]


def check_log(directory: Path, known: Known, required: set[int]) -> Known:
    """Read the whole log after recovery: in order, nothing foreign, nothing required missing."""
    problems: list[object] = []
    records = list(read_log(directory, on_problem=lambda *a: problems.append(a)))
    assert problems == [], "a power cut must never damage a sealed segment"
    seqs = [r.seq for r in records]
    assert seqs == sorted(set(seqs)), "seqs must strictly increase across the log"
    for record in records:
        assert record.seq in known, f"record {record.seq} was never appended"
        assert (record.kind, record.body) == known[record.seq], f"record {record.seq} is damaged"
    missing = required - set(seqs)
    assert not missing, f"durable records lost: {sorted(missing)[:10]}"
    return {r.seq: (r.kind, r.body) for r in records}


def append_until(log: MessageLog, io: CrashIO, state: Round, rng: random.Random, limit: int,
                 on_limit: str = "crash") -> None:
    """The load: appends (with now and then a request_sync or a seal) until the power is cut."""
    for i in range(limit):
        if io.frozen:
            return
        body = random_body(rng, log.last_seq + 1)
        seq = log.append(1 + i % 255, body)
        state.appended[seq] = (1 + i % 255, body)
        roll = rng.random()
        if roll < 0.02:
            log.request_sync()
        elif roll < 0.025:
            try:
                log.seal()
            except OSError:
                return
    if on_limit == "crash":
        io.crash()
    else:
        io.kill()


def run_round(io: CrashIO, directory: Path, rng: random.Random, known: Known, required: set[int],
              *, mode: str, kill: bool = False) -> tuple[Known, set[int]]:
    policy = (SyncPolicy(window=rng.choice([0.0, 0.0005, 0.003]), max_pending_bytes=rng.choice([1, 600, 4096, 1 << 20]))
              if mode == "power_safe" else SyncPolicy(mode="os_buffered", interval=rng.choice([0.001, 0.01, 3600.0])))
    log = MessageLog(directory, io=io, policy=policy, segment_bytes=rng.choice([300, 2048, 16384]),
                     segment_max_age=rng.choice([None, 0.002]), preallocate=rng.choice(["none", "fallocate", "zeros"]),
                     preallocate_bytes=rng.choice([512, 8192]))
    state = Round()
    log.add_listener(state.on_durable)
    log.add_failure_listener(state.on_failed)
    if not kill:
        # Cut the power at a random operation from now: sometimes inside open() itself.
        io.crash_at = io.ops + rng.randrange(1, 400)
    try:
        log.open()
    except OSError:
        io.revive()
        return known, required  # the cut came during recovery: nothing new was promised
    on_disk = check_log(directory, known, required)
    # Everything a completed open() leaves on disk is durable from now on.
    known, required = dict(on_disk), set(on_disk)
    log.start()
    appender = threading.Thread(target=append_until,
                                args=(log, io, state, rng, rng.randrange(1, 3000), "kill" if kill else "crash"))
    appender.start()
    appender.join()
    if not io.frozen:  # the appender hit its limit first (a kill round, or a very late crash_at)
        io.kill() if kill else io.crash()
    state.synced_seq = log.synced_seq  # read after the cut: what was synced before it
    io.crash_at = None
    log.stop()  # the dead process's writer: everything it still tries fails
    io.revive()
    assert all("CrashIO" in error for *_, error in state.failed), state.failed
    known.update(state.appended)
    required |= state.reported_durable()
    return known, required


@pytest.mark.parametrize("seed", range(6))
def test_power_safe_loses_nothing_reported_durable(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    io = CrashIO(tmp_path / "state", rng=rng)
    directory = tmp_path / "state" / "log"
    known: Known = {}
    required: set[int] = set()
    for _ in range(25):
        known, required = run_round(io, directory, rng, known, required, mode="power_safe")
    assert io.crashes >= 25
    final = MessageLog(directory, io=io)
    final.open()
    check_log(directory, known, required)
    final.stop()
    assert len(required) > 0


@pytest.mark.parametrize("seed", range(3))
def test_os_buffered_loses_nothing_when_the_process_is_killed(tmp_path: Path, seed: int) -> None:
    rng = random.Random(100 + seed)
    io = CrashIO(tmp_path / "state", rng=rng)
    directory = tmp_path / "state" / "log"
    known: Known = {}
    required: set[int] = set()
    for _ in range(15):
        known, required = run_round(io, directory, rng, known, required, mode="os_buffered", kill=True)
    MessageLog(directory, io=io).open()
    check_log(directory, known, required)
    assert len(required) > 0


@pytest.mark.parametrize("seed", range(4))
def test_os_buffered_power_cut_loses_only_what_was_not_yet_synced(tmp_path: Path, seed: int) -> None:
    """The promise: a power cut loses at most the records written since the last periodic sync
    (`synced_seq`, at most `interval` old); everything synced before it survives."""
    rng = random.Random(200 + seed)
    io = CrashIO(tmp_path / "state", rng=rng)
    directory = tmp_path / "state" / "log"
    known: Known = {}
    required: set[int] = set()
    for _ in range(20):
        policy = SyncPolicy(mode="os_buffered", interval=rng.choice([0.0005, 0.005]))
        log = MessageLog(directory, io=io, policy=policy, segment_bytes=rng.choice([2048, 1 << 20]))
        state = Round()
        log.add_listener(state.on_durable)
        log.open()
        known = check_log(directory, known, required)
        required = set(known)
        log.start()
        for i in range(rng.randrange(1, 2000)):
            body = random_body(rng, log.last_seq + 1)
            state.appended[log.append(1, body)] = (1, body)
        io.crash()
        synced = log.synced_seq
        log.stop()
        io.revive()
        known.update(state.appended)
        required |= {s for s in state.appended if s <= synced}
    MessageLog(directory, io=io).open()
    check_log(directory, known, required)


@pytest.mark.parametrize("mode", CRASH_MODES)
def test_every_crash_mode_on_a_mid_batch_cut(tmp_path: Path, mode: str) -> None:
    rng = random.Random(mode)
    for attempt in range(10):
        root = tmp_path / f"{attempt}"
        io = CrashIO(root, rng=rng)
        directory = root / "log"
        log = MessageLog(directory, io=io, policy=SyncPolicy(window=3600, max_pending_bytes=1 << 30))
        log.open()
        log.start()
        bodies = {}
        for _ in range(50):
            body = random_body(rng, log.last_seq + 1)
            bodies[log.append(1, body)] = body
        log.request_sync()
        assert log.wait_durable(50, timeout=30)
        for _ in range(30):  # pending, unsynced: crashed in the middle of their write below
            body = random_body(rng, log.last_seq + 1)
            bodies[log.append(1, body)] = body
        io.crash_at = io.ops + 2  # the write happens, its sync does not
        log.request_sync()
        assert not log.wait_durable(80, timeout=30)
        log.stop()
        io.revive()
        again = MessageLog(directory, io=io)
        report = again.open()
        records = list(read_log(directory))
        assert records[:50] == [LogRecord(s, 1, bodies[s]) for s in range(1, 51)]
        assert all(r.body == bodies[r.seq] for r in records) and report.corrupt == []
        again.stop()


def test_unsynced_directory_creation_is_undone(tmp_path: Path) -> None:
    """CrashIO itself: the model must undo what was not synced, or the tests above prove nothing."""
    io = CrashIO(tmp_path / "root", rng=random.Random(1))
    (tmp_path / "root").mkdir(exist_ok=True)
    io.mkdir(tmp_path / "root" / "d")
    fd = io.open(tmp_path / "root" / "d" / "f", create=True)
    io.pwrite(fd, b"hello", 0)
    io.fdatasync(fd)
    io.crash("prefix")
    assert not (tmp_path / "root" / "d").exists()  # the directory's entry was never synced
    io.revive()
    io.makedirs(tmp_path / "root" / "d")
    fd = io.open(tmp_path / "root" / "d" / "f", create=True)
    io.pwrite(fd, b"hello", 0)
    io.fdatasync(fd)
    io.fsync_dir(tmp_path / "root" / "d")
    io.pwrite(fd, b" world", 5)
    io.crash("drop")
    assert (tmp_path / "root" / "d" / "f").read_bytes() == b"hello"
    io.revive()
    io.unlink(tmp_path / "root" / "d" / "f")
    io.crash("drop")
    assert (tmp_path / "root" / "d" / "f").read_bytes() == b"hello"  # the unlink was not synced
