"""A reader's durable position in the message log (the forwarder: the last seq the cloud broker
acknowledged up to), kept in two CRC'd slots written alternately, each synced: a write torn by a
power cut damages only the slot being written, and load() falls back to the other one."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from .fileio import FileIO, OsIO

_SLOT = struct.Struct("<4sIQQ")  # magic, crc32 of what follows, generation, seq
_MAGIC = b"MQCR"
SLOT_SPACING = 4096  # one slot per page, so a torn page never takes both


class Cursor:
    def __init__(self, path: Path, io: FileIO | None = None):
        self.path = Path(path)
        self.io = io or OsIO()
        self._fd: int | None = None
        self._generation = 0
        self._seq = 0
        self._loaded = False

    @property
    def seq(self) -> int:
        return self._seq

    def load(self) -> int:
        """The last seq saved (0 if none): the valid slot with the highest generation."""
        self._loaded = True
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        best = (0, 0)
        for offset in (0, SLOT_SPACING):
            slot = _decode(data[offset:offset + _SLOT.size])
            if slot is not None and slot > best:
                best = slot
        self._generation, self._seq = best
        return self._seq

    def save(self, seq: int) -> None:
        """Durably record `seq` (fdatasync'd before returning); a seq at or below the saved one is a no-op."""
        if not self._loaded:
            self.load()
        if seq <= self._seq:
            return
        io = self.io
        if self._fd is None:
            # Once per process: the file (and its directory) may have been created by a process that
            # died before its directory fsync, so make the entries durable before trusting them.
            io.makedirs(self.path.parent)
            self._fd = io.open(self.path, create=True)
            io.fsync_dir(self.path.parent)
        generation = self._generation + 1
        body = struct.pack("<QQ", generation, seq)
        slot = _SLOT.pack(_MAGIC, zlib.crc32(body), generation, seq)
        io.write_all(self._fd, slot, (generation % 2) * SLOT_SPACING)
        io.fdatasync(self._fd)
        self._generation, self._seq = generation, seq

    def close(self) -> None:
        if self._fd is not None:
            self.io.close(self._fd)
            self._fd = None


def _decode(raw: bytes) -> tuple[int, int] | None:
    if len(raw) < _SLOT.size:
        return None
    magic, crc, generation, seq = _SLOT.unpack(raw)
    if magic != _MAGIC or zlib.crc32(raw[8:]) != crc:
        return None
    return generation, seq
