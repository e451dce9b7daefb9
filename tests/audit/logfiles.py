"""Message-log segments for audit tests, written in the log's format (appliance/msglog/format.py)
from rows of records.py, as the service would append them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from appliance.audit.records import DECISION, EVENT, RecordKind
from appliance.msglog.format import encode_file_header, encode_record, segment_name


def write_segment(directory: Path, first_seq: int, records: Iterable[tuple[RecordKind, tuple[object, ...]]]) -> int:
    """Writes one segment; returns the last seq used (first_seq - 1 when empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    seq = first_seq - 1
    parts = [encode_file_header(first_seq)]
    for kind, row in records:
        seq += 1
        parts.append(encode_record(seq, kind.code, kind.encode(row)))
    path = directory / segment_name(first_seq)
    path.write_bytes(b"".join(parts))
    return seq


def write_log(directory: Path, segments: Sequence[Sequence[tuple[RecordKind, tuple[object, ...]]]],
              *, first_seq: int = 1) -> int:
    """Several segments in a row (the last one is the active segment); returns the last seq."""
    seq = first_seq - 1
    for records in segments:
        seq = write_segment(directory, seq + 1, records)
    return seq


def log_decision(row: tuple[object, ...], *, forward: bool = False, forward_qos: int | None = None,
                 payload_audited: bool = True) -> tuple[object, ...]:
    """A factory.decision() row (the audit columns) with the log-only fields appended."""
    return (*row, forward, forward_qos, payload_audited)


def rows_to_records(decisions: Iterable[tuple[object, ...]], events: Iterable[tuple[object, ...]] = ()
                    ) -> list[tuple[RecordKind, tuple[object, ...]]]:
    """Audit rows (factory.py) as log records in id order: decisions get the log-only fields."""
    merged = [(row[0], DECISION, log_decision(row)) for row in decisions]
    merged += [(row[0], EVENT, tuple(row)) for row in events]
    merged.sort(key=lambda item: item[0])
    return [(kind, row) for _, kind, row in merged]


def chunks(records: Sequence[tuple[RecordKind, tuple[object, ...]]], size: int
           ) -> list[Sequence[tuple[RecordKind, tuple[object, ...]]]]:
    return [records[i:i + size] for i in range(0, len(records), size)] or [[]]
