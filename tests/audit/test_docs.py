"""docs/audit.md keeps up with the code: every cookbook query runs, every column is described."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.audit.records import DECISION_COLUMNS, EVENT_COLUMNS
from appliance.audit.query import AuditQuery

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"
COOKBOOK = re.compile(r"<!-- cookbook: ([\w-]+) -->\s*```sql\n(.*?)```", re.DOTALL)


def cookbook() -> list[tuple[str, str]]:
    return COOKBOOK.findall(DOC.read_text())


def test_the_cookbook_has_enough_recipes_with_unique_names():
    names = [name for name, _ in cookbook()]
    assert len(names) >= 8
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(("name", "sql"), cookbook(), ids=[name for name, _ in cookbook()])
def test_cookbook_query_runs(filled: AuditQuery, name: str, sql: str):
    result = filled.query(sql)
    assert result.columns


def test_cookbook_queries_find_rows_in_the_generated_log(filled: AuditQuery):
    """The ones not bounded by now() return rows, so they are not accidentally empty."""
    for name, sql in cookbook():
        if "now()" not in sql:
            assert filled.query(sql).rows, name


def test_every_column_is_documented():
    text = DOC.read_text()
    missing = [c for c in (*DECISION_COLUMNS, *EVENT_COLUMNS) if f"| `{c}` |" not in text]
    assert missing == []
