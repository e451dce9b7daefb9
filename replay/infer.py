"""Drafting a JSON Schema from recorded payloads: a starting point for a schema set, to review.

Every JSON payload is folded into one `Shape` per position (the payload, each property, array
items), which remembers the JSON types seen, how often, numeric ranges, up to 11 distinct strings
and whether every string was an RFC 3339 date-time. The draft then says:
- `type`: every type seen (`integer` when every number was whole);
- `required`: properties present in every object seen at that position;
- `minimum`/`maximum`: the range seen;
- `enum`: for strings with at most 10 distinct values (and at least 2 messages);
- `format: date-time` when every string parsed as one;
- `additionalProperties: false` is not set: a draft should not reject what it has not seen yet.
Payloads that are not JSON (Protobuf, text) are counted and skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from replay.errors import ReplayInputError
from replay.rows import PAYLOAD, VERDICT, Row

ENUM_MAX = 10
MAX_DEPTH = 32


def _is_datetime(text: str) -> bool:
    if len(text) < 20 or "T" not in text.upper():
        return False
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


@dataclass(slots=True)
class Shape:
    seen: int = 0
    types: set[str] = field(default_factory=set)
    minimum: float | None = None
    maximum: float | None = None
    strings: set[str] | None = field(default_factory=set)  # None once past ENUM_MAX distinct values
    all_datetimes: bool = True
    objects: int = 0
    properties: dict[str, Shape] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)
    items: Shape | None = None

    def add(self, value: Any, depth: int = 0) -> None:
        self.seen += 1
        if value is None:
            self.types.add("null")
        elif isinstance(value, bool):
            self.types.add("boolean")
        elif isinstance(value, int | float):
            self.types.add("integer" if isinstance(value, int) else "number")
            self.minimum = value if self.minimum is None else min(self.minimum, value)
            self.maximum = value if self.maximum is None else max(self.maximum, value)
        elif isinstance(value, str):
            self.types.add("string")
            if self.strings is not None:
                self.strings.add(value)
                if len(self.strings) > ENUM_MAX:
                    self.strings = None
            if self.all_datetimes and not _is_datetime(value):
                self.all_datetimes = False
        elif isinstance(value, list):
            self.types.add("array")
            if depth < MAX_DEPTH:
                if self.items is None:
                    self.items = Shape()
                for item in value:
                    self.items.add(item, depth + 1)
        elif isinstance(value, dict):
            self.types.add("object")
            self.objects += 1
            if depth < MAX_DEPTH:
                for key, item in value.items():
                    child = self.properties.get(key)
                    if child is None:
                        child = self.properties[key] = Shape()
                    child.add(item, depth + 1)
                    self.present[key] = self.present.get(key, 0) + 1

    def schema(self) -> dict[str, Any]:
        types = sorted(self.types)
        if "integer" in types and "number" in types:
            types.remove("integer")
        out: dict[str, Any] = {}
        if types:
            out["type"] = types[0] if len(types) == 1 else types
        if "string" in types and self.strings and len(self.strings) <= ENUM_MAX and self.seen > 1 and not self.all_datetimes:
            out["enum"] = sorted(self.strings) + ([None] if "null" in types else [])
        elif "string" in types and self.all_datetimes:
            out["format"] = "date-time"
        if self.minimum is not None:
            out["minimum"] = self.minimum
            out["maximum"] = self.maximum
        if self.properties:
            out["properties"] = {key: child.schema() for key, child in sorted(self.properties.items())}
            required = sorted(key for key, times in self.present.items() if times == self.objects)
            if required:
                out["required"] = required
        if self.items is not None and self.items.seen:
            out["items"] = self.items.schema()
        return out


def infer_schema(batches: Iterator[list[Row]], *, title: str, accepted_only: bool = False) -> dict[str, Any]:
    root = Shape()
    skipped = 0
    for batch in batches:
        for row in batch:
            payload = row[PAYLOAD]
            if not isinstance(payload, bytes) or accepted_only and row[VERDICT] != "accept":
                continue
            try:
                value = orjson.loads(payload)
            except orjson.JSONDecodeError:
                skipped += 1
                continue
            root.add(value)
    if root.seen == 0:
        extra = f" ({skipped} payloads were not JSON)" if skipped else ""
        raise ReplayInputError(f"nothing to infer from: no JSON payloads recorded for this topic filter{extra}")
    description = f"Inferred from {root.seen} message(s)" + (f"; {skipped} non-JSON payload(s) skipped" if skipped else "")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, "description": description,
            **root.schema()}
