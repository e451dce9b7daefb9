"""tests/audit/legacy.py writes what the previous version left in a state dir, readable the way the
upgrade reads it (sqlite3 read-only, duckdb read-only)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from appliance.audit import records
from appliance.audit.layout import Layout
from appliance.audit.legacy import legacy_duckdb, needs_upgrade
from tests.audit import legacy
from tests.audit.factory import SCHEMA_REASON, decision, epoch, event, generate

START = epoch("2026-11-20T08:00:00")


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def test_a_previous_state_dir_is_detected_and_holds_every_row(tmp_path: Path):
    decisions, events = generate(100, start=START, step=60.0)
    outbox = [(r[0], r[1], r[2], r[6], r[9], 1, False, "temperature:v1") for r in decisions[-10:]]
    legacy.write_state(tmp_path, moved=(decisions[:80], events), journal=(decisions[70:], []), outbox=outbox)
    layout = Layout(tmp_path)
    assert needs_upgrade(layout) and legacy_duckdb(layout.views_file)

    conn = read_only(layout.audit_dir / legacy.JOURNAL_FILE)
    assert conn.execute("SELECT id FROM decisions ORDER BY id").fetchall() == [(r[0],) for r in decisions[70:]]
    assert conn.execute("SELECT * FROM outbox ORDER BY id").fetchall() == [(*r[:6], 0, r[7]) for r in outbox]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con = duckdb.connect(str(layout.views_file), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    assert con.execute("SELECT count(*) FROM decisions").fetchone() == (80,)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (len(events),)
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(1,), (2,)]


def test_rows_are_typed_as_the_duckdb_store_stored_them(tmp_path: Path):
    ts = epoch("2026-11-27T10:15:30.123456")
    rejected = decision(1, ts, verdict="reject", payload=b"\x00\xff")
    dry_run = (*decision(2, ts, verdict="reject")[:21], True, *decision(2, ts)[22:])
    path = legacy.write_duckdb(tmp_path / "audit.duckdb", decisions=[rejected, dry_run],
                               events=[event(3, ts, "client_connected", "dev-1", {"keepalive": 60})])
    con = duckdb.connect(str(path), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    row = con.execute("SELECT ts, reasons, payload FROM quarantine").fetchall()
    assert row == [(datetime(2026, 11, 27, 10, 15, 30, 123456, tzinfo=UTC), [SCHEMA_REASON], b"\x00\xff")]  # v2: no dry run
    assert con.execute("SELECT detail.keepalive::INT FROM events").fetchall() == [(60,)]


def test_a_hot_wal_is_read_by_a_read_only_connection(tmp_path: Path):
    """As a `kill -9` left the journal: the rows only in journal.sqlite3-wal."""
    path = legacy.write_journal(tmp_path / "journal.sqlite3", decisions=[decision(1, START)], hot_wal=True)
    assert (tmp_path / "journal.sqlite3-wal").stat().st_size > 0
    assert read_only(path).execute("SELECT count(*) FROM decisions").fetchone() == (1,)


def test_the_previous_columns_are_still_the_first_audit_columns():
    """The upgrade maps old rows by position: a record field added since must come after them."""
    assert records.DECISION_COLUMNS[:len(legacy.DECISION_COLUMNS)] == legacy.DECISION_COLUMNS
    assert records.EVENT_COLUMNS[:len(legacy.EVENT_COLUMNS)] == legacy.EVENT_COLUMNS
    assert records.OUTBOX_COLUMNS == legacy.OUTBOX_COLUMNS
