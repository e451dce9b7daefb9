"""Logging setup: human-readable lines by default, JSON lines for log shippers (`--log-format json`).

Text under systemd: when stderr is the journal (`$JOURNAL_STREAM`), each line starts with a syslog
priority prefix (`<3>` for errors) so `journalctl -p warning` works, and without a timestamp
(journald adds its own).

JSON: one object per line with `ts` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`,
every `extra={...}` field given to the log call, and `exc` with the traceback when there is one.

Payload policy: message payloads are never logged, at any level. They may hold personal or secret
data, and the audit log (with its retention and quarantine) is where payloads are kept and queried.
Log records carry topics, client ids, reason codes and schema names only.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
# syslog priorities (sd-daemon(3)) by logging level.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def _priority(levelno: int) -> int:
    return next((priority for level, priority in _PRIORITIES if levelno >= level), 7)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = record.stack_info
        return orjson.dumps(entry, default=str).decode()


class JournalFormatter(logging.Formatter):
    """Text for journald: a `<priority>` prefix instead of a timestamp."""

    def __init__(self) -> None:
        super().__init__("%(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        # Every line of a traceback gets the prefix, or journald logs it at the default priority.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def writes_to_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald stream systemd connected (`$JOURNAL_STREAM` is dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def make_formatter(fmt: LogFormat, stream: TextIO) -> logging.Formatter:
    if fmt == "json":
        return JSONFormatter()
    if fmt != "text":
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if writes_to_journal(stream):
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def setup_logging(level: str, fmt: LogFormat = "text", *, stream: TextIO | None = None) -> None:
    """Send every log record at `level` or above to stderr (or `stream`) in the given format.
    Calling it again replaces the handler."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(fmt, stream))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
