"""Quarantine listings, filters, a whole row, and purges over the Parquet files and the log's tail."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.audit.purge import purge_quarantine
from appliance.audit.query import AuditQuery
from tests.audit.factory import TOPIC_REASON, decision, epoch

T0 = epoch("2026-11-27T10:00:00")
# Payloads without repeats, so they show literally in compressed files too.
P1, P3, P4 = b"secret-one", b"secret-three-payload", b"secret-four-payload-is-thirty!"


@pytest.fixture
def held(audit_state) -> Path:  # noqa: ANN001
    """Ids 1-2 in Parquet, 3 in a sealed segment not converted yet, 4 in the active segment."""
    return audit_state([
        decision(1, T0, device="a", verdict="reject", payload=P1),
        decision(2, T0 + 60, device="b", verdict="accept"),
        decision(3, T0 + 120, device="b", verdict="reject", payload=P3, reasons=[TOPIC_REASON]),
        decision(4, T0 + 180, device="c", verdict="reject", payload=P4,
                 topic="sensor/c/humidity"),
    ], split=(0.5, 0.75))


def ids(result) -> list[int]:  # noqa: ANN001
    return [row[result.columns.index("id")] for row in result.rows]


def listed(state: Path, **filters: object) -> list[int]:
    with AuditQuery(state) as query:
        return ids(query.quarantine_list(**filters))  # type: ignore[arg-type]


def sql(state: Path, text: str) -> list[tuple[object, ...]]:
    with AuditQuery(state) as query:
        return query.query(text).rows


def held_bytes(state: Path) -> int:
    return sql(state, "SELECT coalesce(sum(payload_size), 0) FROM quarantine")[0][0]


def on_disk(state: Path, needle: bytes) -> list[Path]:
    return [p for p in state.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_list_is_newest_first_with_a_short_reason(held: Path):
    with AuditQuery(held) as query:
        result = query.quarantine_list()
    assert ids(result) == [4, 3, 1] and not result.truncated
    row = dict(zip(result.columns, result.rows[1]))
    assert row["reason"] == "topic: topic not allowed" and row["payload_size"] == 20


def test_list_filters(held: Path):
    with AuditQuery(held) as query:
        def found(**filters: object) -> list[int]:
            return ids(query.quarantine_list(**filters))  # type: ignore[arg-type]

        assert found(topic="sensor/b/temperature") == [3]
        assert found(topic="sensor/+/temperature") == [3, 1]
        assert found(topic="sensor/#") == [4, 3, 1]
        assert found(topic="other/#") == []
        assert found(since=datetime(2026, 11, 27, 10, 2, tzinfo=UTC)) == [4, 3]
        assert found(since=datetime(2026, 11, 27, 10, 2)) == [4, 3]  # naive = UTC
        assert found(reason="topic") == [3]
        assert found(reason="GREATER THAN THE MAXIMUM") == [4, 1]
        limited = query.quarantine_list(limit=2)
        assert ids(limited) == [4, 3] and limited.truncated


def test_get_returns_the_whole_row(held: Path):
    with AuditQuery(held) as query:
        for tail in (1, 3, 4):  # Parquet, sealed segment, active segment
            assert query.quarantine_get(tail)["verdict"] == "reject"  # type: ignore[index]
        row = query.quarantine_get(3)
        assert row is not None
        assert row["payload"] == P3 and row["reasons"] == [TOPIC_REASON]
        assert query.quarantine_get(2) is None  # accepted: never quarantined
        assert query.quarantine_get(99) is None


def test_purge_some_then_all(held: Path):
    """With the appliance stopped (seal=None): every segment, the newest too, is rewritten."""
    assert held_bytes(held) == 60
    assert all(on_disk(held, p) for p in (P1, P3, P4))
    assert purge_quarantine(held, [3, 2, 99], seal=None) == 1
    assert listed(held) == [4, 1]
    assert held_bytes(held) == 40
    with AuditQuery(held) as query:
        assert query.quarantine_get(3) is None
    assert sql(held, "SELECT payload, payload_size FROM rejected WHERE id = 3") == [(None, 20)]  # the verdict stays
    assert purge_quarantine(held, [], seal=None) == 0
    assert purge_quarantine(held, None, seal=None) == 2
    assert held_bytes(held) == 0 and listed(held) == []
    assert sql(held, "SELECT count(*) FROM rejected") == [(3,)]
    assert sql(held, "SELECT payload IS NOT NULL FROM decisions WHERE id = 2") == [(True,)]  # accepted: untouched
    for payload in (P1, P3, P4):
        assert on_disk(held, payload) == []  # gone from the disk, not just hidden
