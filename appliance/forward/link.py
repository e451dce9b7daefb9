"""The forwarder's MQTT connection to the cloud broker: a thin driver of `appliance.mqtt.Client`.

The protocol (CONNECT/CONNACK and the broker's limits, packet ids, PUBLISH encoding, acks, keepalive,
DISCONNECT) is the sans-IO client core in appliance/mqtt/client.py, shared with the admin operations
and the benchmark's sensors. This module does the I/O: one blocking connect (TCP, TLS handshake,
CONNECT/CONNACK, each bounded by a timeout), then a non-blocking socket driven by `poll()` from the
forwarder's thread, with no thread of its own.

Why not paho-mqtt (which the forwarder used first): paho builds every PUBLISH in Python, wakes its
own socket pair and calls `send()` once per message, and py-spy put 40 % of the appliance's samples
in it, capping the cloud rate near 10k msg/s (docs/performance.md). Here a whole window of
PUBLISHes is encoded into one buffer and written with as few `send()` calls as the kernel takes,
and acks are read from the socket in bulk.

Errors end the connection with `LinkClosed(reason)`; the reason is what `status()` and the
`uplink_down` event show.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from appliance.forward.transport import Stream, open_websocket
from appliance.mqtt import Properties, ProtocolVersion, RemoteProtocolError
from appliance.mqtt.client import (
    NEED_DATA,
    Client,
    ClientState,
    Connected,
    ConnectionRefused,
    Disconnected,
    PacketTooLarge,
    PingResponse,
    Published,
    reason_name,
)
from appliance.mqtt.wire import encode_varint

__all__ = ["Link", "LinkClosed", "TooLarge", "open_connection", "reason_name", "user_properties"]

_READ_SIZE = 256 * 1024
_MAX_PACKET = 1024 * 1024  # what the cloud broker may send us: acks, CONNACK, DISCONNECT
_MAX_QOS = 1  # the forwarder publishes at QoS 0 or 1


_MESSAGE_ID = b"\x26\x00\x0amessage-id"  # USER_PROPERTY (0x26) named "message-id", its value follows
_MAX_TEMPLATES = 10_000


class _Template(NamedTuple):
    """What publish_message() writes of every PUBLISH to one topic with the same user properties."""

    topic: bytes  # length-prefixed UTF-8
    user: bytes  # the user properties after message-id, encoded (MQTT 5; empty for 3.1.1)


class LinkClosed(Exception):
    """The connection is over; the message says why. `acked`: the packet identifiers the broker
    acknowledged in the last read before the end (the client core no longer counts them in flight:
    the caller takes them as poll()'s, rather than send their messages again)."""

    def __init__(self, message: str, acked: list[int] | None = None):
        super().__init__(message)
        self.acked: list[int] = [] if acked is None else acked


class TooLarge(ValueError):
    """A message this broker cannot take (its Maximum Packet Size, or a topic over 65,535 bytes)."""


def user_properties(pairs: Iterable[tuple[str, str]]) -> Properties:
    """MQTT 5 PUBLISH properties holding only user properties."""
    return Properties.user(pairs)


def open_connection(host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None,
                    timeout: float) -> socket.socket:
    """TCP (and a TLS handshake) to the broker within `timeout` seconds; raises LinkClosed.
    The one place the link chooses its transport: the MQTT bytes above it are the same."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise LinkClosed(f"cannot connect to {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is None:
            return sock
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            return tls.wrap_socket(sock, server_hostname=server_hostname or host)
        except ssl.SSLCertVerificationError as exc:
            raise LinkClosed(
                f"TLS: certificate verify failed: {exc.verify_message} "
                "(is upstream.tls.ca_file the CA of the cloud broker?)"
            ) from None
        except ssl.SSLError as exc:
            raise LinkClosed(f"TLS: {exc.reason or exc}") from None
        except (TimeoutError, OSError) as exc:
            raise LinkClosed(f"TLS handshake with {host}:{port} failed: {exc or 'timed out'}") from None
    except BaseException:
        sock.close()
        raise


class Link:
    """One connection. `publish()` queues, `poll()` writes, reads and returns what was acknowledged.

    Packet identifiers are handed out by the client core (1..65535, skipping those still in
    flight); the caller keeps at most `receive_maximum` messages in flight."""

    def __init__(self, host: str, port: int, *, client_id: str, protocol: int, keepalive: int,
                 username: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 write_timeout: float = 30.0, websocket: str | None = None):
        self.host, self.port = host, port
        self.version = ProtocolVersion.MQTT_5 if protocol == 5 else ProtocolVersion.MQTT_3_1_1
        self.tls, self.server_hostname = tls, server_hostname
        self.websocket = websocket  # MQTT over WebSockets to this ws:// or wss:// URL (forward/transport.py)
        self.write_timeout = write_timeout  # bytes waiting this long without any being written: hung
        self.client = Client(
            client_id, version=self.version, keepalive=keepalive, clean_start=True, username=username,
            password=password.encode() if password is not None else None, maximum_packet_size=_MAX_PACKET,
        )
        self.refused: dict[int, int] = {}  # MQTT 5 PUBACK error reason code -> messages, until read
        self._v5 = self.version == ProtocolVersion.MQTT_5
        self._sock: Stream | None = None
        self._out = bytearray()
        # QoS 0 messages count as delivered once written: (end offset in the output stream, token).
        self._unwritten: deque[tuple[int, int]] = deque()
        self._written = 0  # bytes written to the socket since connect
        self._templates: dict[tuple[str, tuple[tuple[str, str], ...]], _Template] = {}
        self._poller: select.poll | None = None  # poll()'s, made at its first wait
        self._poll_mask = 0  # what it watches the socket for
        self._poll_wake: int | None = None  # the wake descriptor it watches too
        self.woken = False  # a poll() saw its wake descriptor readable (the caller resets it)
        self._progress_at = 0.0  # when bytes were last written, or started waiting in _out

    # What the broker's MQTT 5 CONNACK allows (3.1.1: no limits announced).

    @property
    def keepalive(self) -> int:
        return self.client.keepalive  # MQTT 5: the broker's Server Keep Alive replaces ours

    @property
    def receive_maximum(self) -> int | None:
        return self.client.limits.receive_maximum

    @property
    def maximum_qos(self) -> int:
        return min(self.client.limits.maximum_qos, _MAX_QOS)

    @property
    def retain_available(self) -> bool:
        return self.client.limits.retain_available

    @property
    def maximum_packet_size(self) -> int | None:
        return self.client.limits.maximum_packet_size

    @property
    def inflight(self) -> int:
        return self.client.inflight

    # -- connecting ------------------------------------------------------------------------------

    def connect(self, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> Connected:
        """TCP, TLS and CONNECT → CONNACK, all within `timeout` seconds (TCP and TLS within 10 s at
        most); raises LinkClosed. While waiting for the CONNACK, `cancelled()` is asked every 50 ms."""
        deadline = time.monotonic() + timeout
        raw = open_connection(self.host, self.port, tls=self.tls, server_hostname=self.server_hostname,
                              timeout=min(timeout, 10.0))
        sock: Stream = raw
        try:
            if self.websocket is not None:
                try:
                    sock = open_websocket(raw, self.websocket, max(0.01, deadline - time.monotonic()))
                except OSError as exc:
                    raise LinkClosed(str(exc)) from None
            self._sock = sock
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                sock.sendall(self.client.connect())
            except OSError as exc:
                raise LinkClosed(f"connection lost while sending CONNECT: {exc}") from None
            self.client.sent(time.monotonic())
            connected = self._read_connack(deadline, timeout, cancelled)
        except BaseException:
            self._sock = None
            sock.close()
            raw.close()
            raise
        sock.setblocking(False)
        return connected

    def _read_connack(self, deadline: float, timeout: float, cancelled: Callable[[], bool]) -> Connected:
        assert self._sock is not None
        while True:
            event = self._next_event()
            if isinstance(event, Connected):
                return event
            if isinstance(event, ConnectionRefused):
                raise LinkClosed(f"the cloud broker refused the connection: {event.reason}")
            if isinstance(event, Disconnected):
                raise LinkClosed(f"the cloud broker sent DISCONNECT: {event.reason}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkClosed(f"no CONNACK within {timeout:g} s: uplink hung")
            if cancelled():
                raise LinkClosed("stopped")
            self._sock.settimeout(min(left, 0.05))
            try:
                data = self._sock.recv(_READ_SIZE)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError as exc:
                raise LinkClosed(f"connection lost while waiting for CONNACK: {exc}") from None
            if not data:
                raise LinkClosed("connection lost while waiting for CONNACK: closed by the cloud broker")
            self.client.receive_data(data)

    def _next_event(self) -> object:
        try:
            return self.client.next_event()
        except RemoteProtocolError as exc:
            raise LinkClosed(f"protocol error from the cloud broker: {exc}") from None

    # -- sending ---------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool,
                properties: Properties = Properties.EMPTY, token: int = 0) -> int:
        """Queue one PUBLISH; returns its packet identifier (0 at QoS 0, whose `token` is returned
        by poll() once written). `properties`: MQTT 5 only (user_properties()), left out on 3.1.1.
        QoS and retain are lowered to what the broker's CONNACK allows. Raises TooLarge for a
        message the broker would refuse to take (nothing is queued then)."""
        try:
            pid, data = self.client.publish(topic, payload, min(qos, _MAX_QOS), retain,
                                            properties if self._v5 else Properties.EMPTY)
        except PacketTooLarge as exc:
            raise TooLarge(str(exc)) from None
        return self._queue(data, pid, token)

    def publish_message(self, topic: str, payload: bytes, qos: int, retain: bool, message_id: int,
                        user: tuple[tuple[str, str], ...] = (), token: int = 0) -> int:
        """publish() of a forwarded message with the MQTT 5 user properties ("message-id",
        str(message_id)) and then `user`: the same bytes, limits and errors. The topic and `user`
        are checked by publish()'s own path the first time they come (at QoS 0 with an empty
        payload: nothing is queued or taken); each message is then put together from what that
        left (_Template) instead of being encoded field by field: 1 µs instead of 3 per message."""
        client = self.client
        limits = client.limits
        sent_qos = min(qos, limits.maximum_qos, _MAX_QOS)
        if client.state is not ClientState.CONNECTED or (sent_qos and client.send_quota <= 0):
            # publish() raises what it raises then (not connected, the window is full)
            return self.publish(topic, payload, qos, retain, user_properties((("message-id", str(message_id)), *user)),
                                token)
        qos = sent_qos
        template = self._templates.get((topic, user))
        if template is None:
            template = self._template(topic, user)
        if retain and not limits.retain_available:
            retain = False
        if self._v5:
            mid = str(message_id).encode()
            properties = b"".join((_MESSAGE_ID, len(mid).to_bytes(2, "big"), mid, template.user))
            properties = encode_varint(len(properties)) + properties
        else:
            properties = b""
        length = len(template.topic) + (2 if qos else 0) + len(properties) + len(payload)
        remaining = encode_varint(length)
        if limits.maximum_packet_size is not None and 1 + len(remaining) + length > limits.maximum_packet_size:
            raise TooLarge(f"{1 + len(remaining) + length} bytes, the server takes packets up to "
                           f"{limits.maximum_packet_size}")
        first = 0x30 | (qos << 1) | retain
        if qos:
            pid = self.client.take_publish_id()
            data = b"".join((bytes((first,)), remaining, template.topic, pid.to_bytes(2, "big"), properties, payload))
        else:
            pid = 0
            data = b"".join((bytes((first,)), remaining, template.topic, properties, payload))
        return self._queue(data, pid, token)

    def _queue(self, data: bytes, pid: int, token: int) -> int:
        """Queue an encoded PUBLISH for the next write; a QoS 0 one's `token` is returned by poll()
        once it is written."""
        out = self._out
        if not out:
            self._progress_at = time.monotonic()
        out += data
        if not pid:
            self._unwritten.append((self._written + len(out), token))
        return pid

    def _template(self, topic: str, user: tuple[tuple[str, str], ...]) -> _Template:
        properties = user_properties((("message-id", "0"), *user)) if self._v5 else Properties.EMPTY
        try:
            self.client.publish(topic, b"", 0, False, properties)  # checks; raises what publish() would
        except PacketTooLarge as exc:
            raise TooLarge(str(exc)) from None
        encoded = topic.encode()
        parts = []
        if self._v5:
            for pair in user:
                parts.append(b"\x26")
                for text in pair:
                    data = text.encode()
                    parts.append(len(data).to_bytes(2, "big") + data)
        if len(self._templates) >= _MAX_TEMPLATES:
            self._templates.clear()
        template = self._templates[topic, user] = _Template(len(encoded).to_bytes(2, "big") + encoded, b"".join(parts))
        return template

    @property
    def unsent(self) -> int:
        """Bytes queued that the socket has not taken yet."""
        return len(self._out)

    # -- the loop --------------------------------------------------------------------------------

    def poll(self, timeout: float, wake_fd: int | None = None) -> tuple[list[int], list[int]]:
        """Write what is queued, wait up to `timeout` for the socket (or until `wake_fd` is
        readable: the caller drains it), read; returns the packet identifiers the broker
        acknowledged and the tokens of QoS 0 messages now written. Sends PINGREQ on keepalive;
        raises LinkClosed when the connection is over."""
        sock = self._sock
        if sock is None:
            raise LinkClosed("not connected")
        client = self.client
        self._flush()
        now = time.monotonic()
        if not self._out and client.ping_due(now):
            self._out += client.ping(now)
            self._flush()
        pending_tls = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending_tls and timeout > 0:
            # poll(), not select(): the proxy may hold thousands of sockets, and select() cannot
            # watch a descriptor numbered 1024 or more. One poll object per connection, changed
            # only when what it watches changes (this runs at every PUBACK wait of a full window).
            poller = self._poller
            mask = select.POLLIN | (select.POLLOUT if self._out else 0)
            if poller is None:
                poller = self._poller = select.poll()
                poller.register(sock, mask)
                self._poll_mask = mask
            elif mask != self._poll_mask:
                poller.modify(sock, mask)
                self._poll_mask = mask
            if wake_fd != self._poll_wake:
                if self._poll_wake is not None:
                    poller.unregister(self._poll_wake)
                if wake_fd is not None:
                    poller.register(wake_fd, select.POLLIN)
                self._poll_wake = wake_fd
            try:
                ready = poller.poll(timeout * 1000)
            except OSError as exc:
                raise LinkClosed(f"connection lost: {exc}") from None
            sock_fd = sock.fileno()
            for fd, events in ready:
                if fd == sock_fd:
                    if events & select.POLLOUT:
                        self._flush()
                else:
                    self.woken = True
        acked = self._read()
        # Deadlines after reading: a PINGRESP that arrived while this thread was busy elsewhere
        # is an answer, not a hung uplink.
        now = time.monotonic()
        if client.pingresp_overdue(now):
            raise LinkClosed(f"no PINGRESP within {client.keepalive} s: uplink hung", acked)
        if self._out and now - self._progress_at > self.write_timeout:
            # The broker stopped reading (QoS 0 has no acknowledgement to wait for).
            raise LinkClosed(f"nothing written for {self.write_timeout:g} s ({len(self._out)} bytes waiting): uplink hung",
                             acked)
        written: list[int] = []
        while self._unwritten and self._unwritten[0][0] <= self._written:
            written.append(self._unwritten.popleft()[1])
        return acked, written

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        assert self._sock is not None
        try:
            while out:
                sent = self._sock.send(out)
                if not sent:
                    break
                del out[:sent]
                self._written += sent
                self._progress_at = now = time.monotonic()
                self.client.sent(now)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            raise LinkClosed(f"connection lost: {exc}") from None

    def _read(self) -> list[int]:
        sock = self._sock
        assert sock is not None
        client = self.client
        got = closed = False
        while True:
            try:
                data = sock.recv(_READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                raise LinkClosed(f"connection lost: {exc}") from None
            if not data:
                closed = True  # the packets before the end (a DISCONNECT saying why) still count
                break
            client.receive_data(data)
            got = True
            if len(data) < _READ_SIZE and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        if not got and not closed:
            return []
        acked: list[int] = []
        refused = self.refused
        while True:
            for packet_id, code in client.next_pubacks():  # a window of them at once, usually all there is
                acked.append(packet_id)
                if code >= 0x80:  # MQTT 5: an answer, but "no"
                    refused[code] = refused.get(code, 0) + 1
            try:
                event = client.next_event()
            except RemoteProtocolError as exc:
                raise LinkClosed(f"protocol error from the cloud broker: {exc}", acked) from None
            if event is NEED_DATA:
                break
            if type(event) is Published:
                acked.append(event.packet_id)
                if event.reason_code >= 0x80:  # MQTT 5: an answer, but "no"
                    self.refused[event.reason_code] = self.refused.get(event.reason_code, 0) + 1
            elif isinstance(event, PingResponse):
                pass
            elif isinstance(event, Disconnected):
                raise LinkClosed(f"the cloud broker sent DISCONNECT: {event.reason}", acked)
            else:
                raise LinkClosed(f"protocol error: unexpected {type(event).__name__} from the cloud broker", acked)
        if closed:
            raise LinkClosed("connection lost: closed by the cloud broker", acked)
        return acked

    def disconnect(self, grace: float = 0.1) -> None:
        """Send DISCONNECT (best effort, within `grace` seconds) and close."""
        if self._sock is not None:
            self._out += self.client.disconnect()
            deadline = time.monotonic() + grace
            try:
                poller = select.poll()
                poller.register(self._sock, select.POLLOUT)
                while self._out and time.monotonic() < deadline:
                    self._flush()
                    if self._out:
                        poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            except (LinkClosed, OSError, ValueError):
                pass
        self.close()

    def close(self) -> None:
        self._poller, self._poll_mask, self._poll_wake = None, 0, None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
