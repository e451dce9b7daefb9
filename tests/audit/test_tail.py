"""The query's tail (records not converted yet, query.load_tail) reads exactly as the same records
do once the seal helper has converted them to Parquet: same rows, same types, every column."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audit.layout import Layout, Watermark, sql_string
from appliance.audit.query import AuditQuery, load_tail
from appliance.audit.records import (
    COMPACT_DECISION,
    COMPACT_FIELDS,
    CONNECTION,
    CONTEXT,
    DECISION,
    EVENT,
    FORWARD_ONLY,
    IdClock,
    compact_from_row,
    decode_compact,
    decode_compact_staged,
    payload_sha256,
)
from appliance.audit.seal import convert_pending
from appliance.audit.sink import AuditSink
from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.mqtt.properties import Properties, PropertyId
from appliance.msglog import MessageLog
from appliance.pipeline import ClientInfo, Message, Policy, Reason, Verdict
from tests.audit.factory import decision, epoch, event
from tests.audit.logfiles import log_decision

TS = epoch("2026-11-27T10:15:30.123456")
_N = {name: i for i, name in enumerate(DECISION.names)}
_C = {name: i for i, name in enumerate(COMPACT_FIELDS)}


# -- the staged decode ----------------------------------------------------------------------------

def _as_compact(staged: tuple[object, ...]) -> tuple[object, ...]:
    """A decode_compact_staged row in decode_compact's form (what the tail's SQL does with it)."""
    s = dict(zip(("id", "ts", "flags", "connection", "context", "latency_us", "reason_code", "released_from",
                  "reasons", "payload", "payload_size", "payload_sha256"), staged, strict=True))
    flags = s["flags"]
    assert isinstance(flags, int)
    return (s["id"], s["ts"], s["connection"], s["context"], flags & 3, bool(flags & 4), s["payload"],
            s["payload_size"], s["payload_sha256"], "reject" if flags & 8 else "accept", s["reason_code"],
            s["reasons"], s["latency_us"], bool(flags & 0x40), s["released_from"], bool(flags & 0x10),
            bool(flags & 0x20))


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.none(), st.binary(max_size=300)), size=st.integers(0, 1 << 30),
       qos=st.integers(0, 2), flags=st.lists(st.booleans(), min_size=5, max_size=5),
       code=st.integers(0, 255), latency=st.integers(0, 1 << 31), released=st.one_of(st.none(), st.integers(0, 1 << 62)),
       reasons=st.sampled_from(["[]", '[{"check":"schema","message":"é","schema":null,"path":"/a"}]']),
       ts=st.floats(1.6e9, 2.2e9), delta=st.integers(-(1 << 40), 1 << 40),
       refs=st.tuples(st.integers(1, 1 << 50), st.integers(1, 1 << 50)))
def test_the_staged_decode_says_what_the_full_decode_says(
        payload: bytes | None, size: int, qos: int, flags: list[bool], code: int, latency: int, released: int | None,
        reasons: str, ts: float, delta: int, refs: tuple[int, int]) -> None:
    retain, will, forward, audited, reject = flags
    row = list(log_decision(decision((int(ts * 1000) << 20) + delta, ts), forward=forward, payload_audited=audited))
    row[_N["payload"]] = payload
    row[_N["payload_size"]] = len(payload) if payload is not None else size
    row[_N["payload_sha256"]] = payload_sha256(payload if payload is not None else b"z")
    row[_N["qos"]], row[_N["retain"]], row[_N["is_will"]] = qos, retain, will
    row[_N["verdict"]], row[_N["reason_code"]] = ("reject", code) if reject else ("accept", 0)
    row[_N["reasons"]], row[_N["latency_us"]], row[_N["released_from"]] = reasons, latency, released
    body = compact_from_row(tuple(row), *refs)
    assert _as_compact(decode_compact_staged(body)) == decode_compact(body)


@pytest.mark.parametrize("payload", [None, b"", b"abc"])
@pytest.mark.parametrize("reasons", ["[]", '[{"check":"schema","message":"x","schema":null,"path":""}]'])
def test_a_body_the_full_decode_refuses_the_staged_decode_refuses(payload: bytes | None, reasons: str) -> None:
    """Every prefix, and trailing bytes: where decode_compact refuses a body (a record that passed
    its CRC but is damaged), so does decode_compact_staged; where it reads one, they agree."""
    row = list(log_decision(decision(5, TS, verdict="reject"), forward=True))
    row[_N["payload"]], row[_N["reasons"]], row[_N["released_from"]] = payload, reasons, 1 << 35
    row[_N["payload_size"]] = len(payload) if payload is not None else 300
    body = compact_from_row(tuple(row), 70_000, 3_000_000)
    refused = 0
    for short in [body[:end] for end in range(len(body))] + [body + b"x"]:
        try:
            expected = decode_compact(short)
        except (ValueError, IndexError, struct.error):
            refused += 1
            with pytest.raises((ValueError, IndexError, struct.error)):
                decode_compact_staged(short)
        else:
            assert _as_compact(decode_compact_staged(short)) == expected
    assert refused > 10


# -- the tail against the Parquet files -----------------------------------------------------------

def _client(n: int, version: ProtocolVersion) -> ClientInfo:
    return ClientInfo(f"sensor-{n:03d}-é", None if n % 2 else f"user-{n}", f"[::1]:5{n:04d}", version)


def _messages(sink: AuditSink) -> None:
    """Verdicts through the service's own sink: every option the records have."""
    versions = (ProtocolVersion.MQTT_5, ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_3_1)
    properties = Properties(((PropertyId.CONTENT_TYPE, "application/json"), (PropertyId.USER_PROPERTY, ("k", "v"))))
    enforced, dry = Policy(revision="rev-a"), Policy(revision="rev-b", dry_run=True)
    for i in range(240):
        client = _client(i % 7, versions[i % 3])
        payload = b'{"t": %d, "x": "\xc3\xa9"}' % i if i % 11 else bytes(range(256)) * 300  # 76,800 bytes: long varints
        if i == 5:
            payload = b""
        message = Message(f"sensor/{client.client_id}/t{i % 3}", payload, i % 3, i % 4 == 0, client,
                          properties if client.protocol_version == ProtocolVersion.MQTT_5 else Properties.EMPTY,
                          is_will=i % 13 == 0, received_at=TS + i * 0.7311,
                          released_from=(int(TS * 1000) << 20) + i if i % 17 == 0 else None)
        if i % 5 == 3:
            verdict = Verdict.reject(Reason("schema", "/temperature: 200 is greater than the maximum of 125",
                                            "temperature:v1", "/temperature"), Reason("topic", "topic not allowed"),
                                     reason_code=ReasonCode.PAYLOAD_FORMAT_INVALID if i % 2 else ReasonCode.TOPIC_NAME_INVALID,
                                     schema_set="set-1", topic_filter="sensor/+/t1", schema="temperature:v1")
        elif i % 5 == 4:
            verdict = Verdict(True)  # no mapping: no schema, no filter
        else:
            verdict = Verdict(True, schema_set="set-2", topic_filter=f"sensor/+/t{i % 3}",
                              schema="humidity" if i % 2 else "temperature:v2", forward=i % 3 != 0,
                              forward_qos=None if i % 4 else 2)
        sink.record(message, verdict, latency_us=i * 1_000 if i % 9 else 0, delivered=verdict.accepted or i % 2 == 0,
                    policy=dry if i % 10 == 7 else enforced)


