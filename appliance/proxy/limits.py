"""Per-client limits the session enforces: packet sizes, messages in flight, the message rate.

The subscription quota lives with the other SUBSCRIBE filtering (subscriptions.py); connections per
source address need the socket and live in the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.names import Metric
from appliance.mqtt import Properties, PropertyId
from appliance.proxy.commands import Notes

# One throttling pause at most (s): the debt carries over, but the client's PINGREQs must still
# reach the broker within its keepalive.
MAX_THROTTLE_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_packet_size: int = 1024 * 1024
    max_connect_size: int = 64 * 1024
    # QoS 1/2 PUBLISHes not yet acknowledged to the client; 0: no limit. Advertised to MQTT 5
    # clients as Receive Maximum; exceeding it: DISCONNECT 0x93.
    max_inflight: int = 0
    # Topic filters subscribed at once; 0: no limit. Beyond: SUBACK 0x97 Quota exceeded (3.1.1: 0x80).
    max_subscriptions: int = 0
    # PUBLISH packets per second (token bucket with `message_burst`); 0: no limit. Beyond: the
    # client is not read for a while (throttled), nothing is dropped.
    message_rate: float = 0.0
    message_burst: int = 0


def inflight_exceeded(limits: SessionLimits, inflight: int, notes: Notes) -> bool:
    """One more QoS 1/2 PUBLISH arrived with `inflight` unacknowledged: True when that is over
    the limit (the session then disconnects the client: MQTT 5 0x93 Receive Maximum exceeded)."""
    limit = limits.max_inflight
    if not limit or inflight < limit:
        return False
    notes.limit_exceeded("inflight", f"more than {limit} unacknowledged QoS 1/2 messages")
    return True


def advertised(properties: Properties, limits: SessionLimits) -> Properties:
    """The properties of the broker's successful MQTT 5 CONNACK as the client gets them: Receive
    Maximum and Maximum Packet Size lowered to the proxy's limits, so that a well-behaved client
    never hits them. The same object when nothing changes."""
    limit = limits.max_inflight
    receive_maximum = properties.get(PropertyId.RECEIVE_MAXIMUM, 65535)
    if limit and isinstance(receive_maximum, int) and receive_maximum > limit:
        properties = properties.with_(PropertyId.RECEIVE_MAXIMUM, limit)
    max_packet = limits.max_packet_size
    broker_max = properties.get(PropertyId.MAXIMUM_PACKET_SIZE, max_packet + 1)
    if isinstance(broker_max, int) and broker_max > max_packet:
        properties = properties.with_(PropertyId.MAXIMUM_PACKET_SIZE, max_packet)
    return properties


class MessageRate:
    """The message rate limit: a token bucket of `message_burst` PUBLISHes (at least one) refilled
    at `message_rate` per second. A PUBLISH beyond it is still relayed; the client is paused for
    the time its debt takes to repay (at most MAX_THROTTLE_PAUSE_S). Every pause is counted; the
    audit log gets one event per connection."""

    __slots__ = ("_rate", "_burst", "_tokens", "_at", "_clock", "_notes", "_throttled")

    def __init__(self, limits: SessionLimits, clock: Callable[[], float], notes: Notes) -> None:
        self._rate = limits.message_rate
        self._burst = max(limits.message_burst, 1)
        self._tokens = float(self._burst)
        self._clock = clock
        self._at = clock()
        self._notes = notes
        self._throttled = False

    def take(self) -> float:
        """One PUBLISH: how long to stop reading the client (0.0: not at all)."""
        now = self._clock()
        rate = self._rate
        self._tokens = tokens = min(self._burst, self._tokens + (now - self._at) * rate) - 1
        self._at = now
        if tokens >= 0:
            return 0.0
        self._notes.count(Metric.LIMIT_EXCEEDED, "message_rate")
        if not self._throttled:
            self._throttled = True
            self._notes.limit_exceeded("message_rate", f"more than {rate:g} messages/s: throttled", count=False)
        return min(-tokens / rate, MAX_THROTTLE_PAUSE_S)
