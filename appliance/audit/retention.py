"""Retention settings and what a pass did: how long the audit log keeps verdicts and payloads, and
how big it may grow. Enforced over the Parquet store by retain.py (verdicts by whole UTC days,
payloads by rewriting the files that hold them; the verdicts stay)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


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
