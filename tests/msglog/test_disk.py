"""Real disks: a small file system filling up (as root: a size-limited tmpfs and a loop-mounted
ext4 image), and a writer process killed with SIGKILL under load."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.msglog import LogRecord, MessageLog, SyncPolicy, read_log
from tests.helpers import wait_until


def body(seq: int) -> bytes:
    return (b"%d:" % seq) * (seq % 11 + 3)


def _run(*cmd: str | Path) -> bool:
    return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if request.param == "tmpfs":
        ok = _run("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt)
    else:
        image = tmp_path / "fs.img"
        with open(image, "wb") as f:
            f.truncate(2 << 20)
        ok = (shutil.which("mkfs.ext4") is not None and _run("mkfs.ext4", "-q", "-F", image)
              and _run("mount", "-o", "loop", image, mnt))
    if not ok:
        pytest.skip(f"cannot mount a {request.param} here")
    try:
        yield mnt
    finally:
        _run("umount", mnt) or _run("umount", "-l", mnt)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system with one file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            chunk = b"\xaa" * size
            while True:
                try:
                    if os.write(fd, chunk) < size:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        try:
            os.fsync(fd)
        except OSError:
            pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("preallocate", ["none", "fallocate", "zeros"])
def test_disk_full_on_a_real_file_system(small_fs: Path, preallocate: str) -> None:
    directory = small_fs / "log"
    events: list[str] = []
    log = MessageLog(directory, policy=SyncPolicy(window=0), on_event=lambda kind, detail: events.append(kind),
                     preallocate=preallocate, preallocate_bytes=16 * 1024)
    log.open()
    failed: list[tuple[int, int, str]] = []
    log.add_failure_listener(lambda first, last, error: failed.append((first, last, error)))
    log.start()
    filler = fill(small_fs)
    durable, lost = [], []
    for _ in range(20_000):  # what is left of the segment's last block fills first, then writes fail
        seq = log.append(1, body(log.last_seq + 1))
        (durable if log.wait_durable(seq, timeout=30) else lost).append(seq)
        if len(lost) >= 5:
            break
    assert len(lost) >= 5, "the file system never filled up"
    assert not log.healthy and log.lost >= 5 and events == ["log_degraded"]
    assert all("No space left on device" in error for *_, error in failed)
    on_disk = [r.seq for r in read_log(directory)]
    assert on_disk == durable  # every failed write was cut back off the segment

    filler.unlink()  # space returns: the writer notices by itself, no append needed
    wait_until(lambda: len(events) > 1, message="recovery after space returned")  # set healthy, then told
    assert log.healthy and events == ["log_degraded", "log_recovered"]
    more = [log.append(1, body(log.last_seq + 1)) for _ in range(20)]
    assert log.wait_durable(more[-1], timeout=30)
    log.stop()

    again = MessageLog(directory)
    report = again.open()
    again.stop()
    assert report.torn_tail is None and report.corrupt == []
    records = list(read_log(directory))
    assert [r.seq for r in records] == durable + more
    assert all(r == LogRecord(r.seq, 1, body(r.seq)) for r in records)
    assert not set(lost) & {r.seq for r in records}


def test_health_stays_down_while_the_disk_is_full(small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failed batch that got part way is cut back, which frees its pages, and then the next small
    write fits: health must stay down until the file system has headroom again (it flapped on a
    full disk: log_degraded, then log_recovered 21 ms later, while QoS 1/2 was accepted again)."""
    caplog.set_level(logging.DEBUG, logger="appliance.msglog.log")
    directory = small_fs / "log"
    events: list[str] = []
    log = MessageLog(directory, policy=SyncPolicy(window=0), on_event=lambda kind, detail: events.append(kind),
                     preallocate="none")
    log.open()
    log.start()
    try:
        filler = fill(small_fs)
        os.truncate(filler, filler.stat().st_size - 3 * 4096)  # three pages free
        big = log.append(1, b"b" * 40_000)
        assert not log.wait_durable(big, timeout=30)
        assert not log.healthy and events == ["log_degraded"]
        small = [log.append(1, body(log.last_seq + 1)) for _ in range(5)]
        assert log.wait_durable(small[-1], timeout=30)  # written and durable, but still nearly full
        assert not log.healthy and events == ["log_degraded"]
        wait_until(lambda: "still less than" in caplog.text, message="the writer's probe")
        assert not log.healthy and events == ["log_degraded"]

        filler.unlink()  # space returns: healthy again within a probe interval
        wait_until(lambda: len(events) > 1, message="recovery after space returned")  # set healthy, then told
        assert log.healthy and events == ["log_degraded", "log_recovered"]
        more = log.append(1, body(log.last_seq + 1))
        assert log.wait_durable(more, timeout=30)
    finally:
        log.stop()
    assert [r.seq for r in read_log(directory)] == [*small, more]


def assert_a_start_on_a_full_disk_recovers(fs: Path, policy: SyncPolicy) -> None:
    """A log of a previous run in fs/log, then every free byte of `fs` taken: the log starts unhealthy
    (log_degraded) and turns healthy (log_recovered) once the space returns."""
    directory = fs / "log"
    previous = MessageLog(directory)  # the log of a previous run
    previous.open()
    previous.stop()
    filler = fill(fs)
    events: list[str] = []
    log = MessageLog(directory, policy=policy, on_event=lambda kind, detail: events.append(kind))
    log.start()
    try:
        assert not log.healthy and events == ["log_degraded"]
        filler.unlink()
        wait_until(lambda: len(events) > 1, message="recovery after space returned")  # set healthy, then told
        assert log.healthy and events == ["log_degraded", "log_recovered"]
    finally:
        log.stop()


