"""AuditQuery: the audit tables over Parquet files plus the log's tail, guarded and locked down."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from appliance.audit.errors import QueryRefused
from appliance.audit.layout import Layout
from appliance.audit.query import AuditQuery
from appliance.audit.records import DECISION, EVENT_COLUMNS
from appliance.audit.seal import convert_pending
from appliance.audit.store import AuditStore
from appliance.msglog.format import encode_record
from tests.audit.factory import decision, epoch, generate
from tests.audit.logfiles import chunks, log_decision, rows_to_records, write_log
from tests.audit.test_docs import cookbook

START = epoch("2026-11-20T08:00:00")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The conftest's 600 decisions: 6 segments converted to Parquet, 33 records in the active one."""
    decisions, events = generate(600, start=START, step=180.0)
    write_log(tmp_path / "log", chunks(rows_to_records(decisions, events), 100))
    convert_pending(Layout(tmp_path))
    return tmp_path


def active_segment(state: Path) -> Path:
    return sorted((state / "log").glob("*.seg"))[-1]


def test_tables_span_parquet_and_tail(state: Path):
    with AuditQuery(state) as query:
        assert query.tail_records == 33
        assert query.query("SELECT count(*) FROM decisions").rows == [(600,)]
        assert query.query("SELECT count(*), count(DISTINCT id) FROM events").rows == [(33, 33)]
        assert query.query("SELECT count(*) FROM quarantine").rows == [(120,)]
        assert query.query("SELECT count(*) FROM accepted").rows == [(480,)]
        assert query.query("SELECT * FROM events LIMIT 0").columns == list(EVENT_COLUMNS)


def test_a_record_appended_to_the_active_segment_is_seen_by_the_next_query(state: Path):
    late = log_decision(decision(1 << 62, START + 200_000, verdict="reject", payload=b"late"))
    with open(active_segment(state), "ab") as segment:
        segment.write(encode_record(10_000, DECISION.code, DECISION.encode(late)))
    with AuditQuery(state) as query:
        assert query.quarantine_get(1 << 62)["payload"] == b"late"


def test_a_record_being_written_is_not_seen_yet(state: Path):
    late = log_decision(decision(1 << 62, START + 200_000))
    record = encode_record(10_000, DECISION.code, DECISION.encode(late))
    with open(active_segment(state), "ab") as segment:
        segment.write(record[:-5])
    with AuditQuery(state) as query:
        assert query.query("SELECT count(*) FROM decisions").rows == [(600,)]


def test_empty_state_dir_has_empty_tables(tmp_path: Path):
    with AuditQuery(tmp_path) as query:
        for table in ("decisions", "events", "quarantine", "accepted", "rejected"):
            assert query.query(f"SELECT count(*) FROM {table}").rows == [(0,)]


def test_columns_and_types_match_the_duckdb_store(state: Path, tmp_path: Path):
    with AuditStore(tmp_path / "old" / "audit.duckdb") as old, AuditQuery(state) as new:
        for table in ("decisions", "events", "quarantine", "accepted", "rejected"):
            sql = f"SELECT column_name, column_type FROM (DESCRIBE {table})"
            assert new.query(sql).rows == old.query(sql).rows, table


def test_quarantine_list_and_show_cover_parquet_and_tail(state: Path):
    with AuditQuery(state) as query:
        listed = query.quarantine_list(limit=1000)
        assert len(listed.rows) == 120
        newest, oldest = listed.rows[0][0], listed.rows[-1][0]
        assert query.quarantine_get(newest)["verdict"] == "reject"  # in the active segment
        assert query.quarantine_get(oldest)["payload"]  # in Parquet
        assert query.quarantine_get(12345) is None
        since = datetime(2026, 11, 21, tzinfo=UTC)
        assert all(r[1] >= since for r in query.quarantine_list(since=since, limit=1000).rows)
        assert query.quarantine_list(topic="sensor/+/temperature", reason="schema", limit=1000).rows


@pytest.mark.parametrize(("name", "sql"), cookbook(), ids=[name for name, _ in cookbook()])
def test_cookbook_queries_run(state: Path, name: str, sql: str):
    with AuditQuery(state) as query:
        result = query.query(sql)
        assert result.columns
        if "now()" not in sql:
            assert result.rows


@pytest.mark.parametrize("sql", [
    "DELETE FROM decisions",
    "SELECT * FROM read_parquet('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM _tail_decisions",
    "COPY decisions TO '/tmp/out.csv'",
    "ATTACH '/tmp/x.duckdb'",
    "SET enable_external_access = true",
])
def test_the_guard_refuses_writes_and_file_access(state: Path, sql: str):
    with AuditQuery(state) as query, pytest.raises(QueryRefused):
        query.query(sql)


def test_behind_the_guard_only_the_parquet_directory_is_readable(state: Path, tmp_path: Path):
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    with AuditQuery(state) as query:
        cursor = query.cursor()
        inside = next((state / "audit" / "parquet").rglob("*.parquet"))
        assert cursor.execute(f"SELECT count(*) FROM read_parquet('{inside}')").fetchone()[0] > 0
        for sql in (f"SELECT * FROM read_csv('{outside}')", f"COPY (SELECT 1) TO '{tmp_path}/x.csv'",
                    "SET enable_external_access = true", f"ATTACH '{tmp_path}/x.duckdb'"):
            with pytest.raises(duckdb.Error):
                cursor.execute(sql).fetchall()


def test_max_ids_cover_parquet_and_tail(state: Path):
    with AuditQuery(state) as query:
        decisions, events = query.max_ids()
        assert decisions == query.query("SELECT max(id) FROM decisions").rows[0][0]
        assert query.tail_records and decisions > 0 and events > 0
