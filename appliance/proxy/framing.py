"""The incomplete packet at the end of a received chunk, kept until the rest of it arrives.

The session scans each direction's packets in place in the received chunk (`read_fixed_header`) and
relays runs of them as one slice: no per-packet copies. Only a packet cut by the chunk's end is
copied, into a `PacketBuffer`, and joined with the next chunk once that packet can be complete.
"""

from __future__ import annotations

from appliance.mqtt import read_fixed_header
from appliance.mqtt.framing import MAX_PACKET_SIZE


class PacketBuffer:
    """On the hot path the caller checks `pending` before calling `join` and calls `keep` only when
    the scan stopped before the chunk's end: most chunks end with a complete packet."""

    __slots__ = ("pending", "_need")

    def __init__(self) -> None:
        self.pending = bytearray()  # the start of a packet, or empty
        self._need = 0  # the kept packet's total size, once its fixed header is complete

    def __len__(self) -> int:
        return len(self.pending)

    def join(self, data: bytes) -> bytes | None:
        """The bytes to scan: what was kept, followed by `data`. None while the kept packet is still
        incomplete (a large packet arriving in many chunks is not rescanned for every chunk)."""
        pending = self.pending
        if not pending:
            return data
        pending += data
        if len(pending) < self._need:
            return None
        self.pending = bytearray()
        return bytes(pending)

    def keep(self, data: bytes, pos: int, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        """Keep `data[pos:]`, the start of a packet whose end has not arrived (nothing if `pos` is
        at the end). The scan stopped there, so the header, if complete, is valid."""
        size = len(data)
        if pos < size:
            self.pending = bytearray(data[pos:])
            header = read_fixed_header(data, pos, size, max_packet_size)
            self._need = header[2] - pos if header else 0
