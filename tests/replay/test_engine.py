"""The parallel engine against a plain one: the same report, however the work is split.

The reference here is deliberately naive: every recorded message, read in id order with one SQL
query, judged by `Governance.check` in this process, counted in plain dicts. The engine reads
Parquet row ranges in worker processes, batches a log tail, merges tallies in whatever order the
workers finish, and must come to exactly the same counts, reasons and samples.
"""

from __future__ import annotations

import itertools
import shutil
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from appliance.governance import Governance, load_schema_set
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message
from replay import engine
from bench.replay_rate import demo_traffic, generate
from replay.judge import NO_PAYLOAD, Judge, load_for_replay
from replay.report import FailOn, build_report
from replay.rows import Filters
from replay.sources import ChainedSource, DecisionRowsSource, ParquetSource
from replay.tally import SAMPLES_PER_REASON, UNMAPPED, Tally, common_numbers, detail, excerpt, normalise, numbers
from tests.replay.conftest import V1, V2

MESSAGES = 20_000
TAIL = 3_000


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recording")
    generate(out, MESSAGES, seed=7, file_messages=12_000)
    return out


def _tail() -> list[tuple[object, ...]]:
    """Messages after the recording's, as a log tail reader would hand them over: 40 different
    messages repeated (the judge's verdict cache has work), some without a payload (retention removed
    it) and some released from quarantine (not replayed twice)."""
    rows = []
    for index, row in enumerate(demo_traffic(TAIL, seed=8, distinct=40)):
        record = list(row)
        record[1] = float(record[1]) + 4 * 86_400  # type: ignore[arg-type]
        if index % 500 == 0:
            record[9] = None  # payload
        if index % 700 == 1:
            record[23] = 12345  # released_from
        rows.append(tuple(record))
    return rows


def _reference(recording: Path | None, tail: list[tuple[object, ...]], target: Path) -> list[dict[str, Any]]:
    """The report's groups, computed the obvious way."""
    rows = []
    if recording is not None:
        files = sorted(str(p) for p in (recording / "decisions").rglob("*.parquet"))
        with duckdb.connect() as con:
            rows = con.execute(
                "SELECT topic, payload, qos, retain, client_id, username, peer, mqtt_version, verdict, epoch(ts), is_will, "
                "topic_filter FROM read_parquet(?) WHERE released_from IS NULL ORDER BY id", [files]
            ).fetchall()
    for r in tail:
        if r[23] is None:
            rows.append((r[6], r[9], r[7], r[8], r[2], r[3], r[4], r[5], r[16], r[1], r[22], r[15]))
    governance = Governance(load_schema_set(target))  # the plain set: the demo sets have no rate rules
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    for position, (topic, payload, qos, retain, client_id, username, peer, version, recorded, ts, is_will,
                   recorded_filter) in enumerate(rows):
        if payload is None:
            _, mapping = governance.schema_set.route(topic)
            key = (mapping.topic_filter, mapping.schema_name) if mapping else (recorded_filter or UNMAPPED, None)
            group = groups.setdefault(key, _empty(*key))
            group["replayed"] += 1
            group["errors"] += 1
            group["errors_by_reason"][NO_PAYLOAD] += 1
            continue
        client = ClientInfo(client_id, username, peer, ProtocolVersion(version))
        verdict = governance.check(Message(topic, payload, qos, retain, client, is_will=is_will))
        key = (verdict.topic_filter or UNMAPPED, verdict.schema if verdict.topic_filter else None)
        group = groups.setdefault(key, _empty(*key))
        group["replayed"] += 1
        group["unmapped"] += verdict.topic_filter is None
        if verdict.accepted:
            group["accepted"] += 1
            group["still_accepted" if recorded == "accept" else "newly_accepted"] += 1
            continue
        group["rejected"] += 1
        breaking = recorded == "accept"
        group["newly_rejected" if breaking else "still_rejected"] += 1
        for reason in verdict.reasons:
            message, path = normalise(reason.message, reason.path)
            tallied = group["reasons"].setdefault((reason.check, path, message), {"count": 0, "breaking": 0, "seen": [], "limits": None})
            tallied["limits"] = common_numbers(tallied["limits"], numbers(reason.message))
            tallied["count"] += 1
            tallied["breaking"] += breaking
            tallied["seen"].append((not breaking, position, {
                "topic": topic, "client_id": client_id, "time": datetime.fromtimestamp(ts, UTC).isoformat(),
                "payload": excerpt(payload), "reference": recorded, "breaking": breaking}))
    out = []
    for group in groups.values():
        reasons = []
        for (check, path, message), tallied in group.pop("reasons").items():
            kept = sorted(tallied["seen"], key=lambda seen: seen[:2])[:SAMPLES_PER_REASON]  # breaking first, then earliest
            samples = [sample for _, _, sample in sorted(kept, key=lambda seen: seen[2]["time"])]
            reasons.append({"check": check, "path": path, "message": message,
                            "detail": detail(message, tallied["limits"]), "count": tallied["count"],
                            "breaking": tallied["breaking"], "samples": samples})
        reasons.sort(key=lambda r: (-r["breaking"], -r["count"], r["check"], r["message"], r["path"] or ""))
        group["more_reasons"] = max(0, len(reasons) - 10)
        group["reasons"] = reasons[:10]
        group["breaking"] = group["newly_rejected"]
        compared = group["replayed"] - group["errors"]
        group["breaking_rate"] = round(group["breaking"] / compared, 6) if compared else 0.0
        group["errors_by_reason"] = [{"message": m, "count": n} for m, n in group["errors_by_reason"].items()]
        out.append(group)
    return sorted(out, key=lambda g: (-g["breaking"], g["topic_filter"], g["schema"] or ""))


