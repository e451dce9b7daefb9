"""`replay capture`: subscribe to any MQTT broker and write what arrives as NDJSON, one message a
line, in the format `replay --from` reads:

    {"ts": "2026-11-27T12:00:00.123456+00:00", "topic": "...", "payload_b64": "...", "qos": 1, "retain": false}

A subscriber cannot see who published a message, so `client_id` is left out, and a capture has no
recorded verdict: replay it with `--baseline` (the set in force) to compare, or without one to list
everything the target would reject. Each line is flushed as it is written, so an interrupted
capture keeps every message it received.
"""

from __future__ import annotations

import base64
import queue
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import orjson


class CaptureError(Exception):
    """The broker URL, the connection or the output file cannot be used; the message says why."""


def parse_broker(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """mqtt://[user[:password]@]host[:port] or mqtts://... → (host, port, tls, username, password)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise CaptureError(f"--broker {url!r}: use mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise CaptureError(f"--broker {url!r}: no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise CaptureError(f"--broker {url!r}: bad port") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, tls, username, password


def record_line(topic: str, payload: bytes, qos: int, retain: bool, received: float) -> bytes:
    return orjson.dumps({
        "ts": datetime.fromtimestamp(received, UTC).isoformat(),
        "topic": topic,
        "payload_b64": base64.b64encode(payload).decode(),
        "qos": qos,
        "retain": retain,
    }) + b"\n"


def capture_to_file(
    broker: str,
    topics: Sequence[str],
    to_file: Path,
    *,
    count: int | None = None,
    duration: float | None = None,
    qos: int = 1,
    client_id: str = "",
    connect_timeout: float = 10.0,
    ready: threading.Event | None = None,
) -> int:
    """Capture until `count` messages or `duration` seconds (or Ctrl-C); returns how many.
    `ready` is set once the subscriptions are acknowledged (tests publish after it)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, port, tls, username, password = parse_broker(broker)
    received: queue.Queue[tuple[str, bytes, int, bool, float]] = queue.Queue(maxsize=100_000)
    connected = threading.Event()
    subscribed = threading.Event()
    failure: list[str] = []
    pending_subs: set[int] = set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    if tls:
        client.tls_set()

    def on_connect(_c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        if reason_code.is_failure:
            failure.append(f"the broker refused the connection: {reason_code}")
            connected.set()
            return
        for topic in topics:
            _, mid = client.subscribe(topic, qos)
            if mid is not None:
                pending_subs.add(mid)
        connected.set()

    def on_subscribe(_c: Any, _u: Any, mid: int, reason_codes: Any, _p: Any) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            failure.append(f"the broker refused the subscription: {', '.join(refused)}")
        pending_subs.discard(mid)
        if not pending_subs:
            subscribed.set()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        received.put((message.topic, bytes(message.payload), message.qos, bool(message.retain), time.time()))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=60)
    except OSError as exc:
        raise CaptureError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    client.loop_start()
    out: IO[bytes] | None = None
    captured = 0
    try:
        if not connected.wait(connect_timeout) or not subscribed.wait(connect_timeout) and not failure:
            raise CaptureError(f"no answer from the broker at {host}:{port} within {connect_timeout:g} s")
        if failure:
            raise CaptureError(failure[0])
        try:
            out = sys.stdout.buffer if str(to_file) == "-" else to_file.open("ab")
        except OSError as exc:
            raise CaptureError(f"cannot write {to_file}: {exc.strerror}") from None
        if ready is not None:
            ready.set()
        deadline = time.monotonic() + duration if duration is not None else None
        while count is None or captured < count:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            try:
                topic, payload, message_qos, retain, at = received.get(timeout=timeout if timeout is not None else 1.0)
            except queue.Empty:
                continue
            out.write(record_line(topic, payload, message_qos, retain, at))
            out.flush()
            captured += 1
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
        if out is not None and out is not sys.stdout.buffer:
            out.close()
    return captured
