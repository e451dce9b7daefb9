"""Session transcripts: bytes in from either leg, bytes and requests out; no sockets."""

from __future__ import annotations

import pytest

from appliance.mqtt import (
    NEED_DATA, Connack, Connect, Decoder, Disconnect, Pingreq, Properties, PropertyId, ProtocolVersion,
    Puback, Pubcomp, Publish, Pubrec, Pubrel, ReasonCode, Will, encode_packet,
)
from appliance.pipeline import ClientInfo, CountingSink, Message, Pipeline, Reason, Verdict
from appliance.proxy.commands import (
    CloseBroker, CloseClient, Count, OpenBroker, Pause, Record, SendToBroker, SendToClient,
)
from appliance.proxy.session import BrokerCredentials, Session, SessionLimits, State
from appliance.names import Metric

V3 = ProtocolVersion.MQTT_3_1_1
V5 = ProtocolVersion.MQTT_5


class RejectBad:
    name = "bad"

    def __init__(self, action: str = "reject"):
        self.action = action

    def check(self, message: Message) -> Verdict | None:
        if message.payload.startswith(b"bad"):
            return Verdict.reject(Reason("bad", "bad payload"), action=self.action)  # type: ignore[arg-type]
        return None


def decode_all(data: list[bytes], version: ProtocolVersion) -> list[object]:
    decoder = Decoder(version=version)
    decoder.receive_data(b"".join(data))
    packets = []
    while (packet := decoder.next_packet()) is not NEED_DATA:
        packets.append(packet)
    return packets


class Transcript:
    """Drives one Session as the server would, keeping what it sends each way and the other
    commands. The broker leg opens as soon as the session asks (`open_broker=False`: never)."""

    def __init__(self, version: ProtocolVersion = V5, checks=(), *, open_broker: bool = True, **session_kwargs):  # noqa: ANN001
        self.version = version
        self.sink = CountingSink()
        self.open_broker = open_broker
        self.session = Session(peer="192.0.2.7:5555", pipeline=Pipeline(checks, [self.sink]), **session_kwargs)
        self.sent_to_client: list[bytes] = []
        self.sent_to_broker: list[bytes] = []
        self.commands: list[object] = []  # every command but the two sends, in order

    def run(self, commands: list[object]) -> None:
        """Execute what one input of the session returned."""
        for command in commands:
            if isinstance(command, SendToClient):
                self.sent_to_client.append(command.data)
            elif isinstance(command, SendToBroker):
                self.sent_to_broker.append(command.data)
            else:
                self.commands.append(command)
                if isinstance(command, OpenBroker) and self.open_broker:
                    self.run(self.session.broker_connected())

    def client(self, *packets: object) -> None:
        self.client_bytes(b"".join(encode_packet(p, self.version) for p in packets))

    def client_bytes(self, data: bytes) -> None:
        self.run(self.session.client_data(data))

    def broker(self, *packets: object) -> None:
        self.broker_bytes(b"".join(encode_packet(p, self.version) for p in packets))

    def broker_bytes(self, data: bytes) -> None:
        self.run(self.session.broker_data(data))

    def _take(self, data: list[bytes]) -> list[object]:
        packets = decode_all(data, self.version)
        data.clear()
        return packets

    def to_broker(self) -> list[object]:
        return self._take(self.sent_to_broker)

    def to_client(self) -> list[object]:
        return self._take(self.sent_to_client)

    def _of(self, kind: type) -> list:  # noqa: ANN201
        return [c for c in self.commands if isinstance(c, kind)]

    @property
    def counts(self) -> list[str]:
        return [c.key for c in self._of(Count)]

    @property
    def events(self) -> list[tuple[str, dict[str, object]]]:
        return [(c.kind, c.detail) for c in self._of(Record)]

    @property
    def pauses(self) -> list[float]:
        return [c.seconds for c in self._of(Pause)]

    @property
    def opened_broker(self) -> bool:
        return bool(self._of(OpenBroker))

    @property
    def closed_client(self) -> bool:
        return bool(self._of(CloseClient))

    @property
    def closed_broker(self) -> bool:
        return bool(self._of(CloseBroker))

    def connect(self, **kwargs: object) -> None:
        self.client(Connect(client_id="dev", protocol_version=self.version, **kwargs))
        assert self.opened_broker
        [connect] = self.to_broker()
        assert isinstance(connect, Connect)
        props = Properties(((PropertyId.TOPIC_ALIAS_MAXIMUM, 10),)) if self.version is V5 else Properties.EMPTY
        self.broker(Connack(properties=props))
        if self.version is V5:  # the proxy adds its packet size limit
            props = props.with_(PropertyId.MAXIMUM_PACKET_SIZE, self.session._limits.max_packet_size)
        assert self.to_client() == [Connack(properties=props)]
        assert self.session.state is State.CONNECTED


