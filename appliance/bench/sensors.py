"""Many sensors in one process: raw MQTT 3.1.1 clients on asyncio, one connection per sensor.

Run by the benchmark as `python -m appliance.bench.sensors ...`, several processes at once. Each
process connects all its sensors, prints `ready`, waits for `go` on stdin, then publishes:

- a fixed count per sensor as fast as the connection takes it (`--messages-each`), pre-built
  readings with synthetic timestamps; QoS 0 in batches of 64 packets per write, QoS 1 with at most
  `--window` unacknowledged messages per sensor (mosquitto_pub's default is 20);
- or at a fixed rate for the whole process (`--rate` messages/s for `--duration` s, sensors in
  turn), each reading stamped with the time it is written, for latency.

It waits for every PUBACK (QoS 1), sends DISCONNECT, waits for the broker to close, and writes every
payload it published to `--out`, one per line. Raw sockets rather than paho: a paho client in
Python costs more CPU per message than the broker, and the load generators share the cores with it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from appliance.bench.payloads import reading, synthetic_ts, timestamp, topic

BATCH = 64


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def connect_packet(client_id: str) -> bytes:
    body = _string(b"MQTT") + b"\x04\x02" + (60).to_bytes(2, "big") + _string(client_id.encode())
    return b"\x10" + _length(len(body)) + body


def publish_packet(topic_name: bytes, payload: bytes, qos: int, packet_id: int) -> bytes:
    body = _string(topic_name) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _length(len(body)) + body


class Sensor(asyncio.Protocol):
    """One sensor's connection: counts PUBACKs and lets the publisher wait for window space."""

    def __init__(self, device: str, qos: int, window: int) -> None:
        loop = asyncio.get_running_loop()
        self.device, self.qos, self.window = device, qos, window
        self.topic = topic(device).encode()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.space = asyncio.Event()
        self.space.set()
        self.writable = asyncio.Event()
        self.writable.set()
        self.sent = self.acked = 0
        self.packet_id = 0
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.published: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            length, shift, index = 0, 0, 1
            while True:
                if index >= len(self.buffer):
                    return
                byte = self.buffer[index]
                length += (byte & 0x7F) << shift
                shift += 7
                index += 1
                if not byte & 0x80:
                    break
            if len(self.buffer) < index + length:
                return
            kind, body = self.buffer[0] >> 4, bytes(self.buffer[index : index + length])
            del self.buffer[: index + length]
            if kind == 2 and not self.connack.done():
                if body[1] != 0:
                    self.connack.set_exception(RuntimeError(f"{self.device}: CONNACK return code {body[1]}"))
                else:
                    self.connack.set_result(None)
            elif kind == 4:
                self.acked += 1
                if self.sent - self.acked < self.window:
                    self.space.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc or ConnectionError(f"{self.device}: closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.space.set()
        self.writable.set()

    def _next_id(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    async def send(self, payloads: list[bytes]) -> None:
        """Publish `payloads`, batching writes; at QoS 1 never more than `window` unacknowledged."""
        assert self.transport is not None
        index = 0
        while index < len(payloads):
            if self.transport.is_closing():
                raise ConnectionError(f"{self.device}: connection closed after {self.sent} messages")
            room = BATCH
            if self.qos:
                room = self.window - (self.sent - self.acked)
                if room <= 0:
                    self.space.clear()
                    await self.space.wait()
                    continue
            chunk = payloads[index : index + room]
            self.transport.write(b"".join(publish_packet(self.topic, p, self.qos, self._next_id() if self.qos else 0)
                                          for p in chunk))
            self.published.extend(chunk)
            self.sent += len(chunk)
            index += len(chunk)
            if not self.writable.is_set():
                await self.writable.wait()
            elif not self.qos:
                await asyncio.sleep(0)  # let the other sensors write too

    async def finish(self, timeout: float) -> None:
        assert self.transport is not None
        deadline = time.monotonic() + timeout
        while self.qos and self.acked < self.sent:
            if self.transport.is_closing() or time.monotonic() > deadline:
                raise ConnectionError(f"{self.device}: {self.sent - self.acked} of {self.sent} messages unacknowledged")
            self.space.clear()
            try:
                await asyncio.wait_for(self.space.wait(), timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                pass
        self.transport.write(b"\xe0\x00")  # DISCONNECT; the broker closes and so flushes everything before it
        await asyncio.wait_for(asyncio.shield(self.closed), timeout=max(0.1, deadline - time.monotonic()))


async def _at_rate(sensors: list[Sensor], rate: float, duration: float, offset: float) -> None:
    total = int(rate * duration)
    sequence = [0] * len(sensors)
    start = time.monotonic() + offset / rate
    for k in range(total):
        due = start + k / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sensor = sensors[k % len(sensors)]
        seq = sequence[k % len(sensors)]
        sequence[k % len(sensors)] += 1
        await sensor.send([reading(sensor.device, seq, timestamp(time.time()))])


async def _main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    sensors: list[Sensor] = []
    for device in args.devices.split(","):
        transport, sensor = await loop.create_connection(
            functools.partial(Sensor, device, args.qos, args.window), "127.0.0.1", args.port
        )
        sensor.transport = transport
        transport.write(connect_packet(f"{device}-pub"))
        sensors.append(sensor)
    await asyncio.wait_for(asyncio.gather(*(s.connack for s in sensors)), timeout=15)
    print("ready", flush=True)
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        return 2
    if args.rate:
        await _at_rate(sensors, args.rate, args.duration, args.offset)
    else:
        await asyncio.gather(*(
            s.send([reading(s.device, seq, synthetic_ts(seq)) for seq in range(args.messages_each)]) for s in sensors
        ))
    await asyncio.gather(*(s.finish(timeout=30) for s in sensors))
    Path(args.out).write_bytes(b"".join(p + b"\n" for s in sensors for p in s.published))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bench.sensors", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument("--devices", required=True, help="comma-separated device ids, one connection each")
    parser.add_argument("--messages-each", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s for this whole process (0: as fast as possible)")
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--offset", type=float, default=0.0, help="start this many message intervals late (spreads processes)")
    parser.add_argument("--window", type=int, default=20, help="QoS 1 messages in flight per sensor")
    parser.add_argument("--out", required=True, help="file for every payload published")
    args = parser.parse_args(argv)
    try:
        import uvloop

        run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        return run(_main(args))
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"sensors: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
