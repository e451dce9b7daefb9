"""Retention over the Parquet store (appliance/audit/retain.py): verdicts by whole UTC days,
payloads and quarantined payloads by age and by size, the verdicts staying."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time

from appliance.audit.query import AuditQuery
from appliance.audit.records import IdClock
from appliance.audit.retain import enforce_retention
from appliance.audit.retention import RetentionPolicy, RetentionReport
from tests.audit.factory import decision, epoch, event

NOW = "2026-11-27T12:00:00"
DAY = 86400.0
EVERYTHING_CONVERTED = (1.0, 1.0)  # retention leaves the tail (minutes old) to the next run


@pytest.fixture
def daily(audit_state) -> Path:  # noqa: ANN001
    """For each of the last 10 days (age 0 = now, 9 = nine days ago, each 1 s after 12:00), an
    accepted and a rejected decision (payload 10 B each) and an event."""
    clock = IdClock()
    decisions, events = [], []
    for age in range(9, -1, -1):
        at = epoch(NOW) - age * DAY + 1
        decisions.append(decision(clock.next(at), at, device=f"age{age}", payload=b"a" * 10))
        decisions.append(decision(clock.next(at), at, device=f"age{age}", verdict="reject", payload=b"r" * 10))
        events.append(event(clock.next(at), at, "client_connected", f"age{age}"))
    return audit_state(decisions, events, split=EVERYTHING_CONVERTED)


def devices(state: Path, sql: str) -> list[str]:
    with AuditQuery(state) as query:
        return [row[0] for row in query.query(sql).rows]


def one(state: Path, sql: str) -> object:
    with AuditQuery(state) as query:
        return query.query(sql).rows[0][0]


def quarantine_bytes(state: Path) -> int:
    return int(one(state, "SELECT coalesce(sum(payload_size), 0) FROM quarantine"))  # type: ignore[arg-type]


def parquet_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in (state / "audit" / "parquet").rglob("*.parquet"))


def test_nothing_to_do(daily: Path):
    before = parquet_bytes(daily)
    assert enforce_retention(daily, RetentionPolicy()) == RetentionReport()
    assert parquet_bytes(daily) == before


@freeze_time(NOW)
def test_verdicts_by_age_delete_whole_days_of_decisions_and_events(daily: Path):
    report = enforce_retention(daily, RetentionPolicy(verdicts_max_age=timedelta(days=7)))
    # Days that ended before the cutoff (7 days ago, 12:00) go: 8 and 9 days old. The day the
    # cutoff falls in stays whole.
    assert (report.decisions_deleted, report.events_deleted) == (4, 2)
    kept = devices(daily, "SELECT DISTINCT client_id FROM decisions ORDER BY 1")
    assert kept == [f"age{a}" for a in range(8)]
    assert devices(daily, "SELECT client_id FROM events ORDER BY 1") == kept


@freeze_time(NOW)
def test_payload_and_quarantine_ages_only_null_payloads(daily: Path):
    report = enforce_retention(daily, RetentionPolicy(
        payloads_max_age=timedelta(days=2), quarantine_max_age=timedelta(days=5)))
    assert (report.payloads_dropped, report.quarantine_dropped, report.decisions_deleted) == (7, 4, 0)
    held_accepted = devices(daily, "SELECT client_id FROM accepted WHERE payload IS NOT NULL ORDER BY 1")
    assert held_accepted == ["age0", "age1", "age2"]
    assert devices(daily, "SELECT client_id FROM quarantine ORDER BY 1") == [f"age{a}" for a in range(6)]
    assert one(daily, "SELECT count(*) FROM decisions") == 20


def test_quarantine_by_size_drops_the_oldest_payloads(daily: Path):
    assert quarantine_bytes(daily) == 100
    report = enforce_retention(daily, RetentionPolicy(quarantine_max_bytes=35))
    assert report.quarantine_dropped == 7
    assert quarantine_bytes(daily) == 30
    assert devices(daily, "SELECT client_id FROM quarantine ORDER BY 1") == ["age0", "age1", "age2"]
    assert one(daily, "SELECT count(*) FROM accepted WHERE payload IS NOT NULL") == 10


def test_accepted_payloads_by_size_drop_the_oldest(daily: Path):
    report = enforce_retention(daily, RetentionPolicy(payloads_max_bytes=45))
    assert report.payloads_dropped == 6
    held = devices(daily, "SELECT client_id FROM accepted WHERE payload IS NOT NULL ORDER BY 1")
    assert held == ["age0", "age1", "age2", "age3"]
    assert quarantine_bytes(daily) == 100  # rejected payloads untouched


def test_verdicts_by_size_delete_whole_oldest_days(daily: Path):
    files = list((daily / "audit" / "parquet").rglob("*.parquet"))
    newest_three = sum(p.stat().st_size for p in files
                       if any(f"day=2026-11-{d}" in str(p) for d in (25, 26, 27)))
    report = enforce_retention(daily, RetentionPolicy(verdicts_max_bytes=newest_three))
    assert (report.decisions_deleted, report.events_deleted) == (14, 7)
    assert devices(daily, "SELECT DISTINCT client_id FROM decisions ORDER BY 1") == ["age0", "age1", "age2"]
    assert parquet_bytes(daily) <= newest_three
    everything = enforce_retention(daily, RetentionPolicy(verdicts_max_bytes=0))
    assert (everything.decisions_deleted, everything.events_deleted) == (6, 3)
    with AuditQuery(daily) as query:
        assert query.max_ids() == (0, 0)


def test_dropped_payloads_free_their_bytes(audit_state):  # noqa: ANN001
    """Payload retention rewrites the files without the payloads: the files shrink, so a size limit
    on verdicts keeps more days afterwards."""
    clock = IdClock()
    start = epoch(NOW)
    noise = random.Random(1)  # payloads that do not compress
    rows = [decision(clock.next(start + i), start + i, payload=noise.randbytes(256)) for i in range(50)]
    state = audit_state(rows, split=EVERYTHING_CONVERTED)
    before = parquet_bytes(state)
    report = enforce_retention(state, RetentionPolicy(payloads_max_age=timedelta(0)),
                               now=datetime(2026, 11, 27, 13, 0, tzinfo=UTC))
    assert report.payloads_dropped == 50
    assert parquet_bytes(state) < before - 50 * 256
    assert one(state, "SELECT count(*) FROM decisions WHERE payload IS NULL") == 50
