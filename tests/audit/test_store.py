"""The audit store as a whole: rows written to the message log read back through AuditQuery with
every column typed, whether converted to Parquet or still in the log; readers need no lock."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.audit.layout import Layout
from appliance.audit.query import AuditQuery
from appliance.audit.records import DECISION, DECISION_COLUMNS, EVENT_COLUMNS, IdClock
from appliance.audit.seal import convert_pending
from appliance.msglog.log import MessageLog
from tests.audit.factory import SCHEMA_REASON, decision, epoch, event
from tests.audit.logfiles import log_decision

TS = epoch("2026-11-27T10:15:30.123456")
WHERE = {"parquet": (1.0, 1.0), "sealed segment": (0.0, 1.0), "active segment": (0.0, 0.0)}


@pytest.mark.parametrize("where", WHERE)
def test_every_column_reads_back_typed(audit_state, where: str):
    clock = IdClock()
    row = decision(clock.next(TS), TS, verdict="reject", payload=b"\x00\xffraw")
    connected = event(clock.next(TS), TS, "client_connected", "dev-1", {"keepalive": 60})
    state = audit_state([row], [connected], split=WHERE[where])
    with AuditQuery(state) as store:
        assert store.tail_records == (0 if where == "parquet" else 2)
        got = store.quarantine_get(row[0])
        assert got is not None
        assert list(got) == list(DECISION_COLUMNS)
        expected = dict(zip(DECISION_COLUMNS, row))
        expected["ts"] = datetime(2026, 11, 27, 10, 15, 30, 123456, tzinfo=UTC)
        expected["reasons"] = [SCHEMA_REASON]
        assert got == expected
        assert got["ts"].utcoffset().total_seconds() == 0

        types = dict(store.query("SELECT column_name, column_type FROM (DESCRIBE decisions)").rows)
        assert types["ts"] == "TIMESTAMP WITH TIME ZONE"
        assert types["payload"] == "BLOB"
        assert types["mqtt_version"] == "UTINYINT"
        assert types["reasons"].startswith("STRUCT(")
        result = store.query("SELECT * FROM events")
        assert result.columns == list(EVENT_COLUMNS)
        (stored,) = result.rows
        assert stored[:5] == (connected[0], expected["ts"], "client_connected", "dev-1", connected[4])
        assert json.loads(stored[5]) == {"keepalive": 60}
        assert store.query("SELECT detail.keepalive::INT FROM events").rows == [(60,)]


def test_ids_and_timestamps_round_trip(audit_state):
    clock = IdClock()
    times = [epoch("2026-01-01T00:00:00") + i * 0.001001 for i in range(1000)]
    rows = [decision(clock.next(t), t) for t in times]
    with AuditQuery(audit_state(rows)) as store:
        stored = store.query("SELECT id, epoch_us(ts) FROM decisions ORDER BY id").rows
        assert [r[0] for r in stored] == [r[0] for r in rows]
        assert [r[1] for r in stored] == [round(t * 1_000_000) for t in times]
        assert store.max_ids() == (rows[-1][0], 0)


def test_an_empty_store_has_max_ids_zero(tmp_path: Path):
    with AuditQuery(tmp_path) as store:
        assert store.max_ids() == (0, 0)


def test_a_query_opens_while_another_process_holds_the_views_file(audit_state):
    """The previous version's DuckDB file was locked by the running appliance; now an analyst's
    `duckdb -readonly STATE_DIR/audit/audit.duckdb` and `appliance audit sql` run side by side."""
    state = audit_state([decision(1, TS, verdict="reject")], split=(1.0, 1.0))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys; c = duckdb.connect(sys.argv[1], read_only=True); "
         "print(c.execute('SELECT count(*) FROM decisions').fetchone()[0], flush=True); sys.stdin.read()",
         str(Layout(state).views_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
        with AuditQuery(state) as store:
            assert store.query("SELECT count(*) FROM quarantine").rows == [(1,)]
    finally:
        holder.communicate("")
    assert holder.returncode == 0


def test_queries_in_threads_while_the_log_is_written_and_converted(tmp_path: Path):
    """Readers open snapshots while a writer appends and the seal helper converts segments under
    them: a count never goes back, no record is seen twice, and the last snapshot has them all.
    (Today's records: the helper compacts only finished days, see the next test.)"""
    clock = IdClock()
    now = time.time()
    batches = [[decision(clock.next(now + b), now + b) for _ in range(100)] for b in range(30)]
    log = MessageLog(tmp_path / "log", segment_max_age=None)
    log.open()
    log.start(None)
    done = threading.Event()

    def read() -> list[tuple[int, int]]:
        counts = []
        while True:
            last = done.is_set()
            with AuditQuery(tmp_path) as store:
                counts.append(store.query("SELECT count(*), count(DISTINCT id) FROM decisions").rows[0])
            if last:
                return counts

    try:
        with ThreadPoolExecutor(3) as pool:
            readers = [pool.submit(read) for _ in range(2)]
            try:
                for index, batch in enumerate(batches):
                    last = 0
                    for row in batch:
                        last = log.append(DECISION.code, DECISION.encode(log_decision(row)))
                    assert log.wait_durable(last, timeout=30)
                    if index % 5 == 4:
                        log.seal()
                        convert_pending(Layout(tmp_path))
            finally:
                done.set()
            seen = [reader.result() for reader in readers]  # re-raises a reader's error
    finally:
        log.stop()
    for counts in seen:
        assert all(total == distinct for total, distinct in counts)  # never twice
        totals = [total for total, _ in counts]
        assert totals == sorted(totals)                               # never goes back
        assert totals[-1] == 3000


def test_a_query_opened_before_a_compaction_still_reads(audit_state):
    """`appliance audit sql`, an export or a quarantine listing that opened its snapshot just before
    the seal helper ran keeps answering from it."""
    clock = IdClock()
    rows = [decision(clock.next(TS + i), TS + i) for i in range(20)]  # a finished day
    state = audit_state(rows, split=(0.5, 1.0))  # one Parquet file, one sealed segment pending
    with AuditQuery(state) as store:
        convert_pending(Layout(state))  # converts the segment, then merges the day's two files
        assert len(Layout(state).visible("decisions")) == 1
        assert store.query("SELECT count(*) FROM decisions").rows == [(20,)]
