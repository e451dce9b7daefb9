"""The proxy's sockets: the LAN listener and every client's two legs.

Each accepted client gets a `ClientLeg` protocol and, once its CONNECT has passed, a `BrokerLeg`
to the broker. Both feed the client's `Session` and execute the commands it returns
(`ClientLeg.execute`, the one place they are carried out; see commands.py): one write per leg per
received batch. Flow control: when one leg's write buffer passes the high-water mark, the other leg
stops reading. Closing follows docs/evidence.md pitfall 2: the broker leg is half-closed (EOF) and
read to its end, never reset, so mosquitto processes every PUBLISH it was sent.

The server listens on one or more `Listener`s (plain or TLS). It also enforces what needs the
socket: connections per source address, the TLS identity, and the message-rate throttle (the session
asks for a pause; the server stops reading that client for that long). What sessions report (audit
events, metric keys) goes to `on_event` and `counters`.

`ClientLeg` only needs an asyncio transport (write, close, abort, pause/resume_reading,
get_extra_info, set_write_buffer_limits): another transport presenting the same interface plugs in.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from appliance.names import Counted, EventKind, Metric
from appliance.broker import BrokerEndpoint
from appliance.pipeline import Pipeline
from appliance.proxy.acks import Durability
from appliance.proxy.commands import (
    AwaitDurable,
    CloseBroker,
    CloseClient,
    Command,
    Count,
    OpenBroker,
    Pause,
    Record,
    SendToBroker,
    SendToClient,
)
from appliance.proxy.connect import BrokerCredentials
from appliance.proxy.limits import SessionLimits
from appliance.proxy.session import Session
from appliance.proxy.websocket import WebSocketLeg
from appliance.security.acl import AclCheck
from appliance.security.passwords import Authenticator
from appliance.security.tls import certificate_identity

log = logging.getLogger(__name__)

# How long a half-closed broker leg may take to finish before it is aborted.
BROKER_DRAIN_TIMEOUT_S = 10.0

EventCallback = Callable[[EventKind, dict[str, object]], None]


@dataclass
class Listener:
    """One LAN listener: where it binds, TLS, and who may connect through it."""

    host: str
    port: int
    ssl: ssl.SSLContext | None = None
    # "cn"/"san": the client certificate names the client (its username); "none": the CONNECT does.
    identity: str = "none"
    authenticator: Authenticator | None = None
    # MQTT over WebSockets at this HTTP path (proxy/websocket.py); None: MQTT over TCP.
    websocket_path: str | None = None
    # WebSockets: the Origin headers accepted (lowercase); None: any (proxy/websocket.py).
    allowed_origins: frozenset[str] | None = None

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.websocket_path is not None:
            return f"{where}{self.websocket_path} (WebSockets{' over TLS' if self.ssl is not None else ''})"
        return where + (" (TLS)" if self.ssl is not None else "")


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return address_key(str(peer[0]) if isinstance(peer, tuple) and peer else str(peer))


def address_key(host: str) -> str:
    """The source a per-address limit counts: the IPv4 address, or the IPv6 /64 (one host usually
    owns a whole /64 and could otherwise rotate through it)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "unknown")


class _Leg(asyncio.Protocol):
    """What both legs share: a transport whose reading the other leg pauses for flow control."""

    transport: asyncio.Transport | None
    _closed: bool
    _reading_paused: bool

    def pause_reading(self) -> None:
        if not self._reading_paused and not self._closed and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self._closed and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()


