from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from appliance.audit.errors import AuditError
from appliance.audit.records import DECISION_COLUMNS, EVENT_COLUMNS, IdClock
from appliance.audit.schema import CURRENT_VERSION, MIGRATIONS, migrate
from appliance.audit.store import AuditStore
from tests.audit.factory import SCHEMA_REASON, decision, epoch, event

TS = epoch("2026-11-27T10:15:30.123456")


def test_append_reads_back_every_column_typed(store: AuditStore):
    clock = IdClock()
    row = decision(clock.next(TS), TS, verdict="reject", payload=b"\x00\xffraw")
    connected = event(clock.next(TS), TS, "client_connected", "dev-1", {"keepalive": 60})
    store.append([row], [connected])

    got = store.quarantine_get(row[0])
    assert got is not None
    assert list(got) == list(DECISION_COLUMNS)
    expected = dict(zip(DECISION_COLUMNS, row))
    expected["ts"] = datetime(2026, 11, 27, 10, 15, 30, 123456, tzinfo=UTC)
    expected["reasons"] = [SCHEMA_REASON]
    assert got == expected
    assert got["ts"].utcoffset().total_seconds() == 0

    types = dict(store.query(
        "SELECT column_name, column_type FROM (DESCRIBE decisions)").rows)
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


def test_ids_and_timestamps_round_trip(store: AuditStore):
    clock = IdClock()
    times = [epoch("2026-01-01T00:00:00") + i * 0.001001 for i in range(1000)]
    rows = [decision(clock.next(t), t) for t in times]
    store.append(rows)
    stored = store.query("SELECT id, epoch_us(ts) FROM decisions ORDER BY id").rows
    assert [r[0] for r in stored] == [r[0] for r in rows]
    assert [r[1] for r in stored] == [round(t * 1_000_000) for t in times]
    assert store.max_ids() == (rows[-1][0], 0)


def test_empty_store_max_ids_are_zero(store: AuditStore):
    assert store.max_ids() == (0, 0)


def test_a_failed_batch_stores_nothing(store: AuditStore):
    good = decision(1, TS)
    bad = decision(2, TS)[:18] + ("{not json",) + decision(2, TS)[19:]
    with pytest.raises(AuditError, match="could not store a batch of 2 decisions"):
        store.append([good, bad], [event(3, TS, "x")])
    assert store.max_ids() == (0, 0)
    store.append([good])  # the store is still usable
    assert store.max_ids() == (1, 0)


def test_delete_from_drops_rows_at_and_above_the_ids(store: AuditStore):
    store.append([decision(i, TS) for i in range(1, 11)], [event(i, TS, "x") for i in range(1, 6)])
    store.delete_from(7, None)
    assert store.max_ids() == (6, 5)
    store.delete_from(None, 3)
    assert store.max_ids() == (6, 2)
    store.delete_from(1, 1)
    assert store.max_ids() == (0, 0)


def test_migrations_create_v1_and_reopening_changes_nothing(tmp_path: Path):
    path = tmp_path / "deep" / "dir" / "audit.duckdb"
    AuditStore(path).close()
    with AuditStore(path) as store:
        assert store.query("SELECT count(*) FROM decisions").rows == [(0,)]
    con = duckdb.connect(str(path))
    assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(v,) for v in range(1, CURRENT_VERSION + 1)]
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert views == {"quarantine", "accepted", "rejected"}
    con.close()


def test_migrations_upgrade_an_older_file_step_by_step(tmp_path: Path):
    path = tmp_path / "audit.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, str(path), MIGRATIONS[:1]) == 0  # a new file, brought to v1 (as a v1 appliance would)
    con.execute("INSERT INTO decisions (id, ts, verdict, payload, dry_run) VALUES (1, now(), 'reject', 'x', true)")
    assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (1,)

    def v3(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("ALTER TABLE decisions ADD COLUMN region VARCHAR")

    migrations = (*MIGRATIONS, (CURRENT_VERSION + 1, "region", v3))
    assert migrate(con, str(path), migrations) == 1  # was at v1; v2 and v3 applied, in order
    assert migrate(con, str(path), migrations) == 3  # already there
    assert [r[0] for r in con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()] == [1, 2, 3]
    assert "region" in [r[0] for r in con.execute("DESCRIBE decisions").fetchall()]
    assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)  # v2: dry-run rows are not quarantined
    con.close()
    with pytest.raises(AuditError, match="newer appliance"):
        AuditStore(path)


def test_read_only_open_of_a_stopped_store(tmp_path: Path):
    path = tmp_path / "audit.duckdb"
    with AuditStore(path) as store:
        store.append([decision(1, TS, verdict="reject")])
    with AuditStore(path, read_only=True) as reader:
        assert reader.query("SELECT count(*) FROM decisions").rows == [(1,)]
        assert reader.quarantine_get(1) is not None
        for write in (lambda: reader.append([decision(2, TS)]), lambda: reader.quarantine_purge(),
                      lambda: reader.delete_from(1, 1)):
            with pytest.raises(AuditError, match="read-only"):
                write()


def test_read_only_open_of_a_missing_file(tmp_path: Path):
    with pytest.raises(AuditError, match="no audit log at"):
        AuditStore(tmp_path / "nothing.duckdb", read_only=True)
    assert not (tmp_path / "nothing.duckdb").exists()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_file_held_by_another_process_gives_a_clear_error(tmp_path: Path, read_only: bool):
    path = tmp_path / "audit.duckdb"
    AuditStore(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); sys.stdin.read()",
         str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(AuditError, match=r"the appliance is running: use `appliance audit sql`"):
            AuditStore(path, read_only=read_only)
    finally:
        holder.communicate("")
    assert holder.returncode == 0


def test_queries_in_threads_while_another_thread_appends(store: AuditStore):
    clock = IdClock()
    batches = [[decision(clock.next(TS + b), TS + b) for _ in range(100)] for b in range(30)]
    done = threading.Event()

    def read() -> list[int]:
        counts = []
        while not done.is_set():
            counts.append(store.query("SELECT count(*) FROM decisions").rows[0][0])
        counts.append(store.query("SELECT count(*) FROM decisions").rows[0][0])
        return counts

    with ThreadPoolExecutor(3) as pool:
        readers = [pool.submit(read) for _ in range(3)]
        try:
            for batch in batches:
                store.append(batch)
        finally:
            done.set()
        seen = [reader.result() for reader in readers]  # re-raises a reader's error
    for counts in seen:
        assert counts == sorted(counts)               # never goes back
        assert all(c % 100 == 0 for c in counts)      # a batch is seen whole or not at all
        assert counts[-1] == 3000