@pytest.mark.parametrize("version", [V3, V5])
def test_accepted_publish_is_relayed_byte_for_byte(version):
    t = Transcript(version)
    t.connect()
    publish = Publish("a/b", b'{"x":1}', qos=1, packet_id=5)
    t.client(publish)
    assert t.sent_to_broker == [encode_packet(publish, version)]
    assert t.sink.counts["accept"] == 1
    assert t.session.client == t.session.client.__class__("dev", None, "192.0.2.7:5555", version)


def test_peer_address_is_kept_for_the_pipeline():
    t = Transcript(V5)
    t.connect(username="alice")
    t.client(Publish("a", b"x"))
    message, _ = t.sink.recent[-1]
    assert (message.client.peer, message.client.username, message.client.client_id) == ("192.0.2.7:5555", "alice", "dev")


def test_nothing_reaches_the_client_before_connack():
    t = Transcript(V3, [RejectBad()])
    # A pipelining client: CONNECT and a rejected PUBLISH in one segment.
    t.client(Connect(client_id="dev"), Publish("t", b"bad", qos=1, packet_id=1))
    assert t.to_client() == []
    t.broker(Connack())
    assert t.to_client() == [Connack(), Puback(1)]


def test_injected_ack_waits_for_earlier_broker_acks():
    t = Transcript(V5, [RejectBad()])
    t.connect()
    t.client(
        Publish("t", b"ok", qos=1, packet_id=1),
        Publish("t", b"bad", qos=1, packet_id=2),
        Publish("t", b"ok", qos=2, packet_id=3),
        Publish("t", b"bad", qos=2, packet_id=4),
    )
    assert t.to_client() == []
    t.broker(Puback(1))
    assert t.to_client() == [Puback(1), Puback(2, ReasonCode.PAYLOAD_FORMAT_INVALID, Properties(((PropertyId.REASON_STRING, "bad payload"),)))]
    t.broker(Pubrec(3))
    [rec3, rec4] = t.to_client()
    assert rec3 == Pubrec(3) and (rec4.packet_id, rec4.reason_code) == (4, ReasonCode.PAYLOAD_FORMAT_INVALID)


def test_rejection_without_pending_acks_is_answered_at_once():
    t = Transcript(V5, [RejectBad()])
    t.connect()
    t.client(Publish("t", b"bad", qos=1, packet_id=9))
    [ack] = t.to_client()
    assert (ack.packet_id, ack.reason_code) == (9, ReasonCode.PAYLOAD_FORMAT_INVALID)
    assert t.to_broker() == []


def test_reason_string_omitted_when_client_asks_for_no_problem_information():
    t = Transcript(V5, [RejectBad()])
    t.connect(properties=Properties(((PropertyId.REQUEST_PROBLEM_INFORMATION, 0),)))
    t.client(Publish("t", b"bad", qos=1, packet_id=9))
    assert t.to_client() == [Puback(9, ReasonCode.PAYLOAD_FORMAT_INVALID)]


