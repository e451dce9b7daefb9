from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from appliance.audit.layout import Layout
from appliance.audit.query import AuditQuery
from appliance.audit.records import RecordKind
from appliance.audit.seal import convert_pending
from appliance.msglog.log import MessageLog
from tests.audit.factory import epoch, generate
from tests.audit.logfiles import rows_to_records

START = epoch("2026-11-20T08:00:00")

Rows = Iterable[tuple[object, ...]]


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


@pytest.fixture
def audit_state(tmp_path: Path) -> Callable[..., Path]:
    """build_state() in a fresh state dir of this test."""
    made = 0

    def make(decisions: Rows, events: Rows = (), **kwargs: object) -> Path:
        nonlocal made
        made += 1
        return build_state(tmp_path / f"state{made}", decisions, events, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def filled_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 decisions 3 minutes apart from 2026-11-20 08:00 UTC (crossing into the next day), 20
    devices, every 5th rejected, plus connect/disconnect/config events: 60 % of the records in
    Parquet, 20 % in a sealed segment not converted yet, 20 % in the active segment. Shared by the
    tests that only read it."""
    decisions, events = generate(600, start=START, step=180.0)
    return build_state(tmp_path_factory.mktemp("filled"), decisions, events)


@pytest.fixture
def filled(filled_state: Path) -> Iterator[AuditQuery]:
    with AuditQuery(filled_state) as query:
        yield query
