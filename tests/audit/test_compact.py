"""Record version 2: compact decisions that refer to connection and context records.

Every reader expands them into the same DECISION rows as version 1; each segment holds the
definitions its decisions refer to (across rolls, failed batches and restarts); a log with both
versions (a state dir written before the change, continued after it) reads as one.
"""

from __future__ import annotations

import errno
import json
import struct
import time
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audit.layout import Layout
from appliance.audit.query import AuditQuery
from appliance.audit.records import (
    COMPACT_DECISION,
    CONNECTION,
    CONTEXT,
    DECISION,
    EVENT,
    Definitions,
    IdClock,
    compact_forward_fields,
    compact_from_row,
    decode_compact,
    expand_compact,
    payload_sha256,
    placeholder,
    record_id,
)
from appliance.audit.rewrite import drop_payloads_in_segment
from appliance.audit.seal import convert_pending
from appliance.audit.sink import AuditSink
from appliance.config.upstream import OutboxBounds
from appliance.forward.outbox import Outbox, to_row
from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.msglog import MessageLog, list_segments, read_log, read_segment
from appliance.msglog.cursor import Cursor
from appliance.msglog.format import RECORD_HEADER_SIZE
from appliance.msglog.log import EpochChanged
from appliance.msglog.testing import FaultyIO
from appliance.pipeline import ClientInfo, Message, Policy, Reason, Verdict
from tests.audit.factory import decision, epoch
from tests.audit.logfiles import log_decision, write_segment

TS = epoch("2026-11-27T10:15:30.123456")
_N = {name: i for i, name in enumerate(DECISION.names)}


def _parts(row: tuple[object, ...]) -> tuple[tuple[object, ...], tuple[object, ...]]:
    return (tuple(row[_N[n]] for n in CONNECTION.names), tuple(row[_N[n]] for n in CONTEXT.names))


def _round_trip(row: tuple[object, ...]) -> tuple[object, ...]:
    connection, context = _parts(row)
    definitions = Definitions()
    definitions.add(10, CONNECTION.code, CONNECTION.encode(connection))
    definitions.add(11, CONTEXT.code, CONTEXT.encode(context))
    return definitions.decision(compact_from_row(row, 10, 11))


# -- the codec ------------------------------------------------------------------------------------

def test_a_compact_decision_expands_to_the_same_row_with_every_optional_field_set_and_null():
    full = log_decision(decision(1 << 40, TS, verdict="reject", payload=b"\x00\xff raw"), forward=True,
                        forward_qos=2)
    assert _round_trip(full) == full
    nulls = list(full)
    for name in ("username", "schema_set", "schema_name", "schema_version", "topic_filter", "released_from",
                 "forward_qos"):
        nulls[_N[name]] = None
    assert _round_trip(tuple(nulls)) == tuple(nulls)
    released = list(full)
    released[_N["released_from"]] = (1 << 62) + 5
    assert _round_trip(tuple(released)) == tuple(released)


def test_without_a_stored_payload_the_size_and_sha256_are_kept():
    row = list(log_decision(decision(5, TS, payload=b"y" * 300)))
    row[_N["payload"]] = None  # neither audited nor forwarded (or purged)
    row = tuple(row)
    body = compact_from_row(row, 1, 2)
    assert bytes.fromhex(payload_sha256(b"y" * 300)) in body
    assert _round_trip(row) == row
    assert _round_trip(row)[_N["payload_size"]] == 300


def test_with_a_stored_payload_no_sha256_is_stored_and_it_is_computed_when_read():
    row = log_decision(decision(5, TS, payload=b"x" * 100))
    body = compact_from_row(row, 1, 2)
    assert bytes.fromhex(payload_sha256(b"x" * 100)) not in body
    assert decode_compact(body)[COMPACT_FIELDS_SHA] is None
    assert _round_trip(row)[_N["payload_sha256"]] == payload_sha256(b"x" * 100)