def _log_with_everything(state: Path) -> None:
    """Two sinks (payloads recorded and not) writing compact decisions, events, version 1
    decisions (a state dir from before record version 2) and a forward-only record, in two
    segments."""
    log = MessageLog(state / "log", segment_max_age=None)
    log.open()
    log.start(None)
    try:
        clock = IdClock()
        _messages(AuditSink(log, clock, record_payloads=True, forward=True))
        log.append(EVENT.code, EVENT.encode(event(clock.next(TS + 200), TS + 200, "client_connected", "dév-1",
                                                  {"keepalive": 60, "props": {"ü": [1, 2.5, None]}})))
        log.append(EVENT.code, EVENT.encode(event(clock.next(TS + 201), TS + 201, "config_reload")))
        version1 = log_decision(decision(clock.next(TS + 202), TS + 202, verdict="reject", payload=b"\x00v1"),
                                forward=False, payload_audited=True)
        log.append(DECISION.code, DECISION.encode(version1))
        not_stored = list(log_decision(decision(clock.next(TS + 203), TS + 203), payload_audited=False))
        not_stored[_N["payload"]] = None
        log.append(DECISION.code, DECISION.encode(tuple(not_stored)))
        # Not audited: a message to forward without a verdict of its own (an upgrade's old outbox).
        log.append(FORWARD_ONLY.code, FORWARD_ONLY.encode((clock.next(TS + 204), TS + 204, "dev-1", "up/t",
                                                           b"{}", 1, False, None)))
        log.seal()  # the definitions are written again in the next segment
        _messages(AuditSink(log, clock, record_payloads=False, forward=True))
        last = log.append(EVENT.code, EVENT.encode(event(clock.next(TS + 400), TS + 400, "client_disconnected",
                                                         "sensor-001-é", {"reason": "keepalive"})))
        assert log.wait_durable(last, timeout=30)
        log.seal()
    finally:
        log.stop()


def _rows(cursor: duckdb.DuckDBPyConnection, table: str) -> tuple[list[tuple[object, ...]], list[tuple[str, str]]]:
    rows = cursor.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    types = [(name, str(kind)) for name, kind in zip((d[0] for d in cursor.description), (d[1] for d in cursor.description),
                                                   strict=True)]
    return rows, types


