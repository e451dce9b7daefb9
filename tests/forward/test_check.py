"""The reject_new policy's check: a full outbox refuses new messages; a full disk is the message log's
rule (StoreUnavailable, before it), which lets QoS 0 through under every outbox policy."""

from __future__ import annotations

from pathlib import Path

from appliance.audit.check import StoreUnavailable
from appliance.forward.check import OutboxFull
from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.pipeline import ClientInfo, Message, Pipeline
from tests.forward.harness import bounds, harness

V5 = ClientInfo("dev", None, "192.0.2.1:1", ProtocolVersion.MQTT_5)


def test_a_full_disk_is_not_a_full_outbox(tmp_path: Path):
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(5)])
        outbox = h.make_outbox(bounds(policy="reject_new", max_messages=10))
        outbox.enforce()
        healthy = [False]  # the message log cannot write: a full disk
        pipeline = Pipeline([StoreUnavailable(lambda: healthy[0]), OutboxFull(outbox)])  # as the appliance orders them

        assert pipeline.judge(Message("t", b"", 0, False, V5)).verdict.accepted  # QoS 0 keeps flowing
        refused = pipeline.judge(Message("t", b"", 1, False, V5)).verdict
        assert not refused.accepted and refused.reason_code == ReasonCode.QUOTA_EXCEEDED
        assert [r.check for r in refused.reasons] == ["store"] and "disk full" in refused.reason_text

        h.add([h.row("s", i) for i in range(5, 10)])  # now the outbox is full too
        outbox.enforce()
        assert outbox.is_full()
        for qos, healthy[0] in ((0, False), (0, True), (1, True)):
            verdict = pipeline.judge(Message("t", b"", qos, False, V5)).verdict
            assert not verdict.accepted and verdict.reason_code == ReasonCode.QUOTA_EXCEEDED
            assert [r.check for r in verdict.reasons] == ["outbox"] and "outbox is full" in verdict.reason_text
        outbox.close()