class ClientLeg(_Leg):
    def __init__(self, server: ProxyServer, listener: Listener):
        self._server = server
        self._listener = listener
        self._address: str | None = None  # counted in server.per_address while set
        self._throttle: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.broker: BrokerLeg | None = None
        self._broker_task: asyncio.Task[None] | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._reading_paused = False
        self._eof_pending = False

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's are not subclasses of asyncio.Transport.
        transport = self.transport = cast(asyncio.Transport, transport)
        server = self._server
        peer = _peer_name(transport)
        if len(server.clients) >= server.max_connections:
            log.warning("refusing %s: %d connections open (limits.max_connections)", peer, len(server.clients))
            server.refuse(transport, peer, "connections", f"{len(server.clients)} connections open")
            self._closed = True
            return
        address = _peer_host(transport)
        per_address = server.max_connections_per_address
        if per_address and server.per_address[address] >= per_address:
            log.warning("refusing %s: %d connections open from %s (limits.max_connections_per_address)", peer, per_address, address)
            server.refuse(transport, peer, "connections_per_address", f"{per_address} connections open from {address}")
            self._closed = True
            return
        listener = self._listener
        identity = None
        if listener.identity != "none":
            identity = certificate_identity(transport.get_extra_info("peercert"), listener.identity)
            if identity is None:
                log.warning("refusing %s: its client certificate has no %s to use as the username", peer, listener.identity)
                server.count((Metric.AUTH_FAILURES, "no_identity"))
                server.emit(EventKind.AUTH_FAILED, {"peer": peer, "reason": f"client certificate without {listener.identity}"})
                transport.abort()
                self._closed = True
                return
        self._address = address
        server.per_address[address] += 1
        server.clients.add(self)
        transport.set_write_buffer_limits(high=server.write_buffer_high)
        self.session = Session(
            peer=peer, pipeline=server.pipeline, limits=server.limits, broker_credentials=server.current_broker_credentials,
            durability=server.durability, authenticator=listener.authenticator, access=server.access, identity=identity,
        )
        self._connect_timer = asyncio.get_running_loop().call_later(server.connect_timeout, self._on_connect_timeout)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        self.execute(session.client_data(data))

    def eof_received(self) -> bool:
        # The client half-closed. Pass the EOF on and keep reading the broker leg to its end, so the
        # broker handles every PUBLISH it was sent (and publishes the will if there was no DISCONNECT).
        if self.broker is not None:
            self.broker.write_eof()
        elif self._broker_task is not None:
            self._eof_pending = True  # the broker leg is opening: EOF it once the bytes are sent
        else:
            self._close_transport()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.clients.discard(self)
        self._server.durable_waiters.discard(self)
        if self._address is not None:
            self._server.release_address(self._address)
            self._address = None
        if self._throttle is not None:
            self._throttle.cancel()
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        if self.broker is not None:
            self.broker.write_eof()
        elif self._broker_task is not None and not (self.session and self.session.holds_broker_data):
            self._broker_task.cancel()  # nothing to deliver; otherwise the opening leg delivers, then EOFs
        session = self.session
        if session is not None and session.client is not None:
            self._server.emit(
                EventKind.CLIENT_DISCONNECTED,
                {"client_id": session.client.client_id, "peer": session.peer, "reason": session.close_reason or (str(exc) if exc else "closed")},
            )

    def pause_writing(self) -> None:
        if self.broker is not None:
            self.broker.pause_reading()

    def resume_writing(self) -> None:
        if self.broker is not None:
            self.broker.resume_reading()

    # the session's commands ----------------------------------------------------------------------

    def execute(self, commands: list[Command]) -> None:
        """Carry out what the session asked for, in order (commands.py)."""
        for command in commands:
            # The frequent ones first: on the hot path a list holds one or two commands.
            if isinstance(command, SendToBroker):
                if self.broker is not None:
                    self.broker.write(command.data)
            elif isinstance(command, SendToClient):
                if not self._closed:
                    assert self.transport is not None
                    self.transport.write(command.data)
            elif isinstance(command, AwaitDurable):
                self._server.durable_waiters.add(self)
                if command.sync_now:
                    self._server.sync_now()
            elif isinstance(command, Count):
                self._server.count(command.key)
            elif isinstance(command, Record):
                self._server.emit(command.kind, command.detail)
            elif isinstance(command, Pause):
                self._pause_for(command.seconds)
            elif isinstance(command, OpenBroker):
                self._start_broker_leg()
            elif isinstance(command, CloseBroker):
                if self.broker is not None:
                    self.broker.write_eof()
            elif isinstance(command, CloseClient):
                if not self._closed:
                    assert self.session is not None
                    log.info("closing %s: %s", self.session.describe(), command.reason)
                self._close_transport()

    def _start_broker_leg(self) -> None:
        if self._broker_task is not None or self.broker is not None:
            return
        assert self.session is not None
        self._broker_task = asyncio.get_running_loop().create_task(self._open_broker(), name=f"broker-leg {self.session.peer}")
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        # Until the broker leg exists, what the client sends piles up in the session: stop reading it.
        self.pause_reading()

    def _pause_for(self, seconds: float) -> None:
        """The message rate limit: stop reading this client for a while (flow control still applies)."""
        if self._throttle is not None or self._closed or self.transport is None:
            return
        self.transport.pause_reading()

        def resume() -> None:
            self._throttle = None
            if not self._closed and not self._reading_paused and self.transport is not None:
                self.transport.resume_reading()

        self._throttle = asyncio.get_running_loop().call_later(seconds, resume)

    def resume_reading(self) -> None:
        if self._reading_paused and not self._closed and self.transport is not None:
            self._reading_paused = False
            if self._throttle is None:  # a throttled client stays paused until its timer
                self.transport.resume_reading()

    def _close_transport(self) -> None:
        if not self._closed and self.transport is not None:
            self._closed = True
            self.transport.close()

    def _on_connect_timeout(self) -> None:
        assert self.session is not None
        self.execute(self.session.connect_timeout())

    async def _open_broker(self) -> None:
        session = self.session
        assert session is not None
        endpoint = self._server.endpoint()
        try:
            if endpoint is None:
                raise ConnectionRefusedError("the broker is not running")
            loop = asyncio.get_running_loop()
            _, leg = await loop.create_connection(
                lambda: BrokerLeg(self), endpoint.host, endpoint.port,
                ssl=endpoint.ssl, server_hostname=endpoint.server_hostname,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cannot reach the broker for %s: %s", session.describe(), exc)
            self.execute(session.broker_unavailable())
            return
        finally:
            self._broker_task = None
        if self._closed and not session.holds_broker_data:
            leg.write_eof()
            return
        self.broker = leg
        self.resume_reading()
        assert session.client is not None
        self._server.emit(
            EventKind.CLIENT_CONNECTED,
            {"client_id": session.client.client_id, "peer": session.peer, "protocol_version": int(session.version or 0)},
        )
        self.execute(session.broker_connected())
        if self._closed or self._eof_pending:
            leg.write_eof()

    # called by the broker leg --------------------------------------------------------------------

    def broker_closed(self) -> None:
        self.broker = None
        self._close_transport()

    def shutdown(self) -> None:
        if self.session is not None and not self._closed:
            self.execute(self.session.shutdown())

    def revoke(self, reason: str) -> None:
        """Access was withdrawn (a reload): close the client (MQTT 5: DISCONNECT 0x87 first)."""
        if self.session is not None:
            self.execute(self.session.revoke(reason))


class BrokerLeg(_Leg):
    def __init__(self, client: ClientLeg):
        self._client = client
        self.transport: asyncio.Transport | None = None
        self._eof_sent = False
        self._closed = False
        self._reading_paused = False
        self._drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, transport)  # see ClientLeg.connection_made
        transport.set_write_buffer_limits(high=self._client._server.write_buffer_high)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        client = self._client  # the client's session takes the broker's bytes (no extra call per read)
        session = client.session
        assert session is not None
        client.execute(session.broker_data(data))

    def eof_received(self) -> bool:
        return False  # the broker is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._client.broker_closed()

    def pause_writing(self) -> None:
        self._client.pause_reading()

    def resume_writing(self) -> None:
        self._client.resume_reading()

    def write(self, data: bytes) -> None:
        if not self._eof_sent and not self._closed and self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        """Half-close: the broker reads everything we sent, then closes; abort if it takes too long."""
        if self._eof_sent or self._closed or self.transport is None:
            return
        self._eof_sent = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
        self.resume_reading()
        self._drain_timer = asyncio.get_running_loop().call_later(BROKER_DRAIN_TIMEOUT_S, self.abort)

    def abort(self) -> None:
        if not self._closed and self.transport is not None:
            self.transport.abort()


class ProxyServer:
    """The LAN listener. `start()` binds, `stop()` stops accepting and closes every client."""

    def __init__(
        self,
        *,
        listeners: Sequence[Listener] = (),
        host: str | None = None,
        port: int = 0,
        pipeline: Pipeline,
        endpoint: Callable[[], BrokerEndpoint | None],
        limits: SessionLimits = SessionLimits(),
        connect_timeout: float = 10.0,
        max_connections: int = 10_000,
        write_buffer_high: int = 256 * 1024,
        on_event: EventCallback | None = None,
        durability: Durability | None = None,
        max_connections_per_address: int = 0,
        access: AclCheck | None = None,
    ):
        self.listeners = list(listeners) or [Listener(host or "127.0.0.1", port)]
        self.max_connections_per_address = max_connections_per_address
        self.per_address: Counter[str] = Counter()
        # (metric, label) → count: limits hit, authentication failures, ACL denials.
        self.counters: Counter[Counted] = Counter()
        self.access = access
        self.pipeline = pipeline
        self.endpoint = endpoint
        self.limits = limits
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.write_buffer_high = write_buffer_high
        self.clients: set[ClientLeg] = set()
        # Acks wait for the message log's syncs when `durability` is set (see proxy/acks.py).
        self.durability = durability
        self.durable_waiters: set[ClientLeg] = set()
        self._on_event = on_event
        self._servers: list[asyncio.base_events.Server] = []

    @property
    def port(self) -> int:
        """The first listener's port (the actual one once started, when configured as 0)."""
        return self.listeners[0].port

    @property
    def host(self) -> str:
        return self.listeners[0].host

    def current_broker_credentials(self) -> BrokerCredentials | None:
        return self.broker_credentials

    @property
    def broker_credentials(self) -> BrokerCredentials | None:
        endpoint = self.endpoint()
        if endpoint is None or endpoint.username is None:
            return None
        return BrokerCredentials(endpoint.username, endpoint.password)

    def sync_now(self) -> None:
        """A publisher has as many messages in flight as it will send: waiting for the message log's
        sync window would only stall it. Ask for the sync now."""
        if self.durability is not None:
            self.durability.request_sync()

    def committed(self, seq: int) -> None:
        """The message log settled records up to `seq`: send the acks that waited for them."""
        waiters, self.durable_waiters = self.durable_waiters, set()
        for leg in waiters:
            if leg.session is not None and not leg._closed:
                leg.execute(leg.session.release_acks())

    def emit(self, kind: EventKind, detail: dict[str, object]) -> None:
        if self._on_event is not None:
            self._on_event(kind, detail)

    def count(self, key: Counted) -> None:
        self.counters[key] += 1

    def refuse(self, transport: asyncio.Transport, peer: str, limit: str, detail: str) -> None:
        """A connection over a limit at accept: closed before any MQTT is exchanged."""
        transport.abort()
        self.count((Metric.LIMIT_EXCEEDED, limit))
        self.emit(EventKind.LIMIT_EXCEEDED, {"peer": peer, "limit": limit, "detail": detail})

    def release_address(self, address: str) -> None:
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for listener in self.listeners:
                server = await loop.create_server(
                    functools.partial(self._accept, listener),
                    listener.host, listener.port, reuse_address=True, backlog=1024, ssl=listener.ssl,
                    # A TLS handshake happens before connection_made (and so before the connection
                    # limits and the CONNECT timer see it): bound it by the same timeout.
                    ssl_handshake_timeout=self.connect_timeout if listener.ssl is not None else None,
                )
                self._servers.append(server)
                sockets = server.sockets
                if sockets and listener.port == 0:
                    listener.port = sockets[0].getsockname()[1]
                log.info("listening for MQTT clients on %s", listener)
        except OSError as exc:
            for server in self._servers:
                server.close()
            raise OSError(exc.errno, f"{listener}: {exc.strerror}") from exc

    def _accept(self, listener: Listener) -> asyncio.Protocol:
        leg = ClientLeg(self, listener)
        if listener.websocket_path is None:
            return leg
        return WebSocketLeg(leg, path=listener.websocket_path, max_frame=self.limits.max_packet_size, reporter=self,
                            allowed_origins=listener.allowed_origins)

    async def stop(self, timeout: float = 5.0) -> None:
        for server in self._servers:
            server.close()
        for client in list(self.clients):
            client.shutdown()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.clients and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
        for server in self._servers:
            await server.wait_closed()
