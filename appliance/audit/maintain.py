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
from pathlib import Path
from typing import Any

from appliance.audit.helpers import report
from appliance.audit.layout import Layout


def _seal(layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from appliance.audit.seal import convert_pending

    done = convert_pending(layout)
    return {"segments": done.segments, "decisions": done.decisions, "events": done.events,
            "files": len(done.files), "watermark": done.watermark.last_seq, "problems": done.problems}


TASKS = {"seal": _seal}


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
