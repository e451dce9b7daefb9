"""The uplink over WebSockets (`upstream.url: wss://host/path`, as AWS IoT Core and others offer).

`open_websocket()` runs the opening handshake (subprotocol `mqtt`) over a connected socket, TLS
already wrapped by the link exactly as for mqtts://, and returns a `WebSocketStream`: an object with
the socket methods the link uses (`send`, `recv`, `sendall`, `fileno`, `settimeout`, `setblocking`,
`close`), so the link's MQTT code runs unchanged on top. The framing is the `websockets` library's
sans-IO `ClientProtocol`.

What `send()` reports as sent is what reached the kernel: the link counts a QoS 0 message as
delivered once written, and a byte still waiting in a frame buffer here is not. One data frame is
in flight at a time; the link passes back what was not yet reported, which is the rest of that
frame's payload.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Protocol

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

SUBPROTOCOL = Subprotocol("mqtt")
_READ_SIZE = 256 * 1024
_FRAME_PAYLOAD = 256 * 1024  # the most one data frame carries
_MAX_FRAME = 16 * 1024 * 1024  # what the cloud broker may send in one frame (acks are small)


class Stream(Protocol):
    """The socket methods the link uses: a `socket.socket`, an `ssl.SSLSocket` or a `WebSocketStream`."""

    def send(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def sendall(self, data: bytes, /) -> None: ...
    def recv(self, size: int, /) -> bytes: ...
    def fileno(self) -> int: ...
    def settimeout(self, timeout: float | None, /) -> None: ...
    def setblocking(self, flag: bool, /) -> None: ...
    def close(self) -> None: ...


class WebSocketError(ConnectionError):
    """The WebSocket handshake failed or the connection broke; the message says how."""


def open_websocket(sock: socket.socket, url: str, timeout: float) -> WebSocketStream:
    """The opening handshake for `url` (ws:// or wss://) on `sock` (connected, TLS wrapped for
    wss://), within `timeout` seconds. Raises WebSocketError, or OSError from the socket."""
    try:
        protocol = ClientProtocol(parse_uri(url), subprotocols=[SUBPROTOCOL], max_size=(None, _MAX_FRAME))
    except InvalidURI as exc:
        raise WebSocketError(str(exc)) from None
    protocol.send_request(protocol.connect())
    deadline = time.monotonic() + timeout
    sock.settimeout(max(0.01, timeout))
    sock.sendall(b"".join(protocol.data_to_send()))
    stream = WebSocketStream(sock, protocol)
    while True:
        for event in protocol.events_received():
            if isinstance(event, Response):
                if protocol.handshake_exc is not None:
                    raise WebSocketError(f"WebSocket handshake with {url} failed: {_handshake_error(protocol.handshake_exc, event)}")
            elif isinstance(event, Frame):
                stream.take(event)
        if protocol.state is State.OPEN:
            return stream
        if protocol.handshake_exc is not None:
            raise WebSocketError(f"WebSocket handshake with {url} failed: {protocol.handshake_exc}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise WebSocketError(f"no WebSocket handshake answer from {url} within {timeout:g} s")
        sock.settimeout(left)
        try:
            data = sock.recv(_READ_SIZE)
        except TimeoutError:
            raise WebSocketError(f"no WebSocket handshake answer from {url} within {timeout:g} s") from None
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
            if protocol.handshake_exc is None:
                raise WebSocketError(f"WebSocket handshake with {url} failed: connection closed")


def _handshake_error(exc: Exception, response: Response) -> str:
    if isinstance(exc, InvalidHandshake) and response.status_code != 101:
        body = response.body.decode(errors="replace").strip() if response.body else ""
        return f"HTTP {response.status_code} {response.reason_phrase}" + (f": {body[:200]}" if body else "")
    return str(exc)


class WebSocketStream:
    """An open WebSocket connection carrying the MQTT byte stream, with the link's socket methods."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol):
        self._sock = sock
        self._protocol = protocol
        self._inbox = bytearray()  # received payload bytes not yet returned by recv()
        self._out = bytearray()  # frames (and control frames) not yet written to the socket
        self._queued = 0  # bytes ever appended to _out
        self._written = 0  # bytes ever written from _out
        # The data frame being written: where its payload starts in the output stream, its length,
        # and how much of it send() has reported.
        self._frame: tuple[int, int] | None = None
        self._reported = 0
        self._ended: str | None = None  # the close frame's code and reason, or the EOF
        self._clean_end = False

    # -- the socket methods ----------------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def sendall(self, data: bytes) -> None:
        """Blocking: the whole of `data` in one frame (the link's CONNECT)."""
        self._queue(bytes(data))
        self._frame = None
        out = bytes(self._out)
        self._sock.sendall(out)
        self._out.clear()
        self._written += len(out)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Non-blocking: how many bytes of `data` reached the kernel (0: none yet; call again with
        what was not reported, which starts with the rest of the frame being written)."""
        if self._frame is None and data:
            payload = bytes(data[:_FRAME_PAYLOAD])
            self._queue(payload)
            # Masked, the payload keeps its length: it is the last len(payload) bytes queued.
            self._frame, self._reported = (self._queued - len(payload), len(payload)), 0
        self._write()
        frame = self._frame
        if frame is None:
            return 0
        start, length = frame
        done = min(length, max(0, self._written - start))
        sent, self._reported = done - self._reported, done
        if done == length:
            self._frame = None
        return sent

    def recv(self, size: int) -> bytes:
        """The payload bytes received so far (possibly more than `size`: all that is there), b""
        after the server's normal close; raises what the socket raises when nothing is there."""
        self._write()
        try:
            while not self._inbox and self._ended is None:
                self._receive(self._sock.recv(_READ_SIZE))
                # TLS may hold decrypted bytes that poll() will not announce: take them now.
                while isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() and self._ended is None:
                    self._receive(self._sock.recv(_READ_SIZE))
        finally:
            self._write()  # pongs and close replies the frames just read asked for
        if self._inbox:
            data = bytes(self._inbox)
            self._inbox.clear()
            return data
        if self._clean_end:
            return b""
        raise WebSocketError(f"WebSocket closed: {self._ended}")

    def close(self) -> None:
        """A close frame if it can go at once, then the socket closes."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(CloseCode.NORMAL_CLOSURE)
            self._collect()
            try:
                self._sock.setblocking(False)
                self._write()
            except OSError:
                pass
        try:
            self._sock.close()
        except OSError:
            pass

    # -- framing ---------------------------------------------------------------------------------

    def take(self, frame: Frame) -> None:
        """One received frame."""
        if frame.opcode is Opcode.BINARY or frame.opcode is Opcode.CONT:
            self._inbox += frame.data
        elif frame.opcode is Opcode.TEXT:
            self._protocol.fail(CloseCode.UNSUPPORTED_DATA, "MQTT over WebSockets takes binary frames only")
            self._ended = "the server sent a text frame"
        elif frame.opcode is Opcode.CLOSE:
            close = self._protocol.close_rcvd
            self._clean_end = close is not None and close.code == CloseCode.NORMAL_CLOSURE
            self._ended = f"closed by the server with {close}" if close is not None else "closed by the server"

    def _receive(self, data: bytes) -> None:
        protocol = self._protocol
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
            if self._ended is None:
                self._ended = "connection closed by the server without a close frame"
        for event in protocol.events_received():
            if isinstance(event, Frame):
                self.take(event)
        if protocol.parser_exc is not None and self._ended is None:
            self._ended = f"WebSocket protocol error: {protocol.parser_exc}"
        self._collect()

    def _queue(self, payload: bytes) -> None:
        """One binary frame holding `payload`, after whatever is queued."""
        if self._protocol.state is not State.OPEN:  # e.g. the DISCONNECT after the connection broke
            raise WebSocketError(f"WebSocket closed: {self._ended or 'closing'}")
        self._protocol.send_binary(payload)
        self._collect()

    def _collect(self) -> None:
        for data in self._protocol.data_to_send():
            if data:  # b"": the library's end of stream; the socket closes in close()
                self._out += data
                self._queued += len(data)

    def _write(self) -> None:
        out = self._out
        try:
            while out:
                sent = self._sock.send(out)
                if not sent:
                    break
                del out[:sent]
                self._written += sent
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError, TimeoutError):
            pass
