"""Power cuts while sealed segments become Parquet: CrashIO (appliance/msglog/testing.py) under the
audit's own file operations, the way tests/msglog/test_powerloss.py puts it under the log.

One lifetime of the service's sealing cycle is run for real: AuditService starts on the state dir
(creating its directories, opening and recovering the log) and removes what is converted already
(remove_converted: a removal an earlier cut cut short), the seal code converts every sealed segment
(convert_pending: a batch per segment, then the compaction of finished days and the views file),
and the service removes the converted segments. Every FileIO operation is a place to cut the power
(that operation does not happen: cutting at n + 1 is cutting right after n), whatever it is: a
write, a file or directory fsync, a mkdir, a rename, an unlink. Every unsynced write is dropped
("drop" mode), and every directory entry created, renamed or removed since its directory's last
fsync is undone. What a cut leaves then changes only at a sync: a counting run lists the syncs
that changed it, and a fresh copy of the same state dir is cut right after each of them (and at
the first operation): a cut anywhere between two of them leaves the same files, so this covers
every operation (22 distinct cuts of the lifetime's ~120 operations). After the cut, and again
after the next (uninterrupted) lifetime and a power cut right after it, the checks are below.

A process killed (kill -9) loses nothing, but what it did after its last fsync is not durable: the
next start must make durable what it finds (a directory, a watermark) before relying on it. So the
lifetime is also killed right after each mkdir, rename and unlink (25 kills), restarted, and the
power cut right after the restart's lifetime; then the same checks:

- what the audit reader sees (AuditQuery: `appliance audit sql`'s Parquet files + tail) holds every
  decision and event of the log exactly once;
- the watermark claims nothing that is not in the Parquet files it covers (which would make its
  records vanish from the reader, the tail starting after it);
- nothing is lost with the segments the service removed: each removed record is in those files.

What the model covers and what it does not:

- DuckDB writes the Parquet (and views) temp files itself, not through a FileIO. `LibraryCrashIO`
  treats whatever a file holds that did not come through it as unsynced, from the moment our code
  touches the file (opens it to fsync it, renames or removes it), and a file or directory it never
  saw (DuckDB's, or a reader's mkdir -p of audit/tmp) as a directory entry that only a later fsync
  of its directory makes durable: so the library's write is lost at a cut unless our code fsynced
  the file and its directory. It does not model the library's own ordering or syncs (DuckDB is
  assumed to have written the whole file when COPY returns, as it does), nor files the library
  writes and removes by itself (spill files in audit/tmp, a views file's WAL): a cut drops them.
- Crash mode "drop" only (every unsynced write lost, nothing torn): the strictest for loss, and
  the one in which what a cut leaves depends only on the syncs before it. Torn, partly kept and
  reordered unsynced writes are tests/msglog's subject; here they could only touch temp files (no
  file is renamed into place before its fsync) and the active segment (recovered as the log's
  tests show).
- The maintenance lock file and the readers' scratch directories are not written through a FileIO
  (they need no durability): entries of another process, as above.
- Directory renames are not modelled (the audit renames files only), nor is the state dir's own
  entry in its parent: it is CrashIO's root, always there (appliance/statedir.py creates it durably,
  with the real FileIO, before the service starts).
- The forwarder's cursor is not in this lifetime (its power-loss tests: tests/msglog/test_cursor.py,
  tests/forward/test_outbox.py): here segments are removed as soon as they are converted. Nor are
  retention, purge and the upgrade, which use the same layout.py tools but with the real FileIO.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import pytest

from appliance.audit.layout import TABLES, Layout
from appliance.audit.query import AuditQuery, parquet_source
from appliance.audit.seal import convert_pending
from appliance.audit.service import AuditService
from appliance.config import load_config
from appliance.msglog import list_segments, read_log
from appliance.msglog.testing import CrashIO, _apply, _Node
from tests.audit.factory import epoch, generate
from tests.audit.logfiles import chunks, rows_to_records, write_log


class LibraryCrashIO(CrashIO):
    """CrashIO that also models the files a library writes itself (DuckDB's COPY ... TO) and the
    entries other processes make (a reader creating audit/tmp): what a file holds beyond what came
    through this FileIO is an unsynced write, found when our code first touches the file; a file or
    directory this FileIO never saw has a directory entry that only an fsync of its directory (made
    through this FileIO) makes durable."""

    def _foreign_writes(self, path: Path) -> None:
        path = Path(path).absolute()
        if not path.is_file() or (path != self.root and self.root not in path.parents):
            return
        actual = path.read_bytes()
        node = self._entries.get(path)
        if node is None:
            node = self._entries[path] = _Node()  # not in the durable entries: never fsync'd into its dir
        expected = bytearray(node.durable)
        for op in node.ops:
            _apply(expected, op)
        if expected != actual:
            node.ops += [("t", 0), ("w", 0, actual)]

    def _foreign_entries(self, directory: Path) -> None:
        """Entries another process or a library added to or removed from `directory` (a reader's
        mkdir -p of audit/tmp, DuckDB's files): a directory fsync makes them durable as it finds them."""
        directory = Path(directory).absolute()
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:
            return
        for path in [p for p in self._entries if p.parent == directory and p.name not in names]:
            del self._entries[path]
        for name in names:
            path = directory / name
            if path not in self._entries:
                if path.is_dir():
                    self._entries[path] = _Node(is_dir=True)
                else:
                    self._foreign_writes(path)

    def _touch(self, path: Path) -> None:
        with self._lock:
            if not self.frozen:
                self._foreign_writes(path)

    def open(self, path: Path, *, create: bool = False) -> int:
        self._touch(path)
        return super().open(path, create=create)

    def rename(self, src: Path, dst: Path) -> None:
        self._touch(src)
        super().rename(src, dst)
        self._changed()

    def unlink(self, path: Path) -> None:
        self._touch(path)
        super().unlink(path)
        self._changed()

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        self._changed()

    # With `killing`, reaching `crash_at` kills the process instead (kill -9: nothing is lost).

    killing = False

    def _crash(self, mode: str | None) -> dict[str, str]:
        if self.killing:
            self.kill()
            return {}
        return super()._crash(mode)

    def fsync_dir(self, path: Path) -> None:
        with self._lock:
            if not self.frozen:
                self._foreign_entries(path)
        super().fsync_dir(path)
        self._synced()

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self._synced()

    # Only a sync changes what a power cut leaves (in "drop" mode: every unsynced write lost). With
    # `record_syncs`, each sync that changed it is listed as (its operation's number, the state).

    record_syncs = False
    syncs: list[tuple[int, int]]
    entry_changes: list[int]  # the operations that changed a directory entry (mkdir, rename, unlink)

    def _changed(self) -> None:
        if self.record_syncs:
            self.entry_changes.append(self.ops)

    def _synced(self) -> None:
        if not self.record_syncs:
            return
        with self._lock:
            state = hash(tuple(sorted((str(path), node.is_dir, bytes(node.durable))
                                      for path, node in self._durable.items() if self._reachable(path))))
            if not self.syncs or self.syncs[-1][1] != state:
                self.syncs.append((self.ops, state))


# 45 records: 4 connect events and 20 decisions on 2026-11-20 from 23:00, 20 decisions and a reload
# event after midnight; 12 to a segment: 3 sealed segments (the first two hold 2026-11-20's
# decisions, merged when compacted; the third the next day's), and the active one.
START = epoch("2026-11-20T23:00:00")
PER_SEGMENT = 12
SEALED_SEQ = 3 * PER_SEGMENT


@dataclass(frozen=True)
class Base:
    state: Path
    ids: dict[str, list[int]]  # the table's ids, sorted
    by_seq: dict[int, tuple[str, int]]  # seq -> (table, id)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return make_base(tmp_path_factory.mktemp("base") / "state")


def make_base(state: Path) -> Base:
    decisions, events = generate(40, start=START, step=180.0, devices=4)
    records = rows_to_records(decisions, events)
    write_log(state / "log", chunks(records, PER_SEGMENT))
    assert [s.first_seq for s in list_segments(state / "log")] == [1, 13, 25, 37]
    by_seq = {}
    for record, (kind, row) in zip(read_log(state / "log"), records, strict=True):
        by_seq[record.seq] = (kind.table, int(row[0]))  # type: ignore[call-overload]
    ids = {t: sorted(i for table, i in by_seq.values() if table == t) for t in TABLES}
    return Base(state, ids, by_seq)


def fresh_copy(base: Base, root: Path) -> Path:
    state = root / "state"
    shutil.copytree(base.state, state)
    return state


def lifetime(io: CrashIO, state: Path) -> None:
    """The service's sealing cycle, as a process would run it; raises OSError when the power is cut."""
    config = load_config(None, {"state_dir": str(state)})
    service = AuditService(config.audit, state, io=io)
    try:
        service.log.start(None)
        # What the service does after a seal helper run, even one that found nothing to convert:
        # here, after a cut that came between a conversion and the removal of its segments.
        service.remove_converted()
        # What the seal helper does when the service starts it (the helper is another process; the
        # page cache, which CrashIO models, is the same for both); then the removal once it is done.
        convert_pending(service.layout, max_batch_bytes=1, threads=1)
        service.remove_converted()
    finally:
        asyncio.run(service.stop())


def parquet_ids(layout: Layout, table: str, upto_seq: int) -> list[int]:
    files = [f.path for f in layout.visible(table, upto_seq=upto_seq)]
    if not files:
        return []
    con = duckdb.connect()
    try:
        return sorted(r[0] for r in con.execute(f"SELECT id FROM {parquet_source(files)}").fetchall())
    finally:
        con.close()


def check(base: Base, state: Path, when: str) -> None:
    layout = Layout(state)
    mark = layout.read_watermark()
    in_log = {r.seq for r in read_log(layout.log_dir)}
    for table in TABLES:
        in_parquet = parquet_ids(layout, table, mark.last_seq)
        claimed = sorted(i for seq, (t, i) in base.by_seq.items() if t == table and seq <= mark.last_seq)
        assert in_parquet == claimed, (
            f"{when}: the watermark ({mark}) claims {table} that are not in its Parquet files, or they hold others")
        removed = sorted(i for seq, (t, i) in base.by_seq.items() if t == table and seq not in in_log)
        assert set(removed) <= set(in_parquet), f"{when}: {table} removed from the log before their Parquet file was durable"
    with AuditQuery(state, threads=1) as query:
        for table in TABLES:
            seen = [r[0] for r in query.cursor().execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]
            assert seen == base.ids[table], f"{when}: the audit reader does not see every {table} row exactly once"


@dataclass(frozen=True)
class Cuts:
    power: list[int]  # the first operation, and each one right after a sync that changed what a cut leaves
    kill: list[int]  # each operation right after one that changed a directory entry
    total: int


def cut_points(base: Base, root: Path) -> Cuts:
    """Runs a whole lifetime; returns where to cut it (a power cut anywhere up to the next sync that
    changes what a cut leaves leaves the same files) and how many operations there were."""
    state = fresh_copy(base, root)
    io = LibraryCrashIO(state)
    io.record_syncs, io.syncs, io.entry_changes = True, [], []
    lifetime(io, state)
    total = io.ops
    return Cuts([1] + [op + 1 for op, _ in io.syncs if op < total], [op + 1 for op in io.entry_changes], total)


@pytest.fixture(scope="module")
def cuts(base: Base, tmp_path_factory: pytest.TempPathFactory) -> Cuts:
    return cut_points(base, tmp_path_factory.mktemp("count"))


def test_a_power_cut_right_after_a_complete_lifetime_loses_nothing(base: Base, tmp_path: Path) -> None:
    state = fresh_copy(base, tmp_path)
    io = LibraryCrashIO(state)
    lifetime(io, state)
    io.crash("drop")
    io.revive()
    check(base, state, "after a complete lifetime and a power cut")
    assert Layout(state).read_watermark().last_seq == SEALED_SEQ
    assert [s.first_seq for s in list_segments(state / "log")] == [SEALED_SEQ + 1]
    assert all(Layout(state).visible(t) for t in TABLES)
    assert Layout(state).files("decisions")[0].last_seq > Layout(state).files("decisions")[0].first_seq  # compacted


def test_a_power_cut_at_any_step_of_sealing_loses_and_duplicates_no_row(base: Base, cuts: Cuts, tmp_path: Path) -> None:
    total = cuts.total
    assert total > 50 and len(cuts.power) > 20  # every directory, file, rename and removal is an operation
    reached = set()
    for cut in cuts.power:
        state = fresh_copy(base, tmp_path / f"cut{cut}")
        io = LibraryCrashIO(state)
        io.crash_at, io.crash_mode = cut, "drop"
        with pytest.raises(OSError, match="CrashIO"):
            lifetime(io, state)
        io.revive()
        check(base, state, f"power cut at operation {cut} of {total}")
        reached.add(Layout(state).read_watermark().last_seq)
        # The next start: the conversion is redone from the watermark; then the power goes again.
        lifetime(io, state)
        io.crash("drop")
        io.revive()
        check(base, state, f"after the lifetime following the cut at {cut}")
        assert Layout(state).read_watermark().last_seq == SEALED_SEQ
        shutil.rmtree(tmp_path / f"cut{cut}")
    assert reached == {0, PER_SEGMENT, 2 * PER_SEGMENT, SEALED_SEQ}  # cuts before, between and after every batch


def test_a_process_killed_at_any_step_then_a_power_cut_after_the_next_start_loses_no_row(
        base: Base, cuts: Cuts, tmp_path: Path) -> None:
    """kill -9 right after a mkdir, a rename or an unlink, before the fsync that makes it durable:
    nothing is lost then, but the next start must make durable what it finds (a directory, the
    watermark, a removal) before it relies on it, or the power cut that follows takes it away."""
    assert len(cuts.kill) > 20
    for cut in cuts.kill:
        state = fresh_copy(base, tmp_path / f"kill{cut}")
        io = LibraryCrashIO(state)
        io.crash_at, io.killing = cut, True
        with pytest.raises(OSError, match="CrashIO"):
            lifetime(io, state)
        io.killing = False
        io.revive()
        lifetime(io, state)
        io.crash("drop")
        io.revive()
        check(base, state, f"a kill at operation {cut}, the next start, then a power cut")
        assert Layout(state).read_watermark().last_seq == SEALED_SEQ
        shutil.rmtree(tmp_path / f"kill{cut}")


@contextmanager
def killed_between_mkdir_and_fsync(io: CrashIO, directory: Path) -> Iterator[None]:
    """A process that created `directory` and was killed before fsyncing its parent: the entry is
    there for the next process, but not durable."""
    io.mkdir(directory)
    io.kill()
    io.revive()
    yield


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_directories_left_by_a_killed_process_are_made_durable_by_the_next(tmp_path: Path, levels: int) -> None:
    """A seal helper created audit/, audit/parquet/... and was killed before fsyncing their parents:
    the next one, finding them, must still make them durable before it renames files into them."""
    state = tmp_path / "state"
    io = LibraryCrashIO(state)
    layout = Layout(state, io=io)
    day = layout.day_dir("decisions", date(2026, 11, 20))
    for directory in list(reversed(day.parents))[len(state.parents) + 1:][:levels]:
        with killed_between_mkdir_and_fsync(io, directory):
            pass
    layout.make_dirs(day)
    io.crash("drop")
    io.revive()
    assert day.is_dir()


def test_the_first_start_leaves_durable_directories(tmp_path: Path) -> None:
    """The very first start, then a power cut: the audit directory and the log (with its first
    segment) must still be there; nothing fsyncs them for the service later."""
    state = tmp_path / "state"
    io = LibraryCrashIO(state)
    config = load_config(None, {"state_dir": str(state)})
    service = AuditService(config.audit, state, io=io)
    asyncio.run(service.stop())
    io.crash("drop")
    io.revive()
    layout = Layout(state)
    assert layout.audit_dir.is_dir() and layout.tmp_dir.is_dir()
    assert [s.first_seq for s in list_segments(layout.log_dir)] == [1]


def test_the_model_drops_a_library_write_not_synced(tmp_path: Path) -> None:
    """LibraryCrashIO itself: what a library wrote is lost at a cut unless synced through it, and its
    directory entry too unless the directory was synced; or the tests above prove nothing."""
    root = tmp_path / "root"
    io = LibraryCrashIO(root)
    io.makedirs(root / "d")
    (root / "d" / "entry only").write_bytes(b"its directory was synced, the file never")
    (root / "d" / "renamed").write_bytes(b"renamed, not synced")
    io.rename(root / "d" / "renamed", root / "d" / "final")
    io.fsync_dir(root / "d")
    (root / "d" / "synced").write_bytes(b"synced")
    fd = io.open(root / "d" / "synced")
    io.fdatasync(fd)
    io.close(fd)
    io.fsync_dir(root / "d")
    (root / "d" / "synced").write_bytes(b"rewritten behind its back")
    fd = io.open(root / "d" / "synced")
    io.close(fd)
    (root / "d" / "unseen").write_bytes(b"written after the last directory sync")
    (root / "e").mkdir()  # by another process: never synced into root
    io.crash("drop")
    assert sorted(os.listdir(root)) == ["d"]
    assert sorted(os.listdir(root / "d")) == ["entry only", "final", "synced"]
    assert (root / "d" / "entry only").read_bytes() == b""
    assert (root / "d" / "final").read_bytes() == b""
    assert (root / "d" / "synced").read_bytes() == b"synced"
