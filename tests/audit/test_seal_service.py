"""The seal helper as the service will run it: started from the log's on_seal, as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import duckdb

from appliance.audit.query import AuditQuery
from appliance.audit.records import DECISION, IdClock
from appliance.msglog.log import MessageLog
from tests.audit.factory import decision, epoch
from tests.audit.logfiles import log_decision
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_segments_sealed_by_a_running_log_are_converted_by_helper_processes(tmp_path: Path):
    helpers: list[subprocess.Popen[bytes]] = []
    lock = threading.Lock()

    def on_seal(_segment: object) -> None:  # on the writer thread, as the service would
        with lock:
            helpers.append(subprocess.Popen(
                [sys.executable, "-m", "appliance.audit.seal", "--state-dir", str(tmp_path)],
                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    log = MessageLog(tmp_path / "log", segment_bytes=64 << 10, segment_max_age=None, on_seal=on_seal)
    log.open()
    log.start(None)
    clock = IdClock()
    start = epoch("2026-11-20T23:59:00")
    ids = []
    try:
        for i in range(2000):
            row = decision(clock.next(start + i * 0.06), start + i * 0.06, verdict="reject" if i % 4 == 0 else "accept")
            ids.append(row[0])
            seq = log.append(DECISION.code, DECISION.encode(log_decision(row)))
            if i % 100 == 99:  # as publishers waiting for their acks would: smaller batches
                assert log.wait_durable(seq, timeout=30)
        assert log.wait_durable(seq, timeout=30)
        # A verdict just written is visible to the next query, converted or not.
        with AuditQuery(tmp_path) as query:
            assert [r[0] for r in query.cursor().execute("SELECT id FROM decisions ORDER BY id").fetchall()] == ids
    finally:
        log.stop()
    assert len(helpers) >= 3
    for helper in helpers:
        assert helper.wait(timeout=120) == 0
    with AuditQuery(tmp_path) as query:
        assert [r[0] for r in query.cursor().execute("SELECT id FROM decisions ORDER BY id").fetchall()] == ids
        converted = len(ids) - query.tail_records
    assert converted > 1000
    views = duckdb.connect(str(tmp_path / "audit" / "audit.duckdb"), read_only=True)
    assert views.execute("SELECT count(*), count(DISTINCT id) FROM decisions").fetchone() == (converted, converted)
    # 2 minutes from 23:59: two days
    assert {p.parent.name for p in (tmp_path / "audit" / "parquet" / "decisions").rglob("*.parquet")} == \
        {"day=2026-11-20", "day=2026-11-21"}
    wait_until(lambda: all(h.poll() is not None for h in helpers))