COMPACT_FIELDS_SHA = 8  # COMPACT_FIELDS.index("payload_sha256")


def test_an_id_the_clock_borrowed_or_wrote_back_is_kept_exactly():
    base = int(TS * 1000) << IdClock.SEQUENCE_BITS
    for record_id_ in (base, base + 1, base + (1 << 20) + 7, base - 3, base - (1 << 40)):
        row = log_decision(decision(record_id_, TS))
        assert _round_trip(row)[0] == record_id_
        assert record_id(COMPACT_DECISION, compact_from_row(row, 1, 2)) == record_id_


def test_a_typical_accepted_message_costs_about_its_payload_plus_15_bytes():
    payload = json.dumps({"device_id": "sensor-0042", "temperature": 21.53, "unit": "C", "battery": 87}).encode()
    row = log_decision(decision((int(TS * 1000) << 20) + 1, TS, payload=payload), forward=True)
    compact = compact_from_row(row, 1_500_000, 1_500_001)  # seqs after a day at 20 msg/s
    assert len(compact) <= len(payload) + 18
    assert len(DECISION.encode(row)) > len(compact) + 150  # version 1: every string, every time


@settings(max_examples=200, deadline=None)
@given(payload=st.one_of(st.none(), st.binary(max_size=300)), size=st.integers(0, 1 << 30),
       qos=st.integers(0, 2), flags=st.lists(st.booleans(), min_size=5, max_size=5),
       code=st.integers(0, 255), latency=st.integers(0, 1 << 31), released=st.one_of(st.none(), st.integers(0, 1 << 62)),
       reasons=st.sampled_from(["[]", '[{"check":"schema","message":"é","schema":null,"path":"/a"}]']),
       ts=st.floats(1.6e9, 2.2e9), delta=st.integers(-(1 << 40), 1 << 40))
def test_any_decision_round_trips(payload, size, qos, flags, code, latency, released, reasons, ts, delta):
    retain, will, forward, audited, reject = flags
    sha = payload_sha256(payload if payload is not None else b"z")
    row = list(log_decision(decision((int(ts * 1000) << 20) + delta, ts), forward=forward, payload_audited=audited))
    row[_N["payload"]] = payload
    row[_N["payload_size"]] = len(payload) if payload is not None else size
    row[_N["payload_sha256"]] = sha if payload is None else payload_sha256(payload)
    row[_N["qos"]], row[_N["retain"]], row[_N["is_will"]] = qos, retain, will
    row[_N["verdict"]], row[_N["reason_code"]] = ("reject", code) if reject else ("accept", 0)
    row[_N["reasons"]], row[_N["latency_us"]], row[_N["released_from"]] = reasons, latency, released
    assert _round_trip(tuple(row)) == tuple(row)


@settings(max_examples=200, deadline=None)
@given(payload=st.one_of(st.none(), st.binary(max_size=300)), size=st.integers(0, 1 << 30),
       flags=st.lists(st.booleans(), min_size=4, max_size=4), code=st.integers(0, 255),
       latency=st.integers(0, 1 << 31), released=st.one_of(st.none(), st.integers(0, 1 << 62)),
       reasons=st.sampled_from(["[]", '[{"check":"schema","message":"é","schema":null,"path":"/a"}]']),
       ts=st.floats(1.6e9, 2.2e9), delta=st.integers(-(1 << 40), 1 << 40),
       refs=st.tuples(st.integers(1, 1 << 40), st.integers(1, 1 << 40)),
       forward_qos=st.one_of(st.none(), st.integers(0, 2)))
