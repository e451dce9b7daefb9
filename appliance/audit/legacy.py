"""What the previous version's audit log looks like on disk, for the upgrade that imports it and
for the views writer that must not replace its database before then. Opens DuckDB: helper
processes only (the service asks the cheap `layout.previous_version`)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from appliance.audit.layout import Layout

JOURNAL_FILE = "journal.sqlite3"


def legacy_duckdb(path: Path) -> bool:
    """Whether `path` is the previous version's audit database (tables, not our views)."""
    if not path.exists():
        return False
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' "
                          "AND table_name IN ('decisions', 'events')").fetchone()
    finally:
        con.close()
    return bool(row and row[0])


def needs_upgrade(layout: Layout) -> bool:
    return (layout.audit_dir / JOURNAL_FILE).exists() or legacy_duckdb(layout.views_file)