@pytest.mark.parametrize("version", [V3, V5])
def test_rejected_qos2_pubrel_is_answered_by_the_proxy(version):
    t = Transcript(version, [RejectBad()])
    t.connect()
    t.client(Publish("t", b"bad", qos=2, packet_id=4))
    [rec] = t.to_client()
    assert isinstance(rec, Pubrec)
    t.client(Pubrel(4))
    assert t.to_client() == [Pubcomp(4)]
    assert t.to_broker() == []
    # A PUBREL for a forwarded message still goes to the broker.
    t.client(Pubrel(5))
    assert t.to_broker() == [Pubrel(5)]


def test_qos0_rejection_is_silent():
    t = Transcript(V5, [RejectBad()])
    t.connect()
    t.client(Publish("t", b"bad"), Pingreq())
    assert t.to_client() == []
    assert t.to_broker() == [Pingreq()]
    assert t.sink.counts == {"reject": 1}


def test_disconnect_policy_closes_the_client_with_the_reason_code():
    t = Transcript(V5, [RejectBad(action="disconnect")])
    t.connect()
    t.client(Publish("t", b"bad", qos=1, packet_id=1), Publish("t", b"ok", qos=1, packet_id=2))
    [disconnect] = t.to_client()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID
    assert t.to_broker() == []  # nothing after the offending message is relayed
    assert t.closed_client and t.closed_broker


def test_topic_alias_is_resolved_for_the_pipeline():
    t = Transcript(V5)
    t.connect()
    alias = Properties(((PropertyId.TOPIC_ALIAS, 3),))
    t.client(Publish("plant/speed", b"1", properties=alias), Publish("", b"2", properties=alias))
    assert [m.topic for m, _ in t.sink.recent] == ["plant/speed", "plant/speed"]
    assert t.to_broker() == [Publish("plant/speed", b"1", properties=alias), Publish("", b"2", properties=alias)]


def test_alias_set_by_a_rejected_message_is_sent_in_full_to_the_broker():
    t = Transcript(V5, [RejectBad()])
    t.connect()
    alias = Properties(((PropertyId.TOPIC_ALIAS, 1),))
    t.client(Publish("a/one", b"ok", properties=alias))  # broker learns alias 1 = a/one
    t.client(Publish("a/two", b"bad", properties=alias))  # rejected: broker still has a/one
    t.client(Publish("", b"ok", properties=alias))  # means a/two
    assert t.to_broker() == [Publish("a/one", b"ok", properties=alias), Publish("a/two", b"ok", properties=alias)]
    t.client(Publish("", b"ok again", properties=alias))  # the broker knows now: relayed as is
    assert t.to_broker() == [Publish("", b"ok again", properties=alias)]


@pytest.mark.parametrize("first_rejected", [False, True])
def test_alias_only_publish_keeps_qos_flags_packet_id_and_properties(first_rejected: bool) -> None:
    """QoS 1, DUP and RETAIN on an alias-only PUBLISH: relayed as is when the broker knows the
    alias; re-encoded with the full topic (session.py) when the message that set it was rejected,
    and then every field but the topic is the client's."""
    t = Transcript(V5, [RejectBad()])
    t.connect()
    props = Properties(((PropertyId.TOPIC_ALIAS, 1), (PropertyId.CONTENT_TYPE, "application/json")))
    first = Publish("a/one", b"ok", qos=1, packet_id=1, properties=props)
    t.client(first)
    assert t.to_broker() == [first]  # the broker learns alias 1 = a/one
    if first_rejected:
        t.client(Publish("a/two", b"bad", qos=1, packet_id=2, properties=props))  # the broker still has a/one
        assert t.to_broker() == []
    alias_only = Publish("", b"ok", qos=1, retain=True, dup=True, packet_id=3, properties=props)
    t.client(alias_only)
    topic = "a/two" if first_rejected else "a/one"
    assert [m.topic for m, _ in t.sink.recent][-1] == topic
    if first_rejected:
        assert t.to_broker() == [Publish(topic, b"ok", qos=1, retain=True, dup=True, packet_id=3, properties=props)]
    else:
        assert t.sent_to_broker == [encode_packet(alias_only, V5)]  # byte for byte
        assert t.to_broker() == [alias_only]
    t.broker(Puback(1), Puback(3))
    acks = t.to_client()
    assert all(isinstance(ack, Puback) for ack in acks)
    assert [ack.packet_id for ack in acks] == ([1, 2, 3] if first_rejected else [1, 3])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("alias", "code"), [(0, ReasonCode.TOPIC_ALIAS_INVALID), (11, ReasonCode.TOPIC_ALIAS_INVALID), (2, ReasonCode.PROTOCOL_ERROR)])
