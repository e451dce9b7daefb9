"""Real pieces for forwarding tests: a cloud mosquitto, a subscriber on it, a real MessageLog
written on its own event loop, and an Outbox (real Cursor file) with a Forwarder on that loop."""

from __future__ import annotations

import asyncio
import getpass
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from appliance.audit.records import DECISION, EVENT, FORWARD_ONLY, IdClock, RecordKind, payload_sha256
from appliance.config.upstream import OutboxBounds, UpstreamConfig
from appliance.forward import Forwarder, Outbox
from appliance.msglog.cursor import Cursor
from appliance.msglog.format import RECORD_HEADER_SIZE
from appliance.msglog.log import MessageLog
from tests.helpers import wait_until
from tests.processes import can_connect, free_port


def cloud_conf(port: int, directory: Path, *, extra: str = "") -> str:
    """A cloud broker keeping persistent sessions across restarts, with no queue limit."""
    directory.mkdir(parents=True, exist_ok=True)
    return (
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to a user that cannot read tmp_path
        "persistence true\n"
        f"persistence_location {directory}/\n"
        "max_queued_messages 0\n"
        "set_tcp_nodelay true\n"
        f"{extra}"
    )


class CloudBroker:
    """A mosquitto that can be stopped and started again on the same port and persistence dir."""

    def __init__(self, directory: Path, port: int | None = None, *, extra: str = ""):
        self.directory = directory
        self.port = port or free_port()
        self.conf = directory / "mosquitto.conf"
        directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(cloud_conf(self.port, directory / "data", extra=extra))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CloudBroker:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: can_connect(self.port), message=f"mosquitto on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistent sessions
            self.proc.wait(10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Subscriber:
    """A paho subscriber with a persistent session: it gets what was queued while it was away."""

    def __init__(self, port: int, topic: str = "#", *, client_id: str = "cloud-consumer", version: int = 4,
                 tls: dict[str, Any] | None = None):
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": paho.MQTTv5 if version == 5 else paho.MQTTv311}
        if version != 5:
            kwargs["clean_session"] = False
        self.client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.messages: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.topic = topic
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, flags, rc, p: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.version = version
        self.port = port

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def start(self) -> Subscriber:
        if self.version == 5:
            self.client.connect("127.0.0.1", self.port, clean_start=False,
                                properties=_session_expiry())
        else:
            self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.messages]

    def count(self) -> int:
        with self._lock:
            return len(self.messages)


def _session_expiry() -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return props


class Msg(NamedTuple):
    """One record for the log: a DECISION (forwarded or not) or a FORWARD_ONLY."""

    kind: RecordKind
    row: tuple[Any, ...]

    @property
    def id(self) -> int:
        return int(self.row[0])

    @property
    def ts(self) -> float:
        return float(self.row[1])

    @property
    def topic(self) -> str:
        return str(self.row[_TOPIC[self.kind.code]])

    @property
    def payload(self) -> bytes:
        return bytes(self.row[_PAYLOAD[self.kind.code]])

    @property
    def size(self) -> int:
        """Bytes of its record in the log."""
        return RECORD_HEADER_SIZE + len(self.kind.encode(self.row))


_TOPIC = {DECISION.code: DECISION.names.index("topic"), FORWARD_ONLY.code: FORWARD_ONLY.names.index("topic")}
_PAYLOAD = {DECISION.code: DECISION.names.index("payload"), FORWARD_ONLY.code: FORWARD_ONLY.names.index("payload")}


