"""`appliance simulate`: simulated sensors publishing the demo schema set's traffic (`schemas/v1`).

Half the sensors are thermometers (JSON on `sensor/<id>/temperature`), half report their status
(Protobuf `demo.DeviceStatus` on `device/<id>/status`). A chosen fraction of messages is invalid in
one of the ways real devices get it wrong; with MQTT 5 and QoS 1 the appliance's PUBACK reason
codes tell the rejections apart, so the live summary shows what the appliance decided.

`Traffic` plans the messages (no I/O, seeded); `Fleet` owns one paho client per sensor;
`simulate()` paces the plan through the fleet and returns the `Tally`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import click
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from appliance.settings import Address

VALID = "valid"
# How each kind of sensor gets it wrong; every one of these is rejected by schemas/v1.
TEMPERATURE_FAULTS = ("out_of_range", "missing_field", "wrong_device", "not_json", "topic_not_allowed")
STATUS_FAULTS = ("unknown_field", "wrong_device", "truncated", "topic_not_allowed")
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Planned:
    sensor: str
    topic: str
    payload: bytes
    kind: str  # VALID or one of the faults

    @property
    def valid(self) -> bool:
        return self.kind == VALID


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def device_status(device_id: str, state: int, battery_mv: int, uptime_s: int, *, unknown_field: int | None = None) -> bytes:
    """demo.DeviceStatus in protobuf wire format (fields 1-4; field 15 is unknown to the schema)."""
    raw = device_id.encode()
    out = b"\x0a" + _varint(len(raw)) + raw + b"\x10" + _varint(state) + b"\x18" + _varint(battery_mv) + b"\x20" + _varint(uptime_s)
    if unknown_field is not None:
        out += b"\x78" + _varint(unknown_field)
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Traffic:
    """The messages the fleet sends, in order: sensors take turns; `invalid_rate` of them are faulty."""

    def __init__(self, sensors: int, invalid_rate: float, *, seed: int | None = None, clock: Callable[[], str] = _now):
        if sensors < 1:
            raise ValueError("at least one sensor")
        if not 0 <= invalid_rate <= 1:
            raise ValueError("invalid_rate is a fraction between 0 and 1")
        self.sensors = [f"sim{i:03d}" for i in range(sensors)]
        self.invalid_rate = invalid_rate
        self._rng = random.Random(seed)
        self._clock = clock
        self._turn = 0
        self._started = time.monotonic()

    @staticmethod
    def is_thermometer(index: int) -> bool:
        return index % 2 == 0

    def next(self) -> Planned:
        index = self._turn % len(self.sensors)
        self._turn += 1
        sensor = self.sensors[index]
        faulty = self._rng.random() < self.invalid_rate
        if self.is_thermometer(index):
            return self._temperature(sensor, self._rng.choice(TEMPERATURE_FAULTS) if faulty else VALID)
        return self._status(sensor, self._rng.choice(STATUS_FAULTS) if faulty else VALID)

    def _temperature(self, sensor: str, kind: str) -> Planned:
        rng = self._rng
        body: dict[str, object] = {"device_id": sensor, "ts": self._clock(), "temperature": round(rng.uniform(15, 30), 1)}
        topic = f"sensor/{sensor}/temperature"
        if kind == "out_of_range":
            body["temperature"] = rng.choice((-273.2, 150.0, 999.0))
        elif kind == "missing_field":
            del body[rng.choice(("ts", "temperature", "device_id"))]
        elif kind == "wrong_device":
            body["device_id"] = sensor + "-x"
        elif kind == "topic_not_allowed":
            topic = f"sensor/{sensor}/humidity"
        if kind == "not_json":
            return Planned(sensor, topic, f"temperature={body['temperature']}".encode(), kind)
        return Planned(sensor, topic, orjson.dumps(body), kind)

    def _status(self, sensor: str, kind: str) -> Planned:
        rng = self._rng
        uptime = int(time.monotonic() - self._started) + 3600
        fields = {"device_id": sensor, "state": rng.choice((1, 1, 1, 2)), "battery_mv": rng.randint(3000, 3300), "uptime_s": uptime}
        topic = f"device/{sensor}/status"
        if kind == "wrong_device":
            fields["device_id"] = sensor + "-x"
        elif kind == "topic_not_allowed":
            topic = f"device/{sensor}/firmware"
        payload = device_status(**fields, unknown_field=7 if kind == "unknown_field" else None)  # type: ignore[arg-type]
        if kind == "truncated":
            payload = payload[:3]  # cut inside device_id: not decodable
        return Planned(sensor, topic, payload, kind)


def describe(reason_code: Any) -> str:
    return f"0x{reason_code.value:02X} {reason_code}"


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)  # by kind: "valid", "out_of_range", ...
    acked: int = 0  # accepted (PUBACK < 0x80), or for QoS 0 written to the socket
    rejected: Counter[str] = field(default_factory=Counter)  # by reason code, e.g. "0x99 Payload format invalid"
    failed: int = 0  # could not be sent (client not connected)
    disconnects: int = 0  # connections the appliance closed (paho reconnects)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    @property
    def valid(self) -> int:
        return self.sent[VALID]

    @property
    def invalid(self) -> int:
        return self.total - self.valid

    @property
    def answered(self) -> int:
        return self.acked + sum(self.rejected.values()) + self.failed

    def copy(self) -> Tally:
        return Tally(Counter(self.sent), self.acked, Counter(self.rejected), self.failed, self.disconnects)


class Fleet:
    """One paho client per sensor (client id `<sensor>`), each on its own network thread."""

    def __init__(self, sensors: list[str], address: Address, *, protocol: int, qos: int, websocket_path: str | None = None):
        self.qos = qos
        self.tally = Tally()
        self._lock = threading.Lock()
        self._address = address
        self._clients: dict[str, paho.Client] = {}
        self._connected: dict[str, threading.Event] = {}
        self._refused: dict[str, str] = {}
        self._closing = False
        for sensor in sensors:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=sensor,
                                 protocol=paho.MQTTv5 if protocol == 5 else paho.MQTTv311,
                                 transport="websockets" if websocket_path else "tcp")
            if websocket_path:
                client.ws_set_options(path=websocket_path)
            client.max_inflight_messages_set(100)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.user_data_set(sensor)
            self._clients[sensor] = client
            self._connected[sensor] = threading.Event()

    def _on_connect(self, client: paho.Client, sensor: str, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._refused[sensor] = describe(reason_code)
        else:
            self._connected[sensor].set()

    def _on_disconnect(self, client: paho.Client, sensor: str, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected[sensor].clear()
        with self._lock:
            if not self._closing:
                self.tally.disconnects += 1

    def _on_publish(self, client: paho.Client, sensor: str, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            if reason_code.is_failure:
                self.tally.rejected[describe(reason_code)] += 1
            else:
                self.tally.acked += 1

    def connect(self) -> None:
        for client in self._clients.values():
            try:
                client.connect(self._address.host, self._address.port, keepalive=30)
            except OSError as exc:
                self.close()
                raise click.ClickException(f"cannot connect to {self._address}: {exc.strerror or exc}") from exc
            client.loop_start()
        deadline = time.monotonic() + CONNECT_TIMEOUT
        for sensor, connected in self._connected.items():
            if not connected.wait(max(deadline - time.monotonic(), 0)):
                self.close()
                why = self._refused.get(sensor, "no CONNACK")
                raise click.ClickException(f"{sensor} could not connect to {self._address}: {why}")

    def publish(self, message: Planned) -> None:
        with self._lock:
            self.tally.sent[message.kind] += 1
        info = self._clients[message.sensor].publish(message.topic, message.payload, self.qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            with self._lock:
                self.tally.failed += 1

    def snapshot(self) -> Tally:
        with self._lock:
            return self.tally.copy()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        for client in self._clients.values():
            client.disconnect()
            client.loop_stop()


def _rate_line(elapsed: float, now: Tally, before: Tally, interval: float) -> str:
    rejected = now.rejected - before.rejected
    detail = ", ".join(f"{code}: {count}" for code, count in sorted(rejected.items()))
    return (f"{elapsed:6.1f}s  sent {(now.total - before.total) / interval:6.0f}/s "
            f"({now.invalid - before.invalid} invalid)  acked {(now.acked - before.acked) / interval:6.0f}/s  "
            f"rejected {sum(rejected.values()) / interval:5.0f}/s" + (f" [{detail}]" if detail else ""))


def render_tally(tally: Tally, *, elapsed: float, protocol: int, qos: int) -> str:
    lines = [f"sent {tally.total} messages in {elapsed:.1f} s: {tally.valid} valid, {tally.invalid} invalid"]
    for kind, count in sorted(tally.sent.items()):
        if kind != VALID:
            lines.append(f"  {kind:<18} {count}")
    lines.append(f"acked (accepted): {tally.acked}")
    if protocol == 5 and qos == 1:
        lines.append(f"rejected: {sum(tally.rejected.values())}")
        for code, count in sorted(tally.rejected.items()):
            lines.append(f"  {code:<30} {count}")
        if tally.answered < tally.total:
            lines.append(f"unanswered: {tally.total - tally.answered}")
    else:
        lines.append("rejections are invisible to MQTT 3.1.1 and QoS 0 publishers: see `appliance status` or /metrics")
    if tally.failed:
        lines.append(f"not sent (client disconnected): {tally.failed}")
    if tally.disconnects:
        lines.append(f"disconnects: {tally.disconnects}")
    return "\n".join(lines)


PAYLOADS = ("demo", "avro", "sparkplug")


def make_traffic(payload: str, sensors: int, invalid_rate: float, *, seed: int | None = None) -> Any:
    """The traffic plan for a `--payload` choice: the demo set's (schemas/v1), or an example set's."""
    if payload == "demo":
        return Traffic(sensors, invalid_rate, seed=seed)
    from appliance.simulate_formats import AvroTraffic, SparkplugTraffic

    if payload == "avro":
        return AvroTraffic(sensors, invalid_rate, seed=seed)
    if payload == "sparkplug":
        return SparkplugTraffic(sensors, invalid_rate, seed=seed)
    raise ValueError(f"payload must be one of {', '.join(PAYLOADS)}")


def simulate(*, address: Address, sensors: int, rate: float, invalid_rate: float, duration: float | None = None,
             qos: int = 1, protocol: int = 5, seed: int | None = None, report: Callable[[str], None] | None = None,
             stop: threading.Event | None = None, drain_timeout: float = 10.0, payload: str = "demo",
             websocket_path: str | None = None) -> Tally:
    """Publish at `rate` messages per second in total until `duration` passes or `stop` is set, wait
    (up to `drain_timeout`) for the outstanding acknowledgements, and return the tally. `report`
    gets a summary line every second. With `websocket_path`, MQTT over WebSockets (ws://)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    stop = stop or threading.Event()
    traffic = make_traffic(payload, sensors, invalid_rate, seed=seed)
    fleet = Fleet(traffic.sensors, address, protocol=protocol, qos=qos, websocket_path=websocket_path)
    fleet.connect()
    start = time.monotonic()
    end = start + duration if duration is not None else float("inf")
    sent = 0
    next_report, last = start + 1.0, fleet.snapshot()
    try:
        try:
            while not stop.is_set():
                now = time.monotonic()
                if report is not None and now >= next_report:
                    current = fleet.snapshot()
                    report(_rate_line(now - start, current, last, 1.0))
                    next_report, last = next_report + 1.0, current
                if now >= end:
                    break
                due = start + sent / rate
                if due > now:
                    stop.wait(min(due, next_report, end) - now)
                    continue
                fleet.publish(traffic.next())
                sent += 1
        except KeyboardInterrupt:  # Ctrl-C: stop publishing, still collect the answers
            pass
        if qos:
            deadline = time.monotonic() + drain_timeout
            while fleet.snapshot().answered < sent and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        fleet.close()
    return fleet.snapshot()


def parse_broker(text: str) -> tuple[Address, str | None]:
    """`HOST[:PORT]` (1883), or `ws://HOST[:PORT][/PATH]` (80, /mqtt): the address and the WebSocket path."""
    if "://" not in text:
        return Address.parse(text if ":" in text else f"{text}:1883"), None
    parts = urlsplit(text)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"expected HOST:PORT or ws://HOST:PORT/PATH, got {text!r}")
    return Address(host=parts.hostname, port=parts.port or 80), parts.path or "/mqtt"


