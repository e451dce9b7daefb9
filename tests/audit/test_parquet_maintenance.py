"""Purge, retention and export on the Parquet store and the log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from appliance.audit.archive import export_range
from appliance.audit.layout import Layout
from appliance.audit.purge import purge_quarantine
from appliance.audit.query import AuditQuery
from appliance.audit.records import DECISION, IdClock
from appliance.audit.retain import enforce_retention
from appliance.audit.retention import RetentionPolicy
from appliance.audit.seal import convert_pending
from appliance.msglog.log import MessageLog
from appliance.msglog.reader import read_log
from tests.audit.factory import decision, epoch, generate
from tests.audit.logfiles import chunks, log_decision, rows_to_records, write_log

START = epoch("2026-11-20T08:00:00")


def secret(i: int) -> bytes:
    return f"SECRET-PAYLOAD-{i:04d}".encode()


def marked_rows(count: int, clock: IdClock, start: float, *, offset: int = 0) -> list[tuple[object, ...]]:
    """Every second row rejected, each with a payload nobody could find by chance."""
    return [decision(clock.next(start + i * 60), start + i * 60, payload=secret(offset + i),
                     verdict="reject" if i % 2 else "accept") for i in range(count)]


def on_disk(state: Path, needle: bytes) -> list[Path]:
    return [p for p in state.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.fixture
def running(tmp_path: Path):
    """40 decisions converted to Parquet (uncompressed payloads there would be hard to find:
    Parquet compresses, so the test looks for them through the query and in the log), 10 more in
    a sealed unconverted segment, and a running log whose active segment gets 10 more."""
    clock = IdClock()
    rows = marked_rows(60, clock, START)
    write_log(tmp_path / "log", chunks(rows_to_records(rows[:40]), 20) + [rows_to_records(rows[40:50])])
    convert_pending(Layout(tmp_path))
    log = MessageLog(tmp_path / "log", segment_max_age=None)
    log.open()
    log.seal()  # the 10 records become a sealed segment the helper has not converted
    log.start(None)
    last = 0
    for row in rows[50:]:
        last = log.append(DECISION.code, DECISION.encode(log_decision(row)))
    assert log.wait_durable(last, timeout=10)
    yield tmp_path, log, rows
    log.stop()


def quarantine_ids(state: Path) -> set[int]:
    with AuditQuery(state) as query:
        return {r[0] for r in query.cursor().execute("SELECT id FROM quarantine").fetchall()}


def test_purge_removes_the_payload_bytes_wherever_they_are(running):
    state, log, rows = running
    in_parquet, in_sealed, in_active = rows[1], rows[41], rows[51]
    ids = [in_parquet[0], in_sealed[0], in_active[0]]
    before = quarantine_ids(state)
    assert set(ids) <= before
    assert on_disk(state / "log", secret(51)) and on_disk(state / "log", secret(41))

    assert purge_quarantine(state, ids, seal=log.seal) == 3

    assert quarantine_ids(state) == before - set(ids)
    with AuditQuery(state) as query:
        for i in ids:
            assert query.quarantine_get(i) is None
            assert query.cursor().execute("SELECT payload, payload_size FROM rejected WHERE id = ?", [i]).fetchall() \
                == [(None, len(secret(0)))]
        assert query.quarantine_get(rows[3][0])["payload"] == secret(3)
    for i in (1, 41, 51):
        assert on_disk(state, secret(i)) == []
    assert on_disk(state / "log", secret(53))  # the others are still held
    # The log is intact: same records, same seqs, only those payloads emptied.
    records = list(read_log(state / "log"))
    assert [DECISION.decode(r.body)[0] for r in records] == [r[0] for r in rows]


def test_purge_all_leaves_accepted_payloads(running):
    state, log, rows = running
    assert purge_quarantine(state, None, seal=log.seal) == 30
    assert quarantine_ids(state) == set()
    for i in range(1, 60, 2):
        assert on_disk(state, secret(i)) == []
    with AuditQuery(state) as query:
        assert query.query("SELECT count(*) FROM accepted WHERE payload IS NOT NULL").rows == [(30,)]


def test_purge_offline_rewrites_the_newest_segment_too(tmp_path: Path):
    rows = marked_rows(10, IdClock(), START)
    write_log(tmp_path / "log", [rows_to_records(rows)])
    assert purge_quarantine(tmp_path, [rows[1][0]], seal=None) == 1
    assert on_disk(tmp_path, secret(1)) == []
    assert purge_quarantine(tmp_path, [], seal=None) == 0


def test_a_purged_segment_converts_without_the_payloads(running):
    state, log, rows = running
    purge_quarantine(state, None, seal=log.seal)
    log.seal()
    convert_pending(Layout(state))
    with AuditQuery(state) as query:
        assert query.tail_records == 0
        assert query.query("SELECT count(*) FROM rejected WHERE payload IS NULL").rows == [(30,)]
        assert query.query("SELECT count(*) FROM decisions").rows == [(60,)]


# -- retention --------------------------------------------------------------------------------------

@pytest.fixture
def three_days(tmp_path: Path) -> Path:
    """3 days of decisions (one per 10 minutes, every 5th rejected), all converted."""
    decisions, events = generate(432, start=START, step=600.0)
    write_log(tmp_path / "log", chunks(rows_to_records(decisions, events), 100) + [[]])
    convert_pending(Layout(tmp_path))
    return tmp_path


def days(state: Path, table: str = "decisions") -> list[str]:
    return sorted(p.name for p in (state / "audit" / "parquet" / table).iterdir())


def count(state: Path, sql: str) -> int:
    with AuditQuery(state) as query:
        return query.query(sql).rows[0][0]


def test_verdicts_max_age_drops_whole_days_that_ended_before_the_cutoff(three_days: Path):
    assert days(three_days) == ["day=2026-11-20", "day=2026-11-21", "day=2026-11-22", "day=2026-11-23"]
    before = count(three_days, "SELECT count(*) FROM decisions WHERE ts < '2026-11-21'")
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    report = enforce_retention(three_days, RetentionPolicy(verdicts_max_age=timedelta(days=2)), now=now)
    assert days(three_days) == ["day=2026-11-21", "day=2026-11-22", "day=2026-11-23"]  # the 21st is partly inside
    assert report.decisions_deleted == before
    assert count(three_days, "SELECT min(ts) FROM decisions") >= datetime(2026, 11, 21, tzinfo=UTC)
    assert days(three_days, "events")[0] >= "day=2026-11-21"


def test_verdicts_max_bytes_drops_the_oldest_days_until_the_files_fit(three_days: Path):
    files = list((three_days / "audit" / "parquet").rglob("*.parquet"))
    total = sum(p.stat().st_size for p in files)
    newest = sum(p.stat().st_size for p in files if "2026-11-23" in str(p) or "2026-11-22" in str(p))
    enforce_retention(three_days, RetentionPolicy(verdicts_max_bytes=newest + 1))
    assert days(three_days) == ["day=2026-11-22", "day=2026-11-23"]
    assert sum(p.stat().st_size for p in (three_days / "audit" / "parquet").rglob("*.parquet")) <= newest + 1 < total


def test_payload_and_quarantine_max_age_null_old_payloads_only(three_days: Path):
    now = datetime(2026, 11, 22, tzinfo=UTC)
    report = enforce_retention(three_days, RetentionPolicy(payloads_max_age=timedelta(days=1)), now=now)
    assert report.payloads_dropped == count(three_days, "SELECT count(*) FROM accepted WHERE ts < '2026-11-21'")
    assert count(three_days, "SELECT count(*) FROM accepted WHERE ts < '2026-11-21' AND payload IS NOT NULL") == 0
    assert count(three_days, "SELECT count(*) FROM accepted WHERE ts >= '2026-11-21' AND payload IS NULL") == 0
    assert count(three_days, "SELECT count(*) FROM rejected WHERE payload IS NULL") == 0
    report = enforce_retention(three_days, RetentionPolicy(quarantine_max_age=timedelta(days=1)), now=now)
    assert report.quarantine_dropped > 0
    assert count(three_days, "SELECT count(*) FROM quarantine WHERE ts < '2026-11-21'") == 0
    assert count(three_days, "SELECT count(*) FROM decisions") == 432  # verdicts stay


def test_quarantine_max_bytes_keeps_the_newest_payloads_that_fit(three_days: Path):
    total = count(three_days, "SELECT sum(payload_size) FROM quarantine")
    report = enforce_retention(three_days, RetentionPolicy(quarantine_max_bytes=total // 2))
    assert report.quarantine_dropped > 0
    held = count(three_days, "SELECT sum(payload_size) FROM quarantine")
    assert total // 2 - 200 < held <= total // 2
    assert count(three_days, "SELECT max(id) FROM rejected WHERE payload IS NULL") < \
        count(three_days, "SELECT min(id) FROM quarantine")


# -- export -----------------------------------------------------------------------------------------

def test_export_covers_parquet_and_tail_for_a_time_range(tmp_path: Path):
    decisions, events = generate(600, start=START, step=180.0)
    write_log(tmp_path / "log", chunks(rows_to_records(decisions, events), 100))
    convert_pending(Layout(tmp_path))
    since, until = datetime(2026, 11, 20, 12, tzinfo=UTC), datetime(2026, 11, 22, tzinfo=UTC)
    report = export_range(tmp_path, tmp_path / "out", since=since, until=until)
    expected = sum(1 for r in decisions if since.timestamp() <= r[1] < until.timestamp())
    assert report.decisions == expected
    got = duckdb.connect().execute(f"SELECT count(*), max(ts) FROM read_parquet('{tmp_path}/out/decisions/*/*.parquet')").fetchone()
    assert got[0] == expected
    assert got[1].timestamp() == max(r[1] for r in decisions)  # from the active segment


def test_views_file_still_works_when_retention_removed_every_file(three_days: Path):
    enforce_retention(three_days, RetentionPolicy(verdicts_max_age=timedelta(days=1)),
                      now=datetime(2027, 1, 1, tzinfo=UTC))
    con = duckdb.connect(str(three_days / "audit" / "audit.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM decisions").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (0,)
