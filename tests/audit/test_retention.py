from __future__ import annotations

from datetime import UTC, datetime, timedelta

from freezegun import freeze_time

from appliance.audit.records import IdClock
from appliance.audit.retention import DECISION_OVERHEAD, RetentionPolicy
from appliance.audit.store import AuditStore
from tests.audit.factory import decision, epoch, event

NOW = "2026-11-27T12:00:00"
DAY = 86400.0


def daily(store: AuditStore) -> None:
    """For each of the last 10 days (age 0 = now, 9 = nine days ago, each 1 s after 12:00), an
    accepted and a rejected decision (payload 10 B each) and an event."""
    clock = IdClock()
    decisions, events = [], []
    for age in range(9, -1, -1):
        at = epoch(NOW) - age * DAY + 1
        decisions.append(decision(clock.next(at), at, device=f"age{age}", payload=b"a" * 10))
        decisions.append(decision(clock.next(at), at, device=f"age{age}", verdict="reject", payload=b"r" * 10))
        events.append(event(clock.next(at), at, "client_connected", f"age{age}"))
    store.append(decisions, events)


def devices(store: AuditStore, sql: str) -> list[str]:
    return [row[0] for row in store.query(sql).rows]


def test_nothing_to_do(store: AuditStore):
    daily(store)
    report = store.enforce_retention(RetentionPolicy())
    assert report.decisions_deleted == report.payloads_dropped == report.quarantine_dropped == 0
    assert not report.checkpointed


@freeze_time(NOW)
def test_verdicts_by_age_delete_decisions_and_events(store: AuditStore):
    daily(store)
    report = store.enforce_retention(RetentionPolicy(verdicts_max_age=timedelta(days=7)))
    # Rows a second short of 7 days old are kept; 8 and 9 days old are gone.
    assert (report.decisions_deleted, report.events_deleted) == (4, 2)
    assert report.checkpointed
    kept = devices(store, "SELECT DISTINCT client_id FROM decisions ORDER BY 1")
    assert kept == [f"age{a}" for a in range(8)]
    assert devices(store, "SELECT client_id FROM events ORDER BY 1") == kept


@freeze_time(NOW)
def test_payload_and_quarantine_ages_only_null_payloads(store: AuditStore):
    daily(store)
    report = store.enforce_retention(RetentionPolicy(
        payloads_max_age=timedelta(days=2), quarantine_max_age=timedelta(days=5)))
    assert (report.payloads_dropped, report.quarantine_dropped, report.decisions_deleted) == (7, 4, 0)
    held_accepted = devices(store, "SELECT client_id FROM accepted WHERE payload IS NOT NULL ORDER BY 1")
    assert held_accepted == ["age0", "age1", "age2"]
    assert devices(store, "SELECT client_id FROM quarantine ORDER BY 1") == [f"age{a}" for a in range(6)]
    assert store.query("SELECT count(*) FROM decisions").rows == [(20,)]


def test_quarantine_by_size_drops_the_oldest_payloads(store: AuditStore):
    daily(store)
    assert store.quarantine_size_bytes() == 100
    report = store.enforce_retention(RetentionPolicy(quarantine_max_bytes=35))
    assert report.quarantine_dropped == 7
    assert store.quarantine_size_bytes() == 30
    assert devices(store, "SELECT client_id FROM quarantine ORDER BY 1") == ["age0", "age1", "age2"]
    assert store.query("SELECT count(*) FROM accepted WHERE payload IS NOT NULL").rows == [(10,)]


def test_accepted_payloads_by_size_drop_the_oldest(store: AuditStore):
    daily(store)
    report = store.enforce_retention(RetentionPolicy(payloads_max_bytes=45))
    assert report.payloads_dropped == 6
    held = devices(store, "SELECT client_id FROM accepted WHERE payload IS NOT NULL ORDER BY 1")
    assert held == ["age0", "age1", "age2", "age3"]
    assert store.quarantine_size_bytes() == 100  # rejected payloads untouched


def test_verdicts_by_size_delete_whole_oldest_minutes(store: AuditStore):
    clock = IdClock()
    start = epoch(NOW)
    payload = b"p" * (100 - DECISION_OVERHEAD)  # every decision is estimated at 100 bytes
    decisions = [decision(clock.next(start + m * 60 + s), start + m * 60 + s, device=f"m{m}", payload=payload)
                 for m in range(10) for s in (0, 30)]  # 2 per minute for 10 minutes
    events = [event(IdClock().next(start + 5), start + 5, "client_connected", "m0", {})]
    store.append(decisions, events)
    # 4 newest minutes fit (800 B); the fifth would not (and the event's minute is long gone).
    report = store.enforce_retention(RetentionPolicy(verdicts_max_bytes=899))
    assert (report.decisions_deleted, report.events_deleted) == (12, 1)
    assert devices(store, "SELECT DISTINCT client_id FROM decisions ORDER BY 1") == ["m6", "m7", "m8", "m9"]
    # A held payload counts; a dropped one does not: after dropping payloads more minutes fit.
    store.enforce_retention(RetentionPolicy(payloads_max_age=timedelta(0)),
                            now=datetime(2026, 11, 27, 13, 0, tzinfo=UTC))
    again = store.enforce_retention(RetentionPolicy(verdicts_max_bytes=899))
    assert again.decisions_deleted == 0
    everything = store.enforce_retention(RetentionPolicy(verdicts_max_bytes=10))
    assert everything.decisions_deleted == 8
    assert store.max_ids() == (0, 0)
