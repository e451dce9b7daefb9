"""The uplink over WebSockets (upstream.url ws:// and wss://): the forwarder's link through a real
WebSocket endpoint (the `websockets` library's asyncio server) relaying to a real mosquitto, as
AWS IoT Core's wss:// endpoint fronts its broker. The Debian mosquitto has no WebSocket listener,
hence the relay. FIFO and at-least-once as over TCP, through uplink cuts."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from tests.forward.harness import CloudBroker, Subscriber, check_per_sensor_order, harness, sensor_rows, upstream
from tests.helpers import wait_until
from tests.tls import Certificates, make_certificates


class WebSocketRelay:
    """ws(s)://127.0.0.1:PORT/mqtt → mosquitto's TCP port: each WebSocket connection gets a TCP one.
    `fragment`: what mosquitto sends goes out as fragmented messages of that many bytes per frame;
    `ping_interval`: the server pings that often and drops a client that does not answer."""

    def __init__(self, broker_port: int, *, tls: ssl.SSLContext | None = None, fragment: int = 0,
                 ping_interval: float | None = None, path: str = "/mqtt"):
        self.broker_port = broker_port
        self.tls = tls
        self.fragment = fragment
        self.ping_interval = ping_interval
        self.path = path
        self.connections: list[ServerConnection] = []
        self.accepted = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ws-relay", daemon=True)
        self._server: Server | None = None
        self.port = 0

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != self.path:
            return connection.respond(404, f"no such path {request.path}\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        self.accepted += 1
        self.connections.append(ws)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.broker_port)

        async def up() -> None:
            async for message in ws:
                assert isinstance(message, bytes), "the uplink sent a text frame"
                writer.write(message)
            writer.close()

        async def down() -> None:
            while data := await reader.read(65536):
                if self.fragment:
                    await ws.send([data[i:i + self.fragment] for i in range(0, len(data), self.fragment)])
                else:
                    await ws.send(data)
            await ws.close()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            self.connections.remove(ws)

    async def _start(self) -> None:
        self._server = await serve(
            self._handler, "127.0.0.1", 0, ssl=self.tls, subprotocols=[Subprotocol("mqtt")], compression=None,
            ping_interval=self.ping_interval, ping_timeout=self.ping_interval, process_request=self._check_path,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    def start(self) -> WebSocketRelay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def cut(self) -> int:
        """Drop every connection without a close frame (a NAT timeout, a pulled cable)."""

        async def cut() -> int:
            for ws in list(self.connections):
                ws.transport.abort()
            return len(self.connections)

        return asyncio.run_coroutine_threadsafe(cut(), self.loop).result(10)

    def stop(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def server_context(certs: Certificates) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    return context


@contextmanager
def cloud(tmp_path: Path, **relay: Any) -> Iterator[tuple[CloudBroker, WebSocketRelay, Subscriber]]:
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    ws = WebSocketRelay(broker.port, **relay).start()
    try:
        yield broker, ws, sub
    finally:
        ws.stop()
        sub.stop()
        broker.stop()


def test_wss_uplink_keeps_fifo_and_at_least_once_through_cuts(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    # Acks come back split over many frames, and the server pings: the link answers with pongs.
    with cloud(tmp_path, tls=server_context(certs), fragment=3, ping_interval=0.2) as (_, relay, sub), \
            harness(tmp_path / "state") as h:
        url = f"wss://localhost:{relay.port}/mqtt"
        fwd = h.start_forwarder(upstream(url, tls={"ca_file": str(certs.ca)}, window=50))
        stored = sensor_rows(h, sensors=4, per_sensor=600)
        total = h.add(stored[:800])
        wait_until(lambda: sub.count() >= 200, timeout=60, message="forwarding under way")
        assert relay.cut() >= 1
        total += h.add(stored[800:1600])
        wait_until(lambda: relay.accepted >= 2 and sub.count() >= 1000, timeout=60,
                   message=f"reconnected after the first cut ({relay.accepted} connections, {sub.count()} arrived, "
                           f"{fwd.status()})")
        assert relay.cut() >= 1
        total += h.add(stored[1600:])
        wait_until(lambda: fwd.status().forwarded_total >= total, timeout=60, message="everything acknowledged")
        h.add([h.row("end", 0)])  # FIFO: once this arrives, everything before it has
        wait_until(lambda: b"end:0" in sub.payloads(), message="end marker")
        payloads = sub.payloads()
        assert payloads[-1] == b"end:0"
        per_sensor, duplicates = check_per_sensor_order(payloads[:-1])
        assert per_sensor == {f"sensor-{s}": 600 for s in range(4)}  # nothing lost
        print(f"\nwss uplink: {total} messages through 2 cuts, {duplicates} duplicates, {relay.accepted} connections")
        downs = [detail["reason"] for kind, detail in h.events if kind == "uplink_down"]
        assert len(downs) >= 2 and all("WebSocket" in reason or "connection lost" in reason for reason in downs), downs
        assert fwd.status().depth == 0


def test_ws_uplink_delivers_and_a_wrong_path_is_a_clear_uplink_down(tmp_path: Path) -> None:
    with cloud(tmp_path) as (_, relay, sub), harness(tmp_path / "state") as h:
        h.add(sensor_rows(h, sensors=2, per_sensor=50))
        wrong = h.start_forwarder(upstream(f"ws://127.0.0.1:{relay.port}/nope"))
        wait_until(lambda: "uplink_down" in h.kinds(), message="uplink_down")
        reason = dict(h.events)["uplink_down"]["reason"]
        assert "WebSocket handshake" in reason and "HTTP 404" in reason, reason
        assert wrong.status().depth == 100 and sub.count() == 0
        h.stop_forwarder()

        url = f"ws://127.0.0.1:{relay.port}/mqtt"
        fwd = h.start_forwarder(upstream(url, protocol=4))
        wait_until(lambda: sub.count() >= 100, message="100 messages over ws:// with MQTT 3.1.1")
        wait_until(lambda: fwd.status().depth == 0, message="all acknowledged")
        h.stop_forwarder()
        h.add([h.row("v5", i) for i in range(10)])
        h.start_forwarder(upstream(url, protocol=5))  # from where the last one left off
        wait_until(lambda: sub.count() >= 110, message="10 more with MQTT 5")
        per_sensor, duplicates = check_per_sensor_order(sub.payloads())
        assert per_sensor == {"sensor-0": 50, "sensor-1": 50, "v5": 10} and duplicates == 0


def test_wss_with_the_wrong_ca_keeps_buffering(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    other = make_certificates(tmp_path / "other", ca_name="Some Other CA")
    with cloud(tmp_path, tls=server_context(certs)) as (_, relay, sub), harness(tmp_path / "state") as h:
        h.add(sensor_rows(h, sensors=1, per_sensor=20))
        fwd = h.start_forwarder(upstream(f"wss://localhost:{relay.port}/mqtt", tls={"ca_file": str(other.ca)}))
        wait_until(lambda: "uplink_down" in h.kinds(), message="uplink_down")
        reason = dict(h.events)["uplink_down"]["reason"]
        assert "certificate verify failed" in reason, reason
        assert fwd.status().depth == 20 and sub.count() == 0
