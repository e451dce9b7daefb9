"""Acknowledgement order for the acks the proxy injects.

MQTT (§4.6) requires PUBACK and PUBREC to be sent in the order the PUBLISH packets arrived. The
broker acks what the proxy forwarded; the proxy acks what it rejected. An injected ack sent at once
would overtake the broker's acks for earlier messages, and clients such as mosquitto_pub disconnect
when their last message is acked, losing the earlier ones (EVIDENCE.md, pitfall 1). So an injected
ack waits until every earlier forwarded QoS 1/2 PUBLISH of that client has been acked by the broker.

The queue holds, in arrival order: packet ids of forwarded messages awaiting the broker's ack, and
encoded acks ready to go once nothing before them is waiting. The CONNACK is a barrier too: nothing
is sent to the client before it.
"""

from __future__ import annotations

from collections import deque

CONNACK_BARRIER = -1


class AckOrder:
    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: deque[int | bytes] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def wait_for(self, packet_id: int) -> None:
        """A QoS 1/2 PUBLISH was forwarded: its broker ack comes before anything queued later."""
        self._queue.append(packet_id)

    def inject(self, ack: bytes, out: list[bytes]) -> None:
        """Send `ack` now if nothing earlier is pending, else queue it behind what is."""
        if self._queue:
            self._queue.append(ack)
        else:
            out.append(ack)

    def acked(self, packet_id: int, out: list[bytes]) -> bool:
        """The broker's ack for `packet_id` was relayed; release the injected acks behind it.

        Returns False when the id was not awaited (an ack the proxy did not expect), which is
        harmless: the broker's own ack is relayed either way.
        """
        queue = self._queue
        if queue and queue[0] == packet_id:
            queue.popleft()
        else:
            try:
                queue.remove(packet_id)
            except ValueError:
                return False
        while queue and isinstance(queue[0], bytes):
            out.append(queue.popleft())  # type: ignore[arg-type]
        return True