def test_the_forwarders_fields_are_those_of_the_full_decode(payload, size, flags, code, latency, released, reasons,
                                                            ts, delta, refs, forward_qos):
    """compact_forward_fields (the forwarder's decode) and to_row give exactly what decode_compact
    and the expanded DECISION row say, whatever optional fields the decision has."""
    retain, forward, audited, reject = flags
    row = list(log_decision(decision((int(ts * 1000) << 20) + delta, ts), forward=forward, payload_audited=audited,
                            forward_qos=forward_qos))
    row[_N["payload"]] = payload
    row[_N["payload_size"]] = len(payload) if payload is not None else size
    row[_N["payload_sha256"]] = payload_sha256(payload if payload is not None else b"z")
    row[_N["retain"]] = retain
    row[_N["verdict"]], row[_N["reason_code"]] = ("reject", code) if reject else ("accept", 0)
    row[_N["reasons"]], row[_N["latency_us"]], row[_N["released_from"]] = reasons, latency, released
    body = compact_from_row(tuple(row), *refs)
    c = decode_compact(body)
    assert compact_forward_fields(body) == (c[0], c[1], c[2], c[3], c[5], c[6])
    connection, context = _parts(tuple(row))
    definitions = Definitions()
    definitions.add(refs[0], CONNECTION.code, CONNECTION.encode(connection))
    definitions.add(refs[1], CONTEXT.code, CONTEXT.encode(context))
    full = definitions.decision(body)
    message = to_row(7, COMPACT_DECISION, body, definitions)
    name, version = full[_N["schema_name"]], full[_N["schema_version"]]
    assert message == (7, full[_N["id"]], full[_N["ts"]], full[_N["client_id"]], full[_N["topic"]],
                       b"" if payload is None else payload, full[_N["forward_qos"]], full[_N["retain"]],
                       None if name is None else name if version is None else f"{name}:{version}", RECORD_HEADER_SIZE + len(body))
    if payload is None:
        with pytest.raises(ValueError):
            compact_forward_fields(body + b"x")  # a sha256 that is not 32 bytes, as decode_compact says


def test_a_damaged_compact_body_is_refused():
    body = compact_from_row(log_decision(decision(5, TS, verdict="reject")), 1, 2)
    with pytest.raises((ValueError, IndexError)):
        decode_compact(body[:12])
    row = list(log_decision(decision(5, TS)))
    row[_N["payload"]] = None
    body = compact_from_row(tuple(row), 1, 2)
    with pytest.raises(ValueError):
        decode_compact(body + b"x")  # a sha256 that is not 32 bytes


@pytest.mark.parametrize("payload", [b"", b"abc"])
@pytest.mark.parametrize("reasons", ["[]", '[{"check":"schema","message":"x","schema":null,"path":""}]'])
def test_a_body_the_full_decode_refuses_is_refused_by_the_forwarders_decode(payload, reasons):
    """Every prefix of a rejected decision with its payload (a record that passed its CRC but was
    written short): where decode_compact refuses it, so does compact_forward_fields, with the error
    of a damaged record (the outbox then reports it instead of sending an empty payload)."""
    row = list(log_decision(decision(5, TS, verdict="reject")))
    row[_N["payload"]], row[_N["payload_size"]], row[_N["reasons"]] = payload, len(payload), reasons
    body = compact_from_row(tuple(row), 1, 2)
    refused = 0
    for end in range(len(body)):
        short = body[:end]
        try:
            c = decode_compact(short)
        except (ValueError, IndexError, struct.error):
            refused += 1
            with pytest.raises((ValueError, IndexError, struct.error)):
                compact_forward_fields(short)
        else:
            assert compact_forward_fields(short) == (c[0], c[1], c[2], c[3], c[5], c[6])
    assert refused > 1
    if reasons == "[]":  # cut right after the latency: the reason code's byte is missing (payload b"" before)
        after_latency = len(body) - len(payload) - 1
        assert decode_compact(body)[9:11] == ("reject", body[after_latency])
        with pytest.raises(ValueError, match="reason code"):
            compact_forward_fields(body[:after_latency])


def test_a_missing_definition_reads_as_a_placeholder_and_is_counted():
    row = log_decision(decision(5, TS))
    definitions = Definitions(lambda seq: None)
    assert definitions.decision(compact_from_row(row, 1, 2))[_N["client_id"]] == "?"
    assert definitions.missing == 2
    assert placeholder(CONTEXT)[CONTEXT.names.index("topic")] == "?"
    assert record_id(COMPACT_DECISION, compact_from_row(row, 1, 2)) == 5


def test_the_expander_puts_every_field_where_the_declaration_says():
    row = log_decision(decision(5, TS, payload=b"p"), forward=True, forward_qos=1)
    connection, context = _parts(row)
    assert expand_compact(decode_compact(compact_from_row(row, 1, 2)), connection, context) == row


# -- the sink and the log: definitions per segment -----------------------------------------------

def _client(n: int) -> ClientInfo:
    return ClientInfo(f"sensor-{n:03d}", None if n % 2 else "user", f"10.0.0.{n}:5{n:04d}", ProtocolVersion.MQTT_5)


def _verdict(i: int) -> Verdict:
    if i % 7 == 3:
        return Verdict(False, (Reason("schema", f"bad {i}", "temperature:v1", "/t"),),
                       reason_code=ReasonCode.PAYLOAD_FORMAT_INVALID, schema_set="v3",
                       topic_filter="sensor/+/temperature", schema="temperature:v1")
    return Verdict(True, schema_set="v3", topic_filter="sensor/+/temperature", schema="temperature:v1",
                   forward_qos=None if i % 2 else 1)


def _record(sink: AuditSink, i: int) -> int:
    client = _client(i % 5)
    message = Message(f"sensor/{client.client_id}/temperature", b'{"t": %d}' % i, i % 2, False, client,
                      received_at=time.time())
    verdict = _verdict(i)
    return sink.record(message, verdict, 10 + i, verdict.accepted, _POLICIES.get(id(sink), _POLICY))


_POLICY = Policy(revision="rev1")
_POLICIES: dict[int, Policy] = {}  # sink -> the policy its messages are recorded under


def _sink(log: MessageLog, revision: str = "rev1", forward: bool = True) -> AuditSink:
    sink = AuditSink(log, IdClock(), record_payloads=True, forward=forward)
    _POLICIES[id(sink)] = Policy(revision=revision)
    return sink


def _segment_alone(path: Path) -> tuple[list[tuple[object, ...]], int]:
    """The decisions of one segment read with nothing but that segment (no lookup)."""
    definitions = Definitions()
    rows = []
    for record in read_segment(path):
        found = definitions.row(record.seq, record.kind, record.body)
        if found is not None and found[0] is DECISION:
            rows.append(found[1])
    return rows, definitions.missing


def _all_rows(log_dir: Path) -> list[tuple[object, ...]]:
    definitions = Definitions()
    return [found[1] for r in read_log(log_dir)
            if (found := definitions.row(r.seq, r.kind, r.body)) is not None and found[0] is DECISION]


def test_every_segment_holds_the_definitions_its_decisions_refer_to_across_rolls_and_restarts(tmp_path: Path):
    directory = tmp_path / "log"
    log = MessageLog(directory, segment_bytes=4096, segment_max_age=None)
    log.open()
    log.start(None)
    sink = _sink(log)
    for i in range(300):
        last = _record(sink, i)
        if i % 40 == 0:
            assert log.wait_durable(last, timeout=30)
    log.seal()  # a roll on request, too
    for i in range(300, 330):
        _record(sink, i)
    log.stop()
    # Restart: a new log and sink on the same directory continue the active segment.
    log = MessageLog(directory, segment_bytes=4096, segment_max_age=None)
    log.open()
    log.start(None)
    sink = _sink(log, revision="rev2")
    for i in range(330, 420):
        _record(sink, i)
    log.stop()

    segments = list_segments(directory)
    assert len(segments) >= 4
    expanded = []
    for info in segments:
        rows, missing = _segment_alone(info.path)
        assert missing == 0, info.path
        expanded += rows
    assert len(expanded) == 420
    assert expanded == _all_rows(directory)
    for i, row in enumerate(expanded):
        client = _client(i % 5)
        assert (row[_N["client_id"]], row[_N["username"]], row[_N["peer"]]) == \
            (client.client_id, client.username, client.peer)
        assert row[_N["topic"]] == f"sensor/{client.client_id}/temperature"
        assert row[_N["payload"]] == b'{"t": %d}' % i
        assert row[_N["payload_sha256"]] == payload_sha256(b'{"t": %d}' % i)
        assert row[_N["verdict"]] == ("reject" if i % 7 == 3 else "accept")
        assert row[_N["config_revision"]] == ("rev1" if i < 330 else "rev2")
        assert row[_N["latency_us"]] == 10 + i
    # Definitions are written once per segment (and restart), not per message: 5 connections and
    # up to 10 contexts (two forward_qos values per topic) each time.
    kinds = [r.kind for r in read_log(directory)]
    assert kinds.count(COMPACT_DECISION) == 420
    assert kinds.count(CONNECTION.code) <= 5 * (len(segments) + 1)
    assert kinds.count(CONTEXT.code) <= 10 * (len(segments) + 1)


