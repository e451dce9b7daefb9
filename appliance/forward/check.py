"""The `reject_new` outbox policy as a pipeline check: while the outbox is full, new messages are
refused (MQTT 5 publishers get 0x97 Quota exceeded) instead of buffered.

A full disk is not a full outbox: while the message log cannot be written, `StoreUnavailable`
(audit/check.py, before this check) refuses QoS 1/2 and QoS 0 keeps flowing to local subscribers,
whatever the outbox policy."""

from __future__ import annotations

from appliance.forward.outbox import Outbox
from appliance.mqtt import ReasonCode
from appliance.pipeline import Message, Reason, Verdict

_FULL = Verdict.reject(
    Reason("outbox", "the store-and-forward outbox is full (upstream.outbox.policy: reject_new)"),
    reason_code=ReasonCode.QUOTA_EXCEEDED,
)


class OutboxFull:
    name = "outbox"

    def __init__(self, outbox: Outbox):
        self._outbox = outbox

    def check(self, message: Message) -> Verdict | None:
        return _FULL if self._outbox.is_full() else None