def _empty(topic_filter: str, schema: str | None) -> dict[str, Any]:
    group: dict[str, Any] = {"topic_filter": topic_filter, "schema": schema}
    for name in ("replayed", "accepted", "rejected", "still_accepted", "still_rejected", "newly_rejected", "newly_accepted",
                 "accepted_without_reference", "rejected_without_reference", "unmapped", "errors"):
        group[name] = 0
    group["reasons"] = {}
    group["errors_by_reason"] = defaultdict(int)
    return group


def _replay(recording: Path, tail: list[tuple[object, ...]], target: Path, jobs: int) -> dict[str, Any]:
    filters = Filters()
    source = ChainedSource([ParquetSource([str(recording)], filters.unsampled()),
                            DecisionRowsSource(tail, filters.unsampled(), "tail")], filters, "recording and tail")
    try:
        tally, stats = engine.run(source.work(engine.BATCH_SIZE, engine.pieces(jobs)), target=target, baseline=None, jobs=jobs,
                                  in_process_below=10_000)
    finally:
        source.close()
    assert stats.workers == jobs
    return build_report(tally, source="", filters={}, target={}, baseline=None, fail_on=FailOn.parse("any"), notes=[])


@pytest.mark.parametrize("target", [V2, V1], ids=["v2", "v1"])
def test_the_parallel_engine_reports_what_a_plain_judge_finds(recording, target):
    tail = _tail()
    expected = _reference(recording, tail, target)
    pooled = _replay(recording, tail, target, jobs=2)
    assert pooled["groups"] == expected
    assert pooled["totals"]["replayed"] == MESSAGES + TAIL - sum(1 for r in tail if r[23] is not None)
    if target == V1:  # the generator records the verdicts v1 gives
        assert pooled["totals"]["newly_rejected"] == pooled["totals"]["newly_accepted"] == 0
        assert pooled["totals"]["still_rejected"] > 2_000
    if target == V2:  # the recording has what it takes to tell samples apart: breaking and not
        temperature = next(g for g in expected if g["topic_filter"] == "sensor/+/temperature")
        assert temperature["newly_rejected"] > 1_000 and temperature["still_rejected"] > 1_000
    assert _replay(recording, tail, target, jobs=1)["groups"] == expected


@pytest.mark.parametrize("layout", ["as generated", "one file"])
def test_units_cover_every_row_once_in_order(recording, tmp_path, layout):
    if layout == "one file":  # the whole recording in one file of small row groups: cut into many units
        with duckdb.connect() as con:
            con.execute(f"COPY (SELECT * FROM read_parquet('{recording}/decisions/*/*.parquet') ORDER BY id) "
                        f"TO '{tmp_path / 'one.parquet'}' (FORMAT parquet, ROW_GROUP_SIZE 3000)")
        recording = tmp_path
    whole = ParquetSource([str(recording)], Filters())
    try:
        streamed = [row for batch in whole.batches(1_000) for row in batch]
        assert len(streamed) == MESSAGES
        for pieces in (1, 5, 40):
            units = whole.units(pieces)
            assert [row for unit in units for batch in unit.batches(999) for row in batch] == streamed
            by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for unit in units:
                by_file[unit.file].append((unit.first, unit.end))
            for ranges in by_file.values():
                assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        if layout == "one file":
            assert len(whole.units(1)) == 1 and len(whole.units(40)) >= 4
    finally:
        whole.close()


