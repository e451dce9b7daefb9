"""The message log: one append-only, checksummed, segmented log that is the single durable record of
every verdict; forwarding, audit and replay are readers of it (issue #13,
docs/decisions/0004-message-log.md).

The engine is content-agnostic: it stores (kind, body bytes) under a strictly increasing seq. One
writer thread group-commits appends under a `SyncPolicy`; `append()` returns the record's seq, a
ticket that listeners later report durable (or failed). Readers (`read_log`) work from any thread
or process; a `Cursor` keeps a reader's durable position.
"""

from .cursor import Cursor
from .fileio import FileIO, OsIO
from .format import FormatError, LogRecord
from .log import LogClosed, MessageLog, RecoveryReport, SyncPolicy
from .reader import SegmentInfo, SegmentScan, list_segments, read_log, read_segment

__all__ = [
    "Cursor",
    "FileIO",
    "FormatError",
    "LogClosed",
    "LogRecord",
    "MessageLog",
    "OsIO",
    "RecoveryReport",
    "SegmentInfo",
    "SegmentScan",
    "SyncPolicy",
    "list_segments",
    "read_log",
    "read_segment",
]
