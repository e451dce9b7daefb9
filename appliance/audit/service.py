"""The audit log as a running service: the message log (the single durable record of every verdict
and event), the pipeline sink, and the helper processes that turn sealed segments into Parquet and
apply retention. DuckDB never runs in this process (docs/decisions/0004-message-log.md).

Durability, as the proxy sees it (`Durability` in proxy/acks.py): a record's ticket (its seq) is
settled once `settled_seq` reaches it; it is durable unless `failed(ticket)`. The log settles batches
in order, so `settled_seq` is the larger of the last durable seq and the last failed one.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from appliance.audit.errors import AuditError
from appliance.audit.helpers import HELPER_MODULE, HelperProcesses, HelperRun
from appliance.audit.layout import OS_IO, Layout, make_dirs, previous_version, write_durably
from appliance.audit.records import COMPACT_DECISION, DECISION, EVENT, IdClock, record_id
from appliance.audit.sink import AuditSink, event_record
from appliance.config import AuditConfig
from appliance.msglog import FileIO, MessageLog, SyncPolicy, list_segments, read_segment
from appliance.names import EventKind
from appliance.pipeline import FailedTickets

log = logging.getLogger(__name__)

# An import interrupted half way (appliance/audit/upgrade.py): the next start finishes it.
UPGRADE_PROGRESS = "upgrade.json"
_EVENT = EVENT.code
_ID_KINDS = (DECISION.code, EVENT.code, COMPACT_DECISION)


def audit_dir(state_dir: Path) -> Path:
    return state_dir / "audit"


QUARANTINE_BYTES_FILE = "quarantine_bytes"
# The largest id handed out before log segments were removed (or imported by the upgrade): ids keep
# growing across restarts even when the log no longer holds the records that had them.
LAST_ID_FILE = "last_id"


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def forward_cursor_path(state_dir: Path) -> Path:
    """The forwarder's durable position in the log (appliance/forward/outbox.py)."""
    directory = state_dir / "forward"
    make_dirs(directory)
    return directory / "cursor"


def sync_policy(config: AuditConfig) -> SyncPolicy:
    def seconds(value: timedelta | None, default: float) -> float:
        return value.total_seconds() if value is not None else default

    return SyncPolicy(
        mode=config.durability,
        window=seconds(config.sync_window, 0.020),
        max_pending_bytes=config.sync_bytes or 64 * 1024,
        interval=seconds(config.sync_interval, 1.0),
    )


def last_id(log_dir: Path) -> int:
    """The largest decision or event id in the newest segments that hold any (ids keep growing across
    restarts even when the wall clock went back)."""
    for segment in reversed(list_segments(log_dir)):
        found = 0
        for record in read_segment(segment.path):
            if record.kind in _ID_KINDS:
                found = max(found, record_id(record.kind, record.body) or 0)
        if found:
            return found
    return 0


def id_clock(state_dir: Path) -> IdClock:
    """The id clock, continuing after every id handed out before: those in the log, and the one
    saved before segments were removed or by the upgrade (LAST_ID_FILE)."""
    layout = Layout(state_dir)
    return IdClock(start_after=max(last_id(layout.log_dir), _read_int(layout.audit_dir / LAST_ID_FILE)))


