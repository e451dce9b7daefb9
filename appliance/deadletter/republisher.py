"""Republishing rejected messages to their mapping's dead-letter topic.

`DeadLetterSink` is a pipeline sink (after the audit sink, whose verdict id it reads). For a
rejection whose mapping has `on_reject.republish`, on the event loop and without waiting for I/O:

- **cloud**: appends a FORWARD_ONLY record (topic, payload, QoS, retain) to the message log, right
  after the verdict's own record. The forwarder sends it like any forwarded message (durable,
  at-least-once, across uplink outages, within the outbox's bounds), and the sink returns the
  record's seq as its ticket, so the publisher's acknowledgement (the reject reason code) waits
  until the dead letter is durable too.
- **local**: hands the message to `LocalRepublisher`, one MQTT connection of the appliance's own to
  the broker behind the proxy (the forwarder's `Link`, driven from a thread of its own). Straight to
  the broker: a dead letter is never judged. Kept in memory, at most `max_queue` messages: while
  the broker is down they wait and are sent once it is back (QoS 1 ones in flight when a connection
  drops are sent again: at least once); beyond the bound, and whatever is left when the appliance
  stops, is dropped, counted and recorded as a `dead_letter_dropped` event. The proxy never waits.
- records a `dead_letter` event (docs/audit.md) naming the verdict, the topic and the destinations.

Not republished: accepted messages, wills (judged at CONNECT), a message released from quarantine
that fails again (its first rejection was republished already), dry-run verdicts (the message is
delivered as is; the event says `dry_run: true` and nothing is sent), and rejections for the
mapping's rate limit (reason code 0x97 Quota exceeded): a client flooding past it would otherwise
make one dead letter per message, the very load the limit sheds.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

import orjson

from appliance.audit.records import FORWARD_ONLY
from appliance.broker import BrokerEndpoint
from appliance.forward.link import Link, LinkClosed, TooLarge, user_properties
from appliance.mqtt.properties import Properties
from appliance.mqtt.reason_codes import ReasonCode
from appliance.governance import SchemaSet, SchemaSetError
from appliance.msglog import FormatError, LogClosed
from appliance.names import EventKind
from appliance.pipeline import Message, Policy, Verdict

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
MAX_QUEUE = 10_000
WINDOW = 100  # QoS 1 dead letters in flight on the local connection
CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 30
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0
STOP_GRACE_S = 2.0  # on stop, how long queued dead letters may still be sent
LOG_EVERY_S = 10.0  # at most one warning about drops per this many seconds
MAX_REASON_PROPERTY = 512  # characters of the reason text in the `reason` user property

_FORWARD_ONLY = FORWARD_ONLY.code
_encode_forward_only = FORWARD_ONLY.encode


class Appender(Protocol):
    def append(self, kind: int, body: bytes) -> int: ...


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter for the local broker."""

    verdict_id: int | None
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties  # MQTT 5 PUBLISH properties (user_properties())


def envelope(message: Message, verdict: Verdict, verdict_id: int | None) -> bytes:
    """The JSON envelope: what was rejected, why, and the original payload in base64."""
    client = message.client
    received = message.received_at or time.time()
    return orjson.dumps({
        "envelope_version": ENVELOPE_VERSION,
        "verdict_id": None if verdict_id is None else str(verdict_id),  # a string: 63 bits
        "topic": message.topic,
        "client_id": client.client_id,
        "username": client.username,
        "peer": client.peer,
        "received_at": datetime.fromtimestamp(received, timezone.utc).isoformat(timespec="milliseconds"),
        "qos": message.qos,
        "retain": message.retain,
        "schema_set": verdict.schema_set,
        "topic_filter": verdict.topic_filter,
        "schema": verdict.schema,
        "reason_code": int(verdict.reason_code),
        "reasons": [{"check": r.check, "message": r.message, "schema": r.schema, "path": r.path} for r in verdict.reasons],
        "payload_size": len(message.payload),
        "payload_base64": base64.b64encode(message.payload).decode(),
    })


