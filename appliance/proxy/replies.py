"""What the proxy itself says to a client, in the client's protocol version.

Most packets a client receives are the broker's, relayed. The proxy answers on its own behalf when it
refuses something: a CONNACK refusing the connection, the PUBACK/PUBREC of a rejected message, a
DISCONNECT. MQTT 5 carries the reason code and, unless the client asked for no problem information,
a short reason string that fits the client's Maximum Packet Size; 3.1.1 has no way to say why.
"""

from __future__ import annotations

from appliance.mqtt import (
    Connack,
    Connect,
    Disconnect,
    Properties,
    PropertyId,
    ProtocolVersion,
    Puback,
    Pubrec,
    ReasonCode,
    encode_packet,
)
from appliance.pipeline import Verdict

# Reason strings are a courtesy to the publisher; keep them short.
MAX_REASON_STRING = 200
_MQTT5 = ProtocolVersion.MQTT_5


class Replies:
    __slots__ = ("version", "_reason_strings", "_max_packet")

    def __init__(self, version: ProtocolVersion, connect: Connect | None = None) -> None:
        self.version = version
        self._reason_strings = True
        self._max_packet: int | None = None  # the client's Maximum Packet Size
        if connect is not None and version is _MQTT5:
            props = connect.properties
            self._reason_strings = props.get(PropertyId.REQUEST_PROBLEM_INFORMATION, 1) == 1
            max_packet = props.get(PropertyId.MAXIMUM_PACKET_SIZE)
            self._max_packet = max_packet if isinstance(max_packet, int) else None

    def reason(self, text: str) -> Properties:
        """The Reason String property for `text` (MQTT 5), or none."""
        if not self._reason_strings or not text:
            return Properties.EMPTY
        text = text[:MAX_REASON_STRING]
        # The client's Maximum Packet Size bounds what we may send it; leave room for the header.
        if self._max_packet is not None and len(text.encode()) + 16 > self._max_packet:
            return Properties.EMPTY
        return Properties(((PropertyId.REASON_STRING, text),))

    def connack(self, code: int, text: str = "") -> bytes:
        """A CONNACK refusing the connection (`code` in the client's version's terms)."""
        properties = self.reason(text) if self.version is _MQTT5 else Properties.EMPTY
        return encode_packet(Connack(reason_code=code, properties=properties), self.version)

    def disconnect(self, code: ReasonCode, text: str = "") -> bytes | None:
        """MQTT 5's DISCONNECT from the server; None for 3.1.1, which has none (closing says it)."""
        if self.version is not _MQTT5:
            return None
        return encode_packet(Disconnect(code, self.reason(text)), _MQTT5)

    def rejection(self, qos: int, packet_id: int, verdict: Verdict) -> bytes:
        """The PUBACK (QoS 1) or PUBREC (QoS 2) of a rejected message."""
        ack: Puback | Pubrec
        if self.version is _MQTT5:
            props = self.reason(verdict.reason_text)
            ack = Puback(packet_id, verdict.reason_code, props) if qos == 1 else Pubrec(packet_id, verdict.reason_code, props)
        else:
            # 3.1.1 has no way to say "rejected": a plain ack stops the publisher from retrying.
            ack = Puback(packet_id) if qos == 1 else Pubrec(packet_id)
        return encode_packet(ack, self.version)

    def unstored(self, packet_id: int, qos: int) -> bytes | None:
        """What the publisher of an accepted message whose record could not be stored gets instead
        of the broker's success ack. MQTT 5 QoS 1: PUBACK 0x97 Quota exceeded (the client may
        resend). Otherwise there is no honest ack to give: None (the session closes the connection,
        so the client resends after reconnecting, MQTT 3.1.1 §4.4)."""
        if self.version is _MQTT5 and qos == 1:
            reason = self.reason("the message log cannot store messages")
            return encode_packet(Puback(packet_id, ReasonCode.QUOTA_EXCEEDED, reason), _MQTT5)
        return None