def upgrade_legacy(state_dir: Path) -> None:
    """A state dir written by the SQLite + DuckDB version: imported on first start, in a helper
    process (it needs DuckDB), before the log opens. Raises AuditError if the import failed."""
    directory = audit_dir(state_dir)
    if not previous_version(state_dir) and not (directory / UPGRADE_PROGRESS).exists():
        return
    log.info("audit: importing the previous version's journal and DuckDB file from %s", directory)
    done = subprocess.run([sys.executable, "-m", HELPER_MODULE, "upgrade", "--state-dir", str(state_dir)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AuditError(f"importing the previous audit log in {directory} failed: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    log.info("audit: import done: %s", done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")


class AuditService:
    def __init__(
        self,
        config: AuditConfig,
        state_dir: Path,
        *,
        on_event: Callable[[EventKind, dict[str, Any]], None] | None = None,
        forward: bool = False,
        io: FileIO = OS_IO,
    ):
        self.config = config
        self.state_dir = state_dir
        self.layout = Layout(state_dir, io=io)  # io: CrashIO in the power-loss tests
        self.layout.make_dirs(self.layout.audit_dir)  # fsync'd into its parent: a power cut cannot take it away
        # DuckDB's spill directory for the helpers and readers, owned by the service's user (a reader
        # run with sudo before the first seal would otherwise create it as root).
        self.layout.make_dirs(self.layout.tmp_dir)
        self._on_event = on_event or self.record_event
        upgrade_legacy(state_dir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.log = MessageLog(
            self.layout.log_dir,
            policy=sync_policy(config),
            segment_bytes=config.segment_bytes or 16 * 1024 * 1024,
            segment_max_age=config.segment_max_age.total_seconds() if config.segment_max_age else None,
            on_event=self._log_event,
            on_seal=self._sealed,
            io=io,
        )
        self.recovery = self.log.open()
        self.clock = id_clock(state_dir)
        self.sink = AuditSink(self.log, self.clock, record_payloads=config.record_payloads, forward=forward)
        self._failed = FailedTickets()
        self.last_failed = 0  # the highest seq that failed (0: none): acks ask failed() only up to it
        # Records up to here are settled (durable, or failed): an attribute, not a property, since
        # the acks read it several times per message; kept current by _durable and _failure.
        self.settled_seq = self.log.durable_seq
        self._settled_callbacks: list[Callable[[int], None]] = []
        self.log.add_listener(self._durable)
        self.log.add_failure_listener(self._failure)
        self.helpers = HelperProcesses(["--state-dir", str(state_dir)], on_done=self._helper_done)
        # The oldest seq a reader other than the audit still needs (the forwarder's cursor + 1).
        self.keep_from: Callable[[], int] | None = None
        # The quarantine's size: counted by the last retention pass (saved beside the Parquet files)
        # plus what was quarantined since; purges and releases show at the next pass.
        self._quarantine_base = _read_int(self.layout.audit_dir / QUARANTINE_BYTES_FILE)
        self._quarantine_counted_at = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    # -- durability, as the proxy's acks see it ----------------------------------------------------

    def failed(self, seq: int) -> bool:
        return seq in self._failed

    def request_sync(self) -> None:
        self.log.request_sync()

    @property
    def durability(self) -> AuditService | None:
        """What acks wait for, when `durable_acks` is on."""
        return self if self.config.durable_acks else None

    def add_settled_callback(self, callback: Callable[[int], None]) -> None:
        """`callback(settled_seq)` on the event loop whenever records were settled (stored or failed)."""
        self._settled_callbacks.append(callback)

    def _durable(self, seq: int) -> None:
        self.settled_seq = max(self.log.durable_seq, self.last_failed)
        for callback in list(self._settled_callbacks):
            callback(self.settled_seq)

    def _failure(self, first: int, last: int, error: str) -> None:
        self._failed.add(first, last)
        self.last_failed = max(self.last_failed, last)
        self._durable(last)

    @property
    def healthy(self) -> bool:
        return self.log.healthy

    # -- recording ----------------------------------------------------------------------------------

    def record_event(self, kind: EventKind, detail: dict[str, Any]) -> int:
        return self.log.append(_EVENT, event_record(self.clock, kind, detail))

    def _log_event(self, kind: EventKind, detail: dict[str, Any]) -> None:
        """The log's own events (degraded, recovered, a torn tail cut...), from any thread."""
        if kind == "log_degraded":
            log.error("message log %s: cannot write (%s); QoS 1/2 publishes are refused until it can",
                      self.layout.log_dir, detail.get("error"))
        elif kind == "log_recovered":
            log.warning("message log %s: writes work again", self.layout.log_dir)
        loop = self._loop
        if loop is None:
            return  # found while opening: recorded from the recovery report once the log runs (start)
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_event, kind, detail)
            except RuntimeError:
                pass

    async def sync(self, timeout: float = 30.0) -> None:
        """Until everything recorded so far is settled in the log (a reader of the log then sees it)."""
        target = self.log.last_seq
        if self.settled_seq >= target:
            return
        done = asyncio.get_running_loop().create_future()

        def check(settled_seq: int) -> None:
            if settled_seq >= target and not done.done():
                done.set_result(None)

        self.add_settled_callback(check)
        self.request_sync()
        try:
            await asyncio.wait_for(done, timeout)
        finally:
            self._settled_callbacks.remove(check)

    # -- sealing, retention, export: helper processes -----------------------------------------------

    def _sealed(self, segment: object) -> None:  # on the log's writer thread
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.helpers.request, "seal")
            except RuntimeError:
                pass

    @property
    def quarantine_bytes(self) -> int:
        return self._quarantine_base + self.sink.quarantined_bytes - self._quarantine_counted_at

    def _helper_done(self, run: HelperRun) -> None:
        if "quarantine_bytes" in run.result:
            self._quarantine_base = int(run.result["quarantine_bytes"])
            self._quarantine_counted_at = self.sink.quarantined_bytes
        if run.task == "seal" and run.exit_status == 0 and self._loop is not None:
            # remove_segments_before waits for the log's writer thread: not on the event loop.
            self._loop.run_in_executor(None, self.remove_converted)

    def unconverted_segments(self) -> int:
        """Sealed segments (all but the newest) the seal helper has not converted yet."""
        converted = self.layout.read_watermark().segment
        return sum(1 for segment in list_segments(self.layout.log_dir)[:-1] if segment.first_seq > converted)

    def remove_converted(self) -> int:
        """Delete sealed segments every reader is done with: converted to Parquet and, with
        forwarding, acknowledged by the cloud broker (or dropped)."""
        upto = self.layout.read_watermark().last_seq + 1
        if self.keep_from is not None:
            upto = min(upto, self.keep_from())
        # The ids of the records about to go are all <= the clock's last: remembered first.
        write_durably(self.layout.audit_dir / LAST_ID_FILE, f"{self.clock.last}\n".encode(), self.layout.io)
        return self.log.remove_segments_before(upto)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.log.start(self._loop)
        recovery = self.recovery
        if recovery.torn_tail is not None:
            path, offset, cut = recovery.torn_tail
            log.warning("message log: cut a torn tail of %d bytes at offset %d of %s (an interrupted write)", cut, offset, path)
            self._on_event(EventKind.LOG_TORN_TAIL, {"segment": str(path), "offset": offset, "bytes": cut})
        for path, offset, problem in recovery.corrupt:
            log.error("message log: %s at offset %d of %s; the rest of that segment is skipped", problem, offset, path)
            self._on_event(EventKind.LOG_CORRUPTION, {"segment": str(path), "offset": offset, "problem": problem})
        # Segments sealed before a crash, or by a previous run, are converted now.
        if self.unconverted_segments():
            self.helpers.request("seal")
        interval = self.config.retention.interval or timedelta(minutes=10)
        self._tasks.append(asyncio.create_task(self._every(interval.total_seconds(), self._retain), name="audit-retention"))
        if self.config.export.to is not None:
            every = (self.config.export.interval or timedelta(hours=1)).total_seconds()
            self._tasks.append(asyncio.create_task(self._every(every, self._export), name="audit-export"))

    def _retain(self) -> None:
        self.helpers.request("retain", "--policy", orjson.dumps(self.config.retention.model_dump(mode="json")).decode())

    def _export(self) -> None:
        assert self.config.export.to is not None
        self.helpers.request("export-days", "--to", str(self.config.export.to))

    @staticmethod
    async def _every(interval: float, func: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            func()

    def status(self) -> dict[str, Any]:
        stats = self.log.stats
        return {
            "healthy": self.log.healthy,
            "lost_records": self.log.lost,
            "last_seq": self.log.last_seq,
            "durable_seq": self.log.durable_seq,
            "converted_seq": self.layout.read_watermark().last_seq,
            "log": stats,
            "helpers": self.helpers.stats(),
        }

    async def stop(self) -> None:
        """Write and sync everything, stop the helpers; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.helpers.stop()
        await asyncio.to_thread(self.log.stop)
        self._loop = None

