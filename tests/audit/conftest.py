from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit.store import AuditStore
from tests.audit.factory import epoch, generate

START = epoch("2026-11-20T08:00:00")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    with AuditStore(tmp_path / "state" / "audit.duckdb") as opened:
        yield opened


@pytest.fixture
def filled(store: AuditStore) -> AuditStore:
    """600 decisions a minute apart from 2026-11-20 08:00 UTC (crossing into the next day), 20
    devices, every 5th rejected, plus connect/disconnect/config events."""
    decisions, events = generate(600, start=START, step=180.0)
    store.append(decisions, events)
    return store
