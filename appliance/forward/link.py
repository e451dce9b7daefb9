"""The forwarder's MQTT connection to the cloud broker, on the appliance's own codec.

Why not paho-mqtt (which the forwarder used first): paho builds every PUBLISH in Python, wakes its
own socket pair and calls `send()` once per message, and py-spy put 40 % of the appliance's samples
in it, capping the cloud rate near 10k msg/s (docs/performance.md). Here a whole window of
PUBLISHes is encoded into one buffer and written with as few `send()` calls as the kernel takes,
and PUBACKs are cut from the received bytes in bulk. CONNECT, CONNACK, DISCONNECT and PINGRESP go
through `appliance.mqtt`, the same codec the proxy uses (tested against paho and mosquitto).

One blocking connect (TCP, TLS handshake, CONNECT/CONNACK, each bounded by a timeout), then a
non-blocking socket driven by `poll()` from the forwarder's thread: no thread of its own.

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

from appliance.mqtt import (
    Connack,
    Connect,
    ConnectReturnCode,
    Disconnect,
    FrameReader,
    Pingresp,
    Properties,
    PropertyId,
    ProtocolVersion,
    ReasonCode,
    RemoteProtocolError,
    decode_packet,
    encode_packet,
)
from appliance.mqtt.framing import Frame, _NeedData
from appliance.mqtt.wire import encode_varint

_PUBACK = 0x40
_PINGREQ = b"\xc0\x00"
_READ_SIZE = 256 * 1024
_MAX_PACKET = 1024 * 1024  # what the cloud broker sends us: acks, CONNACK, DISCONNECT


class LinkClosed(Exception):
    """The connection is over; the message says why."""


class TooLarge(ValueError):
    """A message this broker cannot take (its Maximum Packet Size, or a topic over 65,535 bytes)."""


def user_properties(pairs: Iterable[tuple[str, str]]) -> bytes:
    """MQTT 5 PUBLISH properties holding only user properties, encoded (length included)."""
    body = bytearray()
    for name, value in pairs:
        body.append(PropertyId.USER_PROPERTY)
        for text in (name, value):
            data = text.encode()
            body += len(data).to_bytes(2, "big") + data
    return encode_varint(len(body)) + bytes(body)


def reason_name(code: int) -> str:
    try:
        return f"{ReasonCode(code).name.replace('_', ' ').lower()} (0x{code:02x})"
    except ValueError:
        return f"0x{code:02x}"


class Link:
    """One connection. `publish()` queues, `poll()` writes, reads and returns what was acknowledged.

    Packet identifiers are handed out here (1..65535, skipping those still in flight); the caller
    keeps at most `window` messages in flight, so an identifier is always free."""

    def __init__(self, host: str, port: int, *, client_id: str, protocol: int, keepalive: int,
                 username: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 write_timeout: float = 30.0):
        self.host, self.port = host, port
        self.version = ProtocolVersion.MQTT_5 if protocol == 5 else ProtocolVersion.MQTT_3_1_1
        self.client_id = client_id
        self.keepalive = keepalive
        self.username, self.password = username, password
        self.tls, self.server_hostname = tls, server_hostname
        self.write_timeout = write_timeout  # bytes waiting this long without any being written: hung
        # What the broker's MQTT 5 CONNACK allows (3.1.1: no limits announced).
        self.receive_maximum: int | None = None  # its own window
        self.maximum_qos = 1
        self.retain_available = True
        self.maximum_packet_size: int | None = None
        self.refused: dict[int, int] = {}  # MQTT 5 PUBACK error reason code -> messages, until read
        self._sock: socket.socket | None = None
        self._out = bytearray()
        self._reader = FrameReader(_MAX_PACKET)
        self._next_pid = 0
        self._inflight: set[int] = set()
        # QoS 0 messages count as delivered once written: (end offset in the output stream, token).
        self._unwritten: deque[tuple[int, int]] = deque()
        self._written = 0  # bytes written to the socket since connect
        self._last_send = 0.0  # when bytes were last written
        self._progress_at = 0.0  # when bytes were last written, or started waiting in _out
        self._ping_sent_at: float | None = None

    # -- connecting ------------------------------------------------------------------------------

    def connect(self, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> Connack:
        """TCP, TLS and CONNECT → CONNACK, all within `timeout` seconds (TCP and TLS within 10 s at
        most); raises LinkClosed. While waiting for the CONNACK, `cancelled()` is asked every 50 ms."""
        deadline = time.monotonic() + timeout
        self._cancelled = cancelled
        try:
            sock = socket.create_connection((self.host, self.port), timeout=min(timeout, 10.0))
        except OSError as exc:
            raise LinkClosed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock.settimeout(max(0.01, min(10.0, deadline - time.monotonic())))
                try:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname or self.host)
                except ssl.SSLCertVerificationError as exc:
                    raise LinkClosed(
                        f"TLS: certificate verify failed: {exc.verify_message} "
                        "(is upstream.tls.ca_file the CA of the cloud broker?)"
                    ) from None
                except ssl.SSLError as exc:
                    raise LinkClosed(f"TLS: {exc.reason or exc}") from None
                except (TimeoutError, OSError) as exc:
                    raise LinkClosed(f"TLS handshake with {self.host}:{self.port} failed: {exc or 'timed out'}") from None
            self._sock = sock
            properties = Properties.EMPTY
            connect = Connect(
                client_id=self.client_id, protocol_version=self.version, clean_start=True,
                keepalive=self.keepalive, username=self.username,
                password=self.password.encode() if self.password is not None else None,
                properties=properties,
            )
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                sock.sendall(encode_packet(connect, self.version))
            except OSError as exc:
                raise LinkClosed(f"connection lost while sending CONNECT: {exc}") from None
            connack = self._read_connack(deadline, timeout)
        except BaseException:
            self._sock = None
            sock.close()
            raise
        sock.setblocking(False)
        self._last_send = time.monotonic()
        if connack.reason_code != 0:
            self.close()
            raise LinkClosed(f"the cloud broker refused the connection: {self._connack_reason(connack.reason_code)}")
        props = connack.properties
        maximum = props.get(PropertyId.RECEIVE_MAXIMUM)
        self.receive_maximum = int(maximum) if isinstance(maximum, int) else None
        server_keepalive = props.get(PropertyId.SERVER_KEEP_ALIVE)
        if isinstance(server_keepalive, int) and server_keepalive > 0:
            self.keepalive = server_keepalive  # MQTT 5: the broker's value replaces ours
        qos = props.get(PropertyId.MAXIMUM_QOS)
        self.maximum_qos = int(qos) if isinstance(qos, int) else 1
        self.retain_available = props.get(PropertyId.RETAIN_AVAILABLE) != 0
        size = props.get(PropertyId.MAXIMUM_PACKET_SIZE)
        self.maximum_packet_size = int(size) if isinstance(size, int) else None
        return connack

    def _read_connack(self, deadline: float, timeout: float) -> Connack:
        assert self._sock is not None
        while True:
            frame = self._next_frame()
            if isinstance(frame, Frame):
                packet = decode_packet(frame.first_byte, frame.body, self.version)
                if isinstance(packet, Connack):
                    return packet
                if isinstance(packet, Disconnect):
                    raise LinkClosed(f"the cloud broker sent DISCONNECT: {reason_name(packet.reason_code)}")
                raise LinkClosed(f"protocol error: {type(packet).__name__} before CONNACK")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkClosed(f"no CONNACK within {timeout:g} s: uplink hung")
            if self._cancelled():
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
            self._reader.feed(data)

    def _connack_reason(self, code: int) -> str:
        if self.version == ProtocolVersion.MQTT_5:
            return reason_name(code)
        try:
            return ConnectReturnCode(code).name.replace("_", " ").lower()
        except ValueError:
            return f"return code {code}"

    def _next_frame(self) -> Frame | _NeedData:
        try:
            return self._reader.next_frame()
        except RemoteProtocolError as exc:
            raise LinkClosed(f"protocol error from the cloud broker: {exc}") from None

    # -- sending ---------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, properties: bytes = b"\x00",
                token: int = 0) -> int:
        """Queue one PUBLISH; returns its packet identifier (0 at QoS 0, whose `token` is returned
        by poll() once written). `properties`: encoded MQTT 5 properties (user_properties()).
        QoS and retain are lowered to what the broker's CONNACK allows. Raises TooLarge for a
        message the broker would refuse to take (nothing is queued then)."""
        data = topic.encode()
        if len(data) > 0xFFFF:
            raise TooLarge(f"topic of {len(data)} bytes (at most 65,535)")
        qos = min(qos, self.maximum_qos)
        retain = retain and self.retain_available
        v5 = self.version == ProtocolVersion.MQTT_5
        remaining = 2 + len(data) + (2 if qos else 0) + (len(properties) if v5 else 0) + len(payload)
        length = encode_varint(remaining)
        size = 1 + len(length) + remaining
        if self.maximum_packet_size is not None and size > self.maximum_packet_size:
            raise TooLarge(f"{size} bytes, the cloud broker takes packets up to {self.maximum_packet_size}")
        if qos:
            pid = self._take_pid()
            variable = len(data).to_bytes(2, "big") + data + pid.to_bytes(2, "big")
        else:
            pid = 0
            variable = len(data).to_bytes(2, "big") + data
        if v5:
            variable += properties
        out = self._out
        if not out:
            self._progress_at = time.monotonic()
        out.append(0x30 | (qos << 1) | (1 if retain else 0))
        out += length
        out += variable
        out += payload
        if not qos:
            self._unwritten.append((self._written + len(out), token))
        return pid

    def _take_pid(self) -> int:
        pid = self._next_pid
        while True:
            pid = pid % 0xFFFF + 1
            if pid not in self._inflight:
                break
        self._next_pid = pid
        self._inflight.add(pid)
        return pid

    @property
    def unsent(self) -> int:
        """Bytes queued that the socket has not taken yet."""
        return len(self._out)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- the loop --------------------------------------------------------------------------------

    def poll(self, timeout: float, wake_fd: int | None = None) -> tuple[list[int], list[int]]:
        """Write what is queued, wait up to `timeout` for the socket (or until `wake_fd` is
        readable: the caller drains it), read; returns the packet identifiers the broker
        acknowledged and the tokens of QoS 0 messages now written. Sends PINGREQ on keepalive;
        raises LinkClosed when the connection is over."""
        sock = self._sock
        if sock is None:
            raise LinkClosed("not connected")
        self._flush()
        now = time.monotonic()
        if self._ping_sent_at is None and not self._out and now - self._last_send >= self.keepalive * 0.75:
            self._out += _PINGREQ
            self._ping_sent_at = now
            self._flush()
        pending_tls = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending_tls and timeout > 0:
            # poll(), not select(): the proxy may hold thousands of sockets, and select() cannot
            # watch a descriptor numbered 1024 or more.
            poller = select.poll()
            poller.register(sock, select.POLLIN | (select.POLLOUT if self._out else 0))
            if wake_fd is not None:
                poller.register(wake_fd, select.POLLIN)
            try:
                ready = poller.poll(timeout * 1000)
            except OSError as exc:
                raise LinkClosed(f"connection lost: {exc}") from None
            if any(fd == sock.fileno() and events & select.POLLOUT for fd, events in ready):
                self._flush()
        acked = self._read()
        # Deadlines after reading: a PINGRESP that arrived while this thread was busy elsewhere
        # is an answer, not a hung uplink.
        now = time.monotonic()
        if self._ping_sent_at is not None and now - self._ping_sent_at > self.keepalive:
            raise LinkClosed(f"no PINGRESP within {self.keepalive} s: uplink hung")
        if self._out and now - self._progress_at > self.write_timeout:
            # The broker stopped reading (QoS 0 has no acknowledgement to wait for).
            raise LinkClosed(f"nothing written for {self.write_timeout:g} s ({len(self._out)} bytes waiting): uplink hung")
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
                self._last_send = self._progress_at = time.monotonic()
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            raise LinkClosed(f"connection lost: {exc}") from None

    def _read(self) -> list[int]:
        sock = self._sock
        assert sock is not None
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
            self._reader.feed(data)
            got = True
            if len(data) < _READ_SIZE and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        if not got and not closed:
            return []
        acked: list[int] = []
        inflight = self._inflight
        while isinstance(frame := self._next_frame(), Frame):
            first, raw, body_at = frame
            if first == _PUBACK and len(raw) >= body_at + 2:
                pid = int.from_bytes(raw[body_at:body_at + 2], "big")
                if pid in inflight:
                    inflight.discard(pid)
                    acked.append(pid)
                    if len(raw) > body_at + 2 and raw[body_at + 2] >= 0x80:  # MQTT 5: an answer, but "no"
                        self.refused[raw[body_at + 2]] = self.refused.get(raw[body_at + 2], 0) + 1
                continue
            try:
                packet = decode_packet(first, raw[body_at:], self.version)
            except RemoteProtocolError as exc:
                raise LinkClosed(f"protocol error from the cloud broker: {exc}") from None
            if isinstance(packet, Pingresp):
                self._ping_sent_at = None
            elif isinstance(packet, Disconnect):
                raise LinkClosed(f"the cloud broker sent DISCONNECT: {reason_name(packet.reason_code)}")
            else:
                raise LinkClosed(f"protocol error: unexpected {type(packet).__name__} from the cloud broker")
        if closed:
            raise LinkClosed("connection lost: closed by the cloud broker")
        return acked

    def disconnect(self, grace: float = 0.1) -> None:
        """Send DISCONNECT (best effort, within `grace` seconds) and close."""
        if self._sock is not None:
            self._out += encode_packet(Disconnect(), self.version)
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
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
