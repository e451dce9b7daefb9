"""Many sensors in one process: MQTT 3.1.1 clients on asyncio, one connection per sensor.

Run by the benchmark as `python -m bench.sensors ...`, several processes at once. Each
process connects all its sensors, prints `ready`, waits for `go` on stdin, then publishes:

- a fixed count per sensor as fast as the connection takes it (`--messages-each`), pre-built
  readings with synthetic timestamps; QoS 0 in batches of 64 packets per write, QoS 1 with at most
  `--window` unacknowledged messages per sensor (mosquitto_pub's default is 20);
- or at a fixed rate for the whole process (`--rate` messages/s for `--duration` s, sensors in
  turn), each reading stamped with the time it is written, for latency.

It waits for every PUBACK (QoS 1), sends DISCONNECT, waits for the broker to close, and writes every
payload it published to `--out`, one per line. The appliance's own sans-IO client core
(appliance/mqtt/client.py) on asyncio transports rather than paho: a paho client in Python costs
more CPU per message than the broker, and the load generators share the cores with it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from bench.payloads import reading, synthetic_ts, timestamp, topic
from appliance.mqtt import RemoteProtocolError
from appliance.mqtt.client import Client, Connected, ConnectionRefused, NeedData, Published

BATCH = 64


class Sensor(asyncio.Protocol):
    """One sensor's connection, a driver of the MQTT client core: counts PUBACKs and lets the
    publisher wait for window space."""

    def __init__(self, device: str, qos: int, window: int) -> None:
        loop = asyncio.get_running_loop()
        self.device, self.qos, self.window = device, qos, window
        self.topic = topic(device)
        self.client = Client(f"{device}-pub", keepalive=60)
        self.connack: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.space = asyncio.Event()
        self.space.set()
        self.writable = asyncio.Event()
        self.writable.set()
        self.sent = self.acked = 0
        self.transport: asyncio.Transport | None = None
        self.published: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's are not subclasses of asyncio.Transport.
        self.transport = stream = cast(asyncio.Transport, transport)
        stream.write(self.client.connect())

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.receive_data(data)
        try:
            while not isinstance(event := client.next_event(), NeedData):
                if isinstance(event, Published):
                    self.acked += 1
                    if self.sent - self.acked < self.window:
                        self.space.set()
                elif isinstance(event, Connected):
                    self.connack.set_result(None)
                elif isinstance(event, ConnectionRefused):
                    self._fail(RuntimeError(f"{self.device}: the broker refused the connection: {event.reason}"))
                else:
                    self._fail(RuntimeError(f"{self.device}: unexpected {type(event).__name__} from the broker"))
        except RemoteProtocolError as exc:
            self._fail(RuntimeError(f"{self.device}: protocol error from the broker: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc)
        print(f"sensors: {exc}", file=sys.stderr)
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc or ConnectionError(f"{self.device}: closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.space.set()
        self.writable.set()

    async def send(self, payloads: list[bytes]) -> None:
        """Publish `payloads`, batching writes; at QoS 1 never more than `window` unacknowledged."""
        assert self.transport is not None
        publish = self.client.publish
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
            self.transport.write(b"".join([publish(self.topic, p, self.qos)[1] for p in chunk]))
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
        self.transport.write(self.client.disconnect())  # the broker closes and so flushes everything before it
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
    parser = argparse.ArgumentParser(prog="python -m bench.sensors", description=__doc__.splitlines()[0])
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
