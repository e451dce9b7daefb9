"""Exporting the audit log to Parquet (a time range, tail included), for use elsewhere."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from appliance.audit.export import ExportReport, export_parquet
from appliance.audit.query import AuditQuery


def export_range(state_dir: Path, to_dir: Path, *, since: datetime | None, until: datetime | None) -> ExportReport:
    """decisions and events with since <= ts < until, as export.py lays them out
    (`to_dir/decisions/day=.../*.parquet`): the Parquet store and the records not converted yet."""
    with AuditQuery(state_dir, locked=False) as query:
        staging = query.layout.tmp_dir / f"export-{os.getpid()}-{id(query)}"
        cursor = query.cursor()
        try:
            return export_parquet(cursor, staging, Path(to_dir), since=since, until=until)
        finally:
            cursor.close()
