from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.audit.query import AuditQuery
from tests.audit.factory import epoch, generate
from tests.audit.logfiles import Rows, build_state

START = epoch("2026-11-20T08:00:00")


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