def test_started_on_a_full_disk_it_is_unhealthy_until_space_returns(small_fs: Path) -> None:
    assert_a_start_on_a_full_disk_recovers(small_fs, SyncPolicy())


def test_a_large_sync_bytes_does_not_keep_it_unhealthy(tmp_path: Path) -> None:
    """Two batches of 64 MiB would be more headroom than this 16 MiB file system can ever have: the
    headroom is capped (MAX_HEADROOM), so it recovers once space returns."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt):
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert_a_start_on_a_full_disk_recovers(mnt, SyncPolicy(max_pending_bytes=64 << 20))
    finally:
        _run("umount", mnt) or _run("umount", "-l", mnt)


def test_as_root_the_reserved_blocks_count_as_headroom(tmp_path: Path) -> None:
    """ext4 keeps blocks only root may use (here 10%): an unprivileged process filled the disk up to
    them, root's log can still write there, so it is healthy (f_bavail, ~0 here, kept it unhealthy
    with room to spare)."""
    if os.geteuid() != 0 or not shutil.which("mount") or not shutil.which("mkfs.ext4"):
        pytest.skip("mounting an ext4 image needs root")
    mnt, image = tmp_path / "mnt", tmp_path / "fs.img"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    if not (_run("mkfs.ext4", "-q", "-F", "-m", "10", image) and _run("mount", "-o", "loop", image, mnt)):
        pytest.skip("cannot mount an ext4 image here")
    try:
        previous = MessageLog(mnt / "log")  # the log of a previous run
        previous.open()
        previous.stop()
        with open(mnt / "filler", "wb") as filler:  # written by nobody: up to the reserved blocks
            done = subprocess.run(["dd", "if=/dev/zero", "bs=4096"], stdout=filler, stderr=subprocess.PIPE,
                                  user=65534, group=65534, extra_groups=[])
        assert b"No space left" in done.stderr, done.stderr
        fs = os.statvfs(mnt)
        assert fs.f_bavail * fs.f_frsize < 16 * 1024 and fs.f_bfree * fs.f_frsize > 256 * 1024
        events: list[str] = []
        log = MessageLog(mnt / "log", on_event=lambda kind, detail: events.append(kind))
        log.start()
        try:
            assert log.healthy and events == []
            assert log.wait_durable(log.append(1, body(1)), timeout=30)
        finally:
            log.stop()
        assert events == []
    finally:
        _run("umount", mnt) or _run("umount", "-l", mnt)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from appliance.msglog import MessageLog, SyncPolicy

    def body(seq):
        return (b"%d:" % seq) * (seq % 11 + 3)

    log = MessageLog(Path(sys.argv[1]), policy=SyncPolicy(mode=sys.argv[2], interval=0.05),
                     segment_bytes=int(sys.argv[3]))
    log.open()
    out = sys.stdout
    log.add_listener(lambda seq: (out.write(f"{seq}\\n"), out.flush()))
    log.start()
    while True:
        log.append(1 + log.last_seq % 200, body(log.last_seq + 1))
""")


@pytest.mark.parametrize("mode", ["power_safe", "os_buffered"])
def test_kill_9_under_load_loses_nothing_reported_durable(tmp_path: Path, mode: str) -> None:
    rng = random.Random(mode)
    directory = tmp_path / "log"
    required = 0
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), mode, str(rng.choice([4096, 1 << 20]))],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        target = required + rng.randrange(500, 5000)
        reported = required
        for line in child.stdout:
            reported = max(reported, int(line))
            if reported >= target:
                break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert reported >= target, "the writer process stopped reporting"
        log = MessageLog(directory)
        log.open()
        log.stop()
        records = list(read_log(directory))
        assert all(r == LogRecord(r.seq, 1 + (r.seq - 1) % 200, body(r.seq)) for r in records)
        seqs = [r.seq for r in records]
        assert seqs[:reported] == list(range(1, reported + 1)), "a record reported durable is missing"
        required = reported


def _write_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes"))


def test_a_reader_at_the_tail_does_not_multiply_the_bytes_each_sync_writes(tmp_path: Path):
    """The outbox reads the active segment right behind the writer. If its reads went ahead into the
    preallocated tail, the page cache there would hold large folios, and every append dirtying one
    would write it whole: ~90 KB per sync of 3 KB measured (docs/performance.md)."""
    from appliance.forward.logtail import SegmentFiles

    log = MessageLog(tmp_path / "log", segment_max_age=None)
    log.open()
    log.start(None)
    files = SegmentFiles(tmp_path / "log")  # the outbox's positioned reads
    try:
        before, syncs = _write_bytes(), log.stats["syncs"]
        end = 16
        for _ in range(200):
            seq = log.append(1, b"x" * 3000)
            log.request_sync()
            assert log.wait_durable(seq, timeout=30)
            end += 3000 + 17
            files.pread(1, end, 65536)  # what comes next, if anything (the tail's first read)
        written, syncs = _write_bytes() - before, log.stats["syncs"] - syncs
    finally:
        files.close()
        log.stop()
    if written == 0:
        pytest.skip("this file system does not count written bytes (tmpfs?)")
    assert written / syncs <= 4 * 4096  # 3 KB a sync: one or two pages
