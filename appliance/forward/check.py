"""The `reject_new` outbox policy as a pipeline check: while the outbox is full, new messages are
refused (MQTT 5 publishers get 0x97 Quota exceeded) instead of buffered."""

from __future__ import annotations

from collections.abc import Callable

from appliance.forward.outbox import Outbox
from appliance.mqtt import ReasonCode
from appliance.pipeline import Message, Reason, Verdict


class OutboxFull:
    name = "outbox"

    def __init__(self, outbox: Outbox, log_healthy: Callable[[], bool] = lambda: True):
        self._outbox = outbox
        self._log_healthy = log_healthy  # the message log's `healthy`

    def check(self, message: Message) -> Verdict | None:
        # A log that cannot be written (full disk) cannot take the message either.
        if self._outbox.is_full() or not self._log_healthy():
            return Verdict.reject(
                Reason("outbox", "the store-and-forward outbox is full (upstream.outbox.policy: reject_new)"),
                reason_code=ReasonCode.QUOTA_EXCEEDED,
            )
        return None
