"""The record declarations and their generated body codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.audit.records import (
    DECISION,
    DECISION_COLUMNS,
    EVENT,
    EVENT_COLUMNS,
    FORWARD_ONLY,
    KINDS,
    OUTBOX_COLUMNS,
    payload_sha256,
)
from tests.audit.factory import decision, epoch, event
from tests.audit.logfiles import log_decision

TS = epoch("2026-11-27T10:15:30.123456")


def test_audit_columns_keep_the_names_and_order_of_the_duckdb_store():
    assert DECISION_COLUMNS == (
        "id", "ts", "client_id", "username", "peer", "mqtt_version", "topic", "qos", "retain", "payload",
        "payload_size", "payload_sha256", "schema_set", "schema_name", "schema_version", "topic_filter",
        "verdict", "reason_code", "reasons", "latency_us", "config_revision", "dry_run", "is_will",
        "released_from")
    assert EVENT_COLUMNS == ("id", "ts", "kind", "client_id", "peer", "detail")
    assert DECISION.names == (*DECISION_COLUMNS, "forward", "forward_qos", "payload_audited")
    assert FORWARD_ONLY.names == OUTBOX_COLUMNS
    assert {k.code for k in KINDS.values()} == {1, 2, 3, 4, 5}  # 6: the compact decision, its own codec


def test_decision_round_trips_with_every_nullable_field_null_and_set():
    full = log_decision(decision(1 << 40, TS, verdict="reject", payload=b"\x00\xff raw"), forward=True, forward_qos=2)
    assert DECISION.decode(DECISION.encode(full)) == full
    nulls = list(full)
    for name in ("username", "payload", "schema_set", "schema_name", "schema_version", "topic_filter",
                 "released_from", "forward_qos"):
        nulls[DECISION.names.index(name)] = None
    nulls = tuple(nulls)
    assert DECISION.decode(DECISION.encode(nulls)) == nulls


def test_null_and_empty_are_different():
    row = list(log_decision(decision(5, TS, payload=b"")))
    row[DECISION.names.index("username")] = ""
    decoded = DECISION.decode(DECISION.encode(tuple(row)))
    assert decoded[DECISION.names.index("username")] == ""
    assert decoded[DECISION.names.index("payload")] == b""


def test_event_and_forward_only_round_trip():
    row = event(7, TS, "client_connected", "dév-1", {"keepalive": 60})
    assert EVENT.decode(EVENT.encode(row)) == row
    forward = (9, TS, "dev-1", "a/b", b"payload", None, True, None)
    assert FORWARD_ONLY.decode(FORWARD_ONLY.encode(forward)) == forward


def test_sha256_is_stored_raw_and_read_back_as_hex():
    row = log_decision(decision(5, TS, payload=b"x" * 100))
    body = DECISION.encode(row)
    assert bytes.fromhex(payload_sha256(b"x" * 100)) in body
    assert payload_sha256(b"x" * 100).encode() not in body


def test_a_body_with_trailing_or_missing_bytes_is_refused():
    body = DECISION.encode(log_decision(decision(5, TS)))
    with pytest.raises(ValueError):
        DECISION.decode(body + b"x")
    with pytest.raises((ValueError, struct.error)):
        DECISION.decode(body[:-1])


def test_a_string_field_longer_than_its_length_prefix_is_refused():
    row = list(log_decision(decision(5, TS)))
    row[DECISION.names.index("topic")] = "t" * 70_000
    with pytest.raises(struct.error):
        DECISION.encode(tuple(row))


def test_wrong_arity_is_refused():
    with pytest.raises(ValueError):
        DECISION.encode(decision(5, TS))  # the audit columns only, without the log-only fields


def test_ddl_and_conversions_are_generated_from_the_declaration():
    assert DECISION.table_ddl().startswith('CREATE TABLE decisions ("id" BIGINT, "ts" TIMESTAMPTZ')
    assert '"forward"' not in DECISION.table_ddl()
    assert '"forward" BOOLEAN' in DECISION.stage_ddl("s")
    select = DECISION.select_from_stage()
    assert "to_timestamp(ts)" in select and "CASE WHEN payload_audited THEN payload END" in select


text = st.text(max_size=40)


@given(
    client_id=text, username=st.none() | text, topic=text.filter(bool), payload=st.none() | st.binary(max_size=300),
    qos=st.integers(0, 2), verdict=st.sampled_from(["accept", "reject"]), released=st.none() | st.integers(0, 2**62),
    forward_qos=st.none() | st.integers(0, 2), ts=st.floats(0, 4e9), reasons=text,
)
def test_decision_round_trip_property(client_id, username, topic, payload, qos, verdict, released, forward_qos, ts, reasons):
    row = (123, ts, client_id, username, "1.2.3.4:5", 5, topic, qos, True, payload, 3, "ab" * 32, None, "s", "v1",
           None, verdict, 0, reasons, 40, "rev", False, True, released, bool(qos), forward_qos, payload is not None)
    assert DECISION.decode(DECISION.encode(row)) == row
