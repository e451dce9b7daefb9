"""The forwarder: one MQTT client to the cloud broker that drains the outbox in log order.

Guarantees (docs/forwarding.md has the long version):
- At-least-once: a message leaves the outbox only after the cloud broker acknowledged it (PUBACK at
  QoS 1; at QoS 0, once it was written to the socket). Every connection starts over from the oldest
  message not acknowledged, and a restart from the outbox's saved cursor, so whatever was in flight
  when a connection or the process died is sent again (duplicates are possible, losses are not).
- FIFO: messages are read in log (seq) order, published in that order over one connection, and
  live messages never bypass the log, so stored messages always go before newer ones.
- Nothing hides a stall: a connection whose oldest in-flight message (or its CONNACK) waits longer
  than ack_timeout is torn down and reopened, and `status()` always shows the oldest waiting
  message's age and the forward rate.

Threads: the MQTT connection (Link, driven by `poll()` calls, no thread of its own) and the outbox's
log reads, acknowledgements and cursor saves run on one dedicated thread, so neither competes with
the proxy's event loop for latency. Events go back to the event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import select
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from appliance.config.upstream import UpstreamConfig
from appliance.forward.link import Link, LinkClosed, TooLarge, reason_name
from appliance.forward.outbox import MAX_DROPS_PER_CALL, Dropped, Outbox, OutboxRow
from appliance.names import EventKind
from appliance.security.tls import client_ssl_context

log = logging.getLogger(__name__)

MAINTAIN_INTERVAL_S = 1.0
DOWN_REMINDER_S = 300.0  # while the uplink stays down, a reminder in the log this often
# How often an empty outbox is looked at again when nothing wakes the forwarder (the log's syncs
# do, through wake()); also the longest a PUBACK waits to be read while the window has room. It was
# 10 ms: with the PUBACK wake-ups, ~90 wake-ups/s at 1,000 msg/s, each one costing GIL hand-overs
# with the event loop (docs/performance.md).
IDLE_POLL_S = 0.25
# With messages in flight and room in the window, the longest the forwarder waits before it reads
# their PUBACKs when nothing else wakes it (the cursor, the depth and forwarded_total follow them).
ACK_LOOK_S = 0.05
STABLE_SESSION_S = 10.0  # a connection that lasted this long resets the backoff
RATE_WINDOW_S = 10.0
STOP_GRACE_S = 2.0  # on stop, wait this long for in-flight acknowledgements (fewer duplicates later)


@dataclass(frozen=True, slots=True)
class ForwarderStatus:
    uplink_up: bool
    depth: int  # messages waiting in the outbox (including those in flight)
    bytes: int
    oldest_age_s: float | None  # age of the oldest message waiting; None when the outbox is empty
    forwarded_total: int  # acknowledged by the cloud broker, since start
    forward_rate: float  # messages/s acknowledged over the last ~10 s
    dropped_total: int  # removed by the outbox bounds (TTL, drop_oldest), since start
    last_error: str | None  # the last connection or outbox problem; None once forwarding works again
    inflight: int = 0


def _seconds(duration: timedelta | None) -> float:
    """A duration the config requires (UpstreamConfig refuses null for these), in seconds."""
    assert duration is not None
    return duration.total_seconds()


def render_topic(template: str, *, topic: str, gateway_id: str, client_id: str) -> str:
    if template == "{topic}":
        return topic
    # A client id may contain characters that are not allowed in (or change the levels of) a topic.
    safe_client = client_id.replace("/", "_").replace("+", "_").replace("#", "_")
    return template.format(topic=topic, gateway_id=gateway_id, client_id=safe_client)


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half the delay fixed, half random."""
    delay: float = min(maximum, initial * 2.0 ** min(attempt, 32))
    return delay / 2 + (rng or random).uniform(0, delay / 2)


