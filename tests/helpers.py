"""Real MQTT clients and a real appliance for tests: paho-mqtt clients, raw sockets, and the
appliance running on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.packettypes import PacketTypes

from appliance import statedir
from appliance.app import Appliance
from appliance.config import Config
from appliance.mqtt import NEED_DATA, Decoder, ProtocolVersion, encode_packet
from appliance.pipeline import Pipeline

# Emulated runs (`make test-arm64`, qemu-user: 5-10x slower) scale every wait instead of skipping.
TIMEOUT_SCALE = float(os.environ.get("APPLIANCE_TIMEOUT_SCALE", "1"))
TIMEOUT = 10.0 * TIMEOUT_SCALE


def scaled(seconds: float) -> float:
    """A timeout for this machine: `seconds` on real hardware, more under emulation."""
    return seconds * TIMEOUT_SCALE


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, message: str = "condition") -> Any:
    """Poll a cheap predicate (state owned by another thread) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.01)


class RunningAppliance:
    """The appliance on its own event loop thread, as `appliance run` would run it."""

    def __init__(self, config: Config, pipeline: Pipeline | None = None, *, uvloop: bool = True, **appliance: Any):
        if uvloop:
            import uvloop as _uvloop

            self.loop = _uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        # As `appliance run` does: the state dir is this appliance's while it runs (the CLI's offline
        # paths tell a running appliance from a stopped one by this lock).
        self._state_lock = statedir.claim(config.state_dir)
        self.app = Appliance(config, pipeline=pipeline, **appliance)
        self.events: list[tuple[str, dict[str, object]]] = []
        self.app.add_event_callback(lambda kind, detail: self.events.append((kind, detail)))
        self._thread = threading.Thread(target=self.loop.run_forever, name="appliance-loop", daemon=True)

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> RunningAppliance:
        self._thread.start()
        self.call(self.app.start())
        return self

    def stop(self) -> None:
        try:
            self.call(self.app.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            self._state_lock.close()

    @property
    def port(self) -> int:
        assert self.app.proxy is not None
        return self.app.proxy.port

    @property
    def verdicts(self):  # noqa: ANN201
        return self.app.verdicts


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any = None


class Client:
    """A paho-mqtt client with blocking helpers that wait for the broker's answers."""

    def __init__(self, port: int, *, version: int = 4, client_id: str = "", clean: bool = True, **connect: Any):
        self.version = version
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if version != 5:
            kwargs["clean_session"] = clean
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.port = port
        self.clean = clean
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_result: Any = None
        self.disconnect_reason: Any = None
        self.acks: dict[int, Any] = {}
        self._subacks: dict[int, Any] = {}
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_publish = self._on_publish
        self._connect_kwargs = connect

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # noqa: ANN001
        self.connect_result = reason_code
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):  # noqa: ANN001
        self.disconnect_reason = reason_code
        self.connected.clear()
        self.disconnected.set()

    def _on_message(self, client, userdata, msg):  # noqa: ANN001
        self.messages.put(Received(msg.topic, msg.payload, msg.qos, msg.retain, getattr(msg, "properties", None)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):  # noqa: ANN001
        self._subacks[mid] = reason_codes

    def _on_publish(self, client, userdata, mid, reason_code, properties):  # noqa: ANN001
        self.acks[mid] = reason_code

    def will(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Client:
        self.paho.will_set(topic, payload, qos, retain)
        return self

    def connect(self, expect_success: bool = True) -> Client:
        kwargs = dict(self._connect_kwargs)
        if self.version == 5:
            kwargs.setdefault("clean_start", self.clean)
        self.paho.connect("127.0.0.1", self.port, keepalive=30, **kwargs)
        self.paho.loop_start()
        if not self.connected.wait(TIMEOUT) and not self.disconnected.is_set():
            raise AssertionError("no CONNACK")
        if expect_success:
            assert self.connect_result is not None and not self.connect_result.is_failure, self.connect_result
        return self

    def subscribe(self, topic: str, qos: int = 0, **kwargs: Any) -> Any:
        result, mid = self.paho.subscribe(topic, qos, **kwargs)
        assert result == paho.MQTT_ERR_SUCCESS
        return wait_until(lambda: self._subacks.get(mid), message=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                properties: PahoProperties | None = None, wait: bool = True) -> paho.MQTTMessageInfo:
        info = self.paho.publish(topic, payload, qos, retain, properties=properties)
        if wait and qos:
            info.wait_for_publish(TIMEOUT)
            assert info.is_published()
        return info

    def expect(self, count: int, timeout: float = TIMEOUT) -> list[Received]:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(remaining, 0.001)))
            except queue.Empty:
                last = got[-1] if got else None
                raise AssertionError(f"expected {count} messages, got {len(got)} (last: {last})") from None
        return got

    def expect_none(self, within: float = 0.3) -> None:
        """Nothing more arrives: checked after a round trip through the same broker has completed."""
        try:
            extra = self.messages.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {extra}")

    def disconnect(self) -> None:
        self.paho.disconnect()
        self.disconnected.wait(TIMEOUT)
        self.paho.loop_stop()

    def close_abruptly(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crashed device would."""
        self.paho.loop_stop()
        sock = self.paho.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def paho_props(packet_type: int = PacketTypes.PUBLISH, **values: Any) -> PahoProperties:
    props = PahoProperties(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props


class RawClient:
    """A blocking socket speaking our own codec: for bad input and exact transcripts."""

    def __init__(self, port: int, version: ProtocolVersion = ProtocolVersion.MQTT_5, timeout: float = TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.version = version
        self.decoder = Decoder(version=version)

    def send(self, *packets: Any) -> None:
        self.sock.sendall(b"".join(encode_packet(p, self.version) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> Any:
        """Next packet from the appliance, or None once it closed the connection."""
        while True:
            packet = self.decoder.next_packet()
            if packet is not NEED_DATA:
                return packet
            data = self.sock.recv(65536)
            if not data:
                return None
            self.decoder.receive_data(data)

    def receive_all(self) -> list[Any]:
        """Every packet until the appliance closes the connection."""
        packets = []
        while (packet := self.receive()) is not None:
            packets.append(packet)
        return packets

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def drain(clients: Iterable[Client]) -> None:
    for client in clients:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - best-effort cleanup in tests
            client.paho.loop_stop()


def mosquitto_sub(port: int, topic: str, count: int, *, client_id: str, qos: int = 1) -> subprocess.Popen[str]:
    """A mosquitto_sub counting `count` messages, subscribed before this returns.

    It subscribes once with a persistent session and exits (-E), then a second mosquitto_sub resumes
    that session: messages published from now on are queued for it even before it reconnects.
    """
    args = ["mosquitto_sub", "-p", str(port), "-t", topic, "-q", str(qos), "-c", "-i", client_id]
    subprocess.run([*args, "-E"], check=True, timeout=30)
    return subprocess.Popen([*args, "-C", str(count), "-W", "60"], stdout=subprocess.PIPE, text=True)


# Debian's headless chromium and its driver (`make setup` installs them), for the browser tests.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (`make setup` installs them)",
)


@contextmanager
def chromium(*arguments: str, page_load_timeout: float) -> Iterator[Any]:
    """A headless Chromium driven by Selenium through chromedriver; `arguments` are added to the
    common ones."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-extensions", "--no-first-run", *arguments):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(page_load_timeout)
    try:
        yield browser
    finally:
        browser.quit()