def test_the_tail_reads_as_the_parquet_files_the_seal_helper_writes_for_the_same_records(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _log_with_everything(state)
    with AuditQuery(state) as query:  # nothing converted: everything is the tail
        assert query.tail_records == 2 * 240 + 3 + 2
        cursor = query.cursor()
        tail = {table: _rows(cursor, table) for table in ("decisions", "events")}
    report = convert_pending(Layout(state), compact=False)
    assert report.decisions == 2 * 240 + 2 and report.events == 3 and not report.problems
    with AuditQuery(state) as query:  # everything converted: no tail
        assert query.tail_records == 0
        cursor = query.cursor()
        parquet = {table: _rows(cursor, table) for table in ("decisions", "events")}
    for table in ("decisions", "events"):
        assert tail[table][1] == parquet[table][1]  # names and types
        assert tail[table][0] == parquet[table][0]
    decisions: list[tuple[Any, ...]] = tail["decisions"][0]
    column = {name: i for i, (name, _) in enumerate(tail["decisions"][1])}
    # The records cover what they should: both verdicts, payloads kept and not, reasons, NULLs.
    assert {r[column["verdict"]] for r in decisions} == {"accept", "reject"}
    assert any(r[column["payload"]] is None for r in decisions) and any(r[column["payload"]] == b"" for r in decisions)
    assert any(r[column["payload"]] is not None and len(r[column["payload"]]) > 70_000 for r in decisions)
    assert all(r[column["payload_sha256"]] == payload_sha256(r[column["payload"]])
               for r in decisions if r[column["payload"]] is not None)
    assert any(len(r[column["reasons"]]) == 2 for r in decisions)
    assert {r[column["mqtt_version"]] for r in decisions} == {3, 4, 5}
    assert {r[column["qos"]] for r in decisions} == {0, 1, 2}
    for name in ("username", "schema_set", "schema_name", "schema_version", "topic_filter", "released_from"):
        assert {r[column[name]] is None for r in decisions} == {True, False}, name
    for name in ("retain", "dry_run", "is_will"):
        assert {r[column[name]] for r in decisions} == {True, False}, name


def test_the_tail_and_the_parquet_files_compare_equal_in_duckdb(tmp_path: Path) -> None:
    """The same comparison inside one DuckDB (EXCEPT ALL both ways): the tail loaded from the
    segments (which the seal helper leaves in place) against the files it wrote from them."""
    state = tmp_path / "state"
    _log_with_everything(state)
    layout = Layout(state)
    convert_pending(layout, compact=False)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    assert load_tail(con, layout, Watermark()) == 2 * 240 + 3 + 2
    for table in ("decisions", "events"):
        files = ", ".join(sql_string(f.path) for f in layout.files(table))
        parquet = f"read_parquet([{files}], hive_partitioning = false)"
        for left, right in ((f"_tail_{table}", parquet), (parquet, f"_tail_{table}")):
            assert con.execute(f"SELECT count(*) FROM (SELECT * FROM {left} EXCEPT ALL SELECT * FROM {right})"
                               ).fetchone() == (0,), (table, left)
        assert con.execute(f"SELECT count(*) FROM _tail_{table}").fetchone() == \
            con.execute(f"SELECT count(*) FROM {parquet}").fetchone()


def test_a_definition_the_tail_does_not_hold_is_read_from_the_log_or_is_a_placeholder(tmp_path: Path) -> None:
    """Decisions whose connection and context records are in a segment before the watermark's (a
    failed write made the sink skip writing them again) are loaded, none dropped: with the
    definitions read from the log, or as placeholders once that segment is gone."""
    from appliance.msglog.format import encode_file_header, encode_record, segment_name

    log_dir = tmp_path / "state" / "log"
    log_dir.mkdir(parents=True)
    row = log_decision(decision(5, TS, device="dev-9"))
    connection = CONNECTION.encode(tuple(row[_N[n]] for n in CONNECTION.names))
    context = CONTEXT.encode(tuple(row[_N[n]] for n in CONTEXT.names))
    (log_dir / segment_name(1)).write_bytes(encode_file_header(1) + encode_record(1, CONNECTION.code, connection)
                                            + encode_record(2, CONTEXT.code, context))
    body = compact_from_row(row, 1, 2)
    (log_dir / segment_name(3)).write_bytes(encode_file_header(3) + encode_record(3, COMPACT_DECISION, body)
                                            + encode_record(4, COMPACT_DECISION, compact_from_row(row, 1, 1)))
    layout = Layout(tmp_path / "state")
    con = duckdb.connect()
    assert load_tail(con, layout, Watermark(1, 2)) == 2
    got = con.execute("SELECT client_id, topic FROM _tail_decisions ORDER BY topic").fetchall()
    assert got == [("dev-9", "?"), ("dev-9", row[_N["topic"]])]  # seq 1 is no context: a placeholder
    (log_dir / segment_name(1)).unlink()
    con = duckdb.connect()
    assert load_tail(con, layout, Watermark(1, 2)) == 2
    assert con.execute("SELECT client_id, topic FROM _tail_decisions").fetchall() == [("?", "?")] * 2