class Forwarder:
    def __init__(
        self,
        config: UpstreamConfig,
        outbox: Outbox,
        *,
        on_event: Callable[[EventKind, dict[str, Any]], None],
    ):
        if config.url is None:
            raise ValueError("upstream.url is not set: forwarding is off")
        self.config = config
        self.outbox = outbox
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._handed_out = 0  # the highest seq read for sending on the current connection
        self._stopping = threading.Event()
        self._topic_template = config.topic_template
        self._plain_topic = config.topic_template == "{topic}"  # render_topic() would return the topic
        self._ack_timeout = _seconds(config.ack_timeout)
        # Shared with status() (reads of ints and references are atomic enough for a status view).
        self._uplink_up = False
        self._down_reason: str | None = None
        self._logged_reason: str | None = None  # what the last "uplink down" warning said
        self._reminded_at = 0.0
        self.forwarded_total = 0
        self.dropped_total = 0
        self.sent_total = 0  # publishes written, resends included
        self.connects = 0
        self._inflight_count = 0
        self._last_error: str | None = None
        self._rate_samples: deque[tuple[float, int]] = deque()
        self._next_maintain = 0.0
        self._idle = False  # waiting in poll() for acks or new rows: wake() writes to the pipe
        self._wakes = 0  # wake() calls so far (a wake-up between the last read and the wait is not lost)
        self._wake_r = self._wake_w = -1  # a pipe while started
        self._wake_lock = threading.Lock()
        self._wake_poller: select.poll | None = None  # watches _wake_r (made once, on the forwarder thread)
        self._wake_pending = False  # the pipe may hold bytes: _drain_wakes() reads it

    # -- waking up -------------------------------------------------------------------------------

    def wake(self) -> None:
        """New messages are durable in the log (any thread; the outbox calls it from the log's
        durable listener): stop waiting. Without it, a live message waits up to IDLE_POLL_S."""
        self._wakes += 1
        if not self._idle:
            return
        with self._wake_lock:  # stop() closes the pipe under it: never write to a reused descriptor
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"w")
                except OSError:
                    pass  # full: a wake-up is already pending

    def _wait_for_wake(self, timeout: float) -> None:
        if self._wake_poller is None:
            self._wake_poller = select.poll()
            self._wake_poller.register(self._wake_r, select.POLLIN)
        if self._wake_poller.poll(timeout * 1000):
            self._wake_pending = True

    def _drain_wakes(self) -> None:
        """Empty the wake pipe. Only when a wait saw it readable (or may have: link.poll() watches
        it too): reading an empty non-blocking pipe raises, i.e. an exception per wake-up."""
        if not self._wake_pending:
            return
        self._wake_pending = False
        try:
            while len(os.read(self._wake_r, 4096)) == 4096:
                pass
        except (BlockingIOError, OSError):
            pass

    # -- lifecycle (event loop) ------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the forwarder is running (or its thread did not stop)")
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="upstream-forwarder", daemon=True)
        self._thread.start()
        self.outbox.waiter = self.wake

    async def stop(self, timeout: float = 10.0) -> None:
        self.outbox.waiter = None
        self._stopping.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"s")  # out of poll() now, not after IDLE_POLL_S
            except OSError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.error("forwarder thread did not stop within %.0f s", timeout)
                return  # it may still poll the pipe
            self._thread = None
        with self._wake_lock:
            fds = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
            self._wake_poller = None
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def status(self) -> ForwarderStatus:
        depth = self.outbox.depth()
        oldest_age = None if depth.oldest_ts is None else max(0.0, time.time() - depth.oldest_ts)
        return ForwarderStatus(
            uplink_up=self._uplink_up,
            depth=depth.messages,
            bytes=depth.bytes,
            oldest_age_s=oldest_age,
            forwarded_total=self.forwarded_total,
            forward_rate=self._rate(),
            dropped_total=self.dropped_total,
            last_error=self._last_error or self.outbox.last_error,
            inflight=self._inflight_count,
        )

    # -- forwarder thread ------------------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.config
        initial = _seconds(cfg.backoff_initial)
        maximum = _seconds(cfg.backoff_max)
        attempt = 0
        try:
            while not self._stopping.is_set():
                self._maintain()
                started = time.monotonic()
                acked_before = self.forwarded_total
                reason = self._session()
                if self._stopping.is_set():
                    break
                self._uplink_is_down(reason)
                if time.monotonic() - started >= STABLE_SESSION_S or self.forwarded_total > acked_before:
                    attempt = 0
                delay = backoff_delay(attempt, initial, maximum)
                attempt += 1
                self._log_down(reason, delay, attempt)
                deadline = time.monotonic() + delay
                while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
                    self._stopping.wait(min(left, MAINTAIN_INTERVAL_S))
                    self._maintain()
        except Exception:  # a bug: say so loudly, and show it in status
            log.exception("forwarder thread crashed")
            self._last_error = "forwarder crashed (see log)"
            self._uplink_is_down("forwarder crashed")
            raise
        finally:
            if self._uplink_up:
                self._uplink_is_down("stopped")
            self.outbox.checkpoint(force=True)  # a clean stop resends nothing after a restart

    def _session(self) -> str:
        """One connection: connect, drain, return why it ended."""
        try:
            link = self._make_link()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # A missing or unreadable CA/certificate/key (a typo, a rotation in progress): back off
            # and try again like any other failed connection, rather than stop forwarding for good.
            return f"TLS files: {exc}"
        inflight: dict[int, tuple[int, float]] = {}  # packet id -> (seq, sent at), in send order
        acked: list[int] = []  # seqs acknowledged, not yet handed to the outbox
        try:
            link.connect(self._ack_timeout, self._connect_cancelled)
            window = min(self.config.window, link.receive_maximum or self.config.window)
            self._uplink_is_up(window)
            read_to = 0  # every connection starts over from the oldest message not acknowledged
            buffer: deque[OutboxRow] = deque()
            seen = self._wakes
            caught_up = False  # the last read found fewer messages than it asked for
            while not self._stopping.is_set():
                now = time.monotonic()
                if not buffer and len(inflight) < window:
                    seen = self._wakes
                    limit = max(window, 500)
                    rows = self.outbox.next_batch(read_to, limit)
                    caught_up = len(rows) < limit
                    buffer.extend(rows)
                    if rows:
                        read_to = self._handed_out = rows[-1].seq
                sent = 0
                publish = self._publish
                while buffer and len(inflight) < window:
                    row = buffer.popleft()
                    try:
                        pid = publish(link, row)
                    except TooLarge as exc:
                        self._drop_unsendable(row, str(exc))
                        continue
                    if pid:
                        inflight[pid] = (row.seq, now)
                    sent += 1
                self.sent_total += sent
                waiting = not buffer or len(inflight) >= window
                if waiting and len(inflight) < window and self._wake_r >= 0:
                    # Nothing to send and room in the window: once the outbox is read to its end,
                    # what comes next is new messages (the log's syncs wake us). Send what was just
                    # published and take the PUBACKs already here, then wait for the wake pipe alone:
                    # not one wake-up per PUBACK.
                    acked_pids, written = link.poll(0.0)
                    self._idle = True
                    if link.unsent:  # the socket is full: wait for it (or a wake-up) as well
                        more_acked, more_written = link.poll(IDLE_POLL_S, self._wake_r)
                        acked_pids += more_acked
                        written += more_written
                        self._wake_pending, link.woken = self._wake_pending or link.woken, False
                    elif caught_up and self._wakes == seen:  # else there is more to read now
                        self._wait_for_wake(ACK_LOOK_S if inflight else IDLE_POLL_S)
                    self._idle = False
                    self._drain_wakes()
                elif waiting:
                    self._idle = True
                    acked_pids, written = link.poll(IDLE_POLL_S, self._wake_r if self._wake_r >= 0 else None)
                    self._wake_pending, link.woken = self._wake_pending or link.woken, False
                    self._idle = False
                    self._drain_wakes()
                else:
                    acked_pids, written = link.poll(0.0)
                self._collect(acked_pids, written, inflight, acked)
                if link.refused:
                    self._report_refused(link)
                self._inflight_count = len(inflight)
                now = time.monotonic()
                if acked:
                    self._acknowledge(acked)
                if inflight:
                    _, sent_at = next(iter(inflight.values()))
                    if now - sent_at > self._ack_timeout:
                        raise LinkClosed(
                            f"no acknowledgement within {self._ack_timeout:g} s ({len(inflight)} in flight): uplink hung"
                        )
                if now >= self._next_maintain:
                    self._maintain()
            self._drain_before_stop(link, inflight, acked)
            return "stopped"
        except LinkClosed as ended:
            self._collect(ended.acked, [], inflight, acked)  # acknowledged in the read that saw the end
            return str(ended)
        finally:
            if acked:
                self._acknowledge(acked)
            self._inflight_count = 0
            self._handed_out = 0  # the next connection starts over from the oldest message waiting
            link.disconnect()

    def _connect_cancelled(self) -> bool:
        """Asked every 50 ms while waiting for a CONNACK (up to ack_timeout): keep the bounds and
        the counters (reject_new's is_full) up to date meanwhile."""
        if time.monotonic() >= self._next_maintain:
            self._maintain()
        return self._stopping.is_set()

    def _make_link(self) -> Link:
        cfg = self.config
        context = None
        if cfg.uses_tls:
            # Errors name the file (TLSFileError): "upstream.tls: /etc/x/ca.pem: no such file".
            context = client_ssl_context(cfg.tls) if cfg.tls is not None else ssl.create_default_context()
        return Link(cfg.host, cfg.port, client_id=cfg.effective_client_id, protocol=cfg.protocol,
                    keepalive=cfg.keepalive, username=cfg.username, password=cfg.password, tls=context,
                    write_timeout=self._ack_timeout, websocket=cfg.websocket_url)

    def _publish(self, link: Link, row: OutboxRow) -> int:
        cfg = self.config
        client_id = row.client_id
        topic = row.topic if self._plain_topic else render_topic(
            self._topic_template, topic=row.topic, gateway_id=cfg.gateway_id, client_id=client_id)
        # User properties (MQTT 5; the link leaves them out on 3.1.1): "message-id" (the verdict's id),
        # then these. The link puts each PUBLISH together from a template per topic and these.
        schema = row.schema
        user = (("client-id", client_id), ("schema", schema)) if schema else (("client-id", client_id),)
        qos = cfg.qos if row.qos is None else min(row.qos, 1)  # the mapping's forward_qos, else upstream.qos
        return link.publish_message(topic, row.payload, qos, row.retain and cfg.retain, row.id, user, row.seq)

    def _drain_before_stop(self, link: Link, inflight: dict[int, tuple[int, float]], acked: list[int]) -> None:
        deadline = time.monotonic() + min(STOP_GRACE_S, self._ack_timeout)
        while inflight and time.monotonic() < deadline:
            try:
                acked_pids, written = link.poll(0.05)
            except LinkClosed as ended:
                self._collect(ended.acked, [], inflight, acked)
                break
            self._collect(acked_pids, written, inflight, acked)

    @staticmethod
    def _collect(acked_pids: list[int], written: list[int], inflight: dict[int, tuple[int, float]],
                 acked: list[int]) -> None:
        """Messages that may leave the outbox: acknowledged packet ids, and QoS 0 ones once written."""
        for pid in acked_pids:
            entry = inflight.pop(pid, None)
            if entry is not None:
                acked.append(entry[0])
        acked += written

    def _acknowledge(self, acked: list[int]) -> None:
        """Move the outbox's cursor past acknowledged messages (in memory; saved when due)."""
        count = self.outbox.acknowledge(acked)
        acked.clear()
        self.forwarded_total += count
        if count:
            self._last_error = None

    @staticmethod
    def _report_refused(link: Link) -> None:
        """MQTT 5 PUBACKs with an error reason code (e.g. 0x87 Not authorized): the broker answered,
        so the messages are not sent again, but somebody must hear about it."""
        for code, count in link.refused.items():
            log.warning("the cloud broker refused %d message(s): %s", count, reason_name(code))
        link.refused.clear()

    def _drop_unsendable(self, row: OutboxRow, why: str) -> None:
        """A message the cloud broker cannot take would end every connection and hold up the rest
        (FIFO) forever: drop it, loudly (outbox_dropped, reason too_large)."""
        dropped = self.outbox.drop(row, "too_large")
        if dropped is None:
            return  # dropped by the bounds meanwhile: reported already
        log.warning("outbox: dropped message %d on %s: %s", row.id, row.topic, why)
        self.dropped_total += 1
        self._report_drops([dropped], why)

    def _maintain(self) -> None:
        """Once a second: enforce the outbox bounds, report drops and outbox errors, sample the rate."""
        now = time.monotonic()
        self._next_maintain = now + MAINTAIN_INTERVAL_S
        had_error = self.outbox.last_error
        while True:
            dropped = self.outbox.enforce(handed_out=self._handed_out)
            if dropped:
                self.dropped_total += len(dropped)
                self._report_drops(dropped)
            if len(dropped) < MAX_DROPS_PER_CALL:
                break
        if self.outbox.last_error and self.outbox.last_error != had_error:
            self._emit(EventKind.OUTBOX_ERROR, {"error": self.outbox.last_error})
        self._rate_samples.append((now, self.forwarded_total))
        while self._rate_samples and now - self._rate_samples[0][0] > RATE_WINDOW_S:
            self._rate_samples.popleft()

    def _rate(self) -> float:
        samples = list(self._rate_samples)
        if not samples:
            return 0.0
        t0, n0 = samples[0]
        elapsed = time.monotonic() - t0
        return (self.forwarded_total - n0) / elapsed if elapsed > 0.5 else 0.0

    def _report_drops(self, dropped: list[Dropped], detail: str | None = None) -> None:
        by_reason: dict[str, list[Dropped]] = {}
        for drop in dropped:
            by_reason.setdefault(drop.reason, []).append(drop)
        for reason, drops in by_reason.items():
            log.warning("outbox: dropped %d message(s) (%s)", len(drops), reason)
            self._emit(EventKind.OUTBOX_DROPPED, {
                "reason": reason,
                **({"detail": detail} if detail else {}),
                "count": len(drops),
                "bytes": sum(d.size for d in drops),
                "first_id": drops[0].id,
                "last_id": drops[-1].id,
                "first_seq": drops[0].seq,
                "last_seq": drops[-1].seq,
                "messages": [{"id": d.id, "seq": d.seq, "client_id": d.client_id, "topic": d.topic, "ts": d.ts}
                             for d in drops],
            })

    def _uplink_is_up(self, window: int) -> None:
        self.connects += 1
        self._uplink_up = True
        self._down_reason = None  # last_error stays until a message is acknowledged: connected is not forwarding
        log.info("uplink up: %s as %s", self.config.url, self.config.effective_client_id)
        self._emit(EventKind.UPLINK_UP, {"url": self.config.url, "client_id": self.config.effective_client_id, "window": window})

    def _log_down(self, reason: str, delay: float, attempt: int) -> None:
        """The transition is logged (a warning), then a reminder at most every DOWN_REMINDER_S with
        the retry count, not a line per retry while the uplink stays down."""
        now = time.monotonic()
        if attempt == 1 or reason != self._logged_reason:
            log.warning("uplink down (%s); reconnecting in %.1f s", reason, delay)
            self._logged_reason, self._reminded_at = reason, now
        elif now - self._reminded_at >= DOWN_REMINDER_S:
            log.warning("uplink still down after %d attempts (%s); retrying every %.0f s at most", attempt, reason,
                        _seconds(self.config.backoff_max))
            self._reminded_at = now
        else:
            log.debug("uplink down (%s); reconnecting in %.1f s (attempt %d)", reason, delay, attempt)

    def _uplink_is_down(self, reason: str) -> None:
        was_up = self._uplink_up
        self._uplink_up = False
        if reason != "stopped":
            self._last_error = reason
        if was_up or reason != self._down_reason:  # a failing reconnect is reported once, not per attempt
            depth = self.outbox.depth()
            self._emit(EventKind.UPLINK_DOWN, {"reason": reason, "depth": depth.messages, "url": self.config.url})
        self._down_reason = reason

    def _emit(self, kind: EventKind, detail: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._on_event, kind, detail)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass
