"""The client side of one MQTT connection, without I/O: bytes in, events out, bytes to send back.
(The events and the server's limits are declared in client_events.py.)

In the manner of h11's ``Connection``: the caller owns the socket (or asyncio stream) and the clock.
It writes what the methods return, feeds what it reads to ``receive_data()`` and pulls ``next_event()``
until ``NEED_DATA``. Everything protocol lives here, once, for every client the appliance runs (the
forwarder's uplink, the admin operations' one-shot publishes, the benchmark's sensors):

- CONNECT/CONNACK for MQTT 3.1.1 and 5 (clean start, session expiry, our receive maximum and
  maximum packet size announced and enforced; the server's CONNACK limits remembered in ``limits``);
- packet identifiers, skipping those still in use;
- the in-flight window: at most the server's Receive Maximum unacknowledged QoS 1/2 PUBLISHes;
- PUBLISH encoding within the server's limits (QoS lowered to its Maximum QoS, retain dropped where
  unavailable, ``PacketTooLarge`` over its Maximum Packet Size), and the PUBACK, PUBREC/PUBREL/PUBCOMP,
  SUBACK and UNSUBACK flows, each matched to what is in flight;
- keepalive: ``ping_due(now)`` and ``pingresp_overdue(now)`` from a clock value the caller passes in;
- DISCONNECT both ways.

A server that breaks the protocol (an ack for a packet id not in flight, an oversized packet, a
second CONNACK...) raises ``RemoteProtocolError`` carrying the reason code to disconnect with; misuse
by the caller (publishing before CONNACK, past the window) raises ``LocalProtocolError``.
"""

from __future__ import annotations

from enum import Enum

