"""A state directory as the previous version (SQLite journal + DuckDB file) left it, for tests of the
upgrade and of readers that still accept its files (`replay --from audit.duckdb`).

The formats are frozen here, copied from the code that wrote them (appliance/audit/journal.py and
schema.py, removed since): a change to records.py must not change what an old file looks like.

    STATE_DIR/audit/journal.sqlite3   SQLite, WAL; tables decisions, events (verdicts not yet moved
                                      to DuckDB) and outbox (accepted messages not yet forwarded)
    STATE_DIR/audit/audit.duckdb      DuckDB, schema v2: tables decisions, events, schema_migrations;
                                      views accepted, rejected, quarantine

Rows are tuples as tests/audit/factory.py builds them: the 24 decision columns and the 6 event
columns in order (ts an epoch float, reasons and detail JSON text); an outbox row has the 8
OUTBOX_COLUMNS (records.py; ts a float, retain 0/1, qos None for the upstream's default).
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import duckdb

JOURNAL_FILE = "journal.sqlite3"
DUCKDB_FILE = "audit.duckdb"

DECISION_COLUMNS = (
    "id", "ts", "client_id", "username", "peer", "mqtt_version", "topic", "qos", "retain", "payload",
    "payload_size", "payload_sha256", "schema_set", "schema_name", "schema_version", "topic_filter",
    "verdict", "reason_code", "reasons", "latency_us", "config_revision", "dry_run", "is_will",
    "released_from",
)
EVENT_COLUMNS = ("id", "ts", "kind", "client_id", "peer", "detail")
OUTBOX_COLUMNS = ("id", "ts", "client_id", "topic", "payload", "qos", "retain", "schema")

Row = Sequence[object]

# -- the journal (journal.py) ------------------------------------------------------------------------

# SQLite columns without types, `id INTEGER PRIMARY KEY`, as journal.py declared them.
JOURNAL_TABLES = {"decisions": DECISION_COLUMNS, "events": EVENT_COLUMNS, "outbox": OUTBOX_COLUMNS}
JOURNAL_PAGE_SIZE = 1024


def _journal_ddl(table: str, columns: Sequence[str]) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {table} "
            f"({', '.join(c + (' INTEGER PRIMARY KEY' if c == 'id' else '') for c in columns)})")


def write_journal(path: Path, *, decisions: Iterable[Row] = (), events: Iterable[Row] = (),
                  outbox: Iterable[Row] = (), hot_wal: bool = False) -> Path:
    """The journal with these rows committed. `hot_wal`: as a `kill -9` left it, the rows still in
    the write-ahead log (`journal.sqlite3-wal`) and not checkpointed into the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".writing") if hot_wal else path
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size={JOURNAL_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        if hot_wal:
            conn.execute("PRAGMA wal_autocheckpoint=0")
        for table, columns in JOURNAL_TABLES.items():
            conn.execute(_journal_ddl(table, columns))
        conn.execute("BEGIN")
        for table, rows in (("decisions", decisions), ("events", events), ("outbox", outbox)):
            marks = ", ".join("?" * len(JOURNAL_TABLES[table]))
            conn.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", [tuple(r) for r in rows])
        conn.execute("COMMIT")
        if hot_wal:
            # Copied while the connection is still open: the file and its WAL as a crash leaves them.
            shutil.copyfile(target, path)
            shutil.copyfile(target.with_name(target.name + "-wal"), path.with_name(path.name + "-wal"))
    finally:
        conn.close()
    if hot_wal:
        for leftover in (target, target.with_name(target.name + "-wal"), target.with_name(target.name + "-shm")):
            leftover.unlink(missing_ok=True)
    return path


# -- the DuckDB file (schema.py, migrations v1 and v2) -------------------------------------------------

REASON_TYPE = 'STRUCT("check" VARCHAR, message VARCHAR, "schema" VARCHAR, path VARCHAR)[]'

SCHEMA_V1 = (
    f"""CREATE TABLE decisions (
        id              BIGINT NOT NULL,
        ts              TIMESTAMPTZ NOT NULL,
        client_id       VARCHAR,
        username        VARCHAR,
        peer            VARCHAR,
        mqtt_version    UTINYINT,
        topic           VARCHAR,
        qos             UTINYINT,
        retain          BOOLEAN,
        payload         BLOB,
        payload_size    INTEGER,
        payload_sha256  VARCHAR,
        schema_set      VARCHAR,
        schema_name     VARCHAR,
        schema_version  VARCHAR,
        topic_filter    VARCHAR,
        verdict         VARCHAR,
        reason_code     UTINYINT,
        reasons         {REASON_TYPE},
        latency_us      INTEGER,
        config_revision VARCHAR,
        dry_run         BOOLEAN,
        is_will         BOOLEAN,
        released_from   BIGINT
    )""",
    """CREATE TABLE events (
        id        BIGINT NOT NULL,
        ts        TIMESTAMPTZ NOT NULL,
        kind      VARCHAR,
        client_id VARCHAR,
        peer      VARCHAR,
        detail    JSON
    )""",
    "CREATE VIEW accepted AS SELECT * FROM decisions WHERE verdict = 'accept'",
    "CREATE VIEW rejected AS SELECT * FROM decisions WHERE verdict = 'reject'",
    "CREATE VIEW quarantine AS SELECT * FROM decisions WHERE verdict = 'reject' AND payload IS NOT NULL",
)
SCHEMA_V2 = (
    "CREATE OR REPLACE VIEW quarantine AS SELECT * FROM decisions "
    "WHERE verdict = 'reject' AND payload IS NOT NULL AND NOT dry_run",
)
MIGRATIONS = (
    (1, "decisions, events, views accepted/rejected/quarantine", SCHEMA_V1),
    (2, "quarantine excludes dry-run verdicts (those messages were delivered)", SCHEMA_V2),
)

# How the store turned a row's values into its columns (ts a float, reasons/detail JSON text).
_STAGED = {"ts": ("DOUBLE", "to_timestamp(ts)"),
           "reasons": ("VARCHAR", f"CAST(CAST(reasons AS JSON) AS {REASON_TYPE})"),
           "detail": ("VARCHAR", "CAST(detail AS JSON)")}


def create_duckdb(con: duckdb.DuckDBPyConnection, *, version: int = 2) -> None:
    """The previous version's tables and views on `con`, migrated up to `version`."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER NOT NULL, description VARCHAR, applied_at TIMESTAMPTZ NOT NULL)")
    for number, description, statements in MIGRATIONS[:version]:
        for statement in statements:
            con.execute(statement)
        con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [number, description])


def append_duckdb(con: duckdb.DuckDBPyConnection, table: str, rows: Iterable[Row]) -> int:
    """Appends rows as AuditStore.append did: staged as they come, converted by one INSERT ... SELECT."""
    columns = DECISION_COLUMNS if table == "decisions" else EVENT_COLUMNS
    types = dict(con.execute("SELECT column_name, data_type FROM duckdb_columns() "
                             "WHERE table_name = ? AND schema_name = 'main'", [table]).fetchall())
    stage = f"legacy_stage_{table}"
    fields = ", ".join(f'"{c}" {_STAGED[c][0] if c in _STAGED else types[c]}' for c in columns)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {stage} ({fields})")
    appender = con.appender(stage)
    count = 0
    batch: list[tuple[object, ...]] = []
    for row in rows:
        batch.append(tuple(row))
        if len(batch) >= 10_000:
            appender.append_rows(batch)
            count += len(batch)
            batch = []
    if batch:
        appender.append_rows(batch)
        count += len(batch)
    appender.flush()
    select = ", ".join(_STAGED[c][1] if c in _STAGED else f'"{c}"' for c in columns)
    con.execute(f"INSERT INTO {table} SELECT {select} FROM {stage}")
    con.execute(f"DROP TABLE {stage}")
    return count


def write_duckdb(path: Path, *, decisions: Iterable[Row] = (), events: Iterable[Row] = (), version: int = 2) -> Path:
    """The previous version's DuckDB file (schema `version`) holding these rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    try:
        con.execute("SET TimeZone = 'UTC'")
        create_duckdb(con, version=version)
        append_duckdb(con, "decisions", decisions)
        append_duckdb(con, "events", events)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return path


def write_state(state_dir: Path, *, moved: tuple[Iterable[Row], Iterable[Row]] = ((), ()),
                journal: tuple[Iterable[Row], Iterable[Row]] = ((), ()), outbox: Iterable[Row] = (),
                hot_wal: bool = False) -> Path:
    """A previous version's state dir: `moved` (decisions, events) in audit/audit.duckdb, `journal`
    (decisions, events) and `outbox` rows in audit/journal.sqlite3. Returns the audit directory.
    (The previous version created both files on its first start, so both always exist.)"""
    audit = state_dir / "audit"
    write_duckdb(audit / DUCKDB_FILE, decisions=moved[0], events=moved[1])
    write_journal(audit / JOURNAL_FILE, decisions=journal[0], events=journal[1], outbox=outbox, hot_wal=hot_wal)
    return audit
