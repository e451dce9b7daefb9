"""The `reject_new` outbox policy as a pipeline check: while the outbox is full, new messages are
refused (MQTT 5 publishers get 0x97 Quota exceeded) instead of buffered."""

from __future__ import annotations

from appliance.forward.outbox import Outbox
from appliance.mqtt import ReasonCode
from appliance.pipeline import Message, Reason, Verdict


class OutboxFull:
    name = "outbox"

    def __init__(self, outbox: Outbox):
        self._outbox = outbox

    def check(self, message: Message) -> Verdict | None:
        if self._outbox.is_full():
            return Verdict.reject(
                Reason("outbox", "the store-and-forward outbox is full (upstream.outbox.policy: reject_new)"),
                reason_code=ReasonCode.QUOTA_EXCEEDED,
            )
        return None
