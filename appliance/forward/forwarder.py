"""The forwarder: one MQTT client to the cloud broker that drains the outbox in id order.

Guarantees (docs/forwarding.md has the long version):
- At-least-once: a row leaves the outbox only after the cloud broker acknowledged it (PUBACK at
  QoS 1; at QoS 0, once paho wrote it to the socket). Every connection starts over from the oldest
  row still in the outbox, so whatever was in flight when a connection or the process died is sent
  again (duplicates are possible, losses are not).
- FIFO: rows are read in id order, published in that order over one connection, and live messages
  never bypass the outbox, so stored messages always go before newer ones.
- Nothing hides a stall: a connection whose oldest in-flight message (or its CONNACK) waits longer
  than ack_timeout is torn down and reopened, and `status()` always shows the oldest waiting
  message's age and the forward rate.

Threads: the MQTT client (paho-mqtt, driven by `loop()` calls, no thread of its own) and the outbox's
SQLite reads and deletes run on one dedicated thread, so neither competes with the proxy's event
loop for latency. Events go back to the event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.forward.config import UpstreamConfig
from appliance.forward.outbox import Dropped, Outbox, OutboxRow

log = logging.getLogger(__name__)

MAINTAIN_INTERVAL_S = 1.0
DELETE_EVERY_S = 0.05  # acknowledged rows are deleted in batches: at most this late...
DELETE_BATCH = 1_000  # ...or as soon as this many are acknowledged
IDLE_POLL_S = 0.01  # how often an empty outbox is looked at again (latency of live messages)
STABLE_SESSION_S = 10.0  # a connection that lasted this long resets the backoff
RATE_WINDOW_S = 10.0
STOP_GRACE_S = 2.0  # on stop, wait this long for in-flight acknowledgements (fewer duplicates later)


@dataclass(frozen=True, slots=True)
class ForwarderStatus:
    uplink_up: bool
    depth: int  # messages waiting in the outbox (including those in flight)
    bytes: int
    oldest_age_s: float | None  # age of the oldest message waiting; None when the outbox is empty
    forwarded_total: int  # acknowledged by the cloud broker and deleted, since start
    forward_rate: float  # messages/s acknowledged over the last ~10 s
    dropped_total: int  # removed by the outbox bounds (TTL, drop_oldest), since start
    last_error: str | None  # the last connection or outbox problem; None once forwarding works again
    inflight: int = 0


class _SessionEnded(Exception):
    """The current connection is over; the message is the reason."""


class _UserProperties(Properties):
    """PUBLISH properties holding only user properties, packed once. paho's Properties validates
    every attribute by name and costs ~30 µs a message, a third of the forwarder's time."""

    _packed: bytes
    _pairs: list[tuple[str, str]]

    def __init__(self, pairs: list[tuple[str, str]]):
        body = bytearray()
        for name, value in pairs:
            body.append(0x26)  # User Property
            for text in (name, value):
                data = text.encode()
                body += len(data).to_bytes(2, "big") + data
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", _varint(len(body)) + bytes(body))
        object.__setattr__(self, "_pairs", pairs)

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:
        return f"[UserProperty: {self._pairs}]"

    __repr__ = __str__


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


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
        on_event: Callable[[str, dict[str, Any]], None],
    ):
        if config.url is None:
            raise ValueError("upstream.url is not set: forwarding is off")
        self.config = config
        self.outbox = outbox
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._handed_out = 0  # the highest outbox id read for sending on the current connection
        self._stopping = threading.Event()
        self._topic_template = config.topic_template
        self._ack_timeout = config.ack_timeout.total_seconds()  # type: ignore[union-attr]
        # Shared with status() (reads of ints and references are atomic enough for a status view).
        self._uplink_up = False
        self._down_reason: str | None = None
        self.forwarded_total = 0
        self.dropped_total = 0
        self.sent_total = 0  # publishes written, resends included
        self.connects = 0
        self._inflight_count = 0
        self._last_error: str | None = None
        self._rate_samples: deque[tuple[float, int]] = deque()
        self._next_maintain = 0.0

    # -- lifecycle (event loop) ------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="upstream-forwarder", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.error("forwarder thread did not stop within %.0f s", timeout)
            self._thread = None

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
        initial = cfg.backoff_initial.total_seconds()  # type: ignore[union-attr]
        maximum = cfg.backoff_max.total_seconds()  # type: ignore[union-attr]
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
                log.info("uplink down (%s); reconnecting in %.1f s", reason, delay)
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

    def _session(self) -> str:
        """One connection: connect, drain, return why it ended."""
        try:
            client = self._make_client()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # A missing or unreadable CA/certificate/key (a typo, a rotation in progress): back off
            # and try again like any other failed connection, rather than stop forwarding for good.
            return f"TLS files: {exc}"
        acked_mids: list[int] = []
        state: dict[str, Any] = {"connack": None, "disconnect": None}

        def on_connect(_c: Any, _u: Any, _flags: Any, reason_code: Any, props: Any) -> None:
            state["connack"] = reason_code
            state["receive_maximum"] = getattr(props, "ReceiveMaximum", None)  # MQTT 5: the broker's own window

        def on_disconnect(_c: Any, _u: Any, flags: Any, reason_code: Any, _props: Any) -> None:
            if getattr(flags, "is_disconnect_packet_from_server", False):
                state["disconnect"] = reason_code

        def on_publish(_c: Any, _u: Any, mid: int, reason_code: Any, _props: Any) -> None:
            acked_mids.append(mid)  # processed after publish()/loop() return: a QoS 0 write calls this inside publish()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish

        inflight: dict[int, tuple[int, float]] = {}  # mid -> (row id, sent at), in send order
        acked_ids: list[int] = []
        try:
            self._connect(client, state)
            window = min(self.config.window, state.get("receive_maximum") or self.config.window)
            self._uplink_is_up(window)
            cursor = 0  # every connection starts over from the oldest row still in the outbox
            buffer: deque[OutboxRow] = deque()
            last_delete = time.monotonic()
            while not self._stopping.is_set():
                now = time.monotonic()
                if not buffer and len(inflight) < window:
                    rows = self.outbox.next_batch(cursor, max(window, 500))
                    buffer.extend(rows)
                    if rows:
                        cursor = self._handed_out = rows[-1].id
                while buffer and len(inflight) < window:
                    row = buffer.popleft()
                    info = self._publish(client, row)
                    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        raise _SessionEnded(self._disconnect_reason(state, info.rc))
                    inflight[info.mid] = (row.id, now)
                    self.sent_total += 1
                waiting = not buffer or len(inflight) >= window
                rc = client.loop(IDLE_POLL_S if waiting else 0.0)
                if acked_mids:
                    for mid in acked_mids:
                        entry = inflight.pop(mid, None)
                        if entry is not None:
                            acked_ids.append(entry[0])
                    acked_mids.clear()
                self._inflight_count = len(inflight)
                now = time.monotonic()
                if acked_ids and (len(acked_ids) >= DELETE_BATCH or now - last_delete >= DELETE_EVERY_S):
                    self._delete(acked_ids)
                    last_delete = now
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise _SessionEnded(self._disconnect_reason(state, rc))
                if inflight:
                    _, sent_at = next(iter(inflight.values()))
                    if now - sent_at > self._ack_timeout:
                        raise _SessionEnded(
                            f"no acknowledgement within {self._ack_timeout:g} s ({len(inflight)} in flight): uplink hung"
                        )
                if now >= self._next_maintain:
                    self._maintain()
            self._drain_before_stop(client, inflight, acked_mids, acked_ids)
            return "stopped"
        except _SessionEnded as ended:
            return str(ended)
        finally:
            if acked_ids:
                self._delete(acked_ids)
            self._inflight_count = 0
            self._handed_out = 0  # the next connection starts over from the oldest row
            self._close(client)

    @staticmethod
    def _close(client: paho.Client) -> None:
        if client.is_connected():
            client.disconnect()
            client.loop(0.1)  # writes the DISCONNECT, then paho closes the socket
        sock = client.socket()
        if sock is not None:
            sock.close()
        # Each connection gets a fresh client (so paho never resends on its own): release its
        # wake-up socket pair now rather than whenever the garbage collector gets to it.
        reset = getattr(client, "_reset_sockets", None)
        if reset is not None:
            reset()

    def _make_client(self) -> paho.Client:
        cfg = self.config
        v5 = cfg.protocol == 5
        kwargs: dict[str, Any] = {"client_id": cfg.effective_client_id, "protocol": paho.MQTTv5 if v5 else paho.MQTTv311}
        if not v5:
            kwargs["clean_session"] = True
        client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        # The window is enforced here; paho's own limit would rescan every in-flight message on each ack.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.connect_timeout = min(self._ack_timeout, 10.0)  # bounds how long stop() can wait on a connect
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.uses_tls:
            tls = cfg.tls
            context = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
            if tls is not None and tls.cert_file is not None:
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
            client.tls_set_context(context)
            if tls is not None and not tls.verify_hostname:
                client.tls_insecure_set(True)
        return client

    def _connect(self, client: paho.Client, state: dict[str, Any]) -> None:
        cfg = self.config
        try:
            if cfg.protocol == 5:
                client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=True)
            else:
                client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
        except ssl.SSLCertVerificationError as exc:
            raise _SessionEnded(
                f"TLS: certificate verify failed: {exc.verify_message} (is upstream.tls.ca_file the CA of the cloud broker?)"
            ) from None
        except ssl.SSLError as exc:
            raise _SessionEnded(f"TLS: {exc.reason or exc}") from None
        except (OSError, ValueError) as exc:
            raise _SessionEnded(f"cannot connect to {cfg.host}:{cfg.port}: {exc}") from None
        deadline = time.monotonic() + self._ack_timeout
        while state["connack"] is None:
            rc = client.loop(0.05)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise _SessionEnded(self._disconnect_reason(state, rc, connecting=True))
            if self._stopping.is_set():
                raise _SessionEnded("stopped")
            if time.monotonic() > deadline:
                raise _SessionEnded(f"no CONNACK within {self._ack_timeout:g} s: uplink hung")
        if state["connack"].is_failure:
            raise _SessionEnded(f"the cloud broker refused the connection: {state['connack']}")

    def _publish(self, client: paho.Client, row: OutboxRow) -> paho.MQTTMessageInfo:
        cfg = self.config
        topic = render_topic(self._topic_template, topic=row.topic, gateway_id=cfg.gateway_id, client_id=row.client_id)
        properties = None
        if cfg.protocol == 5:
            user = [("message-id", str(row.id)), ("client-id", row.client_id)]
            if row.schema:
                user.append(("schema", row.schema))
            properties = _UserProperties(user)
        qos = cfg.qos if row.qos is None else min(row.qos, 1)  # the mapping's forward_qos, else upstream.qos
        return client.publish(topic, row.payload, qos, row.retain and cfg.retain, properties)

    def _drain_before_stop(self, client: paho.Client, inflight: dict[int, tuple[int, float]],
                           acked_mids: list[int], acked_ids: list[int]) -> None:
        deadline = time.monotonic() + min(STOP_GRACE_S, self._ack_timeout)
        while inflight and time.monotonic() < deadline:
            if client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            for mid in acked_mids:
                entry = inflight.pop(mid, None)
                if entry is not None:
                    acked_ids.append(entry[0])
            acked_mids.clear()

    def _disconnect_reason(self, state: dict[str, Any], rc: MQTTErrorCode, *, connecting: bool = False) -> str:
        if state.get("disconnect") is not None:
            return f"the cloud broker sent DISCONNECT: {state['disconnect']}"
        during = " while waiting for CONNACK" if connecting else ""
        return f"connection lost{during}: {paho.error_string(rc)}"

    def _delete(self, acked_ids: list[int]) -> None:
        removed = self.outbox.delete(acked_ids)
        if removed or self.outbox.last_error is None:
            acked_ids.clear()  # on a failure they stay queued and are retried (or sent again)
        self.forwarded_total += removed
        if removed:
            self._last_error = None

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
            if len(dropped) < 10_000:
                break
        if self.outbox.last_error and self.outbox.last_error != had_error:
            self._emit("outbox_error", {"error": self.outbox.last_error})
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

    def _report_drops(self, dropped: list[Dropped]) -> None:
        by_reason: dict[str, list[Dropped]] = {}
        for drop in dropped:
            by_reason.setdefault(drop.reason, []).append(drop)
        for reason, drops in by_reason.items():
            log.warning("outbox: dropped %d message(s) (%s)", len(drops), reason)
            self._emit("outbox_dropped", {
                "reason": reason,
                "count": len(drops),
                "bytes": sum(d.size for d in drops),
                "first_id": drops[0].id,
                "last_id": drops[-1].id,
                "messages": [{"id": d.id, "client_id": d.client_id, "topic": d.topic, "ts": d.ts} for d in drops],
            })

    def _uplink_is_up(self, window: int) -> None:
        self.connects += 1
        self._uplink_up = True
        self._down_reason = None  # last_error stays until a message is acknowledged: connected is not forwarding
        log.info("uplink up: %s as %s", self.config.url, self.config.effective_client_id)
        self._emit("uplink_up", {"url": self.config.url, "client_id": self.config.effective_client_id, "window": window})

    def _uplink_is_down(self, reason: str) -> None:
        was_up = self._uplink_up
        self._uplink_up = False
        if reason != "stopped":
            self._last_error = reason
        if was_up or reason != self._down_reason:  # a failing reconnect is reported once, not per attempt
            depth = self.outbox.depth()
            self._emit("uplink_down", {"reason": reason, "depth": depth.messages, "url": self.config.url})
        self._down_reason = reason

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._on_event, kind, detail)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass
