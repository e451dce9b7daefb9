"""Purging quarantined payloads so that their bytes are gone from disk, not just hidden.

A quarantined message's payload can be in three places: a Parquet file (converted), a sealed log
segment (converted or not: segments stay until forwarded and converted, and retention removes them),
and the active segment. The active segment is sealed first (through the running log's `seal`), then
every Parquet file and every sealed segment holding one of the payloads is rewritten without it
(rewrite.py). The verdicts stay: `rejected` still shows them, with `payload` NULL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from appliance.audit.layout import Layout
from appliance.audit.records import DECISION
from appliance.audit.rewrite import drop_payloads, drop_payloads_in_segment
from appliance.audit.seal import connect
from appliance.msglog.reader import list_segments

# The quarantine view's condition, less `payload IS NOT NULL` (which the rewrite adds).
QUARANTINED = "verdict = 'reject' AND NOT dry_run"
_VERDICT, _DRY_RUN, _ID = (DECISION.names.index(n) for n in ("verdict", "dry_run", "id"))


def purge_quarantine(state_dir: Path, ids: Sequence[int] | None, *,
                     seal: Callable[[], object] | None) -> int:
    """Removes the payloads of the quarantined messages `ids` (None: all); returns how many.

    `seal` rolls the running log's active segment (MessageLog.seal); pass None only when no
    writer runs (the appliance is stopped): then the newest segment is rewritten too."""
    if ids is not None and not ids:
        return 0
    wanted = None if ids is None else frozenset(int(i) for i in ids)
    condition = QUARANTINED
    if wanted is not None:
        listed = ", ".join(str(i) for i in sorted(wanted))
        # The BETWEEN lets DuckDB skip row groups by their min/max id before the list lookup.
        condition += f" AND id BETWEEN {min(wanted)} AND {max(wanted)} AND id IN ({listed})"

    def match(row: tuple[object, ...]) -> bool:
        return (row[_VERDICT] == "reject" and not row[_DRY_RUN]
                and (wanted is None or row[_ID] in wanted))

    if seal is not None:
        seal()
    layout = Layout(state_dir)
    with layout.maintenance():
        segments = list_segments(layout.log_dir)
        if seal is not None:
            segments = segments[:-1]  # the new active segment: only records appended after the seal
        con = connect(layout)
        try:
            purged = drop_payloads(con, [f.path for f in layout.files("decisions")], condition)
        finally:
            con.close()
        for info in segments:
            try:
                purged |= drop_payloads_in_segment(info.path, match)
            except FileNotFoundError:
                continue  # removed by the log's retention meanwhile
    return len(purged)
