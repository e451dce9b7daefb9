from __future__ import annotations

from datetime import UTC, datetime

import pytest

from appliance.audit.quarantine import topic_filter_regex
from appliance.audit.store import AuditStore
from tests.audit.factory import TOPIC_REASON, decision, epoch

T0 = epoch("2026-11-27T10:00:00")


@pytest.fixture
def held(store: AuditStore) -> AuditStore:
    store.append([
        decision(1, T0, device="a", verdict="reject", payload=b"x" * 10),
        decision(2, T0 + 60, device="b", verdict="accept"),
        decision(3, T0 + 120, device="b", verdict="reject", payload=b"y" * 20, reasons=[TOPIC_REASON]),
        decision(4, T0 + 180, device="c", verdict="reject", payload=b"z" * 30,
                 topic="sensor/c/humidity"),
    ])
    return store


def ids(result) -> list[int]:
    return [row[result.columns.index("id")] for row in result.rows]


def test_list_is_newest_first_with_a_short_reason(held: AuditStore):
    result = held.quarantine_list()
    assert ids(result) == [4, 3, 1] and not result.truncated
    row = dict(zip(result.columns, result.rows[1]))
    assert row["reason"] == "topic: topic not allowed" and row["payload_size"] == 20


def test_list_filters(held: AuditStore):
    assert ids(held.quarantine_list(topic="sensor/b/temperature")) == [3]
    assert ids(held.quarantine_list(topic="sensor/+/temperature")) == [3, 1]
    assert ids(held.quarantine_list(topic="sensor/#")) == [4, 3, 1]
    assert ids(held.quarantine_list(topic="other/#")) == []
    assert ids(held.quarantine_list(since=datetime(2026, 11, 27, 10, 2, tzinfo=UTC))) == [4, 3]
    assert ids(held.quarantine_list(since=datetime(2026, 11, 27, 10, 2))) == [4, 3]  # naive = UTC
    assert ids(held.quarantine_list(reason="topic")) == [3]
    assert ids(held.quarantine_list(reason="GREATER THAN THE MAXIMUM")) == [4, 1]
    limited = held.quarantine_list(limit=2)
    assert ids(limited) == [4, 3] and limited.truncated


def test_topic_filter_regex():
    assert topic_filter_regex("a/+/c") == "a/[^/]*/c"
    assert topic_filter_regex("#") == ".*"
    assert topic_filter_regex("a.b/#") == "a\\.b(/.*)?"


def test_get_returns_the_whole_row(held: AuditStore):
    row = held.quarantine_get(3)
    assert row is not None
    assert row["payload"] == b"y" * 20 and row["reasons"] == [TOPIC_REASON]
    assert held.quarantine_get(2) is None  # accepted: never quarantined
    assert held.quarantine_get(99) is None


def test_purge_some_then_all(held: AuditStore):
    assert held.quarantine_size_bytes() == 60
    assert held.quarantine_purge([3, 2, 99]) == 1
    assert ids(held.quarantine_list()) == [4, 1]
    assert held.quarantine_size_bytes() == 40
    assert held.quarantine_get(3) is None
    purged = held.query("SELECT payload, payload_size FROM rejected WHERE id = 3").rows
    assert purged == [(None, 20)]  # the verdict stays in the audit log
    assert held.quarantine_purge([]) == 0
    assert held.quarantine_purge() == 2
    assert held.quarantine_size_bytes() == 0 and ids(held.quarantine_list()) == []
    assert held.query("SELECT count(*) FROM rejected").rows == [(3,)]
    accepted = held.query("SELECT payload IS NOT NULL FROM decisions WHERE id = 2").rows
    assert accepted == [(True,)]  # purging never touches accepted messages
