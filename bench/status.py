"""What a running appliance says about itself, through its admin socket (`appliance status --json`):
the message log's counters (records, bytes appended, fdatasync calls) and its helper processes.

Read in the benchmark's own process (no `appliance status` subprocess, whose Python start-up would
load the shared cores), outside the timed interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance import admin

# The message log's counters a run reports as deltas (appliance/msglog/log.py MessageLog.stats).
LOG_COUNTERS = ("records", "bytes_appended", "syncs")


def appliance_status(state_dir: Path, timeout: float = 10.0) -> dict[str, Any] | None:
    """The `status` report of the appliance running on `state_dir`; None when none answers."""
    try:
        report: dict[str, Any] = admin.call(state_dir, "status", timeout=timeout)["status"]
    except (admin.AdminUnavailable, admin.AdminError, OSError, ValueError):
        return None
    return report


def log_counters(state_dir: Path | None) -> dict[str, int] | None:
    """The message log's counters so far (audit.log in the status); None without an audit log."""
    if state_dir is None:
        return None
    report = appliance_status(state_dir)
    stats = ((report or {}).get("audit") or {}).get("log")
    if not isinstance(stats, dict):
        return None
    return {key: int(stats[key]) for key in LOG_COUNTERS if key in stats}


def helper_stats(state_dir: Path | None) -> dict[str, Any] | None:
    """Per helper task (seal, retain...): runs, failures, largest peak RSS, the last run (audit.helpers)."""
    if state_dir is None:
        return None
    helpers = ((appliance_status(state_dir) or {}).get("audit") or {}).get("helpers")
    return helpers if isinstance(helpers, dict) else None