def check_destinations(schema_set: SchemaSet, *, forwarding: bool) -> None:
    """Refuse a set whose dead letters go to the cloud when this appliance does not forward (the
    manifest alone cannot tell: upstream.url is in the config)."""
    problems = [
        f"{schema_set.directory / 'manifest.yaml'}: schema_mappings.{topic_filter}.on_reject.republish.to: "
        "cloud needs forwarding (upstream.url is not set in the config)"
        for topic_filter, mapping in schema_set.mappings
        if mapping.dead_letter is not None and mapping.dead_letter.cloud and not forwarding
    ]
    if problems:
        raise SchemaSetError(schema_set.directory, sorted(problems))


class DeadLetterSink:
    # The pipeline calls it for rejections only (an accepted message has no dead letter).
    only_rejections = True

    def __init__(
        self,
        *,
        local: LocalRepublisher | None,
        log: Appender | None,
        verdict_id: Callable[[], int | None],
        on_event: Callable[[EventKind, dict[str, object]], None],
        cloud_full: Callable[[], bool] = lambda: False,
    ):
        """`local`: where local dead letters go (None: they are dropped and counted; a set that wants
        them is refused at load when it cannot have them). `log`: the message log the forwarder reads
        (None without forwarding). `verdict_id()`: the id of the verdict just recorded. `cloud_full()`:
        the outbox's `is_full` (reject_new policy: a dead letter is not appended beyond its bounds)."""
        self._local = local
        self._log = log
        self._verdict_id = verdict_id
        self._on_event = on_event
        self._cloud_full = cloud_full
        self.counts: Counter[tuple[str, str]] = Counter()  # (destination, outcome) -> dead letters

    def record(self, message: Message, verdict: Verdict, latency_us: int, delivered: bool = True,
               policy: Policy | None = None) -> int:
        dead = verdict.dead_letter
        if dead is None or verdict.accepted or message.is_will or message.released_from is not None:
            return 0
        if verdict.reason_code == ReasonCode.QUOTA_EXCEEDED:
            return 0  # a flood past the rate limit would become a flood of dead letters
        client = message.client
        verdict_id = self._verdict_id()
        check = verdict.reasons[0].check if verdict.reasons else "schema"
        topic = dead.topic(message.topic, client.client_id, verdict.schema, check)
        qos = min(message.qos, 1) if dead.qos is None else dead.qos
        detail: dict[str, object] = {
            "verdict_id": None if verdict_id is None else str(verdict_id), "client_id": client.client_id,
            "peer": client.peer, "topic": topic, "original_topic": message.topic, "to": list(dead.destinations),
            "envelope": dead.envelope, "qos": qos,
        }
        if delivered:  # dry run: the message went to its own topic; say what would have happened
            self.counts["none", "dry_run"] += 1
            self._on_event(EventKind.DEAD_LETTER, {**detail, "dry_run": True})
            return 0
        payload = envelope(message, verdict, verdict_id) if dead.envelope else message.payload
        ticket = 0
        dropped: list[tuple[str, str]] = []
        if dead.local:
            if self._local is None:
                dropped.append(("local", "no connection to the broker"))
            else:
                properties = user_properties((
                    ("verdict-id", "" if verdict_id is None else str(verdict_id)), ("original-topic", message.topic),
                    ("client-id", client.client_id), ("reason", verdict.reason_text[:MAX_REASON_PROPERTY]),
                ))
                letter = Letter(verdict_id, topic, payload, qos, dead.retain, properties)
                if self._local.submit(letter):
                    self.counts["local", "queued"] += 1
                elif self._local.stopping:
                    dropped.append(("local", "the appliance is stopping"))
                else:
                    dropped.append(("local", f"queue full ({self._local.max_queue} dead letters waiting for the broker)"))
        if dead.cloud:
            if self._log is None:
                dropped.append(("cloud", "forwarding is off"))
            elif self._cloud_full():
                dropped.append(("cloud", "the outbox is full (upstream.outbox.policy: reject_new)"))
            else:
                row = (verdict_id or 0, message.received_at or time.time(), client.client_id, topic, payload, qos,
                       dead.retain, verdict.schema)
                try:
                    ticket = self._log.append(_FORWARD_ONLY, _encode_forward_only(row))
                except (LogClosed, FormatError) as exc:
                    dropped.append(("cloud", f"message log: {exc}"))
                else:
                    self.counts["cloud", "appended"] += 1
        self._on_event(EventKind.DEAD_LETTER, detail)
        for destination, reason in dropped:
            self.counts[destination, "dropped"] += 1
            self._on_event(EventKind.DEAD_LETTER_DROPPED, {"verdict_id": detail["verdict_id"], "topic": topic, "to": destination,
                                                   "reason": reason})
        return ticket

    @property
    def active(self) -> bool:
        """Whether any rejection had a dead letter since start."""
        return bool(self.counts)

    async def stop(self) -> None:
        if self._local is not None:
            await self._local.stop()

    def totals(self) -> Counter[tuple[str, str]]:
        """Dead letters by (destination, outcome): local queued/published/dropped/refused, cloud
        appended/dropped, none/dry_run."""
        counts = Counter(self.counts)
        if self._local is not None:
            counts["local", "published"] = self._local.published
            counts["local", "dropped"] += self._local.dropped
            counts["local", "refused"] = self._local.refused
        return counts

    @property
    def local_queue(self) -> int:
        return self._local.queued if self._local is not None else 0

    def stats(self) -> dict[str, object]:
        """What `appliance status` shows."""
        return {
            "counts": {f"{to}/{outcome}": n for (to, outcome), n in sorted(self.totals().items())},
            "local_queue": self.local_queue,
            "local_connected": self._local is not None and self._local.connected,
        }


