"""One client's protocol logic, without I/O (see appliance/proxy/__init__.py for the vocabulary).

The server feeds bytes in with `client_data()` / `broker_data()` and after each call takes what
the session queued in `to_client` / `to_broker` (one write per leg per batch) and looks at the
flags: `want_broker` (open the broker leg), `close_client`, `close_broker`.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace

from appliance.mqtt import (
    NEED_DATA,
    Connack,
    Connect,
    ConnectReturnCode,
    Disconnect,
    FrameReader,
    PacketType,
    Properties,
    PropertyId,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Pubrec,
    ReasonCode,
    RemoteProtocolError,
    decode_packet,
    decode_publish,
    encode_packet,
)
from appliance.pipeline import ClientInfo, Message, Pipeline, Verdict
from appliance.proxy.acks import CONNACK_BARRIER, AckOrder

log = logging.getLogger(__name__)

_PUBLISH = PacketType.PUBLISH
_CONNECT = PacketType.CONNECT
_PUBREL = PacketType.PUBREL
_PUBACK = PacketType.PUBACK
_PUBREC = PacketType.PUBREC
_CONNACK = PacketType.CONNACK
_DISCONNECT = PacketType.DISCONNECT
_MQTT5 = ProtocolVersion.MQTT_5

# Reason strings are a courtesy to the publisher; keep them short.
MAX_REASON_STRING = 200


class State(enum.Enum):
    AWAIT_CONNECT = "await-connect"
    CONNECTING = "connecting"  # CONNECT forwarded, waiting for the broker's CONNACK
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_packet_size: int = 1024 * 1024
    max_connect_size: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class BrokerCredentials:
    """Credentials the proxy presents to the broker instead of the client's own."""

    username: str
    password: bytes | None


