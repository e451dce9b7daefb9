"""The QoS 2 flows of one client's PUBLISHes, seen from the proxy.

A forwarded QoS 2 message is in flight until the broker's PUBCOMP, not just its PUBREC (MQTT 5
Receive Maximum counts it until then). A message the proxy refused was answered with the proxy's own
PUBREC: the broker never saw its packet id, so the client's PUBREL for it is the proxy's to answer
with PUBCOMP. A 3.1.1 client always sends that PUBREL, and so do some MQTT 5 clients (paho) even
after a failure code. MQTT 5 (§4.3.3) ends the flow at a failed PUBREC, so a new QoS 2 PUBLISH may
reuse the id: from then on its PUBREL belongs to the broker's flow.
"""

from __future__ import annotations

from appliance.mqtt import ProtocolVersion, Pubcomp, encode_packet


class Qos2Flows:
    __slots__ = ("forwarded", "answered")

    def __init__(self) -> None:
        self.forwarded: set[int] = set()  # ids the broker has not PUBCOMPed yet
        self.answered: set[int] = set()  # ids the proxy refused: their PUBREL is ours

    def publish(self, packet_id: int) -> None:
        """A new QoS 2 PUBLISH with `packet_id` arrived (before it is judged)."""
        if self.answered:
            self.answered.discard(packet_id)

    def forward(self, packet_id: int) -> None:
        self.forwarded.add(packet_id)

    def refuse(self, packet_id: int) -> None:
        self.answered.add(packet_id)

    def pubrel(self, packet_id: int, version: ProtocolVersion) -> bytes | None:
        """The client's PUBREL: the PUBCOMP to answer when the flow is the proxy's, else None (the
        PUBREL goes to the broker)."""
        if packet_id not in self.answered:
            return None
        self.answered.discard(packet_id)
        return encode_packet(Pubcomp(packet_id), version)

    def pubcomp(self, packet_id: int) -> None:
        """The broker's PUBCOMP: that message is no longer in flight."""
        self.forwarded.discard(packet_id)
