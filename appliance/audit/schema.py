"""The DuckDB schema of the audit log and the migrations that build it.

A file records its version in `schema_migrations`; `migrate()` applies every missing step in order,
each in its own transaction, so a file from any older appliance is upgraded one step at a time.
Adding v2 means writing `_v2(con)` and appending it to `MIGRATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from appliance.audit.errors import AuditError

REASON_TYPE = 'STRUCT("check" VARCHAR, message VARCHAR, "schema" VARCHAR, path VARCHAR)[]'

# Tables and views an analyst may read (see guard.py); everything else is refused.
QUERYABLE = ("decisions", "events", "quarantine", "accepted", "rejected")


def _v1(con: duckdb.DuckDBPyConnection) -> None:
    # No PRIMARY KEY or other index on purpose: an ART index costs on every append, and ids and ts
    # only ever grow, so DuckDB's per-row-group min/max (zonemaps) already prune id and time ranges.
    con.execute(f"""
        CREATE TABLE decisions (
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
        )""")
    con.execute("""
        CREATE TABLE events (
            id        BIGINT NOT NULL,
            ts        TIMESTAMPTZ NOT NULL,
            kind      VARCHAR,
            client_id VARCHAR,
            peer      VARCHAR,
            detail    JSON
        )""")
    con.execute("CREATE VIEW accepted AS SELECT * FROM decisions WHERE verdict = 'accept'")
    con.execute("CREATE VIEW rejected AS SELECT * FROM decisions WHERE verdict = 'reject'")
    con.execute(
        "CREATE VIEW quarantine AS SELECT * FROM decisions "
        "WHERE verdict = 'reject' AND payload IS NOT NULL"
    )


def _v2(con: duckdb.DuckDBPyConnection) -> None:
    # A dry run delivered its "rejected" messages: nothing was withheld, so nothing is quarantined
    # (and releasing them would deliver them twice).
    con.execute(
        "CREATE OR REPLACE VIEW quarantine AS SELECT * FROM decisions "
        "WHERE verdict = 'reject' AND payload IS NOT NULL AND NOT dry_run"
    )


Migration = tuple[int, str, Callable[[duckdb.DuckDBPyConnection], None]]

MIGRATIONS: tuple[Migration, ...] = (
    (1, "decisions, events, views accepted/rejected/quarantine", _v1),
    (2, "quarantine excludes dry-run verdicts (those messages were delivered)", _v2),
)

CURRENT_VERSION = MIGRATIONS[-1][0]


def file_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version a file is at; 0 for a new, empty file."""
    exists = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_migrations' "
        "AND schema_name = 'main' AND database_name = current_database()"
    ).fetchone()
    if not exists or not exists[0]:
        return 0
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def check_version(version: int, where: str, known: int = CURRENT_VERSION) -> None:
    if version > known:
        raise AuditError(
            f"{where} was written by a newer appliance (audit schema v{version}; this one knows up "
            f"to v{known}): upgrade the appliance or query a Parquet export instead"
        )


def migrate(
    con: duckdb.DuckDBPyConnection, where: str, migrations: tuple[Migration, ...] = MIGRATIONS
) -> int:
    """Brings the file up to the last of `migrations`; returns the version it was at."""
    version = file_version(con)
    check_version(version, where, migrations[-1][0])
    if version == 0:
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER NOT NULL, description VARCHAR, applied_at TIMESTAMPTZ NOT NULL)"
        )
    for number, description, step in migrations:
        if number <= version:
            continue
        con.begin()
        try:
            step(con)
            con.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, now())", [number, description]
            )
            con.commit()
        except BaseException:
            con.rollback()
            raise
    return version
