from __future__ import annotations

from appliance.audit.check import StoreUnavailable
from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.pipeline import ClientInfo, Message, Pipeline

V5 = ClientInfo("dev", None, "192.0.2.1:1", ProtocolVersion.MQTT_5)
V3 = ClientInfo("dev", None, "192.0.2.1:1", ProtocolVersion.MQTT_3_1_1)


def test_refuses_qos1_only_while_the_store_is_unhealthy():
    healthy = [True]
    check = StoreUnavailable(lambda: healthy[0])
    assert check.check(Message("a", b"", 1, False, V5)) is None
    healthy[0] = False
    verdict = check.check(Message("a", b"", 1, False, V5))
    assert verdict is not None and verdict.reason_code == ReasonCode.QUOTA_EXCEEDED and verdict.action == "reject"
    assert check.check(Message("a", b"", 2, False, V3)).action == "disconnect"  # 3.1.1: no ack, it resends
    assert check.check(Message("a", b"", 0, False, V5)) is None  # QoS 0 keeps flowing
    assert check.check(Message("a", b"", 1, False, V5, is_will=True)) is None
    healthy[0] = True
    assert check.check(Message("a", b"", 1, False, V5)) is None


def test_enforced_even_in_dry_run():
    verdict = Pipeline([StoreUnavailable(lambda: False)], dry_run=True).judge(Message("a", b"", 1, False, V5)).verdict
    assert not verdict.accepted
