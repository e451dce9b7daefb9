"""The outbox's reading side against rows written by a real audit Journal."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from appliance.forward import Outbox
from tests.forward.harness import bounds, harness


def test_next_batch_reads_in_id_order_and_delete_updates_the_counters(tmp_path: Path):
    with harness(tmp_path / "journal.sqlite3") as h:
        rows = [h.row(f"sensor-{i % 3}", i) for i in range(250)]
        h.add(rows)
        outbox = Outbox(h.journal_path, bounds())
        depth = outbox.depth()
        assert depth.messages == 250
        assert depth.bytes == sum(len(r[4]) + len(r[3]) for r in rows)
        assert depth.oldest_ts == rows[0][1]

        first = outbox.next_batch(0, 100)
        assert [r.id for r in first] == [r[0] for r in rows[:100]]
        second = outbox.next_batch(first[-1].id, 1000)
        assert [r.id for r in second] == [r[0] for r in rows[100:]]
        assert second[0].payload == rows[100][4] and second[0].schema == "reading:v1" and second[0].qos is None  # None: upstream.qos

        assert outbox.delete([r.id for r in first] + [12345]) == 100  # an unknown id is skipped
        depth = outbox.depth()
        assert depth.messages == 150
        assert depth.bytes == sum(len(r[4]) + len(r[3]) for r in rows[100:])

        # Rows the journal adds later are counted on the next refresh.
        h.add([h.row("sensor-9", 0)])
        assert outbox.refresh().messages == 151
        assert outbox.refresh(full=True).messages == 151
        outbox.close()


def test_expired_rows_are_dropped_whatever_the_policy(tmp_path: Path):
    with harness(tmp_path / "journal.sqlite3") as h:
        old = time.time() - 7200
        h.add([h.row("s", i, ts=old) for i in range(10)] + [h.row("s", i) for i in range(10, 15)])
        outbox = Outbox(h.journal_path, bounds(max_age="1h", policy="reject_new"))
        dropped = outbox.enforce()
        assert len(dropped) == 10 and {d.reason for d in dropped} == {"expired"}
        assert outbox.depth().messages == 5
        outbox.close()


@pytest.mark.parametrize(("limit", "reason"), [({"max_messages": 40}, "max_messages"), ({"max_bytes": 40 * 37}, "max_bytes")])
def test_drop_oldest_keeps_the_newest_within_bounds(tmp_path: Path, limit: dict, reason: str):
    with harness(tmp_path / "journal.sqlite3") as h:
        rows = [h.row("s", i, topic="t/" + "x" * 10, payload=b"p" * 25) for i in range(100)]  # 12 + 25 = 37 bytes
        h.add(rows)
        outbox = Outbox(h.journal_path, bounds(policy="drop_oldest", **limit))
        dropped = outbox.enforce()
        assert [d.id for d in dropped] == [r[0] for r in rows[:60]]
        assert {d.reason for d in dropped} == {reason}
        assert outbox.depth().messages == 40
        assert not outbox.is_full()
        assert outbox.enforce() == []
        outbox.close()


def test_reject_new_drops_nothing_and_reports_full(tmp_path: Path):
    with harness(tmp_path / "journal.sqlite3") as h:
        h.add([h.row("s", i) for i in range(10)])
        outbox = Outbox(h.journal_path, bounds(policy="reject_new", max_messages=10))
        assert outbox.enforce() == []
        assert outbox.is_full()
        outbox.delete([r.id for r in outbox.next_batch(0, 1)])
        assert not outbox.is_full()
        outbox.close()


def test_sqlite_errors_are_reported_not_raised(tmp_path: Path):
    path = tmp_path / "journal.sqlite3"
    outbox = Outbox(path, bounds())
    other = sqlite3.connect(path)
    other.execute("DROP TABLE outbox")  # as unusable as a broken disk, without breaking the test machine
    other.commit()
    other.close()
    assert outbox.next_batch(0, 10) == []
    assert outbox.delete([1, 2]) == 0
    assert outbox.enforce() == []
    assert outbox.last_error is not None and "no such table" in outbox.last_error
    outbox.close()


def test_rows_handed_to_the_forwarder_are_not_dropped(tmp_path: Path):
    with harness(tmp_path / "journal.sqlite3") as h:
        rows = [h.row("s", i) for i in range(10)]
        h.add(rows)
        outbox = Outbox(h.journal_path, bounds(policy="drop_oldest", max_messages=5))
        dropped = outbox.enforce(handed_out=rows[2][0])  # the first three are in flight
        assert [d.id for d in dropped] == [r[0] for r in rows[3:8]]
        assert [r.id for r in outbox.next_batch(0, 100)] == [r[0] for r in rows[:3] + rows[8:]]
        outbox.close()


def test_rows_received_while_the_clock_was_wrong_are_not_expired(tmp_path: Path):
    """A gateway without an RTC boots in 1970, buffers, then NTP sets the clock: the backlog's age is
    unknown, not 56 years."""
    with harness(tmp_path / "journal.sqlite3") as h:
        h.add([h.row("s", i, ts=86_400.0 + i) for i in range(5)])
        outbox = Outbox(h.journal_path, bounds(max_age="1h", policy="drop_oldest"))
        assert outbox.enforce() == []
        assert outbox.depth().messages == 5
        outbox.close()


@pytest.mark.parametrize("through_journal", [True, False])
def test_delete_later_reports_deleted_rows_and_failures(tmp_path: Path, through_journal: bool):
    """The forwarder deletes acknowledged rows without waiting for the journal's commit: the count
    comes back through a callback, and a failed delete hands its ids back for a retry."""
    with harness(tmp_path / "journal.sqlite3") as h:
        rows = [h.row("s", i) for i in range(20)]
        h.add(rows)
        outbox = Outbox(h.journal_path, bounds(), journal=h.journal if through_journal else None)
        deleted: list[int] = []
        failed: list[list[int]] = []
        outbox.delete_later([r[0] for r in rows[:15]] + [10**18], deleted.append, failed.append)
        outbox.settle()
        assert deleted == [15] and failed == []  # an id already gone is not counted
        assert outbox.refresh(full=True).messages == 5
        h.journal.write(lambda conn: conn.execute("DROP TABLE outbox"))
        outbox.delete_later([rows[15][0]], deleted.append, failed.append)
        outbox.settle()
        assert failed == [[rows[15][0]]] and deleted == [15]
        assert outbox.last_error is not None and "no such table" in outbox.last_error
        outbox.close()


def test_a_drop_right_after_an_asynchronous_delete_does_not_deadlock(tmp_path: Path):
    """The forwarder queues a delete (delete_later) and then applies the bounds (enforce), which
    drops rows through the journal's writer while holding the outbox's lock. The delete's callback
    runs on that writer and must not wait for the same lock (it did: both threads stopped, and with
    them every verdict commit)."""
    import threading

    with harness(tmp_path / "journal.sqlite3") as h:
        h.add([h.row("s", i) for i in range(2000)])
        outbox = Outbox(h.journal_path, bounds(max_messages=100, policy="drop_oldest"), journal=h.journal)
        ids = [r.id for r in outbox.next_batch(0, 10)]
        result: list[int] = []
        deleted: list[int] = []

        def forwarder_like() -> None:  # one iteration of Forwarder._session: _delete() then _maintain()
            outbox.delete_later(ids, deleted.append, lambda failed: None)
            result.append(len(outbox.enforce(handed_out=ids[-1])))

        thread = threading.Thread(target=forwarder_like, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "deadlock between the journal writer and the outbox lock"
        outbox.settle()
        assert deleted == [10] and result == [1890]
        assert outbox.refresh(full=True).messages == 100
        h.add([h.row("s", 5000)])  # the writer still commits
        outbox.close()
