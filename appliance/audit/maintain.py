"""The helper process the service starts for DuckDB work (appliance/audit/helpers.py):

    python -m appliance.audit.maintain seal        --state-dir DIR
    python -m appliance.audit.maintain retain      --state-dir DIR --policy JSON
    python -m appliance.audit.maintain export-days --state-dir DIR --to DIR
    python -m appliance.audit.maintain upgrade     --state-dir DIR

Each prints one JSON line last: what it did, and its peak RSS (`helpers.report`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.audit.helpers import report
from appliance.audit.layout import Layout


def _seal(layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from appliance.audit.seal import convert_pending

    done = convert_pending(layout)
    return {"segments": done.segments, "decisions": done.decisions, "events": done.events,
            "files": len(done.files), "watermark": done.watermark.last_seq, "problems": done.problems}


def _retain(layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    import orjson

    from appliance.audit.query import AuditQuery
    from appliance.audit.retain import enforce_retention
    from appliance.audit.retention import RetentionPolicy
    from appliance.config import RetentionConfig

    retention = RetentionConfig.model_validate(orjson.loads(args.policy or "{}"))
    policy = RetentionPolicy(
        verdicts_max_age=retention.verdicts.max_age, verdicts_max_bytes=retention.verdicts.max_bytes,
        payloads_max_age=retention.payloads.max_age, payloads_max_bytes=retention.payloads.max_bytes,
        quarantine_max_age=retention.quarantine.max_age, quarantine_max_bytes=retention.quarantine.max_bytes,
    )
    done = enforce_retention(layout.state_dir, policy)
    with AuditQuery(layout.state_dir) as query:
        held = query.query("SELECT coalesce(sum(octet_length(payload)), 0) FROM quarantine").rows[0][0]
    (layout.audit_dir / "quarantine_bytes").write_text(f"{int(held)}\n")
    return {"retention": str(done), "quarantine_bytes": int(held)}


def _export_days(layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Export each finished UTC day not exported yet (a marker file per day in the target remembers)."""
    from appliance.audit.archive import export_range

    to_dir: Path = args.to
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    exported = []
    for day in sorted({f.day for f in layout.files("decisions")}):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        marker = to_dir / f".exported-{day.isoformat()}"
        if start >= today or marker.exists():
            continue
        export_range(layout.state_dir, to_dir, since=start, until=start + timedelta(days=1))
        marker.write_text(now.isoformat() + "\n")
        exported.append(day.isoformat())
    return {"exported_days": exported}


def _upgrade(layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Import a previous version's state dir (before the service opens the log: it is the writer here)."""
    from appliance.audit.upgrade import upgrade
    from appliance.msglog import MessageLog

    message_log = MessageLog(layout.log_dir)
    message_log.open()
    message_log.start(None)
    try:
        done = upgrade(layout.state_dir, message_log)
    finally:
        message_log.stop()
    if done is not None and done.max_id:
        from appliance.audit.layout import write_durably

        # The service's id clock continues after the imported ids (audit/service.py, LAST_ID_FILE).
        write_durably(layout.audit_dir / "last_id", f"{done.max_id}\n".encode())
    return {"upgrade": str(done) if done is not None else "nothing to import"}


TASKS = {"seal": _seal, "retain": _retain, "export-days": _export_days, "upgrade": _upgrade}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.audit.maintain")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--policy", default=None, help="retain: the audit.retention section as JSON")
    parser.add_argument("--to", type=Path, default=None, help="export-days: the export directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{args.task}: %(levelname)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    result = TASKS[args.task](Layout(args.state_dir), args)
    report({"task": args.task, "ok": True, **result, "seconds": round(time.monotonic() - started, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
