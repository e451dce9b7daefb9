"""MQTT over WebSockets on a LAN listener: a wrapper around the client leg's protocol.

`WebSocketLeg` is the asyncio protocol of a `transport: websockets` listener. It runs the opening
handshake and the framing with the `websockets` library's sans-IO `ServerProtocol`, and shows the
protocol it wraps (the proxy's `ClientLeg`) a transport that carries the MQTT byte stream: the
payloads of binary frames in, one binary frame per write out. An MQTT packet may span frames and a
frame may hold several packets; the leg never sees frame boundaries, as it never sees TCP segments.

The wrapped leg is told of the connection at TCP accept, before the handshake, so that the
connection limits, the TLS identity and the CONNECT timeout (which then also bounds the handshake)
apply as on a TCP listener.

What the MQTT over WebSockets binding (MQTT 5, section 6) asks: the `mqtt` subprotocol (a client
that does not offer it is refused with HTTP 400), binary frames only (a text frame closes the
connection with 1003), and here a frame larger than `limits.max_packet_size` closes it with 1009
and counts as that limit. A wrong path gets HTTP 404, an Origin header that the listener's
`allowed_origins` does not list HTTP 403.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, cast

from websockets.exceptions import InvalidState, PayloadTooBig
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from appliance.names import Counted, EventKind, Metric

log = logging.getLogger(__name__)
# The library logs every opening and closing handshake at INFO: one line per client is too many.
_library_log = logging.getLogger(__name__ + ".library")
_library_log.setLevel(logging.WARNING)

SUBPROTOCOL = Subprotocol("mqtt")


class Reporter(Protocol):
    """Where a closed connection's limit is counted (the proxy server)."""

    def count(self, key: Counted) -> None: ...

    def emit(self, kind: EventKind, detail: dict[str, object]) -> None: ...


class WebSocketClosed(ConnectionError):
    """Why the WebSocket connection ended, as the wrapped leg's `connection_lost` receives it."""


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer or "unknown")


