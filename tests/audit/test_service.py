"""Settings of the audit service kept from the previous store: `durable_acks`, and the scheduled
export of finished days (the `export-days` helper task)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time

from appliance.audit import maintain
from appliance.audit.records import IdClock
from appliance.audit.service import AuditService
from appliance.config import load_config
from tests.audit.factory import decision, epoch


@pytest.mark.parametrize("durable", [True, False])
def test_durable_acks_setting_decides_what_acks_wait_for(tmp_path: Path, durable: bool):
    config = load_config(None, {"state_dir": str(tmp_path), "audit.durable_acks": durable})
    service = AuditService(config.audit, tmp_path)
    try:
        assert (service.durability is service) is durable
    finally:
        asyncio.run(service.stop())


def export_days(state: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert maintain.main(["export-days", "--state-dir", str(state), "--to", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] is True
    return result["exported_days"]


def test_scheduled_export_of_finished_days(audit_state, tmp_path: Path, capsys: pytest.CaptureFixture[str]):  # noqa: ANN001
    clock = IdClock()
    day1, day2, today = epoch("2026-11-25T12:00:00"), epoch("2026-11-26T12:00:00"), epoch("2026-11-27T09:00:00")
    state = audit_state([decision(clock.next(t), t) for t in (day1, day1 + 1, day2, today)], split=(1.0, 1.0))
    out = tmp_path / "export"
    now = datetime(2026, 11, 27, 10, tzinfo=UTC)
    with freeze_time(now):
        assert export_days(state, out, capsys) == ["2026-11-25", "2026-11-26"]
        assert export_days(state, out, capsys) == []  # markers: each day once
    with freeze_time(now + timedelta(days=1)):
        assert export_days(state, out, capsys) == ["2026-11-27"]
    assert sorted(p.name for p in (out / "decisions").iterdir()) == ["day=2026-11-25", "day=2026-11-26", "day=2026-11-27"]


def test_ids_keep_growing_after_the_segments_that_held_them_are_removed(tmp_path: Path):
    """Once converted (and forwarded) segments are removed, the log may hold no id at all: the
    largest one handed out is remembered first, so a restart with the wall clock behind (a Pi
    without a real-time clock, before NTP) never issues an id at or below an earlier one."""
    config = load_config(None, {"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state")})
    future = int((datetime.now(UTC) + timedelta(days=365)).timestamp() * 1000) << IdClock.SEQUENCE_BITS

    async def first_run() -> int:
        service = AuditService(config.audit, config.state_dir)
        await service.start()
        service.clock = IdClock(start_after=future)  # ids from a clock a year ahead (then corrected)
        service.sink._clock = service.clock
        handed_out = service.record_event("test", {})
        await service.sync()
        service.log.seal()
        service.remove_converted()
        await service.stop()
        return handed_out

    asyncio.run(first_run())

    async def second_run() -> int:
        service = AuditService(config.audit, config.state_dir)
        try:
            return service.clock.next()
        finally:
            await service.stop()

    assert asyncio.run(second_run()) > future
