"""Session transcripts for access control and per-client limits: no sockets."""

from __future__ import annotations

import pytest

from appliance.mqtt import (
    Connack, Connect, ConnectReturnCode, Disconnect, Properties, PropertyId, ProtocolVersion, Puback, Publish,
    ReasonCode, Suback, Subscribe, Subscription, Unsubscribe, Will,
)
from appliance.proxy.session import SessionLimits, State
from appliance.security import AclCheck, Authenticator, PasswordFile
from appliance.security.acl import parse_acl
from appliance.names import Metric
from tests.proxy.test_session import Transcript

V3 = ProtocolVersion.MQTT_3_1_1
V5 = ProtocolVersion.MQTT_5

ACL = AclCheck(parse_acl("topic read public/#\ntopic write up/#\nuser alice\ntopic readwrite alice/#\n"))


def authenticator(**kwargs):
    passwords = PasswordFile()
    passwords.set("alice", "pw")
    return Authenticator(passwords, **kwargs)


@pytest.mark.parametrize(("version", "username", "password", "code"), [
    (V5, "alice", b"wrong", ReasonCode.BAD_USER_NAME_OR_PASSWORD),
    (V5, None, None, ReasonCode.NOT_AUTHORIZED),
    (V3, "alice", b"wrong", ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD),
    (V3, None, None, ConnectReturnCode.NOT_AUTHORIZED),
])
def test_refused_connect_never_reaches_the_broker(version, username, password, code):
    t = Transcript(version, authenticator=authenticator())
    t.client(Connect(client_id="dev", protocol_version=version, username=username, password=password))
    assert t.to_client() == [Connack(reason_code=code)]
    assert t.sent_to_broker == [] and not t.opened_broker
    assert t.session.state is State.CLOSED
    [(kind, detail)] = t.events
    assert kind == "auth_failed" and detail["client_id"] == "dev"


def test_good_password_connects_and_tls_identity_is_the_username():
    t = Transcript(V5, authenticator=authenticator())
    t.connect(username="alice", password=b"pw")
    t = Transcript(V5, authenticator=authenticator(), identity="sensor-1", checks=[ACL])
    t.connect()
    assert t.session.client.username == "sensor-1"


def test_will_needs_write_access():
    t = Transcript(V5, checks=[ACL])
    t.client(Connect(client_id="dev", protocol_version=V5, will=Will("alice/status", b"gone")))
    [connack] = t.to_client()
    assert connack.reason_code == ReasonCode.NOT_AUTHORIZED and t.session.state is State.CLOSED


def test_denied_publish_is_answered_like_an_invalid_one():
    t = Transcript(V5, checks=[ACL], access=ACL)
    t.connect()
    t.client(Publish("alice/x", b"{}", qos=1, packet_id=3), Publish("up/x", b"{}", qos=1, packet_id=4))
    assert t.to_broker() == [Publish("up/x", b"{}", qos=1, packet_id=4)]
    [ack] = t.to_client()
    assert (ack.packet_id, ack.reason_code) == (3, ReasonCode.NOT_AUTHORIZED)
    assert t.sink.counts["reject"] == 1


@pytest.mark.parametrize(("version", "failure"), [(V5, ReasonCode.NOT_AUTHORIZED), (V3, 0x80)])
def test_subscribe_rewritten_and_suback_merged_in_order(version, failure):
    t = Transcript(version, access=ACL)
    t.connect()
    t.client(Subscribe(7, (Subscription("secret/#"), Subscription("public/a", qos=1), Subscription("#"),
                           Subscription("public/b", qos=2))))
    assert t.to_broker() == [Subscribe(7, (Subscription("public/a", qos=1), Subscription("public/b", qos=2)))]
    assert t.to_client() == []
    t.broker(Suback(7, (1, 2)))
    assert t.to_client() == [Suback(7, (failure, 1, failure, 2))]
    assert [e[1]["topic_filter"] for e in t.events] == ["secret/#", "#"]


def test_subscribe_denied_whole_is_answered_by_the_proxy_after_the_connack():
    t = Transcript(V5, access=ACL)
    t.client(Connect(client_id="dev", protocol_version=V5), Subscribe(1, (Subscription("secret"),)))
    assert [type(p) for p in t.to_broker()] == [Connect]
    assert t.to_client() == []  # nothing before the CONNACK
    t.broker(Connack())
    advertised = Properties(((PropertyId.MAXIMUM_PACKET_SIZE, SessionLimits().max_packet_size),))
    assert t.to_client() == [Connack(properties=advertised), Suback(1, (ReasonCode.NOT_AUTHORIZED,))]


def test_subscription_limit_and_unsubscribe():
    t = Transcript(V5, limits=SessionLimits(max_subscriptions=2))
    t.connect()
    t.client(Subscribe(1, (Subscription("a"), Subscription("b"), Subscription("c"))))
    assert t.to_broker() == [Subscribe(1, (Subscription("a"), Subscription("b")))]
    t.broker(Suback(1, (0, 0)))
    assert t.to_client() == [Suback(1, (0, 0, ReasonCode.QUOTA_EXCEEDED))]
    t.client(Subscribe(2, (Subscription("a"),)))  # already counted: a re-subscribe is fine
    assert len(t.to_broker()) == 1
    t.client(Unsubscribe(3, ("b",)), Subscribe(4, (Subscription("c"),)))
    assert len(t.to_broker()) == 2


def test_inflight_limit_advertised_and_enforced():
    t = Transcript(V5, limits=SessionLimits(max_inflight=2))
    t.client(Connect(client_id="dev", protocol_version=V5))
    t.to_broker()
    t.broker(Connack(properties=Properties(((PropertyId.RECEIVE_MAXIMUM, 20),))))
    [connack] = t.to_client()
    assert connack.properties.get(PropertyId.RECEIVE_MAXIMUM) == 2
    t.client(Publish("a", b"1", qos=1, packet_id=1), Publish("a", b"2", qos=1, packet_id=2))
    t.broker(Puback(1))
    t.client(Publish("a", b"3", qos=1, packet_id=3))  # one acked: two in flight, fine
    assert len(t.to_broker()) == 3 and t.session.state is State.CONNECTED
    t.client(Publish("a", b"4", qos=1, packet_id=4))
    assert t.to_broker() == []
    assert t.to_client()[-1] == Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
    assert t.session.state is State.CLOSED and (Metric.LIMIT_EXCEEDED, "inflight") in t.counts


def test_message_rate_throttles_instead_of_dropping():
    now = [0.0]
    t = Transcript(V5, limits=SessionLimits(message_rate=10, message_burst=2), clock=lambda: now[0])
    t.connect()
    t.client(*(Publish("a", b"x") for _ in range(2)))
    assert t.pauses == []
    t.client(*(Publish("a", b"x") for _ in range(3)))
    assert len(t.to_broker()) == 5  # nothing dropped
    assert t.pauses == [pytest.approx(0.3)]  # one pause per batch: the last debt
    now[0] = 10.0
    t.client(Publish("a", b"x"))
    assert len(t.pauses) == 1
    assert t.counts == [(Metric.LIMIT_EXCEEDED, "message_rate")] * 3  # every message over the rate
    assert [e[0] for e in t.events] == ["limit_exceeded"]  # one event per connection