def test_append_refuses_a_record_of_an_epoch_that_is_over(tmp_path: Path):
    log = MessageLog(tmp_path / "log", segment_max_age=None)
    log.open()
    log.start(None)
    try:
        epoch_ = log.epoch
        log.append(CONNECTION.code, CONNECTION.encode(("c", None, "p", 5)), epoch_)
        log.seal()
        assert log.epoch != epoch_
        with pytest.raises(EpochChanged):
            log.append(COMPACT_DECISION, b"x", epoch_)
        log.append(EVENT.code, b"", None)  # no epoch: always taken
    finally:
        log.stop()


def test_a_failed_batch_fails_what_was_appended_after_it_and_starts_a_new_epoch(tmp_path: Path):
    io = FaultyIO()
    log = MessageLog(tmp_path / "log", io=io, segment_max_age=None, preallocate="none")
    log.open()
    log.start(None)
    failed: list[tuple[int, int]] = []
    log.add_failure_listener(lambda first, last, error: failed.append((first, last)))
    sink = _sink(log)
    try:
        assert log.wait_durable(_record(sink, 0), timeout=30)
        epoch_ = log.epoch
        io.write_error = errno.EIO
        last = _record(sink, 1)
        assert not log.wait_durable(last, timeout=30)
        assert log.epoch != epoch_
        io.write_error = None
        # The sink writes its definitions again: the next decision reads without the failed ones.
        last = _record(sink, 2)
        deadline = time.monotonic() + 30
        while not log.wait_durable(last, timeout=1) and time.monotonic() < deadline:
            last = _record(sink, 2)
        assert log.wait_durable(last, timeout=30)
    finally:
        log.stop()
    rows = _all_rows(tmp_path / "log")
    assert rows[0][_N["payload"]] == b'{"t": 0}'
    assert rows[-1][_N["payload"]] == b'{"t": 2}'
    assert all(row[_N["client_id"]] != "?" for row in rows)


# -- readers over a log of both versions ---------------------------------------------------------

def _v1_state(state: Path, count: int) -> list[tuple[object, ...]]:
    """A log written by the previous version (DECISION records only), one sealed segment."""
    rows = [log_decision(decision((int(TS * 1000) << 20) + i, TS + i, device=f"old-{i % 3}",
                                  payload=b"old %d" % i), forward=True) for i in range(count)]
    write_segment(state / "log", 1, [(DECISION, row) for row in rows])
    return rows


