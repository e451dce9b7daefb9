"""Purging quarantined payloads so that their bytes are gone from disk, not just hidden.

A quarantined message's payload can be in three places: a Parquet file (converted), a sealed log
segment (converted or not: segments stay until forwarded and converted, and retention removes them),
and the active segment. The active segment is sealed first (through the running log's `seal`), then
every Parquet file and every sealed segment holding one of the payloads is rewritten without it
(rewrite.py). The verdicts stay: `rejected` still shows them, with `payload` NULL.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb

from appliance.audit.errors import AuditError
from appliance.audit.layout import Layout, sql_string, temp_name
from appliance.audit.records import DECISION
from appliance.audit.rewrite import RewriteFailed, drop_payloads_in_file, drop_payloads_in_segment
from appliance.audit.seal import connect
from appliance.msglog.reader import list_segments

# The quarantine view's condition, less `payload IS NOT NULL` (which the rewrite adds).
QUARANTINED = "verdict = 'reject' AND NOT dry_run"
_VERDICT, _DRY_RUN, _ID = (DECISION.names.index(n) for n in ("verdict", "dry_run", "id"))
UNREADABLE = "could not be read"
log = logging.getLogger(__name__)


class PurgeIncomplete(AuditError):
    """Some files could not be rewritten (disk full, a file that cannot be replaced): the payloads
    of `kept` are still on disk; those of `purged` are gone from every file that held them. Every
    other file was rewritten all the same (each rewrite is whole or nothing), so this is raised
    after the purge did all it could."""

    def __init__(self, purged: frozenset[int], kept: frozenset[int], failures: Sequence[tuple[Path, str]]):
        self.purged = purged
        self.kept = kept
        self.failures = tuple(failures)
        files = "; ".join(f"{path.name}: {error}" for path, error in self.failures)
        super().__init__(f"{len(self.failures)} file(s) could not be rewritten ({files}): {len(kept)} payload(s) "
                         f"are still on disk; {len(purged)} purged")

    @property
    def unreadable(self) -> int:
        """How many files could not even be read: which ids they hold is unknown."""
        return sum(1 for _, error in self.failures if error.startswith(UNREADABLE))

    def not_purged(self) -> str:
        """The ids still held, for a message (and "unknown" ones when a file could not be read)."""
        known = ", ".join(str(i) for i in sorted(self.kept))
        if not self.unreadable:
            return known
        unknown = f"unknown ids in {self.unreadable} file(s) that could not be read"
        return f"{known} and {unknown}" if known else unknown


def event_detail(ids: Sequence[int] | None, outcome: int | PurgeIncomplete) -> dict[str, Any]:
    """The `quarantine_purged` event's detail (without who asked): the ids asked for (or "all"),
    how many payloads are gone, and after a partial failure which ids are not and why."""
    detail: dict[str, Any] = {"ids": "all" if ids is None else [str(i) for i in ids]}
    if isinstance(outcome, PurgeIncomplete):
        detail.update(purged=len(outcome.purged), failed=[str(i) for i in sorted(outcome.kept)], error=str(outcome))
    else:
        detail["purged"] = outcome
    return detail


def purge_quarantine(state_dir: Path, ids: Sequence[int] | None, *,
                     seal: Callable[[], object] | None) -> int:
    """Removes the payloads of the quarantined messages `ids` (None: all); returns how many.
    Raises PurgeIncomplete when a file could not be rewritten (after rewriting all the others).

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
    held = f"payload IS NOT NULL AND ({condition})"

    def match(row: tuple[object, ...]) -> bool:
        return (row[_VERDICT] == "reject" and not row[_DRY_RUN]
                and (wanted is None or row[_ID] in wanted))

    if seal is not None:
        seal()
    layout = Layout(state_dir)
    purged: set[int] = set()
    kept: set[int] = set()
    failures: list[tuple[Path, str]] = []
    with layout.maintenance():
        segments = list_segments(layout.log_dir)
        if seal is not None:
            segments = segments[:-1]  # the new active segment: only records appended after the seal
        con = connect(layout)
        try:
            # One file at a time: a file DuckDB cannot read (truncated, damaged) is a failure of
            # its own (which ids it holds is unknown), and every other file is still rewritten.
            for path in [f.path for f in layout.files("decisions")]:
                source = f"read_parquet({sql_string(path)}, hive_partitioning = false)"
                try:
                    in_file = {int(r[0]) for r in con.execute(f"SELECT id FROM {source} WHERE {held}").fetchall()}
                except (OSError, duckdb.Error) as exc:
                    log.error("purge: %s could not be read: %s", path, exc)
                    failures.append((path, f"{UNREADABLE}: {_first_line(exc)}"))
                    continue
                if not in_file:
                    continue
                try:
                    drop_payloads_in_file(con, path, held)
                except (OSError, duckdb.Error) as exc:
                    log.error("purge: %s could not be rewritten: %s", path, exc)
                    kept |= in_file
                    failures.append((path, str(exc)))
                    with contextlib.suppress(OSError):
                        temp_name(path).unlink()
                else:
                    purged |= in_file
        finally:
            con.close()
        for info in segments:
            try:
                purged |= drop_payloads_in_segment(info.path, match)
            except FileNotFoundError:
                continue  # removed by the log's retention meanwhile
            except RewriteFailed as exc:
                log.error("purge: %s", exc)
                kept |= exc.ids
                failures.append((info.path, str(exc.__cause__ or exc)))
            except OSError as exc:  # could not even be read: which ids it holds is unknown
                log.error("purge: %s could not be read: %s", info.path, exc)
                failures.append((info.path, f"{UNREADABLE}: {exc}"))
    if failures:
        raise PurgeIncomplete(frozenset(purged - kept), frozenset(kept), failures)
    return len(purged)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
