"""While the message log cannot store records (a full disk, an I/O error), QoS 1/2 publishes are
refused instead of acknowledged: an acknowledged message must never be lost. MQTT 5 publishers get
0x97 Quota exceeded; an MQTT 3.1.1 publisher has no way to hear "not now", so its connection is
closed without an ack and it resends after reconnecting. QoS 0 keeps flowing to local subscribers
(its records are counted as lost and alarmed). The check clears by itself when the log writes again."""

from __future__ import annotations

from collections.abc import Callable

from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.pipeline import Message, Reason, Verdict

_REASON = Reason("store", "the message log cannot store messages (disk full or I/O error); try again later")
_REFUSE_V5 = Verdict.reject(_REASON, reason_code=ReasonCode.QUOTA_EXCEEDED)
_REFUSE_V3 = Verdict.reject(_REASON, reason_code=ReasonCode.QUOTA_EXCEEDED, action="disconnect")


class StoreUnavailable:
    name = "store"
    # Even a dry run must not acknowledge what it cannot keep.
    enforced_in_dry_run = True

    def __init__(self, healthy: Callable[[], bool]):
        self._healthy = healthy

    def check(self, message: Message) -> Verdict | None:
        if message.qos == 0 or message.is_will or self._healthy():
            return None
        return _REFUSE_V5 if message.client.protocol_version is ProtocolVersion.MQTT_5 else _REFUSE_V3
