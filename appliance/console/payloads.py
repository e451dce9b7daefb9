"""A message's payload as the console shows it: JSON pretty-printed, Protobuf and Avro decoded to JSON
with the schema the topic maps to, hex for anything else; each failing reason placed next to the
line its path (a JSON pointer) points at, or at the nearest enclosing part that exists (a missing
property's reason sits at its object)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

HEX_WIDTH = 16
MAX_LINES = 2000


@dataclass
class Line:
    depth: int
    text: str
    path: str  # the JSON pointer of the value this line opens or holds ("" for the root)
    reasons: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Shown:
    kind: str  # json, protobuf, avro, text, hex, empty, purged
    lines: list[Line]
    unplaced: list[dict[str, Any]]  # reasons without a path, or whose path is not in the payload
    truncated: bool = False


def pointer(parent: str, key: str | int) -> str:
    return f"{parent}/{str(key).replace('~', '~0').replace('/', '~1')}"


def decode(payload: bytes, schema: Any | None) -> tuple[str, Any]:
    """(kind, value): a JSON value for json/protobuf/avro, text, or the bytes for hex."""
    fmt = getattr(schema, "format", None)
    if schema is not None and fmt in ("protobuf", "avro"):
        try:
            value, _errors = schema.validate(payload)
        except Exception:  # noqa: BLE001 - a payload the schema cannot decode is shown as hex
            value = None
        if value is not None:
            return str(fmt), _jsonable(value)
    try:
        return "json", json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "hex", payload
    if text.isprintable() or all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text", text
    return "hex", payload


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def show(payload: bytes | None, schema: Any | None, reasons: list[dict[str, Any]]) -> Shown:
    if payload is None:
        return Shown("purged", [], list(reasons))
    if not payload:
        return Shown("empty", [], list(reasons))
    kind, value = decode(payload, schema)
    if kind == "hex":
        lines = [Line(0, _hex_line(payload, offset), "") for offset in range(0, len(payload), HEX_WIDTH)]
    elif kind == "text":
        lines = [Line(0, text, "") for text in value.splitlines() or [""]]
    else:
        lines = []
        _json_lines(value, "", 0, None, True, lines)
    truncated = len(lines) > MAX_LINES
    lines = lines[:MAX_LINES]
    unplaced = _place(lines, reasons) if kind not in ("hex", "text") else list(reasons)
    return Shown(kind, lines, unplaced, truncated)


def _hex_line(payload: bytes, offset: int) -> str:
    chunk = payload[offset:offset + HEX_WIDTH]
    ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
    return f"{offset:08x}  {chunk.hex(' '):<{HEX_WIDTH * 3 - 1}}  {ascii_}"


def _json_lines(value: Any, path: str, depth: int, key: str | None, last: bool, out: list[Line]) -> None:
    prefix = f"{json.dumps(key, ensure_ascii=False)}: " if key is not None else ""
    comma = "" if last else ","
    if isinstance(value, dict) and value:
        out.append(Line(depth, prefix + "{", path))
        items = list(value.items())
        for index, (k, v) in enumerate(items):
            _json_lines(v, pointer(path, k), depth + 1, str(k), index == len(items) - 1, out)
        out.append(Line(depth, "}" + comma, path))
    elif isinstance(value, list) and value:
        out.append(Line(depth, prefix + "[", path))
        for index, item in enumerate(value):
            _json_lines(item, pointer(path, index), depth + 1, None, index == len(value) - 1, out)
        out.append(Line(depth, "]" + comma, path))
    else:
        out.append(Line(depth, prefix + json.dumps(value, ensure_ascii=False) + comma, path))


_PAYLOAD_FIELD = re.compile(r"\bpayload((?:\.[A-Za-z_]\w*)+)")


def _rule_field(message: str, present: dict[str, Line]) -> str | None:
    """A rule's reason has no path, but its message quotes the expression: the first field of
    `payload` it reads that the payload has is where it is shown."""
    for match in _PAYLOAD_FIELD.finditer(message):
        where = "/" + match.group(1)[1:].replace(".", "/")
        if where in present:
            return where
    return None


def _place(lines: list[Line], reasons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first: dict[str, Line] = {}
    for line in lines:
        first.setdefault(line.path, line)
    unplaced = []
    for reason in reasons:
        path = reason.get("path")
        if path is None and lines:
            path = _rule_field(str(reason.get("message") or ""), first)
        if path is None or not lines:
            unplaced.append(reason)
            continue
        where = str(path)
        if where in ("(root)", "/"):
            where = ""
        if where and not where.startswith("/"):
            where = "/" + where.replace(".", "/")  # a dotted field path (Protobuf, Avro)
        while where not in first and where:
            where = where.rsplit("/", 1)[0]
        first[where].reasons.append(reason) if where in first else unplaced.append(reason)
    return unplaced
