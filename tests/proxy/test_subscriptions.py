"""The Subscriptions unit: SUBSCRIBE filtering by the ACL and the quota, SUBACK merging; packets in,
bytes out."""

from __future__ import annotations

import pytest

from appliance.mqtt import ProtocolVersion, ReasonCode, Suback, Subscribe, Subscription, Unsubscribe
from appliance.pipeline import ClientInfo
from appliance.proxy.commands import Count, Notes, Record
from appliance.proxy.subscriptions import V3_SUBACK_FAILURE, Subscriptions
from appliance.security import AclCheck
from appliance.security.acl import parse_acl
from appliance.names import Metric
from tests.proxy.units import decode, split

V3 = ProtocolVersion.MQTT_3_1_1
V5 = ProtocolVersion.MQTT_5
ACL = AclCheck(parse_acl("topic read public/#\n"))


def client(version: ProtocolVersion = V5) -> ClientInfo:
    return ClientInfo("dev", None, "192.0.2.7:5555", version)  # the ACL's first lines: anonymous clients


def subscribe(subs: Subscriptions, packet_id: int, *filters: str, version: ProtocolVersion = V5) -> object:
    packet = Subscribe(packet_id, tuple(Subscription(f) for f in filters))
    return subs.subscribe(*split(packet, version), client(version), version)


def suback(subs: Subscriptions, packet_id: int, *codes: int, version: ProtocolVersion = V5) -> object:
    merged = subs.suback(*split(Suback(packet_id, codes), version), version)
    return None if merged is None else decode(merged, version)


def test_without_access_rules_or_quota_nothing_is_looked_at():
    assert not Subscriptions(None, 0, Notes("p")).active
    assert Subscriptions(ACL, 0, Notes("p")).active and Subscriptions(None, 3, Notes("p")).active


@pytest.mark.parametrize(("version", "failure"), [(V5, ReasonCode.NOT_AUTHORIZED), (V3, V3_SUBACK_FAILURE)])
def test_denied_filters_are_cut_out_and_merged_back_in_order(version, failure):
    notes = Notes("192.0.2.7:5555")
    subs = Subscriptions(ACL, 0, notes)
    relayed = subscribe(subs, 7, "secret/#", "public/a", "#", version=version)
    assert decode(relayed, version) == Subscribe(7, (Subscription("public/a"),))
    assert subs.awaiting_suback
    assert suback(subs, 7, 1, version=version) == Suback(7, (failure, 1, failure))
    assert not subs.awaiting_suback
    assert [c.key for c in notes.commands if isinstance(c, Count)] == [(Metric.ACL_DENIED, "subscribe")] * 2
    assert [c.detail["topic_filter"] for c in notes.commands if isinstance(c, Record)] == ["secret/#", "#"]


def test_allowed_subscribe_is_relayed_and_its_suback_too():
    subs = Subscriptions(ACL, 0, Notes("p"))
    assert subscribe(subs, 1, "public/a") is True
    assert suback(subs, 1, 0) is None  # relayed as it is


def test_subscribe_denied_whole_is_answered_by_the_proxy():
    subs = Subscriptions(ACL, 0, Notes("p"))
    assert subscribe(subs, 3, "secret/a", "secret/b") == Suback(3, (ReasonCode.NOT_AUTHORIZED,) * 2)
    assert not subs.awaiting_suback  # the broker never sees it


def test_quota_counts_granted_filters_until_unsubscribe():
    notes = Notes("p")
    notes.client_id = "dev"
    subs = Subscriptions(None, 2, notes)
    relayed = subscribe(subs, 1, "a", "b", "c")
    assert decode(relayed, V5) == Subscribe(1, (Subscription("a"), Subscription("b")))
    assert suback(subs, 1, 0, 0) == Suback(1, (0, 0, ReasonCode.QUOTA_EXCEEDED))
    assert [c.key for c in notes.commands if isinstance(c, Count)] == [(Metric.LIMIT_EXCEEDED, "subscriptions")]
    [event] = [c for c in notes.commands if isinstance(c, Record)]
    assert event.detail == {"client_id": "dev", "peer": "p", "limit": "subscriptions", "detail": "more than 2 subscriptions"}
    assert subscribe(subs, 2, "a") is True  # a re-subscribe is no new subscription
    subs.unsubscribe(*split(Unsubscribe(3, ("b",)), V5), V5)
    assert subscribe(subs, 4, "c") is True


def test_filters_the_broker_refuses_stop_counting():
    subs = Subscriptions(None, 1, Notes("p"))
    assert subscribe(subs, 1, "a/#") is True
    assert suback(subs, 1, 0x87) is None
    assert subscribe(subs, 2, "b/#") is True


def test_reused_packet_ids_merge_in_subscribe_order():
    subs = Subscriptions(ACL, 0, Notes("p"))
    subscribe(subs, 7, "secret/a", "public/a")
    subscribe(subs, 7, "public/b", "secret/b", "public/c")
    assert subscribe(subs, 7, "public/d") is True
    assert suback(subs, 7, 0) == Suback(7, (0x87, 0))
    assert suback(subs, 7, 0, 0) == Suback(7, (0, 0x87, 0))
    assert suback(subs, 7, 1) is None
    assert suback(subs, 8, 0) is None  # a SUBACK nobody waits for: relayed


def test_denied_rechecks_the_granted_filters_against_new_rules():
    subs = Subscriptions(ACL, 0, Notes("p"))
    subscribe(subs, 1, "public/a", "public/b")
    assert subs.denied(client()) == []
    subs._access = AclCheck(parse_acl("topic read public/a\n"))  # a reload narrowed the rules
    assert subs.denied(client()) == ["public/b"]
