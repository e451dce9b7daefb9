"""ACL files: mosquitto's format and semantics for publish; covering filters for subscribe."""

from __future__ import annotations

import pytest

from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.pipeline import ClientInfo, Message, Pipeline
from appliance.security.acl import AclCheck, AclError, parse_acl

ACL = """
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic write shared/in

pattern write devices/%u/%c/#
pattern read cmd/%c
"""


@pytest.fixture
def rules():
    return parse_acl(ACL)


def test_publish(rules):
    assert rules.can_publish("alice", "c1", "alice/x")
    assert not rules.can_publish("alice", "c1", "alice/secret")
    assert rules.can_publish("alice", "c1", "shared/in")
    assert rules.can_publish("alice", "c1", "devices/alice/c1/temp")
    assert not rules.can_publish("alice", "c1", "devices/alice/c2/temp")
    assert not rules.can_publish("bob", "c1", "alice/x")
    assert not rules.can_publish(None, "c1", "public/x")  # read only
    assert not rules.can_publish(None, "c1", "devices/x/c1/t")  # %u needs a username


def test_subscribe_needs_a_covering_read_rule(rules):
    assert rules.can_subscribe(None, "c", "public/#")
    assert rules.can_subscribe(None, "c", "public/+/x")
    assert not rules.can_subscribe(None, "c", "#")
    assert rules.can_subscribe("alice", "c", "alice/x/+")
    assert not rules.can_subscribe("alice", "c", "alice/+")  # could receive alice/secret
    assert not rules.can_subscribe("alice", "c", "alice/#")  # overlaps the denied alice/secret
    assert not rules.can_subscribe("alice", "c", "shared/in")  # write only
    assert rules.can_subscribe("bob", "c9", "cmd/c9")
    assert not rules.can_subscribe("bob", "c9", "cmd/+")
    assert rules.can_subscribe(None, "c", "$share/g/public/x")


def test_crafted_ids_cannot_widen_a_pattern(rules):
    assert not rules.can_subscribe("bob", "#", "cmd/#")
    assert not rules.can_publish("a/b", "c", "devices/a/b/c/x")
    assert not rules.can_publish("alice", "+", "devices/alice/x/t")


def test_bad_lines():
    with pytest.raises(AclError, match=":1: expected"):
        parse_acl("toppic a")
    with pytest.raises(AclError, match=":2:"):
        parse_acl("user x\ntopic read a/#/b")


def test_check_rejects_with_not_authorized(rules):
    check = AclCheck(rules)
    client = ClientInfo("c1", "bob", "192.0.2.1:1", ProtocolVersion.MQTT_5)
    verdict = Pipeline([check], dry_run=True).judge(Message("alice/x", b"{}", 1, False, client)).verdict
    assert not verdict.accepted  # enforced even in dry-run mode
    assert verdict.reason_code == ReasonCode.NOT_AUTHORIZED
    assert "user 'bob' is not authorized to publish to 'alice/x'" in verdict.reason_text
    assert AclCheck(None).check(Message("x", b"", 0, False, client)) is None


def test_empty_ids_never_satisfy_a_pattern(rules):
    assert not rules.can_publish("alice", "", "devices/alice//t")
    assert not rules.can_subscribe("bob", "", "cmd/")


def test_wildcards_at_the_first_level_do_not_cover_dollar_topics():
    rules = parse_acl("topic read #\n")
    assert not rules.can_subscribe(None, "c", "$SYS/#")