class WebSocketLeg(asyncio.Protocol):
    """The TCP (or TLS) connection of one WebSocket client, carrying `inner`'s byte stream."""

    def __init__(self, inner: asyncio.Protocol, *, path: str, max_frame: int, reporter: Reporter | None = None,
                 allowed_origins: frozenset[str] | None = None):
        self._inner = inner
        self._path = path
        self._origins = allowed_origins
        self._reporter = reporter
        self._ws = ServerProtocol(subprotocols=[SUBPROTOCOL], max_size=(None, max_frame), logger=_library_log)
        self._raw: asyncio.Transport | None = None
        self._view: _StreamTransport | None = None
        self._peer = "unknown"
        self._error: str | None = None  # why we closed the connection, for the leg's connection_lost
        self._lost = False

    # The TCP side --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)  # a stream transport; uvloop's are not subclasses
        self._peer = _peer_name(transport)
        self._view = _StreamTransport(self, transport)
        self._inner.connection_made(self._view)

    def data_received(self, data: bytes) -> None:
        if self._view is None or self._view.closing:
            return
        ws = self._ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame) and self._error is None:
                if not self._frame(event):
                    break
        self._send_pending()

    def eof_received(self) -> bool:
        # The client half-closed without a close frame: pass it on as a TCP client's EOF.
        if self._ws.state is State.OPEN and self._view is not None and not self._view.closing:
            self._inner.eof_received()
        self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._view is not None:
            self._view.closing = True
        if self._error is not None:
            exc = WebSocketClosed(self._error)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # The WebSocket protocol ----------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        ws = self._ws
        path = request.path.partition("?")[0]
        if path != self._path:
            response = ws.reject(404, f"No MQTT over WebSockets at {path}: the path is {self._path}.\n")
            reason = f"path {path} (the listener's is {self._path})"
        elif (origin := self._refused_origin(request)) is not None:
            response = ws.reject(403, f"Origin {origin} may not connect to this listener (allowed_origins).\n")
            reason = f"origin {origin} is not in allowed_origins"
        else:
            response = ws.accept(request)
            reason = str(ws.handshake_exc) if ws.handshake_exc is not None else ""
        ws.send_response(response)
        if response.status_code != 101:
            log.warning("refusing %s: WebSocket handshake: %s (HTTP %d)", self._peer, reason, response.status_code)
            self._error = f"WebSocket handshake refused: {reason}"

    def _refused_origin(self, request: Request) -> str | None:
        """The Origin header when `allowed_origins` excludes it. A browser sends one with every
        WebSocket handshake and also presents its client certificate and cookies by itself, so a page
        of any site could otherwise speak MQTT as the user (cross-site WebSocket hijacking); a client
        that is not a browser sends none and is judged by its credentials alone."""
        if self._origins is None:
            return None
        origin = request.headers.get("Origin")
        if origin is None or origin.lower().rstrip("/") in self._origins:
            return None
        return origin[:200]

    def _frame(self, frame: Frame) -> bool:
        """One received frame; False once the connection is failing."""
        if frame.opcode is Opcode.BINARY or frame.opcode is Opcode.CONT:
            if frame.data:
                self._inner.data_received(bytes(frame.data))
            return self._view is not None and not self._view.closing
        if frame.opcode is Opcode.TEXT:
            self._fail(CloseCode.UNSUPPORTED_DATA, "MQTT over WebSockets takes binary frames only", "text frame")
            return False
        if frame.opcode is Opcode.CLOSE:
            # The client closed: as a TCP client's EOF (the broker leg drains, the will goes out
            # unless the client said DISCONNECT), then the connection ends.
            self._inner.eof_received()
            return False
        return True  # ping (answered by the library) or pong

    def _fail(self, code: CloseCode, text: str, what: str) -> None:
        self._ws.fail(code, text)
        self._error = f"WebSocket: {what}: closed with {int(code)}"
        log.info("closing %s: %s", self._peer, self._error)

    def _send_pending(self) -> None:
        """Write what the library queued (handshake answer, pongs, close frames); on its end of
        stream, close the connection."""
        raw = self._raw
        if raw is None:
            return
        ws = self._ws
        parser_exc = ws.parser_exc
        if isinstance(parser_exc, PayloadTooBig) and self._error is None:
            self._error = f"WebSocket: frame too large ({parser_exc}): closed with 1009"
            log.info("closing %s: %s", self._peer, self._error)
            if self._reporter is not None:
                self._reporter.count((Metric.LIMIT_EXCEEDED, "packet_size"))
                self._reporter.emit(EventKind.LIMIT_EXCEEDED, {"client_id": None, "peer": self._peer, "limit": "packet_size",
                                                       "detail": f"WebSocket frame: {parser_exc}"})
        elif parser_exc is not None and self._error is None and not isinstance(parser_exc, EOFError):
            self._error = f"WebSocket protocol error: {parser_exc}"
            log.info("closing %s: %s", self._peer, self._error)
        for data in ws.data_to_send():
            if data is SEND_EOF or not data:
                self._close()
                return
            if not raw.is_closing():
                raw.write(data)

    def _close(self) -> None:
        if self._view is not None:
            self._view.closing = True
        raw = self._raw
        if raw is not None and not raw.is_closing():
            for data in self._ws.data_to_send():  # e.g. the answer to the client's close frame
                if data:
                    raw.write(data)
            raw.close()

    # Called through the view -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._ws.state is not State.OPEN:
            return  # before the handshake (nothing is sent then) or after a close frame
        try:
            self._ws.send_binary(data)
        except InvalidState:
            return
        self._send_pending()

    def close(self) -> None:
        """The leg is done: a normal close frame, then the connection ends."""
        if self._ws.state is State.OPEN:
            self._ws.send_close(CloseCode.NORMAL_CLOSURE)
            self._send_pending()
        self._close()

    def abort(self) -> None:
        if self._view is not None:
            self._view.closing = True
        if self._raw is not None:
            self._raw.abort()


class _StreamTransport(asyncio.Transport):
    """What the wrapped leg writes to: the MQTT byte stream inside the WebSocket connection."""

    def __init__(self, leg: WebSocketLeg, raw: asyncio.BaseTransport):
        super().__init__()
        self._leg = leg
        self._raw: Any = raw  # asyncio's or uvloop's transport
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._raw.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.closing or bool(self._raw.is_closing())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self._leg.write(bytes(data))

    def close(self) -> None:
        if not self.closing:
            self._leg.close()
        self.closing = True

    def abort(self) -> None:
        self._leg.abort()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        if not self.closing:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self.closing:
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return bool(self._raw.is_reading())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self) -> int:
        return int(self._raw.get_write_buffer_size())