def test_filters_apply_alike_to_parquet_and_to_decision_rows(recording):
    filters = Filters(since=datetime(2026, 11, 28, tzinfo=UTC), until=datetime(2026, 11, 29, 12, tzinfo=UTC),
                      topic="sensor/+/temperature", client=None)
    parquet = ParquetSource([str(recording)], filters)
    rows = DecisionRowsSource(demo_traffic(MESSAGES, seed=7), filters, "rows")
    try:
        from_parquet = [row for unit in parquet.units(8) for batch in unit.batches(500) for row in batch]
        from_rows = [row for batch in rows.batches(500) for row in batch]
    finally:
        parquet.close()

    def rounded(batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [(*row[:9], round(row[9], 3), *row[10:]) for row in batch]

    assert 1_000 < len(from_rows) < MESSAGES // 2
    assert rounded(from_parquet) == rounded(from_rows)
    one_client = Filters(client="t3")
    assert {row[4] for batch in DecisionRowsSource(demo_traffic(2_000, seed=7), one_client, "rows").batches(100) for row in batch} == {"t3"}


def test_sampling_a_chained_recording_counts_positions_across_its_parts(recording):
    tail = _tail()
    filters = Filters(sample=7, limit=4_000)
    source = ChainedSource([ParquetSource([str(recording)], filters.unsampled()),
                            DecisionRowsSource(tail, filters.unsampled(), "tail")], filters, "both")
    whole = ChainedSource([ParquetSource([str(recording)], Filters()), DecisionRowsSource(tail, Filters(), "tail")],
                          Filters(), "both")
    try:
        every = [row for batch in whole.batches(1_000) for row in batch]
        sampled = [row for work in source.work(1_000, 8) for row in work]  # type: ignore[union-attr]
    finally:
        source.close()
        whole.close()
    assert sampled == every[6::7][:4_000]


def test_repeated_messages_are_judged_once_with_the_same_outcome():
    rows = [row for row in demo_traffic(12_000, seed=9, distinct=300) if row[23] is None]
    judge = Judge(load_for_replay(V2))
    tally = Tally()
    for item, start in enumerate(range(0, len(rows), 4_000)):
        batch = next(DecisionRowsSource(rows[start:start + 4_000], Filters(), "rows").batches(4_000))
        judge.judge(batch, tally, item)
        assert judge._verdicts, "the cache is in use: 300 different messages, repeated"
    report = build_report(tally, source="", filters={}, target={}, baseline=None, fail_on=FailOn.parse("any"), notes=[])
    assert report["groups"] == _reference(None, rows, V2)
    assert report["totals"]["rejected"] > 1_000


def test_a_corrupt_file_read_by_a_worker_is_an_input_error(recording, tmp_path, run):
    copy = tmp_path / "recording"
    shutil.copytree(recording, copy)
    broken = max((copy / "decisions").rglob("*.parquet"))
    data = bytearray(broken.read_bytes())
    data[4: len(data) // 2] = bytes(len(data) // 2 - 4)  # the first columns' pages; the footer is intact
    broken.write_bytes(bytes(data))
    result = run("--from", copy, "--against", V2, "--jobs", "2", "--format", "json")
    assert result.exit_code == 2
    assert "cannot read" in result.stderr and broken.name in result.stderr


def test_units_read_files_with_other_columns_as_the_whole_recording_does(recording, tmp_path):
    """An older export without `dry_run`, `released_from` and `peer`, and an `events` file (no
    topic) beside the decisions: each unit selects what its own file has."""
    first = min(str(p) for p in (recording / "decisions").rglob("*.parquet"))
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT id, ts, client_id, topic, payload, verdict, qos FROM read_parquet('{first}') LIMIT 800) "
                    f"TO '{tmp_path / 'a-old.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY (SELECT 1::BIGINT AS id, 'client_connected' AS kind) TO '{tmp_path / 'b-events.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY (SELECT *, true AS dry_run FROM read_parquet('{first}') LIMIT 900) TO '{tmp_path / 'c-dry.parquet'}' (FORMAT parquet)")
    for filters in (Filters(), Filters(since=datetime(2026, 11, 27, 9, tzinfo=UTC))):
        source = ParquetSource([str(tmp_path)], filters)
        try:
            streamed = [row for batch in source.batches(500) for row in batch]
            from_units = [row for unit in source.units(4) for batch in unit.batches(300) for row in batch]
        finally:
            source.close()
        assert from_units == streamed
        assert 0 < len(streamed) <= 1_700
        assert {row[8] for row in streamed} <= {"accept", "reject"}
    assert all(row[6] is None for row in streamed if row[0] and row[11] is None)  # the old file: no peer, no set
