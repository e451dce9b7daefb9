"""One client's protocol logic, without I/O (see appliance/proxy/__init__.py for the vocabulary).

Each input returns the commands it produced (commands.py), which the server executes: bytes from
the client (`client_data`) or the broker (`broker_data`), the broker leg opened
(`broker_connected`) or not (`broker_unavailable`), the message log's commit (`release_acks`), the
connect timeout, a revocation, the shutdown.

The session owns the connection's state (await CONNECT → connecting → connected → closed), the scan
of both byte streams, the judging of every PUBLISH, the answers to rejected ones, and the order and
durability of acks (`AckOrder`, acks.py). Its policies are small units it composes:

- connect.py: authentication, the will's verdict, broker credentials and client-id namespacing;
- subscriptions.py: the ACL's read side and the subscription quota on SUBSCRIBE, SUBACK merging;
- limits.py: packet sizes, the in-flight limit, the message rate (token bucket);
- aliases.py: MQTT 5 topic aliases; qos2.py: the QoS 2 flows the proxy finishes itself;
- replies.py: what the proxy says itself (refusing CONNACKs, rejections' acks, DISCONNECTs);
- framing.py: the incomplete packet at the end of a chunk.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from appliance.names import EventKind, Metric
from appliance.mqtt import (
    Connack,
    Connect,
    ConnectReturnCode,
    PacketType,
    PropertyId,
    ProtocolVersion,
    ReasonCode,
    RemoteProtocolError,
    Suback,
    Publish,
    decode_packet,
    encode_packet,
    publish_fields,
    read_fixed_header,
)
from appliance.pipeline import ClientInfo, Message, Pipeline, Verdict
from appliance.proxy.acks import CONNACK_BARRIER, SYNC_HINT_INFLIGHT, SYNC_NOW, AckOrder, Durability
from appliance.proxy.aliases import TopicAliases
from appliance.proxy.commands import (
    AWAIT_DURABLE,
    AWAIT_DURABLE_SYNC_NOW,
    CLOSE_BROKER,
    OPEN_BROKER,
    CloseClient,
    Command,
    Notes,
    Pause,
    SendToBroker,
    SendToClient,
)
from appliance.proxy.connect import (
    BrokerCredentials,
    CredentialSource,
    broker_client_id,
    connect_for_broker,
    judge_will,
    refusal_code,
)
from appliance.proxy.framing import PacketBuffer
from appliance.proxy.limits import MessageRate, SessionLimits, advertised, inflight_exceeded
from appliance.proxy.qos2 import Qos2Flows
from appliance.proxy.replies import Replies
from appliance.proxy.subscriptions import Subscriptions
from appliance.security.passwords import AuthResult

if TYPE_CHECKING:
    from appliance.security import AclCheck, Authenticator

__all__ = ["BrokerCredentials", "Session", "SessionLimits", "State", "broker_client_id", "SYNC_HINT_INFLIGHT"]

log = logging.getLogger(__name__)

_PUBLISH = int(PacketType.PUBLISH)
_CONNECT = int(PacketType.CONNECT)
_PUBREL = int(PacketType.PUBREL)
_PUBACK = int(PacketType.PUBACK)
_PUBREC = int(PacketType.PUBREC)
_PUBCOMP = int(PacketType.PUBCOMP)
_CONNACK = int(PacketType.CONNACK)
_DISCONNECT = int(PacketType.DISCONNECT)
_SUBSCRIBE = int(PacketType.SUBSCRIBE)
_SUBACK = int(PacketType.SUBACK)
_UNSUBSCRIBE = int(PacketType.UNSUBSCRIBE)
_MQTT5 = ProtocolVersion.MQTT_5
# A client whose next packets arrive this soon after we released acks to it is clocked by our acks
# (it sends when it hears back): whatever it has in flight, it is blocked on us once it waits.
ACK_CLOCK_S = 0.002
# Builds the Message of every PUBLISH without the NamedTuple's Python-level __new__ (0.24 -> 0.14 µs):
# all of Message's fields, in order (a test checks that list).
_new_tuple = tuple.__new__
# The reason codes a CONNACK may carry (MQTT 5 §3.2.2.2) among those a protocol error names.
_CONNACK_ERRORS = frozenset({ReasonCode.UNSPECIFIED_ERROR, ReasonCode.MALFORMED_PACKET, ReasonCode.PROTOCOL_ERROR,
                             ReasonCode.PACKET_TOO_LARGE, ReasonCode.QUOTA_EXCEEDED})


class State(enum.Enum):
    AWAIT_CONNECT = "await-connect"
    CONNECTING = "connecting"  # CONNECT forwarded, waiting for the broker's CONNACK
    CONNECTED = "connected"
    CLOSED = "closed"


class Session:
    __slots__ = (
        "peer", "client", "version", "state", "close_reason", "password_user", "broker_client_id",
        "_pipeline", "_limits", "_credentials", "_durability", "_authenticator", "_identity", "_clock",
        "_max_packet_size", "_from_client", "_from_broker", "_acks", "_acks_released_at", "_ack_clocked",
        "_to_client", "_to_broker", "_notes", "_requests", "_pause", "_open_broker", "_broker_up", "_close_broker",
        "_close_client", "_subscriptions", "_rate", "_aliases", "_qos2", "_replies", "_client_disconnected",
    )

    def __init__(
        self,
        *,
        peer: str,
        pipeline: Pipeline,
        limits: SessionLimits = SessionLimits(),
        broker_credentials: CredentialSource = None,
        durability: Durability | None = None,
        authenticator: Authenticator | None = None,
        access: AclCheck | None = None,
        identity: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.peer = peer
        self.client: ClientInfo | None = None
        self.version: ProtocolVersion | None = None
        self.state = State.AWAIT_CONNECT
        self.close_reason: str | None = None
        self.password_user: str | None = None  # the user a password file authenticated, if any
        self.broker_client_id: str | None = None  # the client id the broker sees (connect.broker_client_id)
        self._pipeline = pipeline
        self._limits = limits
        self._credentials = broker_credentials
        self._durability = durability
        self._authenticator = authenticator
        # A TLS client certificate's CN or SAN, used as the username (use_identity_as_username).
        self._identity = identity
        self._clock = clock
        # Until CONNECT has arrived, only a small first packet is accepted from a stranger.
        self._max_packet_size = limits.max_connect_size
        self._from_client = PacketBuffer()
        self._from_broker = PacketBuffer()
        self._acks = AckOrder(durability, self._failed_ack)
        self._acks_released_at = float("-inf")
        self._ack_clocked = False
        # What the current input produced (see _commands): bytes for each leg (those for the broker
        # are held until its leg is open), audit events and counts, and the requests.
        self._to_client: list[bytes] = []
        self._to_broker: list[bytes] = []
        self._notes = Notes(peer)
        self._requests = False  # whether any of the four below is set (most inputs set none)
        self._pause = 0.0
        self._open_broker = False
        self._broker_up = False
        self._close_broker = False
        self._close_client = False
        self._subscriptions = Subscriptions(access, limits.max_subscriptions, self._notes)
        self._rate = MessageRate(limits, clock, self._notes) if limits.message_rate else None
        self._aliases = TopicAliases()
        self._qos2 = Qos2Flows()
        # Until a CONNECT names the client's version, the only reply is in 3.1.1, which all can read.
        self._replies = Replies(ProtocolVersion.MQTT_3_1_1)
        self._client_disconnected = False

    # -- the commands of one input ---------------------------------------------------------------

    def _commands(self) -> list[Command]:
        """What the input just handled produced, in the order the server executes it."""
        commands: list[Command] = []
        to_client = self._to_client
        if to_client:
            commands.append(SendToClient(b"".join(to_client)))
            to_client.clear()
        notes = self._notes.commands
        if notes:
            commands += notes
            notes.clear()
        requests = self._requests
        if requests and self._pause > 0:
            commands.append(Pause(self._pause))
            self._pause = 0.0
        # Without a message log, no ack ever waits for one.
        # A blocked client's sync is asked for as soon as its PUBLISH is judged (before the broker's
        # ack comes back): the sync overlaps the broker's round trip instead of following it.
        if self._durability is not None and self._acks.entries:  # no entry: nothing waits for the log
            request = self._acks.durability_request(self._ack_clocked)
            if request:
                commands.append(AWAIT_DURABLE_SYNC_NOW if request == SYNC_NOW else AWAIT_DURABLE)
        to_broker = self._to_broker
        if to_broker and self._broker_up:
            commands.append(SendToBroker(b"".join(to_broker)))
            to_broker.clear()
        if not requests:
            return commands
        self._requests = False
        if self._open_broker:
            commands.append(OPEN_BROKER)
            self._open_broker = False
        if self._close_broker:
            commands.append(CLOSE_BROKER)
            self._close_broker = False
        if self._close_client:
            commands.append(CloseClient(self.close_reason))
            self._close_client = False
        return commands

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def holds_broker_data(self) -> bool:
        """Bytes for the broker wait for its leg to open (they are delivered even if the client has
        gone by then: a will, the last messages)."""
        return bool(self._to_broker)

    @property
    def buffered(self) -> tuple[int, int]:
        """Bytes of incomplete packets held, from the client and from the broker."""
        return len(self._from_client), len(self._from_broker)

    # -- client → broker -------------------------------------------------------------------------
    #
    # Both directions scan packet headers in place (read_fixed_header) and relay runs of packets as
    # one slice of the received chunk: no per-packet copies or objects except for what is judged.

    def client_data(self, data: bytes) -> list[Command]:
        if self.state is State.CLOSED:
            return self._commands()
        if self._durability is not None:  # whether it is clocked by our acks matters only when they wait
            self._ack_clocked = self._clock() - self._acks_released_at < ACK_CLOCK_S
        if self._from_client.pending:
            joined = self._from_client.join(data)
            if joined is None:
                return self._commands()
            data = joined
        size = len(data)
        pos = run = 0  # data[run:pos] is a run of packets to relay as they are
        to_broker = self._to_broker
        max_size = self._max_packet_size
        try:
            while pos < size:
                header = read_fixed_header(data, pos, size, max_size)
                if header is None or header[2] > size:
                    break
                first, body, end = header
                kind = first >> 4
                # What goes to the broker for this packet: True relays it as it is (in the run),
                # bytes replace it, None drops it.
                forward: bytes | bool | None = True
                if kind == _PUBLISH and self.state is not State.AWAIT_CONNECT:
                    forward = self._on_publish(first, data[body:end])
                elif self.state is State.AWAIT_CONNECT:
                    if kind != _CONNECT:
                        raise RemoteProtocolError("the first packet must be CONNECT", ReasonCode.PROTOCOL_ERROR)
                    self._on_connect(first, data[body:end], data[pos:end])
                    run = end
                    max_size = self._max_packet_size
                elif kind == _CONNECT:
                    raise RemoteProtocolError("second CONNECT on one connection", ReasonCode.PROTOCOL_ERROR)
                elif kind == _PUBREL and self._qos2.answered:
                    assert self.version is not None
                    pubcomp = self._qos2.pubrel(int.from_bytes(data[body : body + 2], "big"), self.version)
                    if pubcomp is not None:
                        forward = None
                        self._to_client.append(pubcomp)
                elif kind == _SUBSCRIBE and self._subscriptions.active:
                    forward = self._on_subscribe(first, data[body:end])
                elif kind == _UNSUBSCRIBE and self._subscriptions.active:
                    assert self.version is not None
                    self._subscriptions.unsubscribe(first, data[body:end], self.version)
                elif kind == _DISCONNECT:
                    self._client_disconnected = True
                if forward is not True:
                    if run < pos:
                        to_broker.append(data[run:pos])
                    if isinstance(forward, bytes):
                        to_broker.append(forward)
                    run = end
                pos = end
                if self._close_client:  # this packet closed the connection: nothing after it counts
                    return self._commands()
        except RemoteProtocolError as exc:
            if run < pos:
                to_broker.append(data[run:pos])  # the packets before the bad one were fine
            self._protocol_error(exc)
            return self._commands()
        if run < pos:
            to_broker.append(data if run == 0 and pos == size else data[run:pos])
        if pos < size:
            self._from_client.keep(data, pos, max_size)
        return self._commands()

    def _on_connect(self, first_byte: int, body: bytes, raw: bytes) -> None:
        connect = decode_packet(first_byte, body, ProtocolVersion.MQTT_5)
        assert isinstance(connect, Connect)
        version = self.version = connect.protocol_version
        username = self._identity if self._identity is not None else connect.username
        client = self.client = ClientInfo(connect.client_id, username, self.peer, version)
        self._notes.client_id = client.client_id
        self._max_packet_size = self._limits.max_packet_size
        self._replies = Replies(version, connect)
        if self._authenticator is not None:
            result = self._authenticator.authenticate(connect.username, connect.password, identity=self._identity)
            if result is not AuthResult.OK:
                self._refuse_auth(result)
                return
            if self._identity is None and connect.username is not None and connect.password is not None:
                self.password_user = connect.username
        verdict = judge_will(self._pipeline, connect, client)
        if not verdict.accepted:
            self._refuse_will(verdict)
            return
        raw, self.broker_client_id = connect_for_broker(connect, raw, username, self._credentials)
        self._to_broker.append(raw)
        self._acks.wait_for(CONNACK_BARRIER, qos=0)
        self.state = State.CONNECTING
        self._open_broker = self._requests = True

    def _refuse_will(self, verdict: Verdict) -> None:
        code = verdict.reason_code if self.version is _MQTT5 else ConnectReturnCode.NOT_AUTHORIZED
        self._to_client.append(self._replies.connack(code, verdict.reason_text))
        self._close(f"will refused: {verdict.reason_text}", broker=False)

    def _refuse_auth(self, result: AuthResult) -> None:
        assert self.version is not None and self.client is not None
        self._to_client.append(self._replies.connack(refusal_code(result, self.version)))
        bad, text = result is AuthResult.BAD_CREDENTIALS, result.value
        self._notes.record(EventKind.AUTH_FAILED, {"client_id": self.client.client_id, "username": self.client.username,
                                           "peer": self.peer, "reason": text})
        self._notes.count(Metric.AUTH_FAILURES, "bad_credentials" if bad else "not_authorized")
        self._close(f"authentication failed: {text}", broker=False)

    def _on_subscribe(self, first_byte: int, body: bytes) -> bytes | bool | None:
        assert self.client is not None and self.version is not None
        result = self._subscriptions.subscribe(first_byte, body, self.client, self.version)
        if isinstance(result, Suback):
            # Denied whole: answered behind the CONNACK (and earlier acks) like any ack of our own.
            self._acks.inject(encode_packet(result, self.version), 0, self._to_client, publish=False)
            return None
        return result

    def _on_publish(self, first_byte: int, body: bytes) -> bytes | bool | None:
        """Judge one PUBLISH: True to relay it as it is, bytes to relay instead, None to drop it."""
        version = self.version
        assert version is not None and self.client is not None
        # The fields, not a Publish: the packet is relayed as its own bytes unless an alias is resolved.
        published, payload, qos, retain, dup, packet_id, properties = publish_fields(first_byte, body, version)
        if qos == 2 and self._qos2.answered:
            assert packet_id is not None
            self._qos2.publish(packet_id)
        topic = published
        alias = None
        if version is _MQTT5 and properties:
            alias = properties.get(PropertyId.TOPIC_ALIAS)
            if isinstance(alias, int):
                topic = self._aliases.resolve(alias, topic)
        if qos and self._limits.max_inflight and \
                inflight_exceeded(self._limits, self._acks.publishes + len(self._qos2.forwarded), self._notes):
            self._disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
            self._close("receive maximum exceeded")
            return None
        if self._rate is not None:
            pause = self._rate.take()
            if pause:
                self._pause = pause
                self._requests = True
        verdict, ticket = self._pipeline.judge(
            _new_tuple(Message, (topic, payload, qos, retain, self.client, properties, False, time.time(), None))
        )
        # The message log's sequence number of this message's verdict: its ack waits until it is durable.
        seq = ticket if self._durability is not None and qos else 0
        if verdict.accepted:
            if qos == 2:
                assert packet_id is not None
                self._qos2.forward(packet_id)
                self._acks.wait_for(packet_id, seq, counted=False, qos=2)
            elif qos:
                assert packet_id is not None
                self._acks.wait_for(packet_id, seq)
            if isinstance(alias, int) and self._aliases.accepted(alias) and not published:
                return encode_packet(Publish(topic, payload, qos, retain, dup, packet_id, properties), _MQTT5)
            return True
        if isinstance(alias, int):
            self._aliases.rejected(alias, published)
        self._reject(qos, packet_id, verdict, seq)
        return None

    def _reject(self, qos: int, packet_id: int | None, verdict: Verdict, seq: int = 0) -> None:
        if verdict.action == "disconnect":
            self._disconnect(verdict.reason_code, verdict.reason_text)
            self._close(f"disconnected by policy: {verdict.reason_text}")
            return
        if qos == 0:
            return
        assert packet_id is not None
        if qos == 2:
            self._qos2.refuse(packet_id)
        self._acks.inject(self._replies.rejection(qos, packet_id, verdict), seq, self._to_client)

    def _disconnect(self, code: ReasonCode, text: str = "") -> None:
        """Tell an MQTT 5 client why it is being closed (3.1.1 has no DISCONNECT from the server)."""
        disconnect = self._replies.disconnect(code, text)
        if disconnect is not None:
            self._to_client.append(disconnect)

    # -- broker → client -------------------------------------------------------------------------

    def broker_connected(self) -> list[Command]:
        """The broker leg is open: what was held for it goes out now."""
        self._broker_up = True
        return self._commands()

    def broker_data(self, data: bytes) -> list[Command]:
        if self._from_broker.pending:
            joined = self._from_broker.join(data)
            if joined is None:
                return self._commands()
            data = joined
        size = len(data)
        pos = run = 0
        to_client = self._to_client
        acks = self._acks
        try:
            while pos < size:
                header = read_fixed_header(data, pos, size)
                if header is None or header[2] > size:
                    break
                first, body, end = header
                kind = first >> 4
                if (kind == _PUBACK or kind == _PUBREC) and len(acks):
                    # The broker acked a forwarded message: it goes out in order, once durable.
                    if run < pos:
                        to_client.append(data[run:pos])
                    run = end
                    queued = len(to_client)
                    if not acks.acked(int.from_bytes(data[body : body + 2], "big"), data[pos:end], to_client):
                        to_client.append(data[pos:end])
                    elif len(to_client) > queued:
                        self._acks_released_at = self._clock()
                elif kind == _SUBACK and self._subscriptions.awaiting_suback:
                    assert self.version is not None
                    merged = self._subscriptions.suback(first, data[body:end], self.version)
                    if merged is not None:
                        if run < pos:
                            to_client.append(data[run:pos])
                        run = end
                        to_client.append(merged)
                elif kind == _PUBCOMP and self._qos2.forwarded:
                    self._qos2.pubcomp(int.from_bytes(data[body : body + 2], "big"))
                elif kind == _CONNACK and self.state is State.CONNECTING:
                    if run < pos:
                        to_client.append(data[run:pos])
                    run = end
                    self._on_connack(first, data[body:end], data[pos:end])
                pos = end
        except RemoteProtocolError as exc:
            log.error("broker sent a malformed packet to %s: %s", self.describe(), exc)
            if run < pos:
                to_client.append(data[run:pos])
            self._close("malformed packet from the broker")
            return self._commands()
        if run < pos:
            to_client.append(data if run == 0 and pos == size else data[run:pos])
        if acks.broken:
            self._close_if_unacknowledgeable()
        if pos < size:
            self._from_broker.keep(data, pos)
        return self._commands()

    def _on_connack(self, first_byte: int, body: bytes, raw: bytes) -> None:
        version = self.version
        assert version is not None
        connack = decode_packet(first_byte, body, version)
        assert isinstance(connack, Connack)
        if version is _MQTT5 and connack.reason_code == 0:
            properties = advertised(connack.properties, self._limits)
            if properties is not connack.properties:
                connack = replace(connack, properties=properties)
                raw = encode_packet(connack, _MQTT5)
        self._to_client.append(raw)
        if connack.reason_code != 0:
            self._close(f"broker refused the connection (code {connack.reason_code})", broker=False)
            return
        self.state = State.CONNECTED
        if version is _MQTT5:
            alias_maximum = connack.properties.get(PropertyId.TOPIC_ALIAS_MAXIMUM, 0)
            self._aliases.maximum = alias_maximum if isinstance(alias_maximum, int) else 0
            assigned = connack.properties.get(PropertyId.ASSIGNED_CLIENT_IDENTIFIER)
            if isinstance(assigned, str) and self.client is not None:
                self.client = replace(self.client, client_id=assigned)
                self._notes.client_id = assigned
        self._acks.acked(CONNACK_BARRIER, b"", self._to_client)

    # -- durability ------------------------------------------------------------------------------

    def release_acks(self) -> list[Command]:
        """The message log made more records durable: send the acks that were waiting for them."""
        queued = len(self._to_client)
        self._acks.release(self._to_client)
        if len(self._to_client) > queued:
            self._acks_released_at = self._clock()
        if self._acks.broken:
            self._close_if_unacknowledgeable()
        return self._commands()

    def _failed_ack(self, packet_id: int, qos: int) -> bytes | None:
        """An accepted message's record could not be stored: the ack its publisher gets instead of
        the broker's (None: none, and the connection closes; replies.py)."""
        self._notes.count(Metric.AUDIT_UNAVAILABLE)
        return self._replies.unstored(packet_id, qos)

    def _close_if_unacknowledgeable(self) -> None:
        if self._acks.broken:
            self._disconnect(ReasonCode.QUOTA_EXCEEDED)
            self._close("the message log could not store a message awaiting its acknowledgement")

    @property
    def waiting_for_durability(self) -> bool:
        return self._acks.waiting_for_durability

    @property
    def blocked_on_durability(self) -> bool:
        """The client waits for our acks before it sends more: it has (about) as many QoS 1/2
        messages in flight as it will send (no MQTT version announces that number; common clients
        stop at 10-20), or it is clocked by our acks (what it sent last came right after acks we
        released to it) and has any in flight. A device publishing at its own pace is neither: its
        acks wait up to the sync window (audit.sync_window), which batches syncs.
        Only while one of its records is not durable yet: asked as soon as its PUBLISH is judged,
        the sync overlaps the broker's round trip instead of following it."""
        return self._acks.durability_request(self._ack_clocked) == SYNC_NOW

    # -- connection events -----------------------------------------------------------------------

    def broker_unavailable(self) -> list[Command]:
        """The broker leg could not be opened: tell the client the server is unavailable."""
        if self.state is State.CONNECTING and self.version is not None:
            code = ReasonCode.SERVER_UNAVAILABLE if self.version is _MQTT5 else ConnectReturnCode.SERVER_UNAVAILABLE
            self._to_client.append(self._replies.connack(code))
        self._close("broker unavailable", broker=False)
        return self._commands()

    def connect_timeout(self) -> list[Command]:
        if self.state is State.AWAIT_CONNECT:
            self._close("no CONNECT within the connect timeout", broker=False)
        return self._commands()

    def denied_subscriptions(self) -> list[str]:
        """Filters this client was granted that the access rules in force now refuse."""
        if self.client is None:
            return []
        return self._subscriptions.denied(self.client)

    def revoke(self, reason: str) -> list[Command]:
        """Access was withdrawn (a reload): tell MQTT 5 clients, then close."""
        if self.state is State.CONNECTED:
            self._disconnect(ReasonCode.NOT_AUTHORIZED)
        self._close(f"access revoked: {reason}")
        return self._commands()

    def shutdown(self) -> list[Command]:
        """The appliance is stopping: tell MQTT 5 clients why, then close."""
        if self.state is State.CONNECTED:
            self._disconnect(ReasonCode.SERVER_SHUTTING_DOWN)
        self._close("appliance shutting down")
        return self._commands()

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        if exc.reason_code == ReasonCode.PACKET_TOO_LARGE:
            limit = "connect_size" if self.state is State.AWAIT_CONNECT else "packet_size"
            self._notes.limit_exceeded(limit, exc.msg)
        if self.state is State.CONNECTED:
            self._disconnect(exc.reason_code)
        elif self.state is State.CONNECTING:
            # The CONNECT and a bad packet came together, before the broker's CONNACK: refuse the
            # connection with the reason (MQTT 5), and give the broker nothing of it.
            if self.version is _MQTT5:
                code = exc.reason_code if exc.reason_code in _CONNACK_ERRORS else ReasonCode.PROTOCOL_ERROR
                self._to_client.append(self._replies.connack(code, exc.msg))
            self._to_broker.clear()
            self._open_broker = False
        elif self.state is State.AWAIT_CONNECT and exc.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            # What mosquitto answers too: the 3.1.1 CONNACK every version can read (the session's
            # replies are in 3.1.1 until a CONNECT is accepted).
            self._to_client.append(self._replies.connack(ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION))
        self._close(f"protocol error: {exc}", broker=self.state is not State.AWAIT_CONNECT)

    def _close(self, reason: str, *, broker: bool = True) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason = reason
        self._close_client = self._requests = True
        self._close_broker = broker
        self._open_broker = self._open_broker and broker

    @property
    def client_disconnected(self) -> bool:
        """The client said DISCONNECT before closing (so no will is due)."""
        return self._client_disconnected

    def describe(self) -> str:
        if self.client is None:
            return self.peer
        return f"{self.client.client_id!r} ({self.peer})"
