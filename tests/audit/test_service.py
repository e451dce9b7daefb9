"""Settings of the audit service kept from the previous store: `durable_acks`, and the scheduled
export of finished days (the `export-days` helper task); how the service settles records the log
could not write (`last_failed`, `settled_seq`, `failed()`) as the proxy's acks read them."""

from __future__ import annotations

import asyncio
import errno
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time

from appliance.audit import maintain
from appliance.audit.records import IdClock
from appliance.audit.service import AuditService
from appliance.config import load_config
from appliance.msglog.testing import FaultyIO
from appliance.names import EventKind
from appliance.proxy.acks import AckOrder
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


def test_a_failed_write_settles_its_records_as_failed_and_replaces_their_acks(tmp_path: Path) -> None:
    """The real failure path, as the proxy's acks see it: records the disk refused (ENOSPC at the
    I/O boundary) are settled as failed, `last_failed` covers them before `settled_seq` does (acks
    ask `failed()` only up to `last_failed`), and an accepted message's success ack is replaced."""
    config = load_config(None, {"state_dir": str(tmp_path), "audit.durable_acks": True})

    async def run() -> None:
        service = AuditService(config.audit, tmp_path)
        io = FaultyIO(service.log.io)
        service.log.io = io  # the writer thread reads it per batch; it starts below
        await service.start()
        try:
            replaced: list[tuple[int, int]] = []

            def on_failure(packet_id: int, qos: int) -> bytes:
                replaced.append((packet_id, qos))
                return b"failed-ack-%d" % packet_id

            acks = AckOrder(service, on_failure)
            out: list[bytes] = []
            seen: list[tuple[int, int, bool]] = []  # settled_seq, last_failed, failed(first bad) per callback

            good = service.record_event(EventKind.CLIENT_CONNECTED, {"n": 0})
            acks.wait_for(1, good)
            assert acks.acked(1, b"ok-1", out) and out == []  # its record is not settled yet
            await service.sync()
            acks.release(out)
            assert out == [b"ok-1"] and service.last_failed == 0 and not service.failed(good)

            io.write_error = errno.ENOSPC
            bad = [service.record_event(EventKind.CLIENT_CONNECTED, {"n": n}) for n in (1, 2, 3)]
            service.add_settled_callback(
                lambda settled: seen.append((settled, service.last_failed, service.failed(bad[0]))))
            service.add_settled_callback(lambda settled: acks.release(out))  # as the session does
            # After the service's own failure listener: the failure itself settled the records.
            failures: list[tuple[int, int, int, int]] = []  # first, last, settled_seq, last_failed
            service.log.add_failure_listener(
                lambda first, last, error: failures.append((first, last, service.settled_seq, service.last_failed)))
            for packet_id, seq in zip((2, 3, 4), bad, strict=True):
                acks.wait_for(packet_id, seq)
                assert acks.acked(packet_id, b"ok-%d" % packet_id, out)
            await service.sync()

            assert io.failures >= 1 and not service.healthy
            assert service.last_failed >= bad[-1] and service.settled_seq >= bad[-1]
            assert all(service.failed(seq) for seq in bad) and not service.failed(good)
            assert failures and failures[0][0] <= bad[0]
            assert all(settled >= last and last_failed >= last for _, last, settled, last_failed in failures), failures
            # The first time settled_seq covered a failed record, last_failed already did.
            first = next(entry for entry in seen if entry[0] >= bad[0])
            assert first[1] >= bad[0] and first[2], seen
            assert out == [b"ok-1", b"failed-ack-2", b"failed-ack-3", b"failed-ack-4"]
            assert replaced == [(2, 1), (3, 1), (4, 1)] and len(acks) == 0 and not acks.broken
        finally:
            io.write_error = None
            await service.stop()

    asyncio.run(run())
