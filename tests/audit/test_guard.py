"""The read-only SQL guard: what analysts may run (`appliance audit sql`, over AuditQuery: Parquet
files plus the log's tail), and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.audit.errors import QueryRefused
from appliance.audit.query import AuditQuery

ALLOWED = [
    "SELECT count(*) FROM decisions",
    "select * from DECISIONS limit 1",
    "FROM events LIMIT 3",
    "SELECT * FROM main.decisions LIMIT 1",
    "SELECT * FROM quarantine",
    "SELECT a.id FROM accepted a JOIN rejected r ON a.client_id = r.client_id LIMIT 1",
    "WITH recent AS (SELECT * FROM decisions WHERE ts > now() - INTERVAL 1 DAY) SELECT count(*) FROM recent",
    "WITH a AS (SELECT 1 x), b AS (SELECT * FROM a) SELECT * FROM b",
    "WITH RECURSIVE r AS (SELECT 1 x UNION ALL SELECT x + 1 FROM r WHERE x < 3) SELECT * FROM r",
    "SELECT * FROM (SELECT topic FROM decisions) sub WHERE sub.topic IN (SELECT topic FROM rejected)",
    "SELECT * FROM range(3)",
    "SELECT * FROM generate_series(1, 3)",
    "SELECT unnest(reasons) FROM decisions",
    "SELECT * FROM events, json_each(events.detail)",
    "VALUES (1), (2)",
    "SELECT 1 UNION ALL SELECT 2",
    "DESCRIBE decisions",
    "SUMMARIZE SELECT latency_us FROM decisions",
    "SELECT current_setting('TimeZone')",
    "SELECT list_transform([1, 2], lambda x: x + 1)",
    "SELECT * FROM decisions PIVOT (count(*) FOR verdict IN ('accept', 'reject'))",
    "SELECT 1; -- trailing comment",
    "SELECT 'x.csv' AS not_a_file, ';' AS semicolon",
    "/* a comment; with a semicolon */ SELECT 1",
]

REFUSED = [
    ("INSERT INTO decisions (id, ts) VALUES (1, now())", "writes are not allowed"),
    ("UPDATE decisions SET payload = NULL", "writes are not allowed"),
    ("DELETE FROM events", "writes are not allowed"),
    ("TRUNCATE events", "writes are not allowed"),
    ("DROP TABLE decisions", "writes are not allowed"),
    ("CREATE TABLE x AS SELECT 1", "writes are not allowed"),
    ("CREATE MACRO m(x) AS x", "writes are not allowed"),
    ("ALTER TABLE decisions ADD COLUMN x INT", "writes are not allowed"),
    ("BEGIN", "not allowed"),
    ("ATTACH '/tmp/other.duckdb' AS other", "ATTACH"),
    ("DETACH other", "DETACH"),
    ("COPY decisions TO '/tmp/out.csv'", "COPY"),
    ("COPY (SELECT 1) TO '/tmp/out.parquet' (FORMAT parquet)", "COPY"),
    ("EXPORT DATABASE '/tmp/dump'", "EXPORT"),
    ("PRAGMA database_size", "PRAGMA"),
    ("SET threads = 1", "SET"),
    ("RESET threads", "SET"),
    ("SET VARIABLE x = 1", "SET"),
    ("USE memory", "SET"),
    ("INSTALL httpfs", "INSTALL/LOAD"),
    ("LOAD httpfs", "INSTALL/LOAD"),
    ("CALL pragma_version()", "CALL"),
    ("CHECKPOINT", "CALL"),
    ("EXPLAIN SELECT 1", "EXPLAIN"),
    ("SELECT 1; SELECT 2", "multiple statements"),
    ("SELECT 1; DROP TABLE decisions", "multiple statements"),
    ("SELECT 1 /* ; */; DELETE FROM decisions", "multiple statements"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv: reading files is not allowed"),
    ("SELECT * FROM read_csv_auto('x.csv')", "read_csv_auto: reading files"),
    ("SELECT * FROM read_parquet('x.parquet')", "read_parquet: reading files"),
    ("SELECT * FROM read_json('x.json')", "read_json: reading files"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text: reading files"),
    ("SELECT * FROM read_blob('/etc/passwd')", "read_blob: reading files"),
    ("SELECT * FROM parquet_metadata('x.parquet')", "parquet_metadata: reading files"),
    ("SELECT * FROM glob('/etc/*')", "glob: reading files"),
    ("SELECT * FROM query('DELETE FROM decisions')", "query: running SQL from text"),
    ("SELECT * FROM query_table('decisions')", "query_table"),
    ("SELECT * FROM 'x.csv'", "'x.csv': reading files is not allowed"),
    ("FROM '/etc/passwd'", "reading files is not allowed"),
    ('SELECT * FROM "data.parquet"', "reading files is not allowed"),
    ("SELECT * FROM 's3://bucket/x.parquet'", "reading files is not allowed"),
    ("SELECT * FROM secrets", "secrets: unknown table"),
    ("SELECT * FROM schema_migrations", "schema_migrations: unknown table"),
    ("SELECT * FROM information_schema.tables", "only the audit tables"),
    ("SELECT * FROM system.main.duckdb_settings", "only the audit tables"),
    ("SELECT * FROM duckdb_settings()", "duckdb_settings: catalog and system functions"),
    ("SELECT * FROM duckdb_tables()", "duckdb_tables"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets"),
    ("SELECT * FROM pragma_storage_info('decisions')", "pragma_storage_info"),
    ("SHOW TABLES", "SHOW"),
    ("SHOW ALL TABLES", "SHOW"),
    ("DESCRIBE SELECT * FROM read_csv('x.csv')", "read_csv"),
    ("SELECT write_log('x')", "write_log: this function is not allowed"),
    # CTEs: a CTE may shadow an audit table, but its body is checked, and a CTE name is only
    # visible where DuckDB would resolve it (not in earlier CTEs, not outside its query).
    ("WITH decisions AS (SELECT * FROM read_csv('x.csv')) SELECT * FROM decisions", "read_csv"),
    ("WITH a AS (SELECT * FROM 'x.csv'), \"x.csv\" AS (SELECT 1) SELECT * FROM a", "reading files"),
    ("SELECT * FROM (WITH \"x.csv\" AS (SELECT 1) SELECT * FROM \"x.csv\"), 'x.csv'", "reading files"),
    # Files hidden in nested subqueries, joins, expressions and set operations.
    ("SELECT * FROM decisions WHERE topic IN (SELECT * FROM read_csv('t.csv'))", "read_csv"),
    ("SELECT (SELECT count(*) FROM (SELECT * FROM 'x.csv')) AS n", "reading files"),
    ("SELECT * FROM decisions d JOIN 'x.parquet' p ON d.id = p.id", "reading files"),
    ("SELECT * FROM decisions, LATERAL read_text(topic)", "read_text"),
    ("SELECT 1 UNION ALL SELECT * FROM read_csv('x.csv')", "read_csv"),
    ("SELECT EXISTS (FROM glob('/root/*'))", "glob"),
    ("SELECT 1 FROM decisions WHERE id = (SELECT max(id) FROM 'x.json')", "reading files"),
    ("", "empty"),
    ("-- only a comment", "empty"),
    ("SELEC 1", "does not parse"),
]


@pytest.mark.parametrize("sql", ALLOWED)
def test_allowed(filled: AuditQuery, sql: str):
    result = filled.query(sql)
    assert result.columns


@pytest.mark.parametrize(("sql", "message"), REFUSED)
def test_refused(filled: AuditQuery, sql: str, message: str):
    with pytest.raises(QueryRefused, match=_literal(message)):
        filled.query(sql)


def files(state: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(state)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in state.rglob("*") if p.is_file()}


def test_nothing_refused_left_a_trace(filled: AuditQuery, filled_state: Path):
    count = filled.query("SELECT count(*) FROM decisions").rows
    before = files(filled_state)
    for sql, _ in REFUSED:
        with pytest.raises(QueryRefused):
            filled.query(sql)
    assert filled.query("SELECT count(*) FROM decisions").rows == count
    assert files(filled_state) == before  # nor on disk: no file written, changed or removed


def test_engine_layer_refuses_files_even_without_the_guard(filled: AuditQuery, tmp_path: Path):
    """External access is off for the whole database: a query that got past the guard could not
    read a file either. (Runs SQL on a raw cursor, which `appliance audit sql` never hands out.)"""
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    cursor = filled.cursor()
    for sql in (f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM '{secret}'",
                f"COPY decisions TO '{tmp_path / 'out.csv'}'", f"ATTACH '{tmp_path / 'x.duckdb'}'",
                "SET enable_external_access = true", "SET lock_configuration = false"):
        with pytest.raises(Exception, match="disabled by configuration|configuration has been locked"):
            cursor.execute(sql)
    cursor.close()
    assert not (tmp_path / "out.csv").exists()


def test_errors_from_duckdb_are_refusals_with_its_message(filled: AuditQuery):
    with pytest.raises(QueryRefused, match='Referenced column "nope" not found'):
        filled.query("SELECT nope FROM decisions")
    with pytest.raises(QueryRefused, match="nonexistent_function"):
        filled.query("SELECT nonexistent_function(1)")


def _literal(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("sql", [
    "WITH gone AS (DELETE FROM decisions WHERE verdict='reject' RETURNING id) SELECT count(*) FROM gone",
    "WITH u AS (UPDATE decisions SET verdict='accept', client_id='forged' RETURNING id) SELECT count(*) FROM u",
    "WITH i AS (INSERT INTO events VALUES (1, now(), 'forged', NULL, NULL, '{}') RETURNING id) SELECT * FROM i",
    "WITH duckdb_tables AS (SELECT * FROM duckdb_tables) SELECT * FROM duckdb_tables",
    "WITH schema_migrations AS (FROM schema_migrations) FROM schema_migrations",
])
def test_writes_and_catalog_reads_hidden_in_ctes_are_refused(filled, sql):
    before = filled.query("SELECT count(*), count(*) FILTER (WHERE verdict = 'reject') FROM decisions").rows
    with pytest.raises(QueryRefused):
        filled.query(sql)
    assert filled.query("SELECT count(*), count(*) FILTER (WHERE verdict = 'reject') FROM decisions").rows == before


def test_recursive_ctes_still_work(filled):
    sql = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT n FROM r ORDER BY n"
    assert filled.query(sql).rows == [(1,), (2,), (3,)]
