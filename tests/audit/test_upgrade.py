"""Upgrade: a state dir written by the previous version (DuckDB file + SQLite journal + outbox)
is imported into Parquet and the message log, nothing lost, nothing twice, even when interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from appliance.audit.layout import Layout
from appliance.audit.query import AuditQuery
from appliance.audit.records import FORWARD_ONLY, IdClock
from appliance.audit.legacy import needs_upgrade
from appliance.audit.upgrade import upgrade
from appliance.msglog.log import MessageLog
from appliance.msglog.reader import read_log
from tests.audit.factory import decision, epoch, event, generate
from tests.audit.legacy import write_state

START = epoch("2026-11-20T08:00:00")


def build_old_state(state: Path, *, hot_wal: bool = False) -> dict[str, object]:
    """What the current code leaves after a crash: 600 decisions moved to DuckDB over two days, the
    last 20 of them also still in the journal (the move committed to DuckDB, not yet deleted from
    the journal), 30 newer ones only in the journal, and 25 outbox rows not forwarded yet. With
    `hot_wal`, the journal's rows are still in its write-ahead log, as a `kill -9` leaves them."""
    decisions, events = generate(600, start=START, step=180.0)
    clock = IdClock(start_after=max(decisions[-1][0], events[-1][0]))
    later = START + 600 * 180.0
    newer = [decision(clock.next(later + i), later + i, verdict="reject" if i % 3 == 0 else "accept",
                      payload=f"new-{i}".encode()) for i in range(30)]
    newer[5] = (*newer[5][:9], None, *newer[5][10:])  # recorded without its payload
    newer_events = [event(clock.next(later + 40), later + 40, "config_reload", None, {"revision": "rev-c"})]
    outbox = [(row[0], row[1], row[2], row[6], row[9] or b"", 1 if i % 2 else None, i % 4 == 0,
               "temperature:v1" if i % 5 else None) for i, row in enumerate(newer[:25])]
    write_state(state, moved=(decisions, events), journal=(decisions[-20:] + newer, newer_events),
                outbox=outbox, hot_wal=hot_wal)
    return {"decisions": decisions + newer, "events": events + newer_events, "outbox": outbox}


@pytest.fixture
def log_dir(tmp_path: Path):
    opened = []

    def make(state: Path) -> MessageLog:
        log = MessageLog(state / "log", segment_max_age=None)
        log.open()
        log.start(None)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.stop()


def check_imported(state: Path, old: dict[str, object]) -> None:
    with AuditQuery(state) as query:
        cursor = query.cursor()
        ids = [r[0] for r in cursor.execute("SELECT id FROM decisions ORDER BY id").fetchall()]
        assert ids == sorted(r[0] for r in old["decisions"])
        assert [r[0] for r in cursor.execute("SELECT id FROM events ORDER BY id").fetchall()] == \
            sorted(r[0] for r in old["events"])
        row = query.quarantine_get(old["decisions"][-30][0])
        assert row is not None and row["payload"] == b"new-0" and row["retain"] is False
        assert cursor.execute("SELECT payload FROM decisions WHERE id = ?", [old["decisions"][-25][0]]).fetchall() == [(None,)]
    records = [r for r in read_log(state / "log") if r.kind == FORWARD_ONLY.code]
    assert [FORWARD_ONLY.decode(r.body) for r in records] == \
        [(*row[:6], bool(row[6]), row[7]) for row in old["outbox"]]


@pytest.mark.parametrize("hot_wal", [False, True], ids=["clean", "hot-wal"])
def test_old_state_dir_is_imported_and_renamed(tmp_path: Path, log_dir, hot_wal: bool):
    state = tmp_path / "state"
    old = build_old_state(state, hot_wal=hot_wal)
    con = duckdb.connect(str(state / "audit" / "audit.duckdb"), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    before = con.execute("SELECT * FROM decisions ORDER BY id LIMIT 3").fetchall()
    con.close()
    assert needs_upgrade(Layout(state))
    report = upgrade(state, log_dir(state))
    assert report is not None
    assert report.decisions == 630 and report.events == len(old["events"]) and report.forward_only == 25
    assert report.max_id == max(r[0] for r in old["decisions"] + old["events"])
    check_imported(state, old)
    with AuditQuery(state) as query:
        assert query.query("SELECT * FROM decisions ORDER BY id LIMIT 3").rows == before
    names = sorted(p.name for p in (state / "audit").iterdir())
    assert "journal.sqlite3.migrated" in names and "audit.duckdb.migrated" in names
    assert "journal.sqlite3" not in names
    # The views file replaced the old database under its name, and shows the imported rows.
    con = duckdb.connect(str(state / "audit" / "audit.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM decisions").fetchone() == (630,)
    con.close()
    assert not needs_upgrade(Layout(state))
    assert upgrade(state, log_dir(state)) is None


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(1, 12))
def test_an_interrupted_upgrade_is_finished_by_the_next_start(tmp_path: Path, log_dir, crash_at: int):
    state = tmp_path / "state"
    old = build_old_state(state)
    seen = 0

    def crash(step: str) -> None:
        nonlocal seen
        seen += 1
        if seen == crash_at:
            raise Crash(step)

    try:
        upgrade(state, log_dir(state), checkpoint=crash)
    except Crash:
        pass
    else:
        assert crash_at > seen  # every step ran: nothing to interrupt this time
    upgrade(state, log_dir(state))
    assert not needs_upgrade(Layout(state))
    check_imported(state, old)
    assert not (state / "audit" / "upgrade.json").exists()
    con = duckdb.connect(str(state / "audit" / "audit.duckdb"), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM decisions").fetchone() == (630, 630)
    con.close()


def test_a_state_dir_without_old_files_needs_nothing(tmp_path: Path, log_dir):
    assert upgrade(tmp_path, log_dir(tmp_path)) is None
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["log"]'
