"""Topic aliases and the QoS 2 flows the proxy finishes itself."""

from __future__ import annotations

import pytest

from appliance.mqtt import ProtocolVersion, Pubcomp, ReasonCode, RemoteProtocolError
from appliance.proxy.aliases import TopicAliases
from appliance.proxy.qos2 import Qos2Flows
from tests.proxy.units import decode


def aliases(maximum: int = 10) -> TopicAliases:
    a = TopicAliases()
    a.maximum = maximum
    return a


def test_alias_is_set_then_resolved():
    a = aliases()
    assert a.resolve(3, "plant/speed") == "plant/speed"
    assert a.resolve(3, "") == "plant/speed"
    assert a.resolve(3, "plant/temp") == "plant/temp"  # set again
    assert a.resolve(3, "") == "plant/temp"


@pytest.mark.parametrize(("alias", "code"), [(0, ReasonCode.TOPIC_ALIAS_INVALID), (11, ReasonCode.TOPIC_ALIAS_INVALID),
                                             (2, ReasonCode.PROTOCOL_ERROR)])
def test_bad_alias(alias, code):
    with pytest.raises(RemoteProtocolError) as caught:
        aliases().resolve(alias, "")
    assert caught.value.reason_code == code


def test_alias_set_by_a_rejected_message_is_spelled_out_once():
    a = aliases()
    a.resolve(1, "a/two")
    a.rejected(1, "a/two")
    assert a.accepted(1)  # the broker does not know a/two for alias 1
    assert not a.accepted(1)  # now it does
    a.rejected(1, "")  # a rejected message that only used the alias changes nothing at the broker
    assert not a.accepted(1)


@pytest.mark.parametrize("version", [ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5])
def test_pubrel_of_a_refused_message_is_answered_once(version):
    flows = Qos2Flows()
    flows.refuse(4)
    assert decode(flows.pubrel(4, version), version) == Pubcomp(4)
    assert flows.pubrel(4, version) is None  # a second PUBREL goes to the broker
    assert flows.pubrel(5, version) is None


def test_a_new_publish_takes_back_a_refused_id():
    flows = Qos2Flows()
    flows.refuse(7)
    flows.publish(7)
    assert flows.pubrel(7, ProtocolVersion.MQTT_5) is None


def test_forwarded_flows_are_open_until_pubcomp():
    flows = Qos2Flows()
    flows.forward(1)
    flows.forward(2)
    flows.pubcomp(1)
    assert flows.forwarded == {2}