def test_bad_topic_alias_is_a_protocol_error(alias, code):
    t = Transcript(V5)
    t.connect()
    # PUBLISH, QoS 0, empty topic, properties: TOPIC_ALIAS (0x23) = alias; built by hand since the
    # codec refuses to encode alias 0.
    body = b"\x00\x00" + b"\x03\x23" + alias.to_bytes(2, "big") + b"x"
    t.client_bytes(bytes([0x30, len(body)]) + body)
    assert t.to_client() == [Disconnect(code)]
    assert t.closed_client


@pytest.mark.parametrize("version", [V3, V5])
def test_rejected_will_refuses_the_connection(version):
    t = Transcript(version, [RejectBad()])
    t.client(Connect(client_id="dev", protocol_version=version, will=Will("status/dev", b"bad")))
    [connack] = t.to_client()
    assert connack.reason_code == (ReasonCode.PAYLOAD_FORMAT_INVALID if version is V5 else 5)
    assert not t.opened_broker and t.closed_client
    assert t.sink.recent[-1][0].is_will


def test_broker_credentials_replace_the_clients():
    t = Transcript(V5, broker_credentials=BrokerCredentials("appliance", b"secret"))
    t.client(Connect(client_id="dev", protocol_version=V5, username="alice", password=b"pw"))
    [connect] = t.to_broker()
    assert (connect.username, connect.password) == ("appliance", b"secret")
    assert t.session.client.username == "alice"


def test_connect_larger_than_max_connect_size_is_refused():
    t = Transcript(V5, limits=SessionLimits(max_connect_size=128))
    t.client(Connect(client_id="x" * 200, protocol_version=V5))
    assert t.to_client() == [] and t.closed_client and not t.opened_broker


def test_broker_unavailable_answers_server_unavailable():
    for version, code in ((V5, ReasonCode.SERVER_UNAVAILABLE), (V3, 3)):
        t = Transcript(version, open_broker=False)
        t.client(Connect(client_id="dev", protocol_version=version))
        t.run(t.session.broker_unavailable())
        assert t.to_client() == [Connack(reason_code=code)]
        assert t.closed_client and not t.closed_broker


def test_assigned_client_identifier_is_used():
    t = Transcript(V5)
    t.client(Connect(client_id="", protocol_version=V5))
    t.broker(Connack(properties=Properties(((PropertyId.ASSIGNED_CLIENT_IDENTIFIER, "auto-1"),))))
    assert t.session.client.client_id == "auto-1"


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_input_split_anywhere(chunk):
    t = Transcript(V3, [RejectBad()])
    data = b"".join(encode_packet(p, V3) for p in [
        Connect(client_id="dev"), Publish("t", b"ok", qos=1, packet_id=1), Publish("t", b"bad", qos=1, packet_id=2),
    ])
    for i in range(0, len(data), chunk):
        t.client_bytes(data[i : i + chunk])
    reply = encode_packet(Connack(), V3) + encode_packet(Puback(1), V3)
    for i in range(0, len(reply), chunk):
        t.broker_bytes(reply[i : i + chunk])
    assert t.to_client() == [Connack(), Puback(1), Puback(2)]
    assert [type(p) for p in t.to_broker()] == [Connect, Publish]


def test_dry_run_records_but_accepts():
    t = Transcript(V5)
    t.session = Session(peer="p", pipeline=Pipeline([RejectBad()], [t.sink], dry_run=True))
    t.connect()
    t.client(Publish("t", b"bad", qos=1, packet_id=1))
    assert t.to_broker() == [Publish("t", b"bad", qos=1, packet_id=1)]
    assert t.sink.counts == {"reject": 1}


