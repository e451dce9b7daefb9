"""Retention: how long the audit log keeps verdicts, and payloads, and how big it may grow.

Verdict retention deletes rows, oldest first (events with them, so joins stay whole); payload and
quarantine retention only set `payload` to NULL, so the verdict stays auditable. Afterwards a
CHECKPOINT lets DuckDB reuse (and at the end of the file, release) the freed blocks.

Sizes are estimates, not DuckDB's block counts (which only shrink after a checkpoint and cannot say
which rows to drop): a decision counts its held payload's bytes plus `DECISION_OVERHEAD`, an event
its detail's length plus `EVENT_OVERHEAD`. The overheads were measured on realistic rows (compressed
columns, 100k rows, after CHECKPOINT, see docs/audit.md). Verdicts are dropped by whole minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb

from appliance.audit.records import IdClock

DECISION_OVERHEAD = 64   # bytes per decision row besides its payload, compressed on disk
EVENT_OVERHEAD = 48      # bytes per event row besides its detail

_MS_BITS = IdClock.SEQUENCE_BITS


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    verdicts_max_age: timedelta | None = None
    verdicts_max_bytes: int | None = None
    payloads_max_age: timedelta | None = None      # accepted messages' payloads
    payloads_max_bytes: int | None = None
    quarantine_max_age: timedelta | None = None    # rejected messages' payloads
    quarantine_max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RetentionReport:
    decisions_deleted: int = 0
    events_deleted: int = 0
    payloads_dropped: int = 0       # accepted messages whose payload was removed
    quarantine_dropped: int = 0     # rejected messages whose payload was removed
    checkpointed: bool = False


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[object]) -> int:
    row = con.execute(sql, params).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def enforce_retention(
    con: duckdb.DuckDBPyConnection, policy: RetentionPolicy, *, now: datetime | None = None
) -> RetentionReport:
    """Runs on the writer connection (the caller holds its lock)."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    decisions = events = payloads = quarantined = 0
    con.begin()
    try:
        if policy.verdicts_max_age is not None:
            cutoff = now - policy.verdicts_max_age
            decisions += _count(con, "DELETE FROM decisions WHERE ts < ?", [cutoff])
            events += _count(con, "DELETE FROM events WHERE ts < ?", [cutoff])
        payloads += _drop_payloads(con, "accept", now, policy.payloads_max_age, policy.payloads_max_bytes)
        quarantined += _drop_payloads(con, "reject", now, policy.quarantine_max_age, policy.quarantine_max_bytes)
        if policy.verdicts_max_bytes is not None:
            d, e = _trim_verdicts(con, policy.verdicts_max_bytes)
            decisions, events = decisions + d, events + e
        con.commit()
    except BaseException:
        con.rollback()
        raise
    checkpointed = False
    if decisions or events or payloads or quarantined:
        try:
            con.execute("CHECKPOINT")
            checkpointed = True
        except duckdb.TransactionException:
            # Another connection's transaction is open (an analyst query): DuckDB checkpoints on
            # its own once the write-ahead log grows, so nothing is lost by not forcing it now.
            pass
    return RetentionReport(decisions, events, payloads, quarantined, checkpointed)


def _drop_payloads(
    con: duckdb.DuckDBPyConnection, verdict: str, now: datetime, max_age: timedelta | None, max_bytes: int | None
) -> int:
    """Payloads of accepted ("accept") or quarantined ("reject") messages: older than max_age, then
    the oldest beyond max_bytes. The verdict rows stay."""
    dropped = 0
    if max_age is not None:
        dropped += _count(
            con,
            f"UPDATE decisions SET payload = NULL WHERE verdict = '{verdict}' AND payload IS NOT NULL AND ts < ?",
            [now - max_age],
        )
    if max_bytes is not None:
        dropped += _trim_payloads(con, verdict, max_bytes)
    return dropped


def _trim_payloads(con: duckdb.DuckDBPyConnection, verdict: str, max_bytes: int) -> int:
    """Drops the oldest held payloads of accepted or rejected (quarantined) messages until the rest
    fit in max_bytes."""
    held = f"FROM decisions WHERE verdict = '{verdict}' AND payload IS NOT NULL"  # dry-run rows count too: they hold bytes
    total = _count(con, f"SELECT sum(payload_size) {held}", [])
    if total <= max_bytes:
        return 0
    keep_from = con.execute(
        f"SELECT min(id) FROM (SELECT id, sum(payload_size) OVER "
        f"(ORDER BY id DESC ROWS UNBOUNDED PRECEDING) AS newer {held}) WHERE newer <= ?",
        [max_bytes],
    ).fetchone()
    limit = keep_from[0] if keep_from and keep_from[0] is not None else None
    sql = f"UPDATE decisions SET payload = NULL WHERE verdict = '{verdict}' AND payload IS NOT NULL"
    return _count(con, sql + (" AND id < ?" if limit is not None else ""),
                  [limit] if limit is not None else [])


def _trim_verdicts(con: duckdb.DuckDBPyConnection, max_bytes: int) -> tuple[int, int]:
    """Deletes the oldest whole minutes of decisions and events until the estimate fits."""
    minute = f"((id >> {_MS_BITS}) // 60000)"
    sized = f"""
        SELECT {minute} AS minute,
               {DECISION_OVERHEAD} + CASE WHEN payload IS NULL THEN 0 ELSE payload_size END AS bytes
        FROM decisions
        UNION ALL
        SELECT {minute}, {EVENT_OVERHEAD} + coalesce(strlen(CAST(detail AS VARCHAR)), 0)
        FROM events"""
    total = _count(con, f"SELECT sum(bytes) FROM ({sized})", [])
    if total <= max_bytes:
        return 0, 0
    row = con.execute(
        f"""SELECT min(minute) FROM (
                SELECT minute, sum(bytes) OVER (ORDER BY minute DESC ROWS UNBOUNDED PRECEDING) AS newer
                FROM (SELECT minute, sum(bytes) AS bytes FROM ({sized}) GROUP BY minute)
            ) WHERE newer <= ?""",
        [max_bytes],
    ).fetchone()
    if row and row[0] is not None:
        first_kept = (int(row[0]) * 60000) << _MS_BITS
        return (_count(con, "DELETE FROM decisions WHERE id < ?", [first_kept]),
                _count(con, "DELETE FROM events WHERE id < ?", [first_kept]))
    # Not even the newest minute fits: keep nothing.
    return (_count(con, "DELETE FROM decisions", []), _count(con, "DELETE FROM events", []))
