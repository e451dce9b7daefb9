"""Cutting a byte stream into MQTT packets (fixed header + body), nothing more.

``FrameReader`` buffers whatever the transport hands it and returns one
``Frame`` at a time, or ``NEED_DATA`` when the next packet is not complete.
It enforces only what the fixed header can tell: packet type 0 is reserved,
the remaining length is a well-formed variable byte integer, and the whole
packet fits ``max_packet_size`` (checked as soon as the header is in, so a
peer cannot make us buffer a huge body first).
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import RemoteProtocolError
from .reason_codes import ReasonCode

__all__ = ["NEED_DATA", "Frame", "FrameReader", "MAX_PACKET_SIZE", "read_fixed_header"]

# Largest packet MQTT can express: 1 type byte + 4 length bytes + 268435455.
MAX_PACKET_SIZE = 268_435_460
# Compact the buffer once this many consumed bytes sit in front of the unread ones.
_COMPACT_AFTER = 64 * 1024


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Frame(NamedTuple):
    first_byte: int
    raw: bytes  # the exact wire bytes of the whole packet
    body_offset: int  # where the body starts in ``raw``

    @property
    def packet_type(self) -> int:
        return self.first_byte >> 4

    @property
    def flags(self) -> int:
        return self.first_byte & 0x0F

    @property
    def body(self) -> bytes:
        return self.raw[self.body_offset:]


class FrameReader:
    __slots__ = ("max_packet_size", "_buf", "_pos")

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self.max_packet_size = max_packet_size
        self._buf = bytearray()
        self._pos = 0  # start of the unread bytes in _buf

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def pending_bytes(self) -> bytes:
        return bytes(self._buf[self._pos:])

    def next_frame(self) -> Frame | _NeedData:
        buf = self._buf
        pos = self._pos
        header = read_fixed_header(buf, pos, len(buf), self.max_packet_size)
        if header is None or header[2] > len(buf):
            return NEED_DATA
        first, body_start, end = header
        raw = bytes(buf[pos:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > _COMPACT_AFTER:
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return Frame(first, raw, body_start - pos)


def read_fixed_header(buf: bytes | bytearray, pos: int, end: int, max_packet_size: int = MAX_PACKET_SIZE) -> tuple[int, int, int] | None:
    """The fixed header of the packet starting at `buf[pos]`, reading no further than `end`.

    Returns `(first_byte, body_start, packet_end)` as offsets into `buf` once the header is complete
    (`packet_end` may lie beyond `end`: the body has not all arrived), or None while the header
    itself is incomplete. Raises RemoteProtocolError for packet type 0, a malformed remaining
    length, or a packet larger than `max_packet_size` (known from the header alone).
    This is the zero-copy primitive under `FrameReader`, for relays that forward runs of packets.
    """
    avail = end - pos
    if avail < 2:
        if avail > 0 and not buf[pos] >> 4:
            raise RemoteProtocolError("packet type 0 is reserved")
        return None
    first = buf[pos]
    if not first >> 4:
        raise RemoteProtocolError("packet type 0 is reserved")
    byte = buf[pos + 1]
    if byte < 0x80:
        length = byte
        header = 2
    else:
        length = byte & 0x7F
        header = 2
        shift = 7
        while True:
            if header == 5:
                raise RemoteProtocolError("remaining length longer than 4 bytes")
            if header >= avail:
                return None
            byte = buf[pos + header]
            header += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                if not byte:
                    raise RemoteProtocolError("remaining length not in its shortest form")
                break
            shift += 7
    total = header + length
    if total > max_packet_size:
        raise RemoteProtocolError(
            f"packet of {total} bytes exceeds the maximum of {max_packet_size}",
            ReasonCode.PACKET_TOO_LARGE,
        )
    return first, pos + header, pos + total
