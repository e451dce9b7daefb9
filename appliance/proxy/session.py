"""One client's protocol logic, without I/O (see appliance/proxy/__init__.py for the vocabulary).

The server feeds bytes in with `client_data()` / `broker_data()` and after each call takes what
the session queued in `to_client` / `to_broker` (one write per leg per batch) and looks at the
flags: `want_broker` (open the broker leg), `close_client`, `close_broker`, `pause_for` (stop
reading the client for that many seconds: the message rate limit), and drains `events` (for the
audit log) and `counts` (for metrics).

Access control happens here too, without I/O: the `Authenticator` decides each CONNECT, the ACL's
read side filters SUBSCRIBE packets (denied filters are cut out and their failure codes merged back
into the broker's SUBACK, in order), and the per-client limits (in-flight messages, subscriptions,
message rate) are counted.
"""

from __future__ import annotations

import enum
from collections import deque
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from appliance.mqtt import (
    Connack,
    Connect,
    ConnectReturnCode,
    Disconnect,
    PacketType,
    Properties,
    PropertyId,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Pubrec,
    ReasonCode,
    RemoteProtocolError,
    Suback,
    Subscribe,
    Unsubscribe,
    decode_packet,
    decode_publish,
    read_fixed_header,
    encode_packet,
)
from appliance.pipeline import ClientInfo, Message, Pipeline, Verdict
from appliance.proxy.acks import CONNACK_BARRIER, AckOrder, Durability

from appliance.security.passwords import AuthResult

if TYPE_CHECKING:
    from appliance.security import AclCheck, Authenticator

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
# Acks waiting for durability at which a client is taken to be blocked on us (see
# blocked_on_durability): mosquitto_pub and paho keep 20 QoS 1 messages in flight by default.
SYNC_HINT_INFLIGHT = 10
# A client whose next packets arrive this soon after we released acks to it is clocked by our acks
# (it sends when it hears back): whatever it has in flight, it is blocked on us once it waits.
ACK_CLOCK_S = 0.002
_UNSUBSCRIBE = int(PacketType.UNSUBSCRIBE)
_MQTT5 = ProtocolVersion.MQTT_5

# Reason strings are a courtesy to the publisher; keep them short.
MAX_REASON_STRING = 200
# One throttling pause at most (s): the debt carries over, but the client's PINGREQs must still
# reach the broker within its keepalive.
MAX_THROTTLE_PAUSE_S = 1.0
# MQTT 3.1.1 has one failure code in a SUBACK.
_V3_SUBACK_FAILURE = 0x80
# The reason codes a CONNACK may carry (MQTT 5 §3.2.2.2) among those a protocol error names.
_CONNACK_ERRORS = frozenset({ReasonCode.UNSPECIFIED_ERROR, ReasonCode.MALFORMED_PACKET, ReasonCode.PROTOCOL_ERROR,
                             ReasonCode.PACKET_TOO_LARGE, ReasonCode.QUOTA_EXCEEDED})


class State(enum.Enum):
    AWAIT_CONNECT = "await-connect"
    CONNECTING = "connecting"  # CONNECT forwarded, waiting for the broker's CONNACK
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_packet_size: int = 1024 * 1024
    max_connect_size: int = 64 * 1024
    # QoS 1/2 PUBLISHes not yet acknowledged to the client; 0: no limit. Advertised to MQTT 5
    # clients as Receive Maximum; exceeding it: DISCONNECT 0x93.
    max_inflight: int = 0
    # Topic filters subscribed at once; 0: no limit. Beyond: SUBACK 0x97 Quota exceeded (3.1.1: 0x80).
    max_subscriptions: int = 0
    # PUBLISH packets per second (token bucket with `message_burst`); 0: no limit. Beyond: the
    # client is not read for a while (throttled), nothing is dropped.
    message_rate: float = 0.0
    message_burst: int = 0


@dataclass(frozen=True, slots=True)
class BrokerCredentials:
    """Credentials the proxy presents to the broker instead of the client's own."""

    username: str
    password: bytes | None


def broker_client_id(username: str, client_id: str) -> str:
    """The client id the broker sees for `client_id` of `username`: unique per identity."""
    return f"u{len(username)}:{username}:{client_id}"