class Session:
    __slots__ = (
        "peer", "client", "version", "state", "close_reason",
        "to_client", "to_broker", "want_broker", "close_client", "close_broker",
        "_pipeline", "_limits", "_credentials", "_client_frames", "_broker_frames", "_acks",
        "_aliases", "_stale_aliases", "_alias_maximum", "_proxy_qos2", "_reason_strings",
        "_client_max_packet", "_client_disconnected",
    )

    def __init__(
        self,
        *,
        peer: str,
        pipeline: Pipeline,
        limits: SessionLimits = SessionLimits(),
        broker_credentials: BrokerCredentials | None = None,
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
        self._client_frames = FrameReader(limits.max_connect_size)
        self._broker_frames = FrameReader()
        self._acks = AckOrder()
        self._aliases: dict[int, str] = {}
        # Aliases whose topic the broker does not know (set by a message we rejected).
        self._stale_aliases: set[int] = set()
        self._alias_maximum = 0
        # QoS 2 packet ids the proxy answered itself: their PUBREL is ours to answer.
        self._proxy_qos2: set[int] = set()
        self._reason_strings = True
        self._client_max_packet: int | None = None
        self._client_disconnected = False

    # -- client → broker -------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        frames = self._client_frames
        frames.feed(data)
        to_broker = self.to_broker
        try:
            while True:
                frame = frames.next_frame()
                if frame is NEED_DATA:
                    return
                kind = frame.first_byte >> 4
                if self.state is State.AWAIT_CONNECT:
                    if kind != _CONNECT:
                        raise RemoteProtocolError("the first packet must be CONNECT", ReasonCode.PROTOCOL_ERROR)
                    self._on_connect(frame.first_byte, frame.body, frame.raw)
                elif kind == _PUBLISH:
                    self._on_publish(frame.first_byte, frame.body, frame.raw)
                elif kind == _CONNECT:
                    raise RemoteProtocolError("second CONNECT on one connection", ReasonCode.PROTOCOL_ERROR)
                elif kind == _PUBREL and self._proxy_qos2:
                    self._on_pubrel(frame.first_byte, frame.body, frame.raw)
                else:
                    if kind == _DISCONNECT:
                        self._client_disconnected = True
                    to_broker.append(frame.raw)
                if self.state is State.CLOSED:
                    return
        except RemoteProtocolError as exc:
            self._protocol_error(exc)

    def _on_connect(self, first_byte: int, body: bytes, raw: bytes) -> None:
        connect = decode_packet(first_byte, body, ProtocolVersion.MQTT_5)
        assert isinstance(connect, Connect)
        version = self.version = connect.protocol_version
        self.client = ClientInfo(connect.client_id, connect.username, self.peer, version)
        self._client_frames.max_packet_size = self._limits.max_packet_size
        if version is _MQTT5:
            props = connect.properties
            self._reason_strings = props.get(PropertyId.REQUEST_PROBLEM_INFORMATION, 1) == 1
            self._client_max_packet = props.get(PropertyId.MAXIMUM_PACKET_SIZE)
        if connect.will is not None:
            will = connect.will
            verdict = self._pipeline.judge(
                Message(will.topic, will.payload, will.qos, will.retain, self.client, will.properties, is_will=True)
            )
            if not verdict.accepted:
                self._refuse_connect(verdict)
                return
        if self._credentials is not None:
            connect = replace(connect, username=self._credentials.username, password=self._credentials.password)
            raw = encode_packet(connect, version)
        self.to_broker.append(raw)
        self._acks.wait_for(CONNACK_BARRIER)
        self.state = State.CONNECTING
        self.want_broker = True

    def _refuse_connect(self, verdict: Verdict) -> None:
        if self.version is _MQTT5:
            connack = Connack(reason_code=verdict.reason_code, properties=self._reason_properties(verdict.reason_text))
        else:
            connack = Connack(reason_code=ConnectReturnCode.NOT_AUTHORIZED)
        self.to_client.append(encode_packet(connack, self.version))
        self._close(f"will refused: {verdict.reason_text}", broker=False)

    def _on_publish(self, first_byte: int, body: bytes, raw: bytes) -> None:
        publish = decode_publish(first_byte, body, self.version)
        topic = publish.topic
        alias = None
        if self.version is _MQTT5 and publish.properties:
            alias = publish.properties.get(PropertyId.TOPIC_ALIAS)
            if alias is not None:
                topic = self._resolve_alias(alias, topic)
        assert self.client is not None
        verdict = self._pipeline.judge(
            Message(topic, publish.payload, publish.qos, publish.retain, self.client, publish.properties)
        )
        if verdict.accepted:
            if alias is not None and alias in self._stale_aliases:
                if not publish.topic:
                    raw = encode_packet(replace(publish, topic=topic), _MQTT5)
                self._stale_aliases.discard(alias)
            self.to_broker.append(raw)
            if publish.qos:
                self._acks.wait_for(publish.packet_id)  # type: ignore[arg-type]
            return
        if alias is not None and publish.topic:
            self._stale_aliases.add(alias)
        self._reject(publish.qos, publish.packet_id, verdict)

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

    def _reject(self, qos: int, packet_id: int | None, verdict: Verdict) -> None:
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
        self._acks.inject(encode_packet(ack, self.version), self.to_client)

    def _reason_properties(self, text: str) -> Properties:
        if not self._reason_strings or not text:
            return Properties.EMPTY
        text = text[:MAX_REASON_STRING]
        # The client's Maximum Packet Size bounds what we may send it; leave room for the header.
        if self._client_max_packet is not None and len(text.encode()) + 16 > self._client_max_packet:
            return Properties.EMPTY
        return Properties(((PropertyId.REASON_STRING, text),))

    def _on_pubrel(self, first_byte: int, body: bytes, raw: bytes) -> None:
        packet_id = int.from_bytes(body[:2], "big")
        if packet_id in self._proxy_qos2:
            self._proxy_qos2.discard(packet_id)
            self.to_client.append(encode_packet(Pubcomp(packet_id), self.version))
        else:
            self.to_broker.append(raw)

    # -- broker → client -------------------------------------------------------------------------

    def broker_data(self, data: bytes) -> None:
        frames = self._broker_frames
        frames.feed(data)
        to_client = self.to_client
        acks = self._acks
        try:
            while True:
                frame = frames.next_frame()
                if frame is NEED_DATA:
                    return
                kind = frame.first_byte >> 4
                if (kind == _PUBACK or kind == _PUBREC) and len(acks):
                    to_client.append(frame.raw)
                    offset = frame.body_offset
                    acks.acked(int.from_bytes(frame.raw[offset : offset + 2], "big"), to_client)
                elif kind == _CONNACK and self.state is State.CONNECTING:
                    self._on_connack(frame.first_byte, frame.body, frame.raw)
                else:
                    to_client.append(frame.raw)
        except RemoteProtocolError as exc:
            log.error("broker sent a malformed packet to %s: %s", self.describe(), exc)
            self._close("malformed packet from the broker")

    def _on_connack(self, first_byte: int, body: bytes, raw: bytes) -> None:
        connack = decode_packet(first_byte, body, self.version)
        assert isinstance(connack, Connack)
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
        self._acks.acked(CONNACK_BARRIER, self.to_client)

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

    def shutdown(self) -> None:
        """The appliance is stopping: tell MQTT 5 clients why, then close."""
        if self.state is State.CONNECTED and self.version is _MQTT5:
            self.to_client.append(encode_packet(Disconnect(ReasonCode.SERVER_SHUTTING_DOWN), _MQTT5))
        self._close("appliance shutting down")

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        if self.state is State.CONNECTED and self.version is _MQTT5:
            self.to_client.append(encode_packet(Disconnect(exc.reason_code), _MQTT5))
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
