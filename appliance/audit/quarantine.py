"""Quarantine queries: rejected messages whose payload the audit log still holds (the `quarantine`
view), read through a cursor of AuditQuery. Purging their payloads is purge.py's job."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import duckdb

from appliance.audit.results import QueryResult
from appliance.mqtt.topics import topic_filter_regex

_LIST_COLUMNS = """
    id, ts, client_id, topic, schema_name, schema_version, reason_code,
    CASE WHEN len(reasons) > 0 THEN reasons[1]."check" || ': ' || reasons[1].message END AS reason,
    len(reasons) AS reasons, payload_size"""


def conditions(*, topic: str | None, reason: str | None) -> tuple[list[str], list[object]]:
    """SQL conditions (and their parameters) on quarantine rows: `topic` is a topic or an MQTT
    filter; `reason` matches a check name exactly or any part of a reason's message
    (case-insensitive). Used by `list_held` and the console's quarantine page."""
    where: list[str] = ["TRUE"]
    params: list[object] = []
    if topic is not None:
        if "+" in topic or "#" in topic:
            where.append("regexp_full_match(topic, ?)")
            params.append(topic_filter_regex(topic))
        else:
            where.append("topic = ?")
            params.append(topic)
    if reason is not None:
        where.append(
            "len(list_filter(reasons, lambda r: lower(r.\"check\") = lower(?) "
            "OR contains(lower(r.message), lower(?)))) > 0"
        )
        params += [reason, reason]
    return where, params


def list_held(
    cursor: duckdb.DuckDBPyConnection,
    *,
    topic: str | None,
    since: datetime | None,
    reason: str | None,
    limit: int,
) -> QueryResult:
    """Newest first. `topic` is a topic or an MQTT filter; `reason` matches a check name exactly
    or any part of a reason's message (case-insensitive)."""
    where, params = conditions(topic=topic, reason=reason)
    if since is not None:
        where.append("ts >= ?")
        params.append(since if since.tzinfo else since.replace(tzinfo=UTC))
    sql = (f"SELECT {_LIST_COLUMNS} FROM quarantine WHERE {' AND '.join(where)} "
           f"ORDER BY id DESC LIMIT ?")
    cursor.execute(sql, [*params, limit + 1])
    columns = [d[0] for d in cursor.description or ()]
    rows = cursor.fetchall()
    return QueryResult(columns, rows[:limit], len(rows) > limit)


def get(cursor: duckdb.DuckDBPyConnection, decision_id: int) -> dict[str, Any] | None:
    """A quarantined message (rejected, payload still held) with every column; None when the id is
    unknown, was accepted, or its payload was purged (the verdict is still in `rejected`)."""
    cursor.execute("SELECT * FROM quarantine WHERE id = ?", [decision_id])
    row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip([d[0] for d in cursor.description or ()], row))
