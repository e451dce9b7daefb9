"""Live state for the Overview and the Verdicts tail: the service's `status` over the admin socket
every few seconds, the message log followed every second, both fanned out to the browsers' event
streams (server-sent events). Charts are a point per status sample over the last hour,
seeded at start from the audit log itself so that a fresh console shows the hour already past."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import admin
from appliance.console.store import Store, VerdictTail

log = logging.getLogger(__name__)

STATUS_EVERY_S = 2.0
TAIL_EVERY_S = 1.0
CHART_SEED_STEP_S = 10  # the hour before the console started, from the audit log
CHART_POINTS = int(3600 / STATUS_EVERY_S)
DISK_EVERY_S = 30.0


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def verdict_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A tail row as the browser gets it (no payload; ids as strings: they exceed 2^53)."""
    reasons = row.get("reasons") or []
    schema = f"{row['schema_name']}:{row['schema_version']}" if row.get("schema_name") else None
    return {
        "id": str(row["id"]), "ts": datetime.fromtimestamp(float(row["ts"]), UTC).strftime("%H:%M:%S.%f")[:-3],
        "client_id": row["client_id"], "username": row.get("username"), "peer": row["peer"], "topic": row["topic"],
        "verdict": row["verdict"], "schema": schema, "size": row.get("payload_size"),
        "reason": "; ".join(f"{r.get('check')}: {r.get('message')}" for r in reasons[:3]),
        "checks": sorted({str(r.get("check")) for r in reasons}),
    }


class Hub:
    """Subscribers each get a queue of (event, data); a slow one loses its oldest events."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[tuple[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[tuple[str, Any]]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=100)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        self._queues.discard(queue)

    def publish(self, event: str, data: Any) -> None:
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait((event, data))

    def __len__(self) -> int:
        return len(self._queues)


class Monitor:
    def __init__(self, state_dir: Path, store: Store, *, clock: Callable[[], float] = time.time):
        self.state_dir = state_dir
        self.store = store
        self.tail = VerdictTail(state_dir / "log")
        self.hub = Hub()
        self.clock = clock
        self.overview: dict[str, Any] = {"service": "starting"}
        self.chart: deque[tuple[float, float, float, int]] = deque(maxlen=CHART_POINTS)  # t, acc/s, rej/s, outbox
        self._previous: tuple[float, int, int] | None = None  # when, accepted, rejected (service totals)
        self._disk: dict[str, Any] = {}
        self._disk_at = float("-inf")

    async def run(self) -> None:
        await self._sample()  # the overview first: reading the hour past may take a while
        await self._seed_chart()
        next_status = time.monotonic() + STATUS_EVERY_S
        while True:
            now = time.monotonic()
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                await self._sample()
            try:
                rows = await asyncio.to_thread(self.tail.poll)
            except Exception:  # noqa: BLE001 - a damaged record must not stop the live views; logged
                log.exception("following the message log failed")
                rows = []
            if rows:
                self.hub.publish("verdicts", [verdict_summary(r) for r in rows])
            await asyncio.sleep(TAIL_EVERY_S)

    async def _seed_chart(self) -> None:
        now = self.clock()
        try:
            buckets = await asyncio.to_thread(self.store.rates, since=now - 3600, bucket_s=CHART_SEED_STEP_S)
        except Exception as exc:  # noqa: BLE001 - no history is fine: the chart starts empty
            log.info("no chart history from the audit log: %s", exc)
            return
        step = CHART_SEED_STEP_S
        first = self.chart[0][0] if self.chart else now
        past = [(start + step, accepted / step, rejected / step, 0) for start, accepted, rejected in buckets
                if start + step <= min(now, first)]
        self.chart = deque([*past, *self.chart], maxlen=CHART_POINTS)

    async def _sample(self) -> None:
        now = self.clock()
        try:
            answer = await asyncio.to_thread(admin.call, self.state_dir, "status", timeout=10.0)
        except (admin.AdminUnavailable, admin.AdminError, OSError, ValueError) as exc:
            disk = await asyncio.to_thread(self._disk_figures, now)
            self.overview = {"service": "unreachable", "error": str(exc), "at": now, **disk}
            self._previous = None
            self.hub.publish("overview", self.overview)
            return
        status = answer["status"]
        counts = status.get("messages") or {}
        accepted, rejected = int(counts.get("accept", 0)), int(counts.get("reject", 0))
        rates, measured = (0.0, 0.0), False
        previous = self._previous
        if previous is not None and now > previous[0] and accepted >= previous[1] and rejected >= previous[2]:
            elapsed = now - previous[0]
            rates = ((accepted - previous[1]) / elapsed, (rejected - previous[2]) / elapsed)
            measured = True
        self._previous = (now, accepted, rejected)
        uplink = status.get("uplink") or {}
        disk = await asyncio.to_thread(self._disk_figures, now)
        checks = status.get("checks") or {}
        self.overview = {
            "service": "running", "ready": status.get("ready"), "at": now,
            "broker": checks.get("broker"), "listener": checks.get("listener"), "audit": checks.get("audit"),
            "uplink": checks.get("uplink", "not configured"),
            "accepted_rate": round(rates[0], 2), "rejected_rate": round(rates[1], 2),
            "accepted_total": accepted, "rejected_total": rejected,
            "outbox_depth": uplink.get("depth"), "outbox_oldest_s": uplink.get("oldest_age_s"),
            "schema_set": checks.get("schema_set"), "revision": status.get("config_revision"),
            "clients": status.get("clients"), "uptime_s": status.get("uptime_s"),
            "broker_restarts": status.get("broker_restarts"),
            **disk,
        }
        point: list[float] | None = None
        if measured:
            point = [now, rates[0], rates[1], int(uplink.get("depth") or 0)]
            self.chart.append((now, rates[0], rates[1], int(uplink.get("depth") or 0)))
        self.hub.publish("overview", {**self.overview, "point": point})

    def _disk_figures(self, now: float) -> dict[str, Any]:
        if now - self._disk_at >= DISK_EVERY_S:
            self._disk_at = now
            try:
                usage = shutil.disk_usage(self.state_dir)
                self._disk = {"disk_free": usage.free, "disk_total": usage.total,
                              "state_bytes": tree_bytes(self.state_dir)}
            except OSError as exc:
                self._disk = {"disk_error": exc.strerror}
        return self._disk
