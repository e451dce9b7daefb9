"""The messages waiting to be forwarded, as a compact in-memory index of the log (no payloads).

One entry per forwardable log record after the cursor: its seq, its receive time, its size in the
log and its offset in its segment file, in four parallel `array`s (28 bytes per message: 28 MB for
a full default outbox of a million messages, against ~150 MB for as many tuples). Entries are in
seq order; the oldest live one is at `_head` (the arrays are compacted once the consumed prefix is
large). The index is rebuilt on start by reading the log from the cursor.

A message acknowledged out of order (inside the forwarder's window) stays in the arrays, marked in
`_acked`, until everything before it is acknowledged too; `advance()` then removes the
acknowledged prefix. The cursor is therefore always the seq just before the first entry.

Not thread-safe: the Outbox holds its lock around every call.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import NamedTuple

_COMPACT_AT = 1 << 15  # consumed entries kept before the arrays are shifted down


class Entry(NamedTuple):
    seq: int
    ts: float
    size: int  # bytes of the record in the log (header + body)
    offset: int  # where the record starts in its segment file


class Pending:
    def __init__(self) -> None:
        self._seq = array("q")
        self._ts = array("d")
        self._size = array("I")
        self._offset = array("Q")
        self._head = 0
        self._acked: set[int] = set()
        self.messages = 0  # live entries: not acknowledged, not dropped
        self.bytes = 0

    def __len__(self) -> int:
        """Entries still in the index (acknowledged ones not yet at the head included)."""
        return len(self._seq) - self._head

    def add(self, seq: int, ts: float, size: int, offset: int) -> None:
        if len(self._seq) > self._head and seq <= self._seq[-1]:
            raise ValueError(f"seq {seq} after {self._seq[-1]}: the index only grows at its end")
        self._seq.append(seq)
        self._ts.append(ts)
        self._size.append(size)
        self._offset.append(offset)
        self.messages += 1
        self.bytes += size

    def first_seq(self) -> int | None:
        return self._seq[self._head] if len(self._seq) > self._head else None

    def oldest_ts(self) -> float | None:
        """Receive time of the oldest live message (the head is live after advance())."""
        for i in range(self._head, len(self._seq)):
            if self._seq[i] not in self._acked:
                return self._ts[i]
        return None

    def _find(self, seq: int) -> int:
        i = bisect_left(self._seq, seq, self._head)
        return i if i < len(self._seq) and self._seq[i] == seq else -1

    def acknowledge(self, seq: int) -> bool:
        """Mark a message as acknowledged; False if it is not waiting (dropped, or acknowledged already)."""
        i = self._find(seq)
        if i < 0 or seq in self._acked:
            return False
        self._acked.add(seq)
        self.messages -= 1
        self.bytes -= self._size[i]
        return True

    def acknowledge_many(self, seqs: Iterable[int]) -> int:
        """acknowledge() each of these (a batch of PUBACKs); returns how many were waiting."""
        index, sizes, acked, head = self._seq, self._size, self._acked, self._head
        end = len(index)
        count = freed = 0
        for seq in seqs:
            i = bisect_left(index, seq, head)
            if i < end and index[i] == seq and seq not in acked:
                acked.add(seq)
                count += 1
                freed += sizes[i]
        self.messages -= count
        self.bytes -= freed
        return count

    def advance(self) -> None:
        """Remove the acknowledged prefix."""
        acked = self._acked
        seqs, head, end = self._seq, self._head, len(self._seq)
        while acked and head < end and seqs[head] in acked:
            acked.discard(seqs[head])
            head += 1
        self._head = head
        if head >= _COMPACT_AT and head * 2 >= end:
            self._compact()

    def _compact(self) -> None:
        for arr in (self._seq, self._ts, self._size, self._offset):
            del arr[: self._head]
        self._head = 0

    def entries(self, after_seq: int, limit: int) -> list[Entry]:
        """Up to `limit` live entries with seq > after_seq, oldest first."""
        out: list[Entry] = []
        i = bisect_right(self._seq, after_seq, self._head)
        end = len(self._seq)
        acked = self._acked
        while i < end and len(out) < limit:
            seq = self._seq[i]
            if seq not in acked:
                out.append(Entry(seq, self._ts[i], self._size[i], self._offset[i]))
            i += 1
        return out

    def remove(self, first_seq: int, last_seq: int) -> list[Entry]:
        """Remove every entry with first_seq <= seq <= last_seq (drops: a run of the oldest
        messages); returns the ones that were live (acknowledged ones were counted out already)."""
        start = bisect_left(self._seq, first_seq, self._head)
        stop = bisect_right(self._seq, last_seq, start)
        removed: list[Entry] = []
        for i in range(start, stop):
            seq = self._seq[i]
            if seq in self._acked:
                self._acked.discard(seq)
                continue
            entry = Entry(seq, self._ts[i], self._size[i], self._offset[i])
            removed.append(entry)
            self.messages -= 1
            self.bytes -= entry.size
        if start == self._head:
            self._head = stop
        else:
            for arr in (self._seq, self._ts, self._size, self._offset):
                del arr[start:stop]
        self.advance()
        return removed

    def scan(self, after_seq: int) -> _Scan:
        """Live entries with seq > after_seq, oldest first (for enforce(): read, do not change)."""
        return _Scan(self, bisect_right(self._seq, after_seq, self._head))


class _Scan:
    def __init__(self, pending: Pending, start: int):
        self._p = pending
        self._i = start

    def __iter__(self) -> _Scan:
        return self

    def __next__(self) -> Entry:
        p = self._p
        while self._i < len(p._seq):
            i = self._i
            self._i += 1
            if p._seq[i] not in p._acked:
                return Entry(p._seq[i], p._ts[i], p._size[i], p._offset[i])
        raise StopIteration