def test_qos2_packet_id_reused_after_a_rejection_goes_to_the_broker():
    t = Transcript(V5, [RejectBad()])
    t.connect()
    t.client(Publish("t", b"bad", qos=2, packet_id=7))
    [rec] = t.to_client()
    assert rec.reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID
    # MQTT 5: the failed PUBREC ended that flow, so id 7 is free for the next message.
    t.client(Publish("t", b"good", qos=2, packet_id=7))
    assert t.to_broker() == [Publish("t", b"good", qos=2, packet_id=7)]
    t.broker(Pubrec(7))
    assert t.to_client() == [Pubrec(7)]
    t.client(Pubrel(7))
    assert t.to_broker() == [Pubrel(7)]  # the broker's flow, not the proxy's
    assert t.to_client() == []


def test_client_ids_are_namespaced_per_identity_at_the_broker():
    """Two users with the same client id get different broker sessions: bob cannot resume alice's
    persistent session (her subscriptions and queued messages) by reusing her client id."""
    seen = []
    for user in ("alice", "bob"):
        t = Transcript(V5, broker_credentials=lambda: BrokerCredentials("appliance", b"generated"))
        t.client(Connect(client_id="dev-1", protocol_version=V5, clean_start=False, username=user, password=b"pw"))
        [connect] = t.to_broker()
        seen.append(connect.client_id)
        assert (connect.username, connect.password) == ("appliance", b"generated")
        assert t.session.client.client_id == "dev-1"  # the audit log and ACLs see the client's own id
    assert seen == ["u5:alice:dev-1", "u3:bob:dev-1"]
    anonymous = Transcript(V5)
    anonymous.client(Connect(client_id="dev-1", protocol_version=V5))
    assert anonymous.to_broker()[0].client_id == "dev-1"


def test_broker_credentials_are_read_at_connect_time():
    current = {"creds": None}
    t = Transcript(V5, broker_credentials=lambda: current["creds"])
    current["creds"] = BrokerCredentials("appliance", b"after-restart")  # changed after accept
    t.client(Connect(client_id="", protocol_version=V5, username="alice", password=b"pw"))
    [connect] = t.to_broker()
    assert (connect.username, connect.password) == ("appliance", b"after-restart")


def test_a_proxy_made_suback_does_not_count_as_an_inflight_message():
    from appliance.mqtt import Subscribe, Subscription
    from appliance.security import AclCheck
    from appliance.security.acl import parse_acl

    acl = AclCheck(parse_acl("topic readwrite up/#\n"))
    t = Transcript(V5, access=acl, checks=[acl], limits=SessionLimits(max_inflight=2))
    t.client(Connect(client_id="dev", protocol_version=V5))
    t.to_broker()
    t.broker(Connack(properties=Properties(((PropertyId.TOPIC_ALIAS_MAXIMUM, 10),))))
    t.to_client()
    t.client(Publish("up/x", b"1", qos=1, packet_id=1))  # one unacknowledged QoS 1 message
    t.client(Subscribe(9, (Subscription("secret/#"),)))  # wholly denied: the SUBACK waits behind PUBACK 1
    t.client(Publish("up/x", b"2", qos=1, packet_id=2))  # two in flight: within the limit of 2
    assert t.session.state is State.CONNECTED
    t.client(Publish("up/x", b"3", qos=1, packet_id=3))  # three: over it
    assert t.session.state is State.CLOSED and "receive maximum" in t.session.close_reason


