"""The SQLite journal in front of DuckDB: group commit, moving, crash recovery, a full journal."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.audit.journal import Journal
from appliance.audit.records import IdClock
from appliance.audit.service import export_finished_days
from appliance.audit.store import AuditStore
from tests.audit.factory import decision, epoch, event
from tests.helpers import wait_until

START = epoch("2026-11-27T10:00:00")


def rows(count: int, clock: IdClock | None = None) -> list[tuple[object, ...]]:
    clock = clock or IdClock()
    return [decision(clock.next(START + i), START + i, device=f"d{i % 3}") for i in range(count)]


def count(store: AuditStore, table: str = "decisions") -> int:
    return store.query(f"SELECT count(*) FROM {table}").rows[0][0]


def run_journal(journal: Journal, work) -> list[int]:  # noqa: ANN001
    """Start the journal on a fresh loop, run `work(journal)` there, wait for its commits, stop."""
    commits: list[int] = []

    async def main() -> None:
        journal.add_listener(commits.append)
        journal.start(asyncio.get_running_loop())
        work(journal)
        target = journal.last_seq
        done = asyncio.get_running_loop().create_future()

        def check(seq: int) -> None:
            if seq >= target and not done.done():
                done.set_result(None)

        journal.add_listener(check)
        check(journal.committed)
        await asyncio.wait_for(done, 30)  # commits arrive through call_soon_threadsafe
        await asyncio.to_thread(journal.stop)

    asyncio.run(main())
    return commits


def test_records_are_committed_then_moved(tmp_path: Path):
    store = AuditStore(tmp_path / "audit.duckdb")
    journal = Journal(tmp_path / "journal.sqlite3", store)
    batch = rows(500)
    commits = run_journal(journal, lambda j: [j.add_decision(r) for r in batch] and j.add_event(event(10**18, START, "x")))
    assert commits and commits[-1] == 501 and commits == sorted(commits)
    assert len(commits) < 501  # group commit: many records per transaction
    assert count(store) == 500 and count(store, "events") == 1
    assert journal.max_ids() == (0, 0)  # everything moved on stop
    store.close()


def test_rows_left_by_a_crash_are_moved_once(tmp_path: Path):
    store = AuditStore(tmp_path / "audit.duckdb")
    batch = rows(100)
    # A previous run committed 100 rows to the journal and had moved the first 40 to DuckDB when it
    # died, before deleting them from the journal.
    crashed = Journal(tmp_path / "journal.sqlite3")
    run_journal(crashed, lambda j: [j.add_decision(r) for r in batch])
    store.append(batch[:40])
    journal = Journal(tmp_path / "journal.sqlite3", store)
    journal.recover()
    assert count(store) == 0  # the 40 rows a crash left in both places were removed from DuckDB
    assert journal.move_all() == 100
    assert count(store) == 100
    assert store.query("SELECT count(DISTINCT id) FROM decisions").rows == [(100,)]
    store.close()


def test_a_full_journal_loses_records_but_never_blocks(tmp_path: Path):
    events: list[tuple[str, dict[str, object]]] = []
    journal = Journal(tmp_path / "journal.sqlite3", on_event=lambda kind, detail: events.append((kind, detail)),
                      max_bytes=64 * 1024)
    big = [decision(i + 1, START, payload=b"x" * 4000) for i in range(100)]  # 400 kB into 64 kB
    commits = run_journal(journal, lambda j: [j.add_decision(r) for r in big])
    assert commits[-1] == 100  # every record was released, durable or not
    assert journal.lost > 0 and not journal.healthy
    assert [kind for kind, _ in events][:1] == ["audit_degraded"]
    assert "full" in str(events[0][1]["error"])


def test_deletes_free_a_full_journal_while_records_keep_failing(tmp_path: Path):
    """A full journal: the records of a batch fail (and SQLite rolls the whole transaction back),
    but the deletes queued with them (mover, forwarder) still commit, so space comes back while
    traffic keeps arriving."""
    import sqlite3

    journal = Journal(tmp_path / "journal.sqlite3", max_bytes=64 * 1024)
    insert = f"INSERT INTO decisions VALUES ({', '.join('?' * len(decision(1, START)))})"
    filled = 0
    with pytest.raises(sqlite3.OperationalError, match="full"):
        while True:  # fill it, a row per transaction
            journal.write(lambda conn: conn.execute(insert, decision(filled + 1, START, payload=b"x" * 2000)))
            filled += 1
    assert filled > 10
    outcomes: list[object] = []

    def work(j: Journal) -> None:
        for i in range(10):  # full: these are lost
            j.add_decision(decision(1000 + i, START, payload=b"y" * 2000))
        wait_until(lambda: j.lost >= 10, message="the writer tried them (its own thread)")
        for i in range(10):  # still full: in the same batch as the delete below, and lost with it
            j.add_decision(decision(2000 + i, START, payload=b"y" * 40_000))
        request = j.submit(lambda conn: conn.execute("DELETE FROM decisions").rowcount,
                           lambda result, error: outcomes.append(error or result))
        assert request.done.wait(10)
        j.add_decision(decision(200, START, payload=b"z" * 100))  # after the delete: fits again

    run_journal(journal, work)
    assert journal.lost >= 10  # the first ten at least (the rest depends on how batches fall)
    assert outcomes == [filled]
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert conn.execute("SELECT count(*) FROM decisions WHERE id <= ?", (filled,)).fetchone() == (0,)
    assert (200,) in conn.execute("SELECT id FROM decisions").fetchall()
    assert journal.healthy


def test_scheduled_export_of_finished_days(tmp_path: Path):
    store = AuditStore(tmp_path / "audit.duckdb")
    clock = IdClock()
    day1, day2, today = epoch("2026-11-25T12:00:00"), epoch("2026-11-26T12:00:00"), epoch("2026-11-27T09:00:00")
    store.append([decision(clock.next(t), t) for t in (day1, day1 + 1, day2, today)])
    out = tmp_path / "export"
    now = datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert export_finished_days(store, out, now=now) == ["2026-11-25", "2026-11-26"]
    assert export_finished_days(store, out, now=now) == []  # markers: each day once
    assert export_finished_days(store, out, now=now + timedelta(days=1)) == ["2026-11-27"]
    assert sorted(p.name for p in (out / "decisions").iterdir()) == ["day=2026-11-25", "day=2026-11-26", "day=2026-11-27"]
    store.close()


@pytest.mark.parametrize("durable", [True, False])
def test_durable_acks_setting_decides_what_acks_wait_for(tmp_path: Path, durable: bool):
    from appliance.audit.service import AuditService
    from appliance.config import load_config

    config = load_config(None, {"state_dir": str(tmp_path), "audit.durable_acks": durable})
    service = AuditService(config.audit, tmp_path, config_revision="r", dry_run=False)
    assert (service.durability is service.journal) is durable
    service.store.close()


def test_writes_from_other_threads_run_in_the_writers_commits(tmp_path: Path):
    """Journal.write: the mover's and the outbox's deletes run on the writer thread, each in a
    savepoint (a failing one undoes only itself and raises in its caller), interleaved with live
    commits; before start and after stop they run in a transaction of their own."""
    import sqlite3
    import threading

    journal = Journal(tmp_path / "journal.sqlite3")
    assert journal.write(lambda conn: conn.execute("CREATE TABLE marks (n INTEGER, thread TEXT)").rowcount) == -1
    threads: list[str] = []

    def mark(n: int):  # noqa: ANN202
        def insert(conn: sqlite3.Connection) -> int:
            threads.append(threading.current_thread().name)
            return conn.execute("INSERT INTO marks VALUES (?, ?)", (n, threading.current_thread().name)).rowcount
        return insert

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO marks VALUES (-1, 'undone')")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    errors: list[BaseException] = []

    def other_thread() -> None:
        for n in range(200):
            assert journal.write(mark(n)) == 1
        try:
            journal.write(broken)
        except sqlite3.OperationalError as exc:
            errors.append(exc)

    def work(j: Journal) -> None:
        worker = threading.Thread(target=other_thread)
        worker.start()
        for r in rows(2_000):
            j.add_decision(r)
        worker.join(30)

    run_journal(journal, work)
    assert len(errors) == 1 and "no_such_table" in str(errors[0])
    assert set(threads) == {"audit-journal-writer"}
    assert journal.write(mark(999)) == 1  # stopped: a transaction of its own, in this thread
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert conn.execute("SELECT count(*), min(n), max(n) FROM marks").fetchone() == (201, 0, 999)
    assert conn.execute("SELECT count(*) FROM decisions").fetchone() == (2_000,)
    assert conn.execute("SELECT count(*) FROM marks WHERE thread = 'undone'").fetchone() == (0,)


def test_a_record_sqlite_cannot_store_loses_only_its_batch(tmp_path: Path):
    """A value sqlite3 cannot bind (an int over 2**63) fails its batch; the transaction must not be
    left open, or every later batch would fail too."""
    import sqlite3

    journal = Journal(tmp_path / "journal.sqlite3")
    request: list[object] = []

    def work(j: Journal) -> None:
        j.add_decision(decision(1, START)[:1] + (2**70,) + decision(1, START)[2:])
        wait_until(lambda: j.lost >= 1, message="the writer tried it (its own thread)")
        request.append(j.submit(lambda conn: conn.execute("SELECT 1").fetchone()[0]))
        for i in range(5):
            j.add_decision(decision(100 + i, START))

    run_journal(journal, work)
    assert journal.lost == 1
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert conn.execute("SELECT id FROM decisions ORDER BY id").fetchall() == [(100 + i,) for i in range(5)]
    assert request[0].error is None and request[0].result == 1  # type: ignore[attr-defined]
