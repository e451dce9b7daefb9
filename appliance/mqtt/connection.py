"""``Decoder``: frames plus packet decoding, for one direction of one connection.

It only remembers what decoding needs: the protocol version, learned from the
CONNECT when not given up front. It does not track session state.
"""

from __future__ import annotations

from .errors import RemoteProtocolError
from .framing import MAX_PACKET_SIZE, NEED_DATA, FrameReader, _NeedData
from .packets import Connect, Packet, PacketType, ProtocolVersion
from .reader import decode_packet, decode_publish
from .reason_codes import ReasonCode

__all__ = ["Decoder"]

_CONNECT = PacketType.CONNECT
_PUBLISH = PacketType.PUBLISH


class Decoder:
    __slots__ = ("version", "_frames", "_connected")

    def __init__(
        self, max_packet_size: int = MAX_PACKET_SIZE, version: ProtocolVersion | None = None
    ) -> None:
        self.version = version
        self._frames = FrameReader(max_packet_size)
        self._connected = False  # a CONNECT has been decoded

    @property
    def max_packet_size(self) -> int:
        return self._frames.max_packet_size

    @max_packet_size.setter
    def max_packet_size(self, value: int) -> None:
        self._frames.max_packet_size = value

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def receive_data(self, data: bytes) -> None:
        self._frames.feed(data)

    def next_packet(self) -> Packet | _NeedData:
        frame = self._frames.next_frame()
        if isinstance(frame, _NeedData):
            return NEED_DATA
        first_byte, raw, offset = frame
        packet_type = first_byte >> 4
        if packet_type == _PUBLISH and self.version is not None:
            return decode_publish(first_byte, raw[offset:], self.version)
        if packet_type == _CONNECT:
            if self._connected:
                raise RemoteProtocolError("second CONNECT", ReasonCode.PROTOCOL_ERROR)
            packet = decode_packet(first_byte, raw[offset:], ProtocolVersion.MQTT_5)
            assert isinstance(packet, Connect)
            self._connected = True
            self.version = packet.protocol_version
            return packet
        if self.version is None:
            raise RemoteProtocolError("the first packet must be CONNECT", ReasonCode.PROTOCOL_ERROR)
        return decode_packet(first_byte, raw[offset:], self.version)
