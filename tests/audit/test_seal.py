"""The seal helper: sealed log segments to Parquet by day, crash-safe and idempotent."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from appliance.audit.layout import Layout
from appliance.audit.query import AuditQuery
from appliance.audit.records import DECISION, EVENT
from appliance.audit.seal import convert_pending, write_views
from tests.audit.factory import decision, epoch, event, generate
from tests.audit.logfiles import chunks, rows_to_records, write_log, write_segment
from tests.helpers import wait_until

START = epoch("2026-11-20T08:00:00")


def build_log(state: Path, count: int = 600, per_segment: int = 100, step: float = 180.0) -> tuple[list, list, int]:
    decisions, events = generate(count, start=START, step=step)
    last = write_log(state / "log", chunks(rows_to_records(decisions, events), per_segment))
    return decisions, events, last


def views(state: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(state / "audit" / "audit.duckdb"), read_only=True)


def ids_through_query(state: Path, table: str) -> list[int]:
    with AuditQuery(state) as query:
        return [r[0] for r in query.cursor().execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]


def test_sealed_segments_become_parquet_per_day_and_the_active_one_stays(tmp_path: Path):
    decisions, events, _last = build_log(tmp_path)
    report = convert_pending(Layout(tmp_path))
    records = sorted([(r[0], "d") for r in decisions] + [(r[0], "e") for r in events])
    active = records[600:]  # the last segment (records 601..) is still being written
    assert report.segments == 6
    assert report.decisions + report.events == 600
    assert report.watermark.last_seq == 600
    days = sorted(p.parent.name for p in (tmp_path / "audit" / "parquet" / "decisions").rglob("*.parquet"))
    assert days == ["day=2026-11-20", "day=2026-11-21"]  # 600 x 3 min crosses midnight
    con = views(tmp_path)
    stored = con.execute("SELECT count(*) FROM decisions").fetchone()[0] + con.execute("SELECT count(*) FROM events").fetchone()[0]
    assert stored == 600 and len(active) == len(records) - 600


def test_parquet_rows_read_back_as_the_audit_columns(tmp_path: Path):
    ts = epoch("2026-11-27T10:15:30.123456")
    row = decision(1 << 50, ts, verdict="reject", payload=b"\x00\xffraw")
    hidden = decision((1 << 50) + 1, ts, payload=b"forward only")
    connected = event((1 << 50) + 2, ts, "client_connected", "dev-1", {"keepalive": 60})
    write_segment(tmp_path / "log", 1, [(DECISION, (*row, False, None, True)),
                                        (DECISION, (*hidden, True, 1, False)), (EVENT, connected)])
    write_segment(tmp_path / "log", 4, [])
    convert_pending(Layout(tmp_path))
    con = views(tmp_path)
    con.execute("SET TimeZone = 'UTC'")
    got = con.execute("SELECT * FROM decisions ORDER BY id").fetchall()
    assert [d[0] for d in con.description] == [c for c in DECISION.columns]
    assert got[0][9] == b"\x00\xffraw"
    assert got[0][18] == [{"check": "schema", "message": "/temperature: 200 is greater than the maximum of 125",
                           "schema": "temperature:v1", "path": "/temperature"}]
    assert got[1][9] is None  # not audited: the payload was in the log only to be forwarded
    assert str(got[0][1]) == "2026-11-27 10:15:30.123456+00:00"
    assert con.execute("SELECT detail.keepalive::INT FROM events").fetchall() == [(60,)]
    assert con.execute("SELECT id FROM quarantine").fetchall() == [(1 << 50,)]


def test_views_file_works_before_any_parquet_file_exists(tmp_path: Path):
    write_views(Layout(tmp_path))
    con = views(tmp_path)
    for table in ("decisions", "events", "accepted", "rejected", "quarantine"):
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    assert [r[0] for r in con.execute("DESCRIBE decisions").fetchall()] == list(DECISION.columns)
    con.close()
    build_log(tmp_path)
    convert_pending(Layout(tmp_path))
    assert views(tmp_path).execute("SELECT count(*) FROM decisions").fetchone()[0] > 0


def test_a_rerun_converts_nothing_twice(tmp_path: Path):
    build_log(tmp_path)
    convert_pending(Layout(tmp_path))
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "audit" / "parquet").rglob("*.parquet")}
    again = convert_pending(Layout(tmp_path))
    assert again.segments == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "audit" / "parquet").rglob("*.parquet")} == files


def test_newly_sealed_segments_are_converted_on_the_next_run(tmp_path: Path):
    decisions, _events, last = build_log(tmp_path, count=300)
    convert_pending(Layout(tmp_path))
    more = [(DECISION, (*decision(1 << 62, START + 90_000), False, None, True))]
    write_segment(tmp_path / "log", last + 1, more)  # seals the previous active segment
    report = convert_pending(Layout(tmp_path))
    assert report.segments == 1
    assert ids_through_query(tmp_path, "decisions") == sorted([r[0] for r in decisions] + [1 << 62])


class Crash(Exception):
    pass


# ~25 crash points, two conversions and several queries each: 118-127 s on the shared 2-core VM.
@pytest.mark.timeout(400)
def test_a_crash_after_any_step_then_a_rerun_leaves_every_row_exactly_once(tmp_path: Path):
    reference = tmp_path / "reference"
    _decisions, _events, _ = build_log(reference, per_segment=70)
    convert_pending(Layout(reference), max_batch_bytes=1)
    expected = {t: ids_through_query(reference, t) for t in ("decisions", "events")}
    steps = 0

    def count(step: str) -> None:
        nonlocal steps
        steps += 1

    build_log(tmp_path / "counting", per_segment=70)
    convert_pending(Layout(tmp_path / "counting"), max_batch_bytes=1, checkpoint=count)
    assert steps > 20
    for crash_at in range(1, steps + 1):
        state = tmp_path / f"crash{crash_at}"
        build_log(state, per_segment=70)
        seen = 0

        def crash(step: str, crash_at: int = crash_at) -> None:
            nonlocal seen
            seen += 1
            if seen == crash_at:
                raise Crash(step)

        with pytest.raises(Crash):
            convert_pending(Layout(state), max_batch_bytes=1, checkpoint=crash)
        # Between the crash and the rerun a reader sees every record once (files past the
        # watermark are ignored, their records read from the log).
        for table in ("decisions", "events"):
            assert ids_through_query(state, table) == expected[table], (crash_at, table)
        convert_pending(Layout(state), max_batch_bytes=1)
        for table in ("decisions", "events"):
            assert ids_through_query(state, table) == expected[table], (crash_at, table)
            con = views(state)
            assert con.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone() == \
                (len(expected[table]) - _tail_count(state, table),) * 2
            con.close()


def _tail_count(state: Path, table: str) -> int:
    with AuditQuery(state) as query:
        return query.cursor().execute(f"SELECT count(*) FROM _tail_{table}").fetchone()[0]


def test_sigkill_of_the_helper_at_random_points_then_rerun_loses_and_duplicates_nothing(tmp_path: Path):
    rng = random.Random(13)
    decisions, events, _ = build_log(tmp_path, count=3000, per_segment=100, step=30.0)
    expected = sorted(r[0] for r in decisions)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "appliance.audit.seal", "--state-dir", str(tmp_path), "--max-batch-bytes", "1"]
    parquet = tmp_path / "audit" / "parquet" / "decisions"
    for _ in range(4):
        before = len(list(parquet.rglob("*.parquet"))) if parquet.exists() else 0
        helper = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = before + rng.randrange(1, 4)
        wait_until(lambda helper=helper, target=target: helper.poll() is not None or
                   (parquet.exists() and len(list(parquet.rglob("*.parquet"))) >= target), timeout=60)
        helper.send_signal(signal.SIGKILL)
        helper.wait()
        # Whatever the kill interrupted, a reader sees every decision once (Parquet + log tail).
        assert ids_through_query(tmp_path, "decisions") == expected
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert ids_through_query(tmp_path, "decisions") == expected
    con = views(tmp_path)
    count, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM decisions").fetchone()
    assert count == distinct
    # Everything but the active segment's records is in Parquet, once.
    with AuditQuery(tmp_path) as query:
        assert query.tail_records + count + con.execute("SELECT count(*) FROM events").fetchone()[0] == 3000 + len(events)


def test_helper_prints_a_summary(tmp_path: Path):
    build_log(tmp_path)
    out = subprocess.run([sys.executable, "-m", "appliance.audit.seal", "--state-dir", str(tmp_path)],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["segments"] == 6 and summary["watermark"] == 600


def test_files_a_crashed_run_left_past_the_watermark_are_removed_first(tmp_path: Path):
    build_log(tmp_path)

    def crash(step: str) -> None:
        if step == "file_published":
            raise Crash(step)

    with pytest.raises(Crash):
        convert_pending(Layout(tmp_path), max_batch_bytes=1, checkpoint=crash)
    orphan = next((tmp_path / "audit" / "parquet").rglob("*.parquet"))
    seen = []
    convert_pending(Layout(tmp_path), max_batch_bytes=1,
                    checkpoint=lambda step: seen.append(orphan.exists()) if not seen else None)
    assert seen == [False]  # gone before the batch was written again
    con = views(tmp_path)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM decisions").fetchone() == (569, 569)


def test_finished_days_are_compacted_into_one_file_per_table(tmp_path: Path):
    decisions, _events, _ = build_log(tmp_path, per_segment=50)
    report = convert_pending(Layout(tmp_path), max_batch_bytes=1)
    names = sorted(p.name for p in (tmp_path / "audit" / "parquet" / "decisions").rglob("*.parquet"))
    assert len(names) == 2 and all("-" in name for name in names)  # one per day, named first-last
    assert report.compacted > 2
    assert ids_through_query(tmp_path, "decisions") == sorted(r[0] for r in decisions)
    con = views(tmp_path)
    # 569 of the 600 decisions are in sealed segments; the others are in the active one
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM decisions").fetchone() == (569, 569)


def test_a_compaction_interrupted_before_deleting_the_old_files_shows_no_row_twice(tmp_path: Path):
    decisions, _events, _ = build_log(tmp_path, per_segment=50)

    def crash(step: str) -> None:
        if step == "compacted":
            raise Crash(step)

    with pytest.raises(Crash):
        convert_pending(Layout(tmp_path), max_batch_bytes=1, checkpoint=crash)
    files = list((tmp_path / "audit" / "parquet" / "decisions").rglob("*.parquet"))
    assert any("-" in p.name for p in files) and any("-" not in p.name for p in files)
    assert ids_through_query(tmp_path, "decisions") == sorted(r[0] for r in decisions)
    convert_pending(Layout(tmp_path))
    assert all("-" in p.name for p in (tmp_path / "audit" / "parquet" / "decisions").rglob("*.parquet"))
    con = views(tmp_path)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM decisions").fetchone() == (569, 569)


def test_today_is_not_compacted(tmp_path: Path):
    now = __import__("time").time()
    rows = [decision(i + 1, now - 3 + i * 0.001) for i in range(40)]
    write_log(tmp_path / "log", chunks(rows_to_records(rows), 10) + [[]])
    report = convert_pending(Layout(tmp_path), max_batch_bytes=1)
    if report.files and len({p.parent for p in report.files}) == 1:  # not across midnight
        assert report.compacted == 0
        assert len(list((tmp_path / "audit" / "parquet" / "decisions").rglob("*.parquet"))) == 4


def test_compaction_runs_group_consecutive_small_files_and_skip_big_ones():
    from datetime import date

    from appliance.audit.layout import ParquetFile
    from appliance.audit.seal import _runs

    files = [ParquetFile(Path(f"/x/{i}.parquet"), "decisions", date(2026, 1, 1), i, i) for i in range(1, 8)]
    rows = {f.path: n for f, n in zip(files, [10, 10, 600, 10, 400, 400, 400], strict=True)}
    runs = _runs(files, rows, target_rows=1000)
    # 600 >= half the target: left alone, splitting the runs around it; 7 would take the second
    # run past the target, and alone it is no run.
    assert [[f.first_seq for f in run] for run in runs] == [[1, 2], [4, 5, 6]]


def test_a_corrupt_sealed_segment_keeps_the_records_before_the_damage(tmp_path: Path):
    decisions, _, _ = build_log(tmp_path)
    segments = sorted((tmp_path / "log").glob("*.seg"))
    damaged = segments[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = convert_pending(Layout(tmp_path))
    assert report.segments == 6
    assert len(report.problems) == 1 and "corrupt" in report.problems[0]
    with AuditQuery(tmp_path) as query:
        got = {r[0] for r in query.cursor().execute("SELECT id FROM decisions").fetchall()}
    lost = {r[0] for r in decisions} - got
    assert 0 < len(lost) < 60  # the rest of that segment, nothing else
    assert report.watermark.last_seq == 600
