"""MQTT primitive data types (MQTT 5 §1.5): readers and writers.

Readers take ``(buf, pos, end)`` and return ``(value, new_pos)``; running past
``end`` is a malformed packet, never an IndexError.
"""

from __future__ import annotations

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "encode_varint", "read_varint", "read_u16", "read_u32", "read_binary", "read_utf8",
    "read_str", "encode_str", "encode_binary",
]

MAX_VARINT = 268_435_455
_SMALL_VARINTS = tuple(bytes((i,)) for i in range(128))


def encode_varint(n: int) -> bytes:
    if n < 128:
        return _SMALL_VARINTS[n]
    if n > MAX_VARINT:
        raise LocalProtocolError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while n > 127:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for i in range(pos, min(pos + 4, end)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and i > pos:
                raise RemoteProtocolError("variable byte integer not in its shortest form")
            return value, i + 1
        shift += 7
    if end - pos >= 4:
        raise RemoteProtocolError("variable byte integer longer than 4 bytes")
    raise RemoteProtocolError("truncated variable byte integer")


def read_u16(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise RemoteProtocolError("truncated two byte integer")
    return (buf[pos] << 8) | buf[pos + 1], pos + 2


def read_u32(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise RemoteProtocolError("truncated four byte integer")
    return int.from_bytes(buf[pos:pos + 4], "big"), pos + 4


def read_binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise RemoteProtocolError("truncated length prefix")
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise RemoteProtocolError("length prefix runs past the end of the packet")
    return buf[pos + 2:stop], stop


def read_utf8(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    """A UTF-8 string without the U+0000 check (topics report it as a topic error)."""
    raw, pos = read_binary(buf, pos, end)
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError:
        raise RemoteProtocolError("invalid UTF-8 in string") from None


def read_str(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    text, pos = read_utf8(buf, pos, end)
    if "\x00" in text:
        raise RemoteProtocolError("U+0000 in UTF-8 string")
    return text, pos


def encode_binary(data: bytes) -> bytes:
    n = len(data)
    if n > 0xFFFF:
        raise LocalProtocolError(f"{n} bytes do not fit a length-prefixed field")
    return n.to_bytes(2, "big") + data


def encode_str(text: str) -> bytes:
    if "\x00" in text:
        raise LocalProtocolError("U+0000 is not allowed in an MQTT string")
    try:
        return encode_binary(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{text!r} is not encodable as UTF-8") from None