@dataclass
class Harness:
    """A real MessageLog (writer thread, power-safe syncs) on a background event loop, and, when
    started, an Outbox over it with a real Cursor and a Forwarder on that loop."""

    directory: Path
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    clock: IdClock = field(default_factory=IdClock)
    forwarder: Forwarder | None = None
    outbox: Outbox | None = None
    outbox_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()
        self.log_dir = self.directory / "log"
        self.cursor_path = self.directory / "forward.cursor"
        self.log = MessageLog(self.log_dir, segment_bytes=256 * 1024)  # small segments: many rolls
        self.log.open()
        self.log.start(self.loop)

    def call(self, func: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return func()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, msgs: Iterable[Msg]) -> int:
        """Append records (as the pipeline's sink does, on the loop) and wait until durable."""
        msgs = list(msgs)

        def add_all() -> int:
            seq = 0
            for msg in msgs:
                seq = self.log.append(msg.kind.code, msg.kind.encode(msg.row))
            return seq

        seq = self.call(add_all)
        wait_until(lambda: self.log.durable_seq >= seq, message="log durable")
        return sum(1 for m in msgs if forwarded(m))

    def row(self, client_id: str, seq: int, *, topic: str | None = None, payload: bytes | None = None,
            ts: float | None = None, qos: int | None = None, schema: str | None = "reading:v1",
            forward: bool = True) -> Msg:
        """A decision (accepted) for a message to forward, or with forward=False one that is not."""
        now = time.time() if ts is None else ts
        topic = topic or f"sensors/{client_id}/reading"
        payload = payload if payload is not None else f"{client_id}:{seq}".encode()
        name, _, version = (schema or "").partition(":")
        row = (self.clock.next(now), now, client_id, None, "127.0.0.1:40000", 5, topic, 1, False, payload,
               len(payload), payload_sha256(payload), "v1" if schema else None, name or None, version or None,
               "sensors/#", "accept", 0, "[]", 12, "rev", False, False, None, forward, qos, True)
        return Msg(DECISION, row)

    def imported(self, client_id: str, seq: int, *, ts: float | None = None) -> Msg:
        """A FORWARD_ONLY record: a row of an old outbox, imported by the upgrade."""
        now = time.time() if ts is None else ts
        payload = f"{client_id}:{seq}".encode()
        return Msg(FORWARD_ONLY, (self.clock.next(now), now, client_id, f"sensors/{client_id}/reading", payload, None,
                                  False, "reading:v1"))

    def rejected(self, client_id: str) -> Msg:
        """A decision that is not forwarded (rejected): the forwarder passes over it."""
        now = time.time()
        payload = b"not json"
        return Msg(DECISION, (self.clock.next(now), now, client_id, None, "127.0.0.1:40000", 5, "sensors/x", 1, False,
                              payload, len(payload), payload_sha256(payload), None, None, None, None, "reject", 153,
                              '[{"check": "schema", "message": "bad", "schema": null, "path": null}]', 9, "rev", False,
                              False, None, False, None, True))

    def event(self, kind: str = "client_connected") -> Msg:
        now = time.time()
        return Msg(EVENT, (self.clock.next(now), now, kind, "sensor-x", "127.0.0.1:40000", "{}"))

    def make_outbox(self, bounds: OutboxBounds | None = None, **options: Any) -> Outbox:
        """An outbox over the running log, with the real cursor file (not started by a forwarder)."""
        return Outbox.for_log(self.log, Cursor(self.cursor_path), bounds or OutboxBounds(),
                              **{**self.outbox_options, **options})

    def start_forwarder(self, config: UpstreamConfig, **options: Any) -> Forwarder:
        self.outbox = self.make_outbox(config.outbox, **options)
        self.forwarder = Forwarder(config, self.outbox, on_event=lambda kind, detail: self.events.append((kind, detail)))
        self.run(self.forwarder.start())
        return self.forwarder

    def stop_forwarder(self) -> None:
        if self.forwarder is not None:
            self.run(self.forwarder.stop())
            self.forwarder = None
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def close(self) -> None:
        self.stop_forwarder()
        self.log.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def forwarded(msg: Msg) -> bool:
    return msg.kind is FORWARD_ONLY or (msg.kind is DECISION and bool(msg.row[DECISION.names.index("forward")]))


@contextmanager
def harness(directory: Path) -> Iterator[Harness]:
    h = Harness(directory)
    try:
        yield h
    finally:
        h.close()


def upstream(url: str, **values: Any) -> UpstreamConfig:
    defaults: dict[str, Any] = {"url": url, "client_id": "gateway-test", "backoff_initial": 0.05, "backoff_max": 0.5,
                                "ack_timeout": 5, "gateway_id": "gw1"}
    defaults.update(values)
    return UpstreamConfig.model_validate(defaults)


def sensor_rows(h: Harness, sensors: int, per_sensor: int, *, noise_every: int = 0) -> list[Msg]:
    """Interleaved messages: s0:0, s1:0, ..., s0:1, ...; with noise_every, a rejected decision and
    an event after every that many (records the forwarder must pass over)."""
    msgs: list[Msg] = []
    for i in range(per_sensor):
        for s in range(sensors):
            msgs.append(h.row(f"sensor-{s}", i))
            if noise_every and len(msgs) % (noise_every + 2) == noise_every:
                msgs += [h.rejected(f"sensor-{s}"), h.event()]
    return msgs


def check_per_sensor_order(payloads: list[bytes]) -> tuple[dict[str, int], int]:
    """Asserts that, per sensor, first occurrences come in sequence order; returns the count per
    sensor of distinct messages, and the number of duplicates."""
    seen: set[bytes] = set()
    last: dict[str, int] = {}
    duplicates = 0
    for payload in payloads:
        if payload in seen:
            duplicates += 1
            continue
        seen.add(payload)
        sensor, seq = payload.decode().rsplit(":", 1)
        assert int(seq) == last.get(sensor, -1) + 1, f"{sensor}: {seq} after {last.get(sensor)}"
        last[sensor] = int(seq)
    return {sensor: n + 1 for sensor, n in last.items()}, duplicates


def bounds(**values: Any) -> OutboxBounds:
    return OutboxBounds.model_validate(values)