class LocalRepublisher:
    """Dead letters for the broker behind the proxy, over one MQTT 5 connection kept from a thread.

    `submit()` (event loop) queues and never blocks; the thread connects when the broker is up
    (`endpoint()`), publishes, waits for PUBACKs (a window of `window`), reconnects with backoff."""

    def __init__(
        self,
        endpoint: Callable[[], BrokerEndpoint | None],
        *,
        on_drop: Callable[[Letter, str], None],
        max_queue: int = MAX_QUEUE,
        window: int = WINDOW,
    ):
        self._endpoint = endpoint
        self._on_drop = on_drop
        self.max_queue = max_queue
        self._window = window
        self.client_id = f"appliance-deadletter-{socket.gethostname()}"[:64]
        self._queue: deque[Letter] = deque()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_r = self._wake_w = -1  # a pipe once started: wakes the thread's poll()
        self._wake_pending = False
        self.connected = False
        self.published = 0  # acknowledged by the broker (QoS 1) or written (QoS 0)
        self.dropped = 0
        self.refused = 0  # acknowledged with an MQTT 5 error reason code
        self._last_warning = 0.0
        self._unlogged_drops = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def submit(self, letter: Letter) -> bool:
        """Queue one dead letter (event loop). False when the queue is full: the caller drops it."""
        if len(self._queue) >= self.max_queue or self._stopping.is_set():
            return False
        if self._thread is None:
            self._start()
        self._queue.append(letter)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
        return True

    def _start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._thread = threading.Thread(target=self._run, name="dead-letters", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Send what is queued (for up to STOP_GRACE_S while connected), then close; what is left
        is dropped (each reported to on_drop)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_GRACE_S + CONNECT_TIMEOUT_S + 1)
        if self._thread is not None and not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        down_since: float | None = None
        while not self._stopping.is_set():
            endpoint = self._endpoint()
            reason = "the broker is not running"
            if endpoint is not None:
                link = Link(endpoint.host, endpoint.port, client_id=self.client_id, protocol=5, keepalive=KEEPALIVE_S,
                            username=endpoint.username,
                            password=endpoint.password.decode() if endpoint.password is not None else None,
                            tls=endpoint.ssl, server_hostname=endpoint.server_hostname)
                try:
                    link.connect(CONNECT_TIMEOUT_S, cancelled=self._stopping.is_set)
                except LinkClosed as exc:
                    reason = str(exc).replace("the cloud broker", "the broker")
                else:
                    if down_since is not None:
                        log.info("dead letters: connected to the broker again after %.1f s", time.monotonic() - down_since)
                    attempt, down_since = 0, None
                    self.connected = True
                    try:
                        self._pump(link)
                        return
                    except LinkClosed as exc:
                        reason = str(exc).replace("the cloud broker", "the broker")
                    finally:
                        self.connected = False
                        link.close()
            if down_since is None:
                down_since = time.monotonic()
                log.warning("dead letters: cannot publish to the broker (%s); %d queued, up to %d kept meanwhile",
                            reason, len(self._queue), self.max_queue)
            delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** min(attempt, 16))
            attempt += 1
            self._stopping.wait(delay)
        self._drop_all("the appliance stopped before the broker took it")

    def _pump(self, link: Link) -> None:
        """Publish until stopped; raises LinkClosed when the connection is lost (what was in flight
        goes back to the front of the queue)."""
        inflight: dict[int, tuple[int, Letter]] = {}  # QoS 1: packet id, QoS 0: -token -> (token, letter)
        token = 0
        deadline: float | None = None
        try:
            while True:
                if self._stopping.is_set():
                    deadline = deadline or time.monotonic() + STOP_GRACE_S
                    if (not self._queue and not inflight) or time.monotonic() > deadline:
                        link.disconnect()
                        self._drop_all("the appliance stopped before the broker took it", inflight)
                        return
                queue = self._queue
                while queue and len(inflight) < self._window:
                    letter = queue.popleft()
                    token += 1
                    try:
                        pid = link.publish(letter.topic, letter.payload, letter.qos, letter.retain, letter.properties,
                                           token=token)
                    except TooLarge as exc:
                        self._drop(letter, f"the broker does not take it: {exc}")
                        continue
                    inflight[pid or -token] = (token, letter)
                self._wake_pending = False
                acked, written = link.poll(0.2 if self._stopping.is_set() else 1.0, self._wake_r)
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                for key in (*acked, *(-t for t in written)):
                    if inflight.pop(key, None) is not None:
                        self.published += 1
                if link.refused:
                    refused = sum(link.refused.values())
                    codes = ", ".join(f"0x{code:02x}" for code in link.refused)
                    link.refused.clear()
                    self.refused += refused
                    self.published -= refused
                    log.warning("dead letters: the broker refused %d (reason codes %s)", refused, codes)
        except LinkClosed:
            # In flight when the connection went: send again (at least once), first, in order.
            self._queue.extendleft(letter for _, letter in sorted(inflight.values(), key=_token, reverse=True))
            raise

    def _drop_all(self, reason: str, inflight: dict[int, tuple[int, Letter]] | None = None) -> None:
        for _, letter in (inflight or {}).values():
            self._drop(letter, reason)
        while self._queue:
            self._drop(self._queue.popleft(), reason)

    def _drop(self, letter: Letter, reason: str) -> None:
        self.dropped += 1
        self._unlogged_drops += 1
        now = time.monotonic()
        if now - self._last_warning >= LOG_EVERY_S:
            log.warning("dead letters: dropped %d (last: %s, %s)", self._unlogged_drops, letter.topic, reason)
            self._last_warning, self._unlogged_drops = now, 0
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._on_drop, letter, reason)
            except RuntimeError:
                pass  # the loop is closed: counted and logged only


def _token(item: tuple[int, Letter]) -> int:
    return item[0]
