"""Acknowledgement order and durability for the acks a publisher receives.

MQTT (§4.6) requires PUBACK and PUBREC to be sent in the order the PUBLISH packets arrived. The
broker acks what the proxy forwarded; the proxy acks what it rejected. An injected ack sent at once
would overtake the broker's acks for earlier messages, and clients such as mosquitto_pub disconnect
when their last message is acked, losing the earlier ones (docs/evidence.md, pitfall 1). And with the
message log, no ack may reach the publisher before the message's verdict is durable.

So every QoS 1/2 PUBLISH gets an entry, in arrival order: the ack to send (the broker's, once it
arrives, or the proxy's own) and the message log's sequence number (the sink's ticket) that must be
durable first. The head entry leaves when it has its ack and its record is durable; entries behind
it wait. The CONNACK is a barrier entry too: nothing is sent to the client before it.

A record the log could not write (a full disk) is never durable. An accepted message whose record
failed must not get the broker's success ack: `on_failure(packet_id, qos)` gives the ack to send
instead (MQTT 5 QoS 1: PUBACK 0x97 Quota exceeded) or None, and then nothing more is released and
`broken` is set: the session closes the connection, and the client resends after reconnecting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

CONNACK_BARRIER = -1
# Acks waiting for durability at which a client is taken to be blocked on us (see
# Session.blocked_on_durability): mosquitto_pub and paho keep 20 QoS 1 messages in flight by default.
SYNC_HINT_INFLIGHT = 10
# AckOrder.durability_request's answers (0: nothing).
WAIT_FOR_COMMIT, SYNC_NOW = 1, 2


class Durability(Protocol):
    """What the acks wait for: records numbered up to `settled_seq` are settled, durable unless
    `failed(seq)`; none above `last_failed` ever failed (0: none did), so an ack asks `failed()`
    only after a failure. `request_sync()` asks for the next sync now rather than at the end of
    the sync window (a publisher is blocked on its acks)."""

    @property
    def settled_seq(self) -> int: ...

    @property
    def last_failed(self) -> int: ...

    def failed(self, seq: int) -> bool: ...

    def request_sync(self) -> None: ...


def _no_replacement(packet_id: int, qos: int) -> bytes | None:
    return None


class AckOrder:
    __slots__ = ("entries", "_durability", "_on_failure", "broken", "publishes", "_last_seq")

    def __init__(self, durability: Durability | None = None,
                 on_failure: Callable[[int, int], bytes | None] = _no_replacement) -> None:
        # Entries are [packet id awaiting the broker's ack or None, ack bytes (None: not yet), sequence,
        # whether it answers a PUBLISH (the CONNACK barrier and a proxy-made SUBACK do not),
        # the packet id and QoS of an accepted PUBLISH (its ack must not claim success if its record failed)].
        self.entries: deque[list[Any]] = deque()  # read by the session, changed only here
        self._durability = durability
        self._on_failure = on_failure
        self.broken = False  # a failed record's ack could not be replaced: close the connection
        self.publishes = 0  # PUBLISH packets whose PUBACK/PUBREC the client has not received yet
        self._last_seq = 0  # the highest record seq an entry waited for

    def __len__(self) -> int:
        return len(self.entries)

    def _settled_seq(self) -> int:
        durability = self._durability
        return durability.settled_seq if durability is not None else 1 << 62

    def wait_for(self, packet_id: int, seq: int = 0, *, counted: bool = True, qos: int = 1) -> None:
        """A QoS 1/2 PUBLISH was forwarded: its broker ack goes out after everything queued before.
        `counted`: it counts in `publishes` until then (a QoS 2 message is counted by the session
        until its PUBCOMP instead)."""
        publish = counted and packet_id != CONNACK_BARRIER
        self.publishes += publish
        if seq > self._last_seq:
            self._last_seq = seq
        self.entries.append([packet_id, None, seq, publish, packet_id, qos])

    def inject(self, ack: bytes, seq: int, out: list[bytes], *, publish: bool = True) -> None:
        """The proxy's own ack for a message it answered itself (`publish`: a PUBACK/PUBREC)."""
        if not self.entries and seq <= self._settled_seq():
            out.append(ack)
        else:
            self.publishes += publish
            if seq > self._last_seq:
                self._last_seq = seq
            self.entries.append([None, ack, seq, publish, 0, 0])

    def acked(self, packet_id: int, ack: bytes, out: list[bytes]) -> bool:
        """The broker's ack for `packet_id` arrived. Returns False when no entry awaited it (the
        caller then relays it as is)."""
        for entry in self.entries:
            if entry[0] == packet_id and entry[1] is None:
                entry[0] = None
                entry[1] = ack
                self.release(out)
                return True
        return False

    def release(self, out: list[bytes]) -> None:
        """Send every entry at the head that has its ack and whose record is durable."""
        queue = self.entries
        settled = self._settled_seq()
        durability = self._durability
        last_failed = durability.last_failed if durability is not None else 0
        while queue and not self.broken:
            head = queue[0]
            if head[1] is None or head[2] > settled:
                return
            ack = head[1]
            if head[5] and 0 < head[2] <= last_failed and durability is not None and durability.failed(head[2]):
                ack = self._on_failure(head[4], head[5])
                if ack is None:
                    self.broken = True
                    return
            queue.popleft()
            self.publishes -= head[3]
            if ack:
                out.append(ack)

    def durability_request(self, clocked: bool) -> int:
        """What the session asks of the message log after an input, in one call on the hot path:
        0 nothing (no entry waits for a record), WAIT_FOR_COMMIT (the head is ready but for its
        record: release() after the next commit), SYNC_NOW (the client is blocked on us: `clocked`,
        or SYNC_HINT_INFLIGHT PUBLISHes unacknowledged, while a record is not settled; see
        Session.blocked_on_durability)."""
        queue = self.entries
        if not queue:
            return 0
        publishes = self.publishes
        if (publishes >= SYNC_HINT_INFLIGHT or (clocked and publishes > 0)) and self._last_seq > self._settled_seq():
            return SYNC_NOW
        return WAIT_FOR_COMMIT if queue[0][1] is not None else 0

    @property
    def waiting_for_durability(self) -> bool:
        """The head is ready but for its record's commit: release() after the next commit."""
        return bool(self.entries) and self.entries[0][1] is not None
