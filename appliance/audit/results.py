"""Query results and how they are shown: an aligned text table, CSV or JSON."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    # True when the query produced more than the caller's max_rows; rows holds the first max_rows.
    truncated: bool


Format = Literal["table", "csv", "json"]


def format_result(result: QueryResult, fmt: Format, *, more: str = "add a LIMIT or raise --max-rows") -> str:
    """`more` says how to get the rows a truncated result left out (the table says so)."""
    if fmt == "table":
        return _table(result, more)
    if fmt == "csv":
        return _csv(result)
    if fmt == "json":
        return _json(result)
    raise ValueError(f"unknown format {fmt!r}: use table, csv or json")


# Integers JavaScript (and jq) cannot hold exactly: ids are 63-bit (records.IdClock).
_MAX_SAFE_INTEGER = 2**53 - 1


def _is_id_column(name: str) -> bool:
    return name == "id" or name.endswith("_id") or name == "released_from"


def _json_cell(column: str, value: Any) -> Any:
    """Ids (and any integer beyond 2^53) as strings, so that jq and JavaScript keep every digit;
    `quarantine show/release/purge` take them in either form."""
    if isinstance(value, int) and not isinstance(value, bool) and (_is_id_column(column) or abs(value) > _MAX_SAFE_INTEGER):
        return str(value)
    return to_jsonable(value)


def to_jsonable(value: Any) -> Any:
    """Bytes as base64, times as ISO 8601, decimals and UUIDs as strings; lists, dicts (DuckDB
    STRUCTs and MAPs) recursively."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    return str(value)


def _text(value: Any) -> str:
    """One cell as text, for the table and CSV formats: NULL is empty in CSV and 'NULL' in tables
    (the caller decides); nested values as compact JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_jsonable(value), ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, (datetime, date, time)):
        return value.isoformat(sep=" ") if isinstance(value, datetime) else value.isoformat()
    return str(value)


def csv_cells(row: tuple[Any, ...]) -> list[str]:
    """One row's CSV cells (NULL empty), as the csv format writes them."""
    return ["" if value is None else _text(value) for value in row]


def _csv(result: QueryResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows(csv_cells(row) for row in result.rows)
    return out.getvalue()


def _json(result: QueryResult) -> str:
    """An object: `rows` (a list of objects, one per row) and `truncated` (true when more rows
    matched than were returned)."""
    objects = [
        {column: _json_cell(column, value) for column, value in zip(result.columns, row)}
        for row in result.rows
    ]
    return json.dumps({"rows": objects, "truncated": result.truncated}, ensure_ascii=False, indent=2) + "\n"


_MAX_CELL = 60


def _table(result: QueryResult, more: str) -> str:
    """A box like DuckDB's CLI: header, separator, rows; numbers right-aligned."""

    def cell(value: Any) -> str:
        text = "NULL" if value is None else _text(value).replace("\n", "\\n")
        return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"

    header = list(result.columns)
    body = [[cell(value) for value in row] for row in result.rows]
    numeric = [
        all(isinstance(row[i], (int, float, Decimal)) and not isinstance(row[i], bool)
            for row in result.rows if row[i] is not None)
        for i in range(len(header))
    ]
    widths = [max([len(name)] + [len(row[i]) for row in body]) for i, name in enumerate(header)]

    def line(left: str, fill: str, middle: str, right: str) -> str:
        return left + middle.join(fill * (width + 2) for width in widths) + right

    def render(cells: list[str], align_numbers: bool) -> str:
        parts = [
            (text.rjust(width) if align_numbers and numeric[i] else text.ljust(width))
            for i, (text, width) in enumerate(zip(cells, widths))
        ]
        return "│ " + " │ ".join(parts) + " │"

    lines = [line("┌", "─", "┬", "┐"), render(header, False), line("├", "─", "┼", "┤")]
    lines += [render(row, True) for row in body]
    lines.append(line("└", "─", "┴", "┘"))
    count = f"{len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
    if result.truncated:
        count += f" (truncated: more rows matched; {more})"
    lines.append(count)
    return "\n".join(lines) + "\n"