@click.command("simulate")
@click.option("--sensors", type=click.IntRange(min=1), default=10, show_default=True,
              help="Simulated sensors, each its own MQTT client; half thermometers (JSON), half device status (Protobuf).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Messages per second, all sensors together.")
@click.option("--invalid-rate", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Fraction of messages that are invalid: out of range, missing field, wrong device id, not JSON, "
                   "bad Protobuf, topic outside the allowlist.")
@click.option("--broker", default="127.0.0.1:1883", show_default=True, metavar="HOST:PORT",
              help="The appliance's MQTT listener; ws://HOST:PORT/PATH for a WebSocket listener.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after this long (default: until Ctrl-C).")
@click.option("--qos", type=click.Choice(["0", "1"]), default="1", show_default=True,
              help="QoS of every message. With QoS 1 and MQTT 5 the PUBACK says whether it was accepted.")
@click.option("--protocol", type=click.Choice(["4", "5"]), default="5", show_default=True,
              help="MQTT protocol level: 4 (3.1.1) or 5.")
@click.option("--seed", type=int, help="Seed for the random choices, to repeat a run.")
@click.option("--payload", "payload", type=click.Choice(PAYLOADS), default="demo", show_default=True,
              help="What the sensors send: the demo set's JSON and Protobuf (schemas/v1), Avro meter readings "
                   "(fixtures/avro/v1) or Sparkplug B edge nodes (fixtures/sparkplug/v1).")
def simulate_command(sensors: int, rate: float, invalid_rate: float, broker: str, duration: float | None,
                     qos: str, protocol: str, seed: int | None, payload: str) -> None:
    """Publish demo sensor traffic (for schemas/v1, or an example set with --payload) and show what the appliance accepts and rejects."""
    try:
        address, websocket_path = parse_broker(broker)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc
    where = f"ws://{address}{websocket_path}" if websocket_path else str(address)
    click.echo(f"{sensors} sensors -> {where}, {rate:g} msg/s, {invalid_rate:.0%} invalid, "
               f"MQTT {'5' if protocol == '5' else '3.1.1'} QoS {qos}" + ("" if duration else "; Ctrl-C stops"))
    start = time.monotonic()
    tally = simulate(address=address, sensors=sensors, rate=rate, invalid_rate=invalid_rate, duration=duration,
                     qos=int(qos), protocol=int(protocol), seed=seed, report=click.echo, payload=payload,
                     websocket_path=websocket_path)
    click.echo(render_tally(tally, elapsed=time.monotonic() - start, protocol=int(protocol), qos=int(qos)))

