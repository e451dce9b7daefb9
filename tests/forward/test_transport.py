"""`WebSocketStream` byte by byte: over a real loopback TCP connection whose other end is the
`websockets` library's sans-IO server, driven by the test."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from appliance.forward.transport import WebSocketError, WebSocketStream, open_websocket
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol


class Server:
    """The far end: a ServerProtocol fed by hand, collecting the binary payloads it receives."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.protocol = ServerProtocol(subprotocols=[Subprotocol("mqtt")], max_size=None)
        self.payload = bytearray()
        self.raw_read = 0

    def handshake(self) -> None:
        while True:
            self.feed(self.sock.recv(65536))
            if self.protocol.state.name == "OPEN":
                return

    def feed(self, data: bytes) -> None:
        self.raw_read += len(data)
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                self.protocol.send_response(self.protocol.accept(event))
            elif isinstance(event, Frame) and event.opcode in (Opcode.BINARY, Opcode.CONT):
                self.payload += event.data
        self.flush()

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)


@contextmanager
def connected(*, sndbuf: int = 0) -> Iterator[tuple[WebSocketStream, Server, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    if sndbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    client.connect(listener.getsockname())
    conn, _ = listener.accept()
    listener.close()
    if sndbuf:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    server = Server(conn)
    shaking = threading.Thread(target=server.handshake)
    shaking.start()
    try:
        stream = open_websocket(client, f"ws://127.0.0.1:{conn.getsockname()[1]}/mqtt", 10)
        shaking.join(10)
        yield stream, server, client
    finally:
        client.close()
        conn.close()


def _queued(sock: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])


def test_send_reports_only_what_reached_the_kernel() -> None:
    data = bytes(range(256)) * 16384  # 4 MiB: many 256 KiB frames, each written in many pieces
    with connected(sndbuf=16384) as (stream, server, client):
        client.setblocking(False)
        out = bytearray(data)
        reported = 0
        while out or len(server.payload) < len(data):
            if out:
                sent = stream.send(out)
                del out[:sent]
                reported += sent
            # Every reported byte left this process: read by the server, or in either kernel buffer
            # (an upper bound: what was written also holds the handshake and the frame headers).
            in_kernel = _queued(client, termios.TIOCOUTQ) + _queued(server.sock, termios.FIONREAD)
            assert reported <= server.raw_read + in_kernel
            server.sock.settimeout(0.001 if out else 5)
            try:
                server.feed(server.sock.recv(7000))
            except TimeoutError:
                pass
        assert reported == len(data) and bytes(server.payload) == data


def test_recv_reassembles_fragments_and_answers_pings_byte_by_byte() -> None:
    with connected() as (stream, server, client):
        protocol = server.protocol
        connack = b"\x20\x03\x00\x00\x00"
        protocol.send_ping(b"are you there")
        protocol.send_binary(connack[:2], fin=False)
        protocol.send_continuation(connack[2:4], fin=False)
        protocol.send_continuation(connack[4:], fin=True)
        protocol.send_binary(b"\xd0\x00")  # a PINGRESP in a frame of its own
        wire = b"".join(protocol.data_to_send())
        for i in range(len(wire)):  # one byte per TCP segment
            server.sock.sendall(wire[i:i + 1])
        client.settimeout(5)
        received = bytearray()
        while len(received) < len(connack) + 2:
            received += stream.recv(65536)
        assert bytes(received) == connack + b"\xd0\x00"
        # The pong went out before recv() returned.
        server.sock.settimeout(5)
        pongs: list[bytes] = []
        while not pongs:
            protocol.receive_data(server.sock.recv(65536))
            pongs = [bytes(e.data) for e in protocol.events_received() if isinstance(e, Frame) and e.opcode is Opcode.PONG]
        assert pongs == [b"are you there"]


def test_a_normal_close_reads_as_the_end_and_an_abnormal_one_as_an_error() -> None:
    with connected() as (stream, server, client):
        server.protocol.send_binary(b"\xe0\x00")  # DISCONNECT, then a normal close
        server.protocol.send_close(1000)
        server.flush()
        client.settimeout(5)
        assert stream.recv(65536) == b"\xe0\x00"
        assert stream.recv(65536) == b""
    with connected() as (stream, server, client):
        server.protocol.send_close(1011, "overloaded")
        server.flush()
        client.settimeout(5)
        with pytest.raises(WebSocketError, match="1011"):
            stream.recv(65536)


def test_sending_after_the_server_went_away_is_a_connection_error() -> None:
    with connected() as (stream, server, client):
        server.sock.close()
        client.settimeout(5)
        with pytest.raises(WebSocketError, match="without a close frame"):
            stream.recv(65536)
        with pytest.raises(WebSocketError):  # an OSError: what the link catches on a dead socket
            stream.send(b"\xe0\x00")