from .client_events import (
    Connected, ConnectionRefused, Disconnected, Event, MessageReceived, PingResponse, Published,
    PublishReceived, ReleaseReceived, ServerLimits, Subscribed, Unsubscribed, reason_name,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import _COMPACT_AFTER, MAX_PACKET_SIZE, NEED_DATA, FrameReader, _NeedData
from .packets import (
    Connack, Connect, Disconnect, Packet, PacketType, Pingreq, Pingresp, ProtocolVersion, Puback,
    Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will,
    _check_topic_name,
)
from .properties import Properties, PropertyId
from .reader import decode_packet, decode_publish
from .reason_codes import ReasonCode
from .writer import encode_packet, encode_publish_fields

__all__ = [
    "Client", "ClientState", "ServerLimits", "Event", "Connected", "ConnectionRefused", "Published",
    "PublishReceived", "Subscribed", "Unsubscribed", "MessageReceived", "ReleaseReceived",
    "PingResponse", "Disconnected", "PacketTooLarge", "reason_name", "NEED_DATA", "NeedData",
]

NeedData = _NeedData  # the type of NEED_DATA, for isinstance() and annotations

_MQTT_5 = ProtocolVersion.MQTT_5
_PROTOCOL_ERROR = ReasonCode.PROTOCOL_ERROR
_EMPTY = Properties.EMPTY
_MAX_TOPIC = 0xFFFF
_PID_LIMIT = 0xFFFF  # packet ids 1..65535


class ClientState(Enum):
    NEW = "new"  # nothing sent yet: connect() is next
    CONNECTING = "connecting"  # CONNECT sent, waiting for the CONNACK
    CONNECTED = "connected"
    CLOSED = "closed"  # refused, disconnected (either side) or broken: nothing more to send


class PacketTooLarge(LocalProtocolError):
    """A message this server cannot take: over its Maximum Packet Size, or a topic over 65,535 bytes."""


# Published events on the PUBACK hot path are built through the slot descriptors, as
# reader.decode_publish builds its packets: the fields are known good.
_new = object.__new__
_set_published_id, _set_published_code = (getattr(Published, name).__set__ for name in ("packet_id", "reason_code"))
_PUBACK_BYTE = PacketType.PUBACK << 4
_PUBLISH_TYPE = PacketType.PUBLISH

# What an outgoing packet id waits for.
_AWAIT_PUBACK, _AWAIT_PUBREC, _AWAIT_PUBCOMP, _AWAIT_SUBACK, _AWAIT_UNSUBACK = range(5)
_AWAITED = ("PUBACK", "PUBREC", "PUBCOMP", "SUBACK", "UNSUBACK")
# Where an incoming QoS 1/2 message's flow is: waiting for acknowledge() (PUBACK / PUBREC), for the
# server's PUBREL, for complete() (PUBCOMP).
_IN_QOS1, _IN_QOS2, _IN_PUBREC_SENT, _IN_RELEASED = range(4)
_PING_AT = 0.75  # of the keepalive: a PINGREQ goes out before the server's 1.5 × keepalive runs out


class Client:
    """One client connection's protocol state. See the module docstring for the flow."""

    __slots__ = (
        "version", "client_id", "keepalive", "clean_start", "limits", "state", "_connect",
        "_receive_maximum", "_frames", "_outgoing", "_publishes", "_requests", "_next_pid",
        "_incoming", "_last_sent", "_ping_sent_at",
    )

    def __init__(
        self, client_id: str, *, version: ProtocolVersion = ProtocolVersion.MQTT_3_1_1,
        keepalive: int = 60, clean_start: bool = True, username: str | None = None,
        password: bytes | None = None, will: Will | None = None,
        session_expiry_interval: int | None = None, receive_maximum: int | None = None,
        maximum_packet_size: int | None = None,
    ) -> None:
        """``session_expiry_interval``, ``receive_maximum`` and ``maximum_packet_size`` are MQTT 5
        CONNECT properties; the last two are also enforced on what the server sends (a larger
        packet is a protocol error in any version)."""
        self.version = ProtocolVersion(version)
        self.client_id = client_id
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.limits = ServerLimits()
        self.state = ClientState.NEW
        items: list[tuple[PropertyId, object]] = []
        if self.version == _MQTT_5:
            if session_expiry_interval is not None:
                items.append((PropertyId.SESSION_EXPIRY_INTERVAL, session_expiry_interval))
            if receive_maximum is not None:
                items.append((PropertyId.RECEIVE_MAXIMUM, receive_maximum))
            if maximum_packet_size is not None:
                items.append((PropertyId.MAXIMUM_PACKET_SIZE, maximum_packet_size))
        elif session_expiry_interval is not None:
            raise LocalProtocolError("a session expiry interval needs MQTT 5")
        self._connect = Connect(client_id, self.version, clean_start, keepalive, username, password,
                                will, Properties(tuple(items)))
        self._receive_maximum = receive_maximum if receive_maximum is not None else _PID_LIMIT
        self._frames = FrameReader(maximum_packet_size or MAX_PACKET_SIZE)
        self._outgoing: dict[int, int] = {}  # packet id -> what it waits for (_AWAIT_*)
        self._publishes = 0  # of them, QoS 1/2 PUBLISHes: what the server's receive maximum counts
        self._requests: dict[int, int] = {}  # SUBSCRIBE/UNSUBSCRIBE packet id -> topic filters
        self._next_pid = 0
        self._incoming: dict[int, int] = {}  # incoming QoS 1/2 packet id -> where its flow is (_IN_*)
        self._last_sent: float | None = None
        self._ping_sent_at: float | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Outgoing QoS 1/2 PUBLISHes not yet acknowledged."""
        return self._publishes

    @property
    def send_quota(self) -> int:
        """How many more QoS 1/2 PUBLISHes the server's receive maximum allows now."""
        return self.limits.window - self._publishes

    @property
    def ping_outstanding(self) -> bool:
        return self._ping_sent_at is not None

    def _require(self, state: ClientState, doing: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot {doing} while {self.state.value}")

    # -- bytes out ---------------------------------------------------------------------------------

    def connect(self) -> bytes:
        self._require(ClientState.NEW, "connect")
        self.state = ClientState.CONNECTING
        return encode_packet(self._connect, self.version)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties: Properties = _EMPTY) -> tuple[int, bytes]:
        """One PUBLISH: its packet id (0 at QoS 0) and bytes. QoS and retain are lowered to what the
        server's CONNACK allows. Raises PacketTooLarge (nothing is taken then), LocalProtocolError
        when the server's receive maximum is reached or the message is not valid MQTT."""
        if self.state is not ClientState.CONNECTED:
            self._require(ClientState.CONNECTED, "publish")
        limits = self.limits
        if len(topic) > _MAX_TOPIC // 4 and (size := len(topic.encode())) > _MAX_TOPIC:
            raise PacketTooLarge(f"topic of {size} bytes (at most 65,535)")
        if qos not in (0, 1, 2) or type(payload) is not bytes or type(properties) is not Properties:
            Publish(topic, payload, qos, retain, False, 1 if qos else None, properties)  # raises, saying why
        if qos > limits.maximum_qos:
            qos = limits.maximum_qos
        if retain and not limits.retain_available:
            retain = False
        packet_id = None
        if qos:
            if self._publishes >= limits.window:
                raise LocalProtocolError(f"the server's receive maximum ({limits.window}) is reached")
            packet_id = self._free_pid()
        # What Publish() would check, without building one per message (encoding checks the rest).
        _check_topic_name(topic, properties)
        if properties.items:
            properties.check_allowed(PacketType.PUBLISH, "PUBLISH")
        data = encode_publish_fields(topic, payload, qos, retain, False, packet_id, properties, self.version)
        if limits.maximum_packet_size is not None and len(data) > limits.maximum_packet_size:
            raise PacketTooLarge(f"{len(data)} bytes, the server takes packets up to {limits.maximum_packet_size}")
        if packet_id is None:
            return 0, data
        self._next_pid = packet_id
        self._outgoing[packet_id] = _AWAIT_PUBACK if qos == 1 else _AWAIT_PUBREC
        self._publishes += 1
        return packet_id, data

    def take_publish_id(self) -> int:
        """The packet id of a QoS 1 PUBLISH the caller encodes itself, counted in the window and
        awaiting its PUBACK as publish()'s are. For a sender of many messages whose topic and
        properties publish() has checked once (the forwarder's templates): it must apply the
        server's limits (QoS, retain, packet size) as publish() does."""
        if self.state is not ClientState.CONNECTED:
            self._require(ClientState.CONNECTED, "publish")
        if self._publishes >= self.limits.window:
            raise LocalProtocolError(f"the server's receive maximum ({self.limits.window}) is reached")
        packet_id = self._next_pid = self._free_pid()
        self._outgoing[packet_id] = _AWAIT_PUBACK
        self._publishes += 1
        return packet_id

    def release(self, packet_id: int) -> bytes:
        """PUBREL, after a ``PublishReceived`` that did not refuse the message."""
        if self._outgoing.get(packet_id) != _AWAIT_PUBCOMP:
            raise LocalProtocolError(f"packet id {packet_id} has no PUBREC to answer")
        return encode_packet(Pubrel(packet_id), self.version)

    def acknowledge(self, packet_id: int, reason_code: int = 0) -> bytes:
        """PUBACK (QoS 1) or PUBREC (QoS 2) for a ``MessageReceived``."""
        state = self._incoming.get(packet_id)
        if state == _IN_QOS1:
            del self._incoming[packet_id]
            return encode_packet(Puback(packet_id, reason_code), self.version)
        if state == _IN_QOS2 or state == _IN_PUBREC_SENT:
            if reason_code >= 0x80:  # MQTT 5: refused, the flow ends here
                del self._incoming[packet_id]
            else:
                self._incoming[packet_id] = _IN_PUBREC_SENT
            return encode_packet(Pubrec(packet_id, reason_code), self.version)
        raise LocalProtocolError(f"no incoming message with packet id {packet_id} to acknowledge")

    def complete(self, packet_id: int) -> bytes:
        """PUBCOMP for a ``ReleaseReceived``: the incoming QoS 2 message is done."""
        if self._incoming.get(packet_id) != _IN_RELEASED:
            raise LocalProtocolError(f"packet id {packet_id} has no PUBREL to answer")
        del self._incoming[packet_id]
        return encode_packet(Pubcomp(packet_id), self.version)

    def subscribe(self, subscriptions: tuple[Subscription, ...],
                  properties: Properties = _EMPTY) -> tuple[int, bytes]:
        self._require(ClientState.CONNECTED, "subscribe")
        packet_id = self._free_pid()
        data = encode_packet(Subscribe(packet_id, subscriptions, properties), self.version)
        self._take(packet_id, _AWAIT_SUBACK)
        self._requests[packet_id] = len(subscriptions)
        return packet_id, data

    def unsubscribe(self, topic_filters: tuple[str, ...],
                    properties: Properties = _EMPTY) -> tuple[int, bytes]:
        self._require(ClientState.CONNECTED, "unsubscribe")
        packet_id = self._free_pid()
        data = encode_packet(Unsubscribe(packet_id, topic_filters, properties), self.version)
        self._take(packet_id, _AWAIT_UNSUBACK)
        self._requests[packet_id] = len(topic_filters)
        return packet_id, data

    def disconnect(self, reason_code: int = 0, properties: Properties = _EMPTY) -> bytes:
        """DISCONNECT (with a reason code in MQTT 5, e.g. the one a RemoteProtocolError carries);
        nothing when no CONNECT went out. The client is closed afterwards."""
        sent_connect = self.state is not ClientState.NEW
        self.state = ClientState.CLOSED
        if not sent_connect:
            return b""
        if self.version != _MQTT_5:
            reason_code, properties = 0, _EMPTY
        return encode_packet(Disconnect(reason_code, properties), self.version)

    def _free_pid(self) -> int:
        """The next packet id not in use (not taken yet: encoding may still fail)."""
        outgoing = self._outgoing
        if len(outgoing) >= _PID_LIMIT:
            raise LocalProtocolError("all 65,535 packet ids are in use")
        pid = self._next_pid
        while True:
            pid = pid % _PID_LIMIT + 1
            if pid not in outgoing:
                return pid

    def _take(self, packet_id: int, awaiting: int) -> None:
        self._next_pid = packet_id
        self._outgoing[packet_id] = awaiting

    # -- keepalive -----------------------------------------------------------------------------

    def sent(self, now: float) -> None:
        """The caller wrote bytes to the server at ``now`` (keepalive counts from the last write)."""
        self._last_sent = now

    def ping_due(self, now: float) -> bool:
        last = self._last_sent
        return (self.state is ClientState.CONNECTED and self.keepalive > 0 and self._ping_sent_at is None
                and last is not None and now - last >= self.keepalive * _PING_AT)

    def ping(self, now: float) -> bytes:
        self._require(ClientState.CONNECTED, "ping")
        self._ping_sent_at = now
        return encode_packet(Pingreq(), self.version)

    def pingresp_overdue(self, now: float) -> bool:
        """A PINGREQ has waited longer than the keepalive for its PINGRESP: the server is hung."""
        sent_at = self._ping_sent_at
        return sent_at is not None and now - sent_at > self.keepalive

    # -- bytes in ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._frames.feed(data)

    def next_event(self) -> Event | _NeedData:
        """The next event from the bytes received, or NEED_DATA. Raises RemoteProtocolError (and
        the client is closed) when the server broke the protocol."""
        try:
            frame = self._frames.next_frame()
            if isinstance(frame, _NeedData):
                return NEED_DATA
            first_byte, raw, offset = frame
            size = len(raw) - offset
            if first_byte == _PUBACK_BYTE and (size == 2 or (
                    self.version == _MQTT_5 and (size == 3 or (size == 4 and not raw[offset + 3])))):
                # The forwarder's hot path: a PUBACK without properties (MQTT 5: with a reason code,
                # e.g. 0x10 no matching subscribers), checked as decode_packet would, without a
                # Puback object per message.
                packet_id = (raw[offset] << 8) | raw[offset + 1]
                if self._outgoing.get(packet_id) == _AWAIT_PUBACK:
                    del self._outgoing[packet_id]
                    self._publishes -= 1
                    event = _new(Published)
                    _set_published_id(event, packet_id)
                    _set_published_code(event, raw[offset + 2] if size > 2 else 0)
                    return event
            if first_byte >> 4 == _PUBLISH_TYPE:
                packet: Packet = decode_publish(first_byte, raw[offset:], self.version)
            else:
                packet = decode_packet(first_byte, raw[offset:], self.version)
            return self._handle(packet)
        except RemoteProtocolError:
            self.state = ClientState.CLOSED
            raise

    def next_pubacks(self) -> list[tuple[int, int]]:
        """(packet id, reason code) of the PUBACKs at the front of what was received, taken in one
        pass: those next_event() would return as ``Published`` on its fast path (no properties,
        acknowledging a QoS 1 PUBLISH in flight), with the same effect on the window. Stops at
        anything else (an empty list when that comes first): next_event() takes it from there. For
        the forwarder, which reads a window of PUBACKs at a time."""
        frames = self._frames
        buf, pos = frames._buf, frames._pos  # the same package's reader, read in place
        end = len(buf)
        outgoing = self._outgoing
        v5 = self.version == _MQTT_5
        out: list[tuple[int, int]] = []
        while pos + 4 <= end and buf[pos] == _PUBACK_BYTE:
            size = buf[pos + 1]
            if size == 2:
                code = 0
            elif v5 and ((size == 3 and pos + 5 <= end) or (size == 4 and pos + 6 <= end and not buf[pos + 5])):
                code = buf[pos + 4]
            else:
                break
            packet_id = (buf[pos + 2] << 8) | buf[pos + 3]
            if outgoing.get(packet_id) != _AWAIT_PUBACK:
                break  # next_event() says what is wrong with it
            del outgoing[packet_id]
            out.append((packet_id, code))
            pos += 2 + size
        if out:
            self._publishes -= len(out)
            if pos == end:
                buf.clear()
                frames._pos = 0
            elif pos > _COMPACT_AFTER:  # as next_frame() does: a partial packet stays, what was read goes
                del buf[:pos]
                frames._pos = 0
            else:
                frames._pos = pos
        return out

    def _handle(self, packet: object) -> Event:
        cls = type(packet)
        if cls is Puback:
            assert isinstance(packet, Puback)
            self._finish(packet.packet_id, _AWAIT_PUBACK)
            return Published(packet.packet_id, packet.reason_code)
        state = self.state
        if state is ClientState.CONNECTING:
            if cls is Connack:
                assert isinstance(packet, Connack)
                return self._connack(packet)
            if cls is Disconnect:
                assert isinstance(packet, Disconnect)
                return self._disconnected(packet)
            raise RemoteProtocolError(f"{cls.__name__.upper()} before CONNACK", _PROTOCOL_ERROR)
        if state is not ClientState.CONNECTED:
            raise RemoteProtocolError(f"{cls.__name__.upper()} while {state.value}", _PROTOCOL_ERROR)
        if cls is Pubrec:
            assert isinstance(packet, Pubrec)
            pid = packet.packet_id
            if packet.reason_code >= 0x80:  # MQTT 5: refused, the flow ends here
                self._finish(pid, _AWAIT_PUBREC)
                return Published(pid, packet.reason_code)
            self._expect(pid, _AWAIT_PUBREC, "PUBREC")
            self._outgoing[pid] = _AWAIT_PUBCOMP
            return PublishReceived(pid, packet.reason_code)
        if cls is Pubcomp:
            assert isinstance(packet, Pubcomp)
            self._finish(packet.packet_id, _AWAIT_PUBCOMP)
            return Published(packet.packet_id, packet.reason_code)
        if cls is Pingresp:
            self._ping_sent_at = None
            return PingResponse()
        if cls is Publish:
            assert isinstance(packet, Publish)
            return self._message(packet)
        if cls is Pubrel:
            assert isinstance(packet, Pubrel)
            if self._incoming.get(packet.packet_id) != _IN_PUBREC_SENT:
                raise RemoteProtocolError(f"PUBREL for packet id {packet.packet_id}, which awaits none",
                                          ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)
            self._incoming[packet.packet_id] = _IN_RELEASED
            return ReleaseReceived(packet.packet_id)
        if cls is Suback:
            assert isinstance(packet, Suback)
            self._answered(packet.packet_id, _AWAIT_SUBACK, "SUBACK", len(packet.reason_codes))
            return Subscribed(packet.packet_id, packet.reason_codes)
        if cls is Unsuback:
            assert isinstance(packet, Unsuback)
            count = len(packet.reason_codes) if self.version == _MQTT_5 else None
            self._answered(packet.packet_id, _AWAIT_UNSUBACK, "UNSUBACK", count)
            return Unsubscribed(packet.packet_id, packet.reason_codes)
        if cls is Disconnect:
            assert isinstance(packet, Disconnect)
            return self._disconnected(packet)
        raise RemoteProtocolError(f"unexpected {cls.__name__.upper()} from the server", _PROTOCOL_ERROR)

    def _connack(self, packet: Connack) -> Event:
        if packet.reason_code:
            self.state = ClientState.CLOSED
            return ConnectionRefused(packet.reason_code, reason_name(packet.reason_code, self.version, connack=True),
                                     packet.properties)
        if packet.session_present and self.clean_start:
            # MQTT 5 §3.2.2.1.1 / 3.1.1 §3.2.2.2: the server has no session after a clean start.
            raise RemoteProtocolError("session present after a clean start", _PROTOCOL_ERROR)
        limits = ServerLimits.from_connack(packet.properties) if self.version == _MQTT_5 else ServerLimits()
        self.limits = limits
        if limits.server_keepalive is not None:
            self.keepalive = limits.server_keepalive  # MQTT 5: the server's value replaces ours
        if limits.assigned_client_id is not None:
            self.client_id = limits.assigned_client_id
        self.state = ClientState.CONNECTED
        return Connected(packet.session_present, limits, packet.properties)

    def _disconnected(self, packet: Disconnect) -> Disconnected:
        self.state = ClientState.CLOSED
        return Disconnected(packet.reason_code, reason_name(packet.reason_code, self.version), packet.properties)

    def _message(self, packet: Publish) -> MessageReceived:
        if PropertyId.TOPIC_ALIAS in packet.properties:
            # We announce no Topic Alias Maximum, so the server may use none (MQTT 5 §3.1.2.11.5).
            raise RemoteProtocolError("topic alias from the server, none allowed", ReasonCode.TOPIC_ALIAS_INVALID)
        pid = packet.packet_id
        if pid is None:
            return MessageReceived(packet)
        incoming = self._incoming
        state = incoming.get(pid)
        if state is not None:
            if packet.qos == 2 and (state == _IN_QOS2 or state == _IN_PUBREC_SENT):
                return MessageReceived(packet, duplicate=True)  # acknowledge() answers PUBREC again
            raise RemoteProtocolError(f"PUBLISH with packet id {pid}, still in use",
                                      ReasonCode.PACKET_IDENTIFIER_IN_USE)
        if len(incoming) >= self._receive_maximum:
            raise RemoteProtocolError(f"more than {self._receive_maximum} unacknowledged PUBLISHes",
                                      ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
        incoming[pid] = _IN_QOS1 if packet.qos == 1 else _IN_QOS2
        return MessageReceived(packet)

    def _expect(self, packet_id: int, awaiting: int, name: str) -> None:
        found = self._outgoing.get(packet_id)
        if found != awaiting:
            waits = "nothing" if found is None else _AWAITED[found]
            raise RemoteProtocolError(f"{name} for packet id {packet_id}, which awaits {waits}",
                                      ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if found is None else _PROTOCOL_ERROR)

    def _finish(self, packet_id: int, awaiting: int) -> None:
        """An outgoing PUBLISH flow ends: its packet id is free again."""
        if self._outgoing.get(packet_id) != awaiting:
            self._expect(packet_id, awaiting, ("PUBACK", "PUBREC", "PUBCOMP")[awaiting])
        del self._outgoing[packet_id]
        self._publishes -= 1

    def _answered(self, packet_id: int, awaiting: int, name: str, count: int | None) -> None:
        self._expect(packet_id, awaiting, name)
        expected = self._requests.pop(packet_id)
        del self._outgoing[packet_id]
        if count is not None and count != expected:
            raise RemoteProtocolError(f"{name} with {count} reason codes for {expected} topic filters",
                                      _PROTOCOL_ERROR)
