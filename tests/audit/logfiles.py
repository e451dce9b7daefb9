"""Message-log segments for audit tests, written in the log's format (appliance/msglog/format.py)
from rows of records.py, as the service would append them; and whole state dirs written through a
real MessageLog and the seal helper (build_state)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from appliance.audit.layout import Layout
from appliance.audit.records import DECISION, EVENT, RecordKind, payload_sha256
from appliance.audit.seal import convert_pending
from appliance.msglog.format import encode_file_header, encode_record, segment_name
from appliance.msglog.log import MessageLog

Rows = Iterable[tuple[object, ...]]


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


def _append(log: MessageLog, records: Sequence[tuple[RecordKind, tuple[object, ...]]]) -> None:
    last = 0
    for kind, row in records:
        last = log.append(kind.code, kind.encode(row))
    if last:
        assert log.wait_durable(last, timeout=30)


def build_state(state: Path, decisions: Rows, events: Rows = (), *,
                split: tuple[float, float] = (0.6, 0.8)) -> Path:
    """A state dir holding these rows as the service leaves them: appended to a real message log in
    id order; the first `split[0]` of the records sealed and converted to Parquet, the records up to
    `split[1]` in a sealed segment not converted yet, the rest in the active segment. (1.0, 1.0):
    everything converted, as after a last seal at shutdown."""
    records = rows_to_records(decisions, events)
    converted, sealed = (round(len(records) * part) for part in split)
    log = MessageLog(state / "log", segment_max_age=None)
    log.open()
    log.start(None)
    try:
        _append(log, records[:converted])
        if converted:
            log.seal()
            convert_pending(Layout(state))
        if sealed > converted:
            _append(log, records[converted:sealed])
            log.seal()
        _append(log, records[sealed:])
    finally:
        log.stop()
    return state