@pytest.mark.parametrize(("host", "counted_as"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_per_address_limits_count_ipv6_by_its_64(host, counted_as):
    from appliance.proxy.server import address_key

    assert address_key(host) == counted_as


def test_qos2_counts_as_inflight_until_the_brokers_pubcomp():
    t = Transcript(V3, limits=SessionLimits(max_inflight=2))
    t.connect()
    for pid in (1, 2):
        t.client(Publish("t", b"x", qos=2, packet_id=pid))
        t.broker(Pubrec(pid))
    assert t.to_client() == [Pubrec(1), Pubrec(2)]
    # The client never sends PUBREL: both are still in flight at the broker.
    t.client(Publish("t", b"x", qos=2, packet_id=3))
    assert t.session.state is State.CLOSED and "receive maximum" in t.session.close_reason


def test_pubcomp_frees_the_qos2_slot():
    t = Transcript(V3, limits=SessionLimits(max_inflight=1))
    t.connect()
    t.client(Publish("t", b"x", qos=2, packet_id=1))
    t.broker(Pubrec(1))
    t.client(Pubrel(1))
    t.broker(Pubcomp(1))
    t.client(Publish("t", b"y", qos=2, packet_id=2))
    assert t.session.state is State.CONNECTED


def test_suback_merges_follow_subscribe_order_when_an_id_is_reused():
    from appliance.mqtt import Suback, Subscribe, Subscription
    from appliance.security import AclCheck
    from appliance.security.acl import parse_acl

    acl = AclCheck(parse_acl("topic read public/#\n"))
    t = Transcript(V5, access=acl)
    t.connect()
    t.client(Subscribe(7, (Subscription("secret/a"), Subscription("public/a"))))
    t.client(Subscribe(7, (Subscription("public/b"), Subscription("secret/b"), Subscription("public/c"))))
    t.client(Subscribe(7, (Subscription("public/d"),)))  # wholly allowed: relayed as it is
    t.to_broker()
    t.broker(Suback(7, (0,)), Suback(7, (0, 0)), Suback(7, (1,)))
    assert [s.reason_codes for s in t.to_client()] == [(0x87, 0), (0, 0x87, 0), (1,)]


def test_a_filter_the_broker_refuses_does_not_count_against_the_limit():
    from appliance.mqtt import Suback, Subscribe, Subscription

    t = Transcript(V5, limits=SessionLimits(max_subscriptions=1))
    t.connect()
    t.client(Subscribe(1, (Subscription("a/#"),)))
    t.to_broker()
    t.broker(Suback(1, (0x87,)))  # the broker said no
    assert [s.reason_codes for s in t.to_client()] == [(0x87,)]
    t.client(Subscribe(2, (Subscription("b/#"),)))  # so the one allowed subscription is still free
    assert t.to_broker() == [Subscribe(2, (Subscription("b/#"),))]


@pytest.mark.parametrize("version", [V3, V5])
def test_connect_and_a_too_large_publish_in_one_segment(version):
    t = Transcript(version, limits=SessionLimits(max_packet_size=1024))
    t.client(Connect(client_id="dev", protocol_version=version), Publish("t", b"x" * 2000))
    expected = [Connack(reason_code=ReasonCode.PACKET_TOO_LARGE)] if version is V5 else []  # 3.1.1 has no such code
    assert [type(p) for p in t.to_client()] == [type(p) for p in expected]
    assert t.to_broker() == [] and not t.opened_broker  # the broker never hears of it
    assert t.session.state is State.CLOSED
    assert t.counts == [(Metric.LIMIT_EXCEEDED, "packet_size")]


def test_the_fast_message_constructor_knows_every_field():
    # Session._on_publish builds a Message with tuple.__new__ and every field in order: a new field
    # must be added there too.
    assert Message._fields == ("topic", "payload", "qos", "retain", "client", "properties", "is_will",
                               "received_at", "released_from")


def test_a_sink_for_rejections_only_is_not_called_for_accepted_messages():
    class Rejections(CountingSink):
        only_rejections = True

    everything, rejections = CountingSink(), Rejections()
    pipeline = Pipeline([RejectBad()], [everything, rejections])
    client = ClientInfo("c", None, "p", V5)
    for payload in (b"ok", b"bad", b"ok"):
        pipeline.judge(Message("a/b", payload, 0, False, client))
    assert everything.counts == {"accept": 2, "reject": 1}
    assert rejections.counts == {"reject": 1}
