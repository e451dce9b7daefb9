from __future__ import annotations

import base64
import csv
import io
import json
from datetime import UTC, datetime

import pytest

from appliance.audit.errors import QueryTimeout
from appliance.audit.results import QueryResult, format_result
from appliance.audit.store import AuditStore

SLOW = "SELECT sum(a.range * b.range) FROM range(1000000000) a, range(1000000000) b"


def test_a_query_past_its_timeout_is_interrupted(filled: AuditStore):
    with pytest.raises(QueryTimeout, match="longer than 0.05 s"):
        filled.query(SLOW, timeout=0.05)
    assert filled.query("SELECT count(*) FROM decisions").rows == [(600,)]


def test_max_rows_truncates_and_says_so(filled: AuditStore):
    result = filled.query("SELECT id FROM decisions ORDER BY id", max_rows=10)
    assert len(result.rows) == 10 and result.truncated
    whole = filled.query("SELECT id FROM decisions", max_rows=600)
    assert len(whole.rows) == 600 and not whole.truncated


RESULT = QueryResult(
    ["id", "topic", "payload", "ts", "reasons", "note"],
    [
        (1, "a/b", b"\x00\x01", datetime(2026, 11, 27, 10, 0, tzinfo=UTC),
         [{"check": "schema", "message": "bad", "schema": None, "path": "/x"}], None),
        (22, "c,d", None, None, [], 'say "hi"'),
    ],
    False,
)


def test_json_format_is_a_list_of_objects_and_says_whether_it_is_complete():
    answer = json.loads(format_result(RESULT, "json"))
    assert answer["truncated"] is False
    objects = answer["rows"]
    assert objects[0] == {
        "id": "1", "topic": "a/b", "payload": base64.b64encode(b"\x00\x01").decode(),
        "ts": "2026-11-27T10:00:00+00:00",
        "reasons": [{"check": "schema", "message": "bad", "schema": None, "path": "/x"}],
        "note": None,
    }
    assert objects[1]["payload"] is None and objects[1]["reasons"] == []


def test_csv_format_has_a_header_and_quotes():
    rows = list(csv.reader(io.StringIO(format_result(RESULT, "csv"))))
    assert rows[0] == RESULT.columns
    assert rows[1][:4] == ["1", "a/b", "\\x0001", "2026-11-27 10:00:00+00:00"]
    assert rows[2] == ["22", "c,d", "", "", "[]", 'say "hi"']


def test_table_format_is_aligned():
    lines = format_result(RESULT, "table").splitlines()
    assert lines[0].startswith("┌") and lines[-2].startswith("└")
    assert len({len(line) for line in lines[:-1]}) == 1  # every box line has the same width
    assert "NULL" in lines[4]
    assert lines[3].startswith("│  1 │") and lines[4].startswith("│ 22 │")  # numbers right-aligned
    assert lines[-1] == "2 rows"


def test_json_ids_are_strings_so_jq_and_javascript_keep_every_digit(filled: AuditStore):
    result = filled.query("SELECT id, released_from, client_id, qos, 9007199254740993 AS big FROM decisions LIMIT 2", max_rows=1)
    answer = json.loads(format_result(result, "json"))
    [row] = answer["rows"]
    assert answer["truncated"] is True
    assert isinstance(row["id"], str) and int(row["id"]) == result.rows[0][0] > 2**53
    assert isinstance(row["qos"], int) and row["big"] == "9007199254740993"
    assert row["released_from"] is None and isinstance(row["client_id"], str)


def test_table_format_of_real_results(filled: AuditStore):
    text = format_result(filled.query("SELECT * FROM decisions LIMIT 3"), "table")
    assert text.endswith("3 rows\n")
    truncated = format_result(filled.query("SELECT id FROM decisions", max_rows=2), "table")
    assert "truncated" in truncated
