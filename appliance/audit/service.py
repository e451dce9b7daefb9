"""The audit log as a running service: the DuckDB store, the journal in front of it, the pipeline
sink, event recording and background retention, started and stopped with the appliance."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from appliance.admin import AdminError
from appliance.audit.journal import Journal
from appliance.audit.records import IdClock
from appliance.audit.sink import AuditSink
from appliance.audit.store import AuditStore, RetentionPolicy
from appliance.config import AuditConfig

log = logging.getLogger(__name__)

DUCKDB_FILE = "audit.duckdb"
JOURNAL_FILE = "journal.sqlite3"


def export_finished_days(store: AuditStore, to_dir: Path, *, now: datetime | None = None) -> list[str]:
    """Export each UTC day before today that has rows and no `.exported-DAY` marker in `to_dir`."""
    now = now or datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    result = store.query("SELECT DISTINCT CAST(date_trunc('day', ts) AS DATE) AS day FROM decisions ORDER BY day")
    exported = []
    for (day,) in result.rows:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        marker = to_dir / f".exported-{day.isoformat()}"
        if start >= today or marker.exists():
            continue
        store.export_parquet(to_dir, since=start, until=start + timedelta(days=1))
        marker.write_text(now.isoformat() + "\n")
        exported.append(day.isoformat())
    return exported


def audit_dir(state_dir: Path) -> Path:
    return state_dir / "audit"


def retention_policy(config: AuditConfig) -> RetentionPolicy:
    retention = config.retention
    return RetentionPolicy(
        verdicts_max_age=retention.verdicts.max_age,
        verdicts_max_bytes=retention.verdicts.max_bytes,
        payloads_max_age=retention.payloads.max_age,
        payloads_max_bytes=retention.payloads.max_bytes,
        quarantine_max_age=retention.quarantine.max_age,
        quarantine_max_bytes=retention.quarantine.max_bytes,
    )


class AuditService:
    def __init__(
        self,
        config: AuditConfig,
        state_dir: Path,
        *,
        config_revision: str,
        dry_run: bool,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        forward: bool = False,
    ):
        self.config = config
        directory = audit_dir(state_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.store = AuditStore(directory / DUCKDB_FILE)
        # The journal's own events (degraded, recovered) go to the appliance, which records them here.
        self.journal = Journal(
            directory / JOURNAL_FILE, self.store, on_event=on_event or self.record_event, max_bytes=config.journal_max_bytes
        )
        # Rows a crash left in the journal go to DuckDB first; ids continue after everything stored.
        self.journal.recover()
        recovered = self.journal.move_all()
        if recovered:
            log.info("audit: moved %d records left in the journal by the last run to DuckDB", recovered)
        self.clock = IdClock(start_after=max(*self.store.max_ids(), *self.journal.max_ids()))
        self.sink = AuditSink(
            self.journal, self.clock, record_payloads=config.record_payloads, config_revision=config_revision, dry_run=dry_run,
            forward=forward,
        )
        self._retention_task: asyncio.Task[None] | None = None
        self._export_task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def durability(self) -> Journal | None:
        """What acks wait for, when `durable_acks` is on."""
        return self.journal if self.config.durable_acks else None

    def record_event(self, kind: str, detail: dict[str, Any]) -> None:
        now = time.time()
        client_id = detail.get("client_id")
        peer = detail.get("peer")
        rest = {k: v for k, v in detail.items() if k not in ("client_id", "peer")}
        self.journal.add_event((self.clock.next(now), now, kind, client_id, peer, orjson.dumps(rest, default=str).decode()))

    async def sync(self) -> None:
        """Make everything recorded so far visible in DuckDB: wait for the journal to commit it,
        then move it (analysts expect a query to see the messages they just sent)."""
        target = self.journal.last_seq
        if self.journal.committed < target:
            done = asyncio.get_running_loop().create_future()

            def check(seq: int) -> None:
                if seq >= target and not done.done():
                    done.set_result(None)

            self.journal.add_listener(check)
            try:
                await asyncio.wait_for(done, 30)
            except TimeoutError as exc:
                raise AdminError("the audit journal has not committed for 30 s; see the appliance's log") from exc
            finally:
                self.journal.remove_listener(check)
        await asyncio.to_thread(self.journal.move_all)

    async def start(self) -> None:
        self.journal.start(asyncio.get_running_loop())
        interval = self.config.retention.interval or timedelta(minutes=10)
        self._retention_task = asyncio.create_task(self._retain(interval.total_seconds()), name="audit-retention")
        if self.config.export.to is not None:
            every = (self.config.export.interval or timedelta(hours=1)).total_seconds()
            self._export_task = asyncio.create_task(self._export_days(self.config.export.to, every), name="audit-export")

    async def _retain(self, interval: float) -> None:
        policy = retention_policy(self.config)
        while True:
            try:
                report = await asyncio.to_thread(self.store.enforce_retention, policy)
                log.debug("audit retention: %s", report)
            except Exception:  # noqa: BLE001 - retention must never take the appliance down
                log.exception("audit retention failed; will try again in %.0fs", interval)
            await asyncio.sleep(interval)

    async def _export_days(self, to_dir: Path, interval: float) -> None:
        """Export every finished UTC day not exported yet (a marker file per day remembers which)."""
        while True:
            try:
                await self.sync()
                await asyncio.to_thread(export_finished_days, self.store, to_dir)
            except Exception:  # noqa: BLE001 - a failed export is retried; it never stops message flow
                log.exception("scheduled audit export to %s failed; will try again in %.0fs", to_dir, interval)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """Commit and move everything to DuckDB, then close; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._retention_task, self._export_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.journal.stop)
        self.store.close()