class Session:
    __slots__ = (
        "peer", "client", "version", "state", "close_reason",
        "to_client", "to_broker", "want_broker", "close_client", "close_broker",
        "_pipeline", "_limits", "_credentials", "_max_packet_size", "_acks", "_acks_released_at", "_ack_clocked",
        "_client_pending", "_client_need", "_broker_pending", "_broker_need",
        "_durability", "_qos2_open", "password_user", "broker_client_id", "_aliases", "_stale_aliases", "_alias_maximum", "_proxy_qos2", "_reason_strings",
        "_client_max_packet", "_client_disconnected",
        "events", "counts", "pause_for", "_authenticator", "_access", "_identity", "_clock",
        "_filter_subscriptions", "_subscriptions", "_suback_merges", "_tokens", "_tokens_at", "_throttled",
    )

    def __init__(
        self,
        *,
        peer: str,
        pipeline: Pipeline,
        limits: SessionLimits = SessionLimits(),
        broker_credentials: BrokerCredentials | Callable[[], BrokerCredentials | None] | None = None,
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
        self.to_client: list[bytes] = []
        self.to_broker: list[bytes] = []
        self.want_broker = False
        self.close_client = False
        self.close_broker = False
        self._pipeline = pipeline
        self._limits = limits
        self._credentials = broker_credentials
        # Until CONNECT has arrived, only a small first packet is accepted from a stranger.
        self._max_packet_size = limits.max_connect_size
        self._client_pending = bytearray()  # an incomplete packet, waiting for more bytes
        self._client_need = 0  # its total size, when its header is complete
        self._broker_pending = bytearray()
        self._broker_need = 0
        self._durability = durability
        self._acks = AckOrder(durability, self._failed_ack)
        self._acks_released_at = float("-inf")
        self._ack_clocked = False
        self._qos2_open: set[int] = set()  # forwarded QoS 2 ids the broker has not PUBCOMPed yet
        self.password_user: str | None = None  # the user a password file authenticated, if any
        self.broker_client_id: str | None = None  # the client id the broker sees (see broker_client_id)
        self._aliases: dict[int, str] = {}
        # Aliases whose topic the broker does not know (set by a message we rejected).
        self._stale_aliases: set[int] = set()
        self._alias_maximum = 0
        # QoS 2 packet ids the proxy answered itself: their PUBREL is ours to answer.
        self._proxy_qos2: set[int] = set()
        self._reason_strings = True
        self._client_max_packet: int | None = None
        self._client_disconnected = False
        # What the server records: (kind, detail) audit events, and metric keys "name:label".
        self.events: list[tuple[str, dict[str, object]]] = []
        self.counts: list[str] = []
        self.pause_for = 0.0
        self._authenticator = authenticator
        self._access = access
        # A TLS client certificate's CN or SAN, used as the username (use_identity_as_username).
        self._identity = identity
        self._clock = clock
        self._filter_subscriptions = access is not None or limits.max_subscriptions > 0
        self._subscriptions: set[str] = set()
        # SUBSCRIBE packet id → the proxy's failure code per filter (None: the broker's code).
        # Per packet id, in order: (the proxy's own codes to merge in or None, the filters relayed).
        self._suback_merges: dict[int, deque[tuple[list[int | None] | None, tuple[str, ...]]]] = {}
        self._tokens = float(max(limits.message_burst, 1))
        self._tokens_at = clock()
        self._throttled = False

    # -- client → broker -------------------------------------------------------------------------
    #
    # Both directions scan packet headers in place (read_fixed_header) and relay runs of packets as
    # one slice of the received chunk: no per-packet copies or objects except for what is judged.

    def client_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self._ack_clocked = self._clock() - self._acks_released_at < ACK_CLOCK_S
        if self._client_pending:
            self._client_pending += data
            if len(self._client_pending) < self._client_need:
                return  # a large packet still arriving: don't rescan it for every chunk
            data = bytes(self._client_pending)
            self._client_pending = bytearray()
        size = len(data)
        pos = run = 0  # data[run:pos] is a run of packets to relay as they are
        to_broker = self.to_broker
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
                elif kind == _PUBREL and self._proxy_qos2:
                    packet_id = int.from_bytes(data[body : body + 2], "big")
                    if packet_id in self._proxy_qos2:
                        forward = None
                        self._proxy_qos2.discard(packet_id)
                        self.to_client.append(encode_packet(Pubcomp(packet_id), self.version))
                elif kind == _SUBSCRIBE and self._filter_subscriptions:
                    forward = self._on_subscribe(first, data[body:end])
                elif kind == _UNSUBSCRIBE and (self._limits.max_subscriptions or self._access is not None):
                    unsubscribe = decode_packet(first, data[body:end], self.version)  # type: ignore[arg-type]
                    assert isinstance(unsubscribe, Unsubscribe)
                    self._subscriptions.difference_update(unsubscribe.topic_filters)
                elif kind == _DISCONNECT:
                    self._client_disconnected = True
                if forward is not True:
                    if run < pos:
                        to_broker.append(data[run:pos])
                    if isinstance(forward, bytes):
                        to_broker.append(forward)
                    run = end
                pos = end
                if self.state is State.CLOSED:
                    return
        except RemoteProtocolError as exc:
            if run < pos:
                to_broker.append(data[run:pos])  # the packets before the bad one were fine
            self._protocol_error(exc)
            return
        if run < pos:
            to_broker.append(data if run == 0 and pos == size else data[run:pos])
        if pos < size:
            self._client_pending = bytearray(data[pos:])
            header = read_fixed_header(data, pos, size, max_size)
            self._client_need = header[2] - pos if header else 0

    def _on_connect(self, first_byte: int, body: bytes, raw: bytes) -> None:
        connect = decode_packet(first_byte, body, ProtocolVersion.MQTT_5)
        assert isinstance(connect, Connect)
        version = self.version = connect.protocol_version
        username = self._identity if self._identity is not None else connect.username
        self.client = ClientInfo(connect.client_id, username, self.peer, version)
        self._max_packet_size = self._limits.max_packet_size
        if version is _MQTT5:
            props = connect.properties
            self._reason_strings = props.get(PropertyId.REQUEST_PROBLEM_INFORMATION, 1) == 1
            self._client_max_packet = props.get(PropertyId.MAXIMUM_PACKET_SIZE)
        if self._authenticator is not None:
            result = self._authenticator.authenticate(connect.username, connect.password, identity=self._identity)
            if result is not AuthResult.OK:
                self._refuse_auth(result)
                return
            if self._identity is None and connect.username is not None and connect.password is not None:
                self.password_user = connect.username
        if connect.will is not None:
            will = connect.will
            verdict = self._pipeline.judge(
                Message(will.topic, will.payload, will.qos, will.retain, self.client, will.properties, is_will=True)
            ).verdict
            if not verdict.accepted:
                self._refuse_connect(verdict)
                return
        changes: dict[str, object] = {}
        # Read now, not when the TCP connection was accepted: the broker may have restarted since
        # (new generated password) or been down then.
        credentials = self._credentials() if callable(self._credentials) else self._credentials
        if credentials is not None:
            changes.update(username=credentials.username, password=credentials.password)
        if credentials is not None and connect.client_id and username is not None:
            # The broker then sees every client as the appliance's one account, so a client id alone
            # would let bob resume alice's persistent session (her subscriptions and queued messages).
            # Each identity gets its own client-id namespace at the broker.
            changes["client_id"] = broker_client_id(username, connect.client_id)
        self.broker_client_id = str(changes.get("client_id", connect.client_id))
        if changes:
            connect = replace(connect, **changes)  # type: ignore[arg-type]
            raw = encode_packet(connect, version)
        self.to_broker.append(raw)
        self._acks.wait_for(CONNACK_BARRIER, qos=0)
        self.state = State.CONNECTING
        self.want_broker = True

    def _refuse_connect(self, verdict: Verdict) -> None:
        if self.version is _MQTT5:
            connack = Connack(reason_code=verdict.reason_code, properties=self._reason_properties(verdict.reason_text))
        else:
            connack = Connack(reason_code=ConnectReturnCode.NOT_AUTHORIZED)
        self.to_client.append(encode_packet(connack, self.version))
        self._close(f"will refused: {verdict.reason_text}", broker=False)

    def _refuse_auth(self, result: AuthResult) -> None:
        bad, text = result is AuthResult.BAD_CREDENTIALS, result.value
        if self.version is _MQTT5:
            code: int = ReasonCode.BAD_USER_NAME_OR_PASSWORD if bad else ReasonCode.NOT_AUTHORIZED
        else:
            code = ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD if bad else ConnectReturnCode.NOT_AUTHORIZED
        self.to_client.append(encode_packet(Connack(reason_code=code), self.version))
        assert self.client is not None
        self.events.append(("auth_failed", {"client_id": self.client.client_id, "username": self.client.username,
                                            "peer": self.peer, "reason": text}))
        self.counts.append("auth_failures:" + ("bad_credentials" if bad else "not_authorized"))
        self._close(f"authentication failed: {text}", broker=False)

    def _on_subscribe(self, first_byte: int, body: bytes) -> bytes | bool | None:
        """Filter a SUBSCRIBE by the ACL and the subscription limit: True to relay it as it is,
        bytes to relay instead (denied filters cut out), None when the proxy answered it whole."""
        subscribe = decode_packet(first_byte, body, self.version)  # type: ignore[arg-type]
        assert isinstance(subscribe, Subscribe) and self.client is not None
        v5 = self.version is _MQTT5
        codes: list[int | None] = []
        limit = self._limits.max_subscriptions
        for subscription in subscribe.subscriptions:
            topic_filter = subscription.topic_filter
            if self._access is not None and not self._access.can_subscribe(self.client.username, self.client.client_id, topic_filter):
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else _V3_SUBACK_FAILURE)
                self.counts.append("acl_denied:subscribe")
                self.events.append(("acl_denied", {"client_id": self.client.client_id, "username": self.client.username,
                                                   "peer": self.peer, "action": "subscribe", "topic_filter": topic_filter}))
            elif limit and topic_filter not in self._subscriptions and len(self._subscriptions) >= limit:
                codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else _V3_SUBACK_FAILURE)
                self._limit_exceeded("subscriptions", f"more than {limit} subscriptions")
            else:
                codes.append(None)
                if limit or self._access is not None:  # granted filters: counted, and re-checked on reload
                    self._subscriptions.add(topic_filter)
        relayed = tuple(s.topic_filter for s, code in zip(subscribe.subscriptions, codes, strict=True) if code is None)
        if all(code is None for code in codes):
            # Remembered so that a filter the broker refuses stops counting against the limit.
            self._suback_merges.setdefault(subscribe.packet_id, deque()).append((None, relayed))
            return True
        if all(code is not None for code in codes):
            suback = Suback(subscribe.packet_id, tuple(code for code in codes if code is not None))
            # Behind the CONNACK (and earlier acks) like any ack of the proxy's own.
            self._acks.inject(encode_packet(suback, self.version), 0, self.to_client, publish=False)  # type: ignore[arg-type]
            return None
        # FIFO per packet id: a client may (wrongly) reuse an id before its SUBACK came back.
        self._suback_merges.setdefault(subscribe.packet_id, deque()).append((codes, relayed))
        kept = tuple(s for s, code in zip(subscribe.subscriptions, codes, strict=True) if code is None)
        return encode_packet(replace(subscribe, subscriptions=kept), self.version)  # type: ignore[arg-type]

    def _limit_exceeded(self, limit: str, text: str) -> None:
        self.counts.append("limit_exceeded:" + limit)
        client_id = self.client.client_id if self.client is not None else None
        self.events.append(("limit_exceeded", {"client_id": client_id, "peer": self.peer, "limit": limit, "detail": text}))

    def _on_publish(self, first_byte: int, body: bytes) -> bytes | bool | None:
        """Judge one PUBLISH: True to relay it as it is, bytes to relay instead, None to drop it."""
        publish = decode_publish(first_byte, body, self.version)
        if publish.qos == 2 and self._proxy_qos2:
            # The id of a QoS 2 message the proxy refused is free again (MQTT 5 §4.3.3 ends that flow
            # at a failed PUBREC): its next PUBREL belongs to this new message.
            self._proxy_qos2.discard(publish.packet_id)  # type: ignore[arg-type]
        topic = publish.topic
        alias = None
        if self.version is _MQTT5 and publish.properties:
            alias = publish.properties.get(PropertyId.TOPIC_ALIAS)
            if alias is not None:
                topic = self._resolve_alias(alias, topic)
        assert self.client is not None
        if publish.qos and self._limits.max_inflight and self._inflight() >= self._limits.max_inflight:
            self._limit_exceeded("inflight", f"more than {self._limits.max_inflight} unacknowledged QoS 1/2 messages")
            if self.version is _MQTT5:
                self.to_client.append(encode_packet(Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED), _MQTT5))
            self._close("receive maximum exceeded")
            return None
        if self._limits.message_rate:
            self._take_token()
        verdict, ticket = self._pipeline.judge(
            Message(topic, publish.payload, publish.qos, publish.retain, self.client, publish.properties, False, time.time())
        )
        # The message log's sequence number of this message's verdict: its ack waits until it is durable.
        seq = ticket if self._durability is not None and publish.qos else 0
        if verdict.accepted:
            if publish.qos == 2:
                # In flight until the broker's PUBCOMP, not just its PUBREC (MQTT 5 Receive Maximum).
                self._qos2_open.add(publish.packet_id)  # type: ignore[arg-type]
                self._acks.wait_for(publish.packet_id, seq, counted=False, qos=2)  # type: ignore[arg-type]
            elif publish.qos:
                self._acks.wait_for(publish.packet_id, seq)  # type: ignore[arg-type]
            if alias is not None and alias in self._stale_aliases:
                self._stale_aliases.discard(alias)
                if not publish.topic:
                    return encode_packet(replace(publish, topic=topic), _MQTT5)
            return True
        if alias is not None and publish.topic:
            self._stale_aliases.add(alias)
        self._reject(publish.qos, publish.packet_id, verdict, seq)
        return None

    def _inflight(self) -> int:
        return self._acks.publishes + len(self._qos2_open)

    def _take_token(self) -> None:
        limits = self._limits
        now = self._clock()
        burst = max(limits.message_burst, 1)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * limits.message_rate)
        self._tokens_at = now
        self._tokens -= 1
        if self._tokens < 0:
            self.pause_for = min(-self._tokens / limits.message_rate, MAX_THROTTLE_PAUSE_S)
            self.counts.append("limit_exceeded:message_rate")
            if not self._throttled:  # one audit event per connection; the metric counts every pause
                self._throttled = True
                self._limit_exceeded("message_rate", f"more than {limits.message_rate:g} messages/s: throttled")
                self.counts.pop()

    def _resolve_alias(self, alias: int, topic: str) -> str:
        if alias == 0 or alias > self._alias_maximum:
            raise RemoteProtocolError(f"topic alias {alias} out of range", ReasonCode.TOPIC_ALIAS_INVALID)
        if topic:
            self._aliases[alias] = topic
            return topic
        known = self._aliases.get(alias)
        if known is None:
            raise RemoteProtocolError(f"topic alias {alias} was never set", ReasonCode.PROTOCOL_ERROR)
        return known

    def _reject(self, qos: int, packet_id: int | None, verdict: Verdict, seq: int = 0) -> None:
        v5 = self.version is _MQTT5
        if verdict.action == "disconnect":
            if v5:
                self.to_client.append(
                    encode_packet(Disconnect(verdict.reason_code, self._reason_properties(verdict.reason_text)), _MQTT5)
                )
            self._close(f"disconnected by policy: {verdict.reason_text}")
            return
        if qos == 0:
            return
        assert packet_id is not None
        if v5:
            props = self._reason_properties(verdict.reason_text)
            ack = Puback(packet_id, verdict.reason_code, props) if qos == 1 else Pubrec(packet_id, verdict.reason_code, props)
        else:
            # 3.1.1 has no way to say "rejected": a plain ack stops the publisher from retrying.
            ack = Puback(packet_id) if qos == 1 else Pubrec(packet_id)
        if qos == 2:
            # A 3.1.1 client answers our PUBREC with PUBREL, and so do some MQTT 5 clients (paho)
            # even after a failure code: the broker never saw this id, so the PUBCOMP is ours.
            self._proxy_qos2.add(packet_id)
        self._acks.inject(encode_packet(ack, self.version), seq, self.to_client)

    def _reason_properties(self, text: str) -> Properties:
        if not self._reason_strings or not text:
            return Properties.EMPTY
        text = text[:MAX_REASON_STRING]
        # The client's Maximum Packet Size bounds what we may send it; leave room for the header.
        if self._client_max_packet is not None and len(text.encode()) + 16 > self._client_max_packet:
            return Properties.EMPTY
        return Properties(((PropertyId.REASON_STRING, text),))

    # -- broker → client -------------------------------------------------------------------------

    def broker_data(self, data: bytes) -> None:
        if self._broker_pending:
            self._broker_pending += data
            if len(self._broker_pending) < self._broker_need:
                return
            data = bytes(self._broker_pending)
            self._broker_pending = bytearray()
        size = len(data)
        pos = run = 0
        to_client = self.to_client
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
                elif kind == _SUBACK and self._suback_merges:
                    packet_id = int.from_bytes(data[body : body + 2], "big")
                    pending = self._suback_merges.get(packet_id)
                    codes, relayed = pending.popleft() if pending else (None, ())
                    if pending is not None and not pending:
                        del self._suback_merges[packet_id]
                    if relayed:
                        self._forget_refused(first, data[body:end], relayed)
                    if codes is not None:
                        if run < pos:
                            to_client.append(data[run:pos])
                        run = end
                        to_client.append(self._merge_suback(first, data[body:end], codes))
                elif kind == _PUBCOMP and self._qos2_open:
                    self._qos2_open.discard(int.from_bytes(data[body : body + 2], "big"))
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
            return
        if run < pos:
            to_client.append(data if run == 0 and pos == size else data[run:pos])
        if acks.broken:
            self._close_if_unacknowledgeable()
        if pos < size:
            self._broker_pending = bytearray(data[pos:])
            header = read_fixed_header(data, pos, size)
            self._broker_need = header[2] - pos if header else 0

    def _forget_refused(self, first_byte: int, body: bytes, relayed: tuple[str, ...]) -> None:
        """Filters the broker refused are not subscriptions: they neither count nor get re-checked."""
        suback = decode_packet(first_byte, body, self.version)  # type: ignore[arg-type]
        assert isinstance(suback, Suback)
        for topic_filter, code in zip(relayed, suback.reason_codes, strict=False):
            if code >= 0x80:
                self._subscriptions.discard(topic_filter)

    def _merge_suback(self, first_byte: int, body: bytes, codes: list[int | None]) -> bytes:
        """The broker answered the filters we kept: put the proxy's refusals back in their places."""
        suback = decode_packet(first_byte, body, self.version)  # type: ignore[arg-type]
        assert isinstance(suback, Suback)
        broker_codes = iter(suback.reason_codes)
        merged = tuple(code if code is not None else next(broker_codes, ReasonCode.UNSPECIFIED_ERROR) for code in codes)
        return encode_packet(replace(suback, reason_codes=merged), self.version)  # type: ignore[arg-type]

    def _on_connack(self, first_byte: int, body: bytes, raw: bytes) -> None:
        connack = decode_packet(first_byte, body, self.version)
        assert isinstance(connack, Connack)
        limit = self._limits.max_inflight
        if self.version is _MQTT5 and connack.reason_code == 0:
            # Tell the client the in-flight and packet size limits so a well-behaved one never hits them.
            properties = connack.properties
            if limit and properties.get(PropertyId.RECEIVE_MAXIMUM, 65535) > limit:  # type: ignore[operator]
                properties = properties.with_(PropertyId.RECEIVE_MAXIMUM, limit)
            max_packet = self._limits.max_packet_size
            if properties.get(PropertyId.MAXIMUM_PACKET_SIZE, max_packet + 1) > max_packet:  # type: ignore[operator]
                properties = properties.with_(PropertyId.MAXIMUM_PACKET_SIZE, max_packet)
            if properties is not connack.properties:
                connack = replace(connack, properties=properties)
                raw = encode_packet(connack, _MQTT5)
        self.to_client.append(raw)
        if connack.reason_code != 0:
            self._close(f"broker refused the connection (code {connack.reason_code})", broker=False)
            return
        self.state = State.CONNECTED
        if self.version is _MQTT5:
            self._alias_maximum = connack.properties.get(PropertyId.TOPIC_ALIAS_MAXIMUM, 0)
            assigned = connack.properties.get(PropertyId.ASSIGNED_CLIENT_IDENTIFIER)
            if assigned is not None and self.client is not None:
                self.client = replace(self.client, client_id=assigned)
        self._acks.acked(CONNACK_BARRIER, b"", self.to_client)

    def release_acks(self) -> None:
        """The message log made more records durable: send the acks that were waiting for them."""
        queued = len(self.to_client)
        self._acks.release(self.to_client)
        if len(self.to_client) > queued:
            self._acks_released_at = self._clock()
        self._close_if_unacknowledgeable()

    def _failed_ack(self, packet_id: int, qos: int) -> bytes | None:
        """An accepted message's record could not be stored: what its publisher gets instead of the
        broker's success ack. MQTT 5 QoS 1: PUBACK 0x97 Quota exceeded (the client may resend).
        Otherwise there is no honest ack to give: None, and the connection is closed, so the client
        resends after reconnecting (MQTT 3.1.1 §4.4)."""
        self.counts.append("audit_unavailable")
        if self.version is _MQTT5 and qos == 1:
            return encode_packet(
                Puback(packet_id, ReasonCode.QUOTA_EXCEEDED, self._reason_properties("the message log cannot store messages")),
                _MQTT5,
            )
        return None

    def _close_if_unacknowledgeable(self) -> None:
        if self._acks.broken:
            if self.version is _MQTT5:
                self.to_client.append(encode_packet(Disconnect(ReasonCode.QUOTA_EXCEEDED), _MQTT5))
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
        acks = self._acks
        publishes = acks.publishes
        return (publishes >= SYNC_HINT_INFLIGHT or (self._ack_clocked and publishes > 0)) and acks.awaiting_durability

    # -- connection events -----------------------------------------------------------------------

    def broker_unavailable(self) -> None:
        """The broker leg could not be opened: tell the client the server is unavailable."""
        if self.state is State.CONNECTING and self.version is not None:
            code = ReasonCode.SERVER_UNAVAILABLE if self.version is _MQTT5 else ConnectReturnCode.SERVER_UNAVAILABLE
            self.to_client.append(encode_packet(Connack(reason_code=code), self.version))
        self._close("broker unavailable", broker=False)

    def connect_timeout(self) -> None:
        if self.state is State.AWAIT_CONNECT:
            self._close("no CONNECT within the connect timeout", broker=False)

    def denied_subscriptions(self) -> list[str]:
        """Filters this client was granted that the access rules in force now refuse."""
        if self._access is None or self.client is None:
            return []
        client = self.client
        return sorted(f for f in self._subscriptions if not self._access.can_subscribe(client.username, client.client_id, f))

    def revoke(self, reason: str) -> None:
        """Access was withdrawn (a reload): tell MQTT 5 clients, then close."""
        if self.state is State.CONNECTED and self.version is _MQTT5:
            self.to_client.append(encode_packet(Disconnect(ReasonCode.NOT_AUTHORIZED), _MQTT5))
        self._close(f"access revoked: {reason}")

    def shutdown(self) -> None:
        """The appliance is stopping: tell MQTT 5 clients why, then close."""
        if self.state is State.CONNECTED and self.version is _MQTT5:
            self.to_client.append(encode_packet(Disconnect(ReasonCode.SERVER_SHUTTING_DOWN), _MQTT5))
        self._close("appliance shutting down")

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        if exc.reason_code == ReasonCode.PACKET_TOO_LARGE:
            self._limit_exceeded("connect_size" if self.state is State.AWAIT_CONNECT else "packet_size", exc.msg)
        if self.state is State.CONNECTED and self.version is _MQTT5:
            self.to_client.append(encode_packet(Disconnect(exc.reason_code), _MQTT5))
        elif self.state is State.CONNECTING:
            # The CONNECT and a bad packet came together, before the broker's CONNACK: refuse the
            # connection with the reason (MQTT 5), and give the broker nothing of it.
            if self.version is _MQTT5:
                code = exc.reason_code if exc.reason_code in _CONNACK_ERRORS else ReasonCode.PROTOCOL_ERROR
                self.to_client.append(encode_packet(Connack(reason_code=code, properties=self._reason_properties(exc.msg)), _MQTT5))
            self.to_broker.clear()
            self.want_broker = False
        elif self.state is State.AWAIT_CONNECT and exc.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            # What mosquitto answers too: the 3.1.1 CONNACK every version can read.
            self.to_client.append(encode_packet(Connack(reason_code=ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION), ProtocolVersion.MQTT_3_1_1))
        self._close(f"protocol error: {exc}", broker=self.state is not State.AWAIT_CONNECT)

    def _close(self, reason: str, *, broker: bool = True) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason = reason
        self.close_client = True
        self.close_broker = broker
        self.want_broker = self.want_broker and broker

    @property
    def client_disconnected(self) -> bool:
        """The client said DISCONNECT before closing (so no will is due)."""
        return self._client_disconnected

    def describe(self) -> str:
        if self.client is None:
            return self.peer
        return f"{self.client.client_id!r} ({self.peer})"