def test_a_state_dir_of_the_previous_version_opens_and_both_versions_convert_and_query_as_one(tmp_path: Path):
    state = tmp_path / "state"
    old = _v1_state(state, 20)
    log = MessageLog(state / "log", segment_max_age=None)
    log.open()
    assert log.last_seq == 20
    log.start(None)
    sink = _sink(log)
    for i in range(30):
        _record(sink, i)
    log.seal()
    for i in range(30, 35):
        _record(sink, i)
    log.stop()

    report = convert_pending(Layout(state))
    assert report.decisions == 50 and not report.problems
    con = duckdb.connect()
    pattern = str(state / "audit" / "parquet" / "decisions" / "*" / "*.parquet")
    got = con.execute(f"SELECT client_id, payload, payload_sha256 FROM read_parquet('{pattern}') ORDER BY id").fetchall()
    assert [g[0] for g in got[:20]] == [r[_N["client_id"]] for r in old]
    assert [g[1] for g in got[20:]] == [b'{"t": %d}' % i for i in range(30)]
    assert all(g[2] == payload_sha256(g[1]) for g in got)
    # The tail (not converted yet) reads through the same expansion.
    query = AuditQuery(state)
    try:
        result = query.query("SELECT count(*), count(DISTINCT client_id), min(payload_sha256 IS NOT NULL) FROM decisions")
    finally:
        query.close()
    assert result.rows == [(55, 8, True)]


def test_the_tail_reads_definitions_written_before_the_watermark(tmp_path: Path):
    """A segment partly converted (the watermark inside it) still reads: its definitions come first."""
    state = tmp_path / "state"
    log = MessageLog(state / "log", segment_max_age=None)
    log.open()
    log.start(None)
    sink = _sink(log)
    for i in range(10):
        _record(sink, i)
    log.stop()
    from appliance.audit.layout import Watermark
    from replay.sources import _tail_rows

    rows = _tail_rows(state, Watermark(0, 8))  # definitions are seqs 1-3, decisions from seq 9 on
    assert rows and all(row[_N["client_id"]].startswith("sensor-") for row in rows)


def test_purge_rewrites_compact_decisions_and_keeps_their_sha256(tmp_path: Path):
    log = MessageLog(tmp_path / "log", segment_max_age=None)
    log.open()
    log.start(None)
    sink = _sink(log, revision="r", forward=False)
    for i in range(14):
        _record(sink, i)
    log.stop()
    path = list_segments(tmp_path / "log")[0].path
    before = _all_rows(tmp_path / "log")
    changed = drop_payloads_in_segment(path, lambda row: row[_N["verdict"]] == "reject")
    assert changed == {int(r[0]) for r in before if r[_N["verdict"]] == "reject"} and changed
    after = _all_rows(tmp_path / "log")
    for old, new in zip(before, after, strict=True):
        if old[_N["verdict"]] == "reject":
            assert new[_N["payload"]] is None and new[_N["payload_sha256"]] == old[_N["payload_sha256"]]
            assert new[_N["payload_size"]] == old[_N["payload_size"]] and not new[_N["payload_audited"]]
        else:
            assert new == old
    assert b'{"t": 3}' not in path.read_bytes()


def test_the_outbox_forwards_compact_decisions_after_a_restart_behind_their_definitions(tmp_path: Path):
    directory = tmp_path / "log"
    log = MessageLog(directory, segment_max_age=None)
    log.open()
    log.start(None)
    sink = _sink(log)
    for i in range(12):
        _record(sink, i)
    log.stop()
    cursor_path = tmp_path / "cursor"
    outbox = Outbox(directory, OutboxBounds(), cursor=Cursor(cursor_path))
    rows = outbox.next_batch(0, 100)
    assert [r.payload for r in rows] == [b'{"t": %d}' % i for i in range(12) if i % 7 != 3]
    assert rows[0].client_id == "sensor-000" and rows[0].schema == "temperature:v1"
    outbox.acknowledge([r.seq for r in rows[:4]])
    outbox.close()
    # Restarted: the cursor lies after the definitions; the outbox still knows who sent what.
    outbox = Outbox(directory, OutboxBounds(), cursor=Cursor(cursor_path))
    again = outbox.next_batch(0, 100)
    outbox.close()
    assert [(r.client_id, r.topic, r.payload, r.qos) for r in again] == \
        [(r.client_id, r.topic, r.payload, r.qos) for r in rows[4:]]
