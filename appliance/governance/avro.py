"""Avro payloads: `.avsc` files of a schema set parsed by fastavro, payloads decoded in-process.

Every `.avsc` file of the set is indexed by the named types (records, enums, fixed) it defines, so a
schema may use a type another file defines (`"type": "demo.Geo"`): `compile_avro` parses the files
a schema needs first, each schema in a namespace of its own, so two versions of one record in the
same set (a reader and an older writer) do not clash.

Three encodings (`encoding:` in the manifest entry):

- `binary` (default): the record's Avro binary encoding, no header; decoded with the entry's schema.
- `confluent`: Confluent's wire format, a magic byte 0 and a 4-byte big-endian schema id before the
  record. `schema_ids` in the manifest maps each id to a schema file of the set (the writer's
  schema); a record written with another schema than the entry's is read through Avro's schema
  resolution into the entry's schema, as a Schema Registry consumer would.
- `single_object`: Avro's single-object encoding, the marker C3 01 and the writer schema's 8-byte
  CRC-64-AVRO fingerprint (little-endian) before the record. The entry's schema and any file listed
  in `writers` are accepted, again resolved into the entry's schema.

Rules see the decoded record as JSON-like values: records and maps as maps, enums as their symbol,
`bytes`/`fixed` as bytes, and logical types in the form CEL can take: timestamps, dates and times as
ISO 8601 strings (`timestamp(payload.ts)` in a rule), decimals as doubles, UUIDs as strings.

Hostile payloads: a payload that ends early, an enum or union index out of range, a negative or
oversized length, invalid UTF-8 and bytes left over after the record are each rejected with a
reason. Two shapes would let a few bytes cost a lot, so a set that has them does not load: an array
whose items encode to zero bytes (a 10-byte block count would mean billions of items). Recursive
schemas are decoded by fastavro's pure-Python reader, whose depth Python bounds (the compiled one
recurses on the C stack and would crash the process on a deeply nested payload).
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro import _read_py
from fastavro._read_common import SchemaResolutionError
from fastavro.io.binary_decoder import BinaryDecoder
from fastavro.schema import UnknownType, to_parsing_canonical_form

from appliance.governance.errors import SchemaError

__all__ = ["ENCODINGS", "AvroCompileError", "AvroFiles", "AvroSchema", "crc64_avro"]

ENCODINGS = ("binary", "confluent", "single_object")
SINGLE_OBJECT_MARKER = b"\xc3\x01"
_NAMED = {"record", "error", "enum", "fixed"}
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class AvroCompileError(Exception):
    """A schema file that does not parse: `file` (relative to the set), `line` (None when unknown)."""

    def __init__(self, file: str, line: int | None, message: str):
        self.file = file
        self.line = line
        self.message = message
        super().__init__(f"{file}: {message}")


# --- CRC-64-AVRO (the Rabin fingerprint of the Avro specification) ------------------------------

_EMPTY = 0xC15D213AA4D7A795


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_FP_TABLE = _fp_table()


def crc64_avro(data: bytes) -> int:
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint(parsed: Any) -> bytes:
    """The 8 bytes a single-object encoded record carries for this schema: the fingerprint of its
    canonical form with the named types from other files written out, as a producer holding the
    whole schema computes it."""
    expanded = _expand(parsed, _named_schemas(parsed), set())
    return crc64_avro(to_parsing_canonical_form(expanded).encode()).to_bytes(8, "little")


def _expand(schema: Any, named: dict[str, Any], defined: set[str]) -> Any:
    """Named references inlined at their first use (later uses stay names, as Avro requires)."""
    if isinstance(schema, str):
        if schema in named and schema not in defined:
            return _expand(named[schema], named, defined)
        return schema
    if isinstance(schema, list):
        return [_expand(branch, named, defined) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if not k.startswith("__")}
    kind = schema.get("type")
    if kind in _NAMED and isinstance(schema.get("name"), str):
        defined.add(schema["name"])
    if kind in ("record", "error"):
        out["fields"] = [{**f, "type": _expand(f["type"], named, defined)} for f in schema.get("fields", [])]
    elif kind == "array":
        out["items"] = _expand(schema["items"], named, defined)
    elif kind == "map":
        out["values"] = _expand(schema["values"], named, defined)
    elif isinstance(kind, (dict, list)):
        out["type"] = _expand(kind, named, defined)
    return out


# --- files ----------------------------------------------------------------------------------------


class AvroFiles:
    """Every `.avsc` file of a set, indexed by the named types each defines."""

    def __init__(self, directory: Path, files: Iterable[Path]):
        self.root = Path(directory).resolve()
        self.documents: dict[str, Any] = {}
        self.defined_in: dict[str, list[str]] = {}
        self.broken: dict[str, AvroCompileError] = {}
        for path in sorted(files):
            relative = path.resolve().relative_to(self.root).as_posix() if path.resolve().is_relative_to(self.root) else None
            if relative is None:
                continue
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                self.broken[relative] = AvroCompileError(relative, None, "not UTF-8 text")
                continue
            except json.JSONDecodeError as exc:
                self.broken[relative] = AvroCompileError(relative, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})")
                continue
            self.documents[relative] = document
            for name in _definitions(document, ""):
                self.defined_in.setdefault(name, []).append(relative)

    def parse(self, file: str) -> Any:
        """The parsed schema of `file`, with the named types it uses from other files."""
        if file in self.broken:
            raise self.broken[file]
        if file not in self.documents:
            raise AvroCompileError(file, None, "not an .avsc file of the schema set")
        needed: list[str] = []  # files to parse first, in order
        for _ in range(100):
            named: dict[str, Any] = {}
            try:
                for dependency in needed:
                    fastavro.parse_schema(self.documents[dependency], named_schemas=named)
                return fastavro.parse_schema(self.documents[file], named_schemas=named)
            except UnknownType as exc:
                missing = exc.name
                where = [f for f in self.defined_in.get(missing, []) if f != file and f not in needed]
                if not where:
                    raise AvroCompileError(file, None, f"unknown type {missing!r} (no .avsc file of the set defines it)") from None
                if len(where) > 1:
                    raise AvroCompileError(file, None, f"type {missing!r} is defined by several files ({', '.join(where)}): ambiguous") from None
                needed.insert(0, where[0])
            except (fastavro.schema.SchemaParseException, ValueError, TypeError, KeyError, AttributeError) as exc:
                culprit = file
                raise AvroCompileError(culprit, None, f"not a valid Avro schema: {exc}") from None
        raise AvroCompileError(file, None, "too many files referring to each other")


def _definitions(node: Any, namespace: str) -> Iterable[str]:
    if isinstance(node, list):
        for item in node:
            yield from _definitions(item, namespace)
    elif isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and kind in _NAMED and isinstance(node.get("name"), str):
            name = node["name"]
            space = node.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
            yield name if "." in name or not space else f"{space}.{name}"
            namespace = space or ""
        for key in ("fields", "items", "values"):
            if key in node:
                yield from _definitions(node[key], namespace)
        if isinstance(kind, (dict, list)):
            yield from _definitions(kind, namespace)


# --- shape checks ----------------------------------------------------------------------------------


def _named_schemas(parsed: Any) -> dict[str, Any]:
    return parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}


def _walk(schema: Any, named: dict[str, Any], visit: Callable[[Any, list[str]], None], stack: list[str]) -> None:
    """Call `visit(node, names being expanded)` on every node, following named references once per path."""
    if isinstance(schema, str):
        if schema in named:
            if schema in stack:
                visit(schema, stack)
                return
            _walk(named[schema], named, visit, [*stack, schema])
        return
    visit(schema, stack)
    if isinstance(schema, list):
        for branch in schema:
            _walk(branch, named, visit, stack)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "error"):
            name = schema.get("name")
            inner = [*stack, name] if name and name not in stack else stack
            for field in schema.get("fields", []):
                _walk(field["type"], named, visit, inner)
        elif kind == "array":
            _walk(schema["items"], named, visit, stack)
        elif kind == "map":
            _walk(schema["values"], named, visit, stack)
        elif isinstance(kind, (dict, list)):
            _walk(kind, named, visit, stack)


def _zero_width(schema: Any, named: dict[str, Any], seen: frozenset[str] = frozenset()) -> bool:
    """True when some value of `schema` encodes to no bytes at all."""
    if isinstance(schema, str):
        if schema == "null":
            return True
        if schema in named and schema not in seen:
            return _zero_width(named[schema], named, seen | {schema})
        return False
    if isinstance(schema, list):
        return False  # a union writes its branch index
    kind = schema.get("type")
    if kind in ("record", "error"):
        name = schema.get("name", "")
        return all(_zero_width(f["type"], named, seen | {name}) for f in schema.get("fields", []))
    if kind == "fixed":
        return bool(schema.get("size") == 0)
    if isinstance(kind, (str, dict)) and kind not in ("array", "map", "enum"):
        return _zero_width(kind, named, seen)
    return False


def _check_shape(parsed: Any) -> tuple[bool, str | None]:
    """(recursive?, problem or None)."""
    named = _named_schemas(parsed)
    recursive = False
    problem: str | None = None

    def visit(node: Any, stack: list[str]) -> None:
        nonlocal recursive, problem
        if isinstance(node, str):
            recursive = True
        elif isinstance(node, dict) and node.get("type") == "array" and problem is None and _zero_width(node["items"], named):
            problem = ("an array whose items can encode to zero bytes (null, an empty record, fixed of size 0): "
                       "a few bytes of payload could claim billions of items; use another item type")

    _walk(parsed, named, visit, [])
    return recursive, problem


# --- strict reading ---------------------------------------------------------------------------------


class _StrictDecoder(BinaryDecoder):
    """fastavro's decoder, refusing negative union and enum indexes (Python's lists would take them
    from the end: garbage would decode as a valid record that Java's reader then refuses)."""

    def read_index(self) -> int:
        index: int = self.read_long()  # type: ignore[no-untyped-call]  # fastavro's pure-Python decoder is unannotated
        if index < 0:
            raise IndexError(f"negative union branch index {index}")
        return index

    def read_enum(self) -> int:
        index: int = self.read_long()  # type: ignore[no-untyped-call]  # fastavro's pure-Python decoder is unannotated
        if index < 0:
            raise IndexError(f"negative enum symbol index {index}")
        return index


_OPTIONS = {"return_record_name": False, "return_record_name_override": False, "handle_unicode_errors": "strict",
            "return_named_type": False, "return_named_type_override": False}


def _strict_reader(stream: Any, writer: Any, reader: Any = None, return_record_name: bool = False) -> Any:
    """fastavro's pure-Python reader with `_StrictDecoder`: slower, bounded by Python's recursion
    limit, exact about indexes."""
    named = _read_py._default_named_schemas()
    writer = fastavro.parse_schema(writer, named["writer"])
    if reader is not None and reader is not writer:
        reader = fastavro.parse_schema(reader, named["reader"])
    else:
        reader = None
    decoder = _StrictDecoder(stream)  # type: ignore[no-untyped-call]  # fastavro's pure-Python decoder is unannotated
    return _read_py.read_data(decoder, writer, named, reader, _OPTIONS)  # type: ignore[no-untyped-call]  # likewise its reader


NEGATIVE = "\x00negative index"  # never a symbol: Avro names match [A-Za-z_][A-Za-z0-9_]*
_NEGATIVE_BRANCH = {"type": "enum", "name": "\x00negative", "symbols": []}  # reading it raises IndexError


class _NegativeIndex(Exception):
    pass


def _guard(node: Any, memo: dict[int, Any]) -> Any:
    """A copy of a parsed schema for decoding with fastavro's compiled reader, which indexes Python
    lists with the union branch and enum symbol numbers it reads, so -1 would take the last one.
    Each union gets as many extra branches as it has, each an enum without symbols (reading one
    raises IndexError); each enum as many extra symbols, each NEGATIVE (checked after decoding)."""
    if isinstance(node, list):
        branches = [_guard(branch, memo) for branch in node]
        return branches + [_NEGATIVE_BRANCH] * len(branches)
    if not isinstance(node, dict):
        return node
    if id(node) in memo:
        return memo[id(node)]
    out: dict[str, Any] = {}
    memo[id(node)] = out
    for key, value in node.items():
        if key == "__named_schemas":
            out[key] = {name: _guard(definition, memo) for name, definition in value.items()}
        elif key == "symbols" and node.get("type") == "enum":
            out[key] = [*value, *[NEGATIVE] * len(value)]
        elif key == "fields" and node.get("type") in ("record", "error"):
            out[key] = [{**f, "type": _guard(f["type"], memo)} for f in value]
        elif key in ("items", "values") or (key == "type" and isinstance(value, (dict, list))):
            out[key] = _guard(value, memo)
        else:
            out[key] = value
    return out


# --- payloads --------------------------------------------------------------------------------------


def _for_rules(value: Any) -> Any:
    """Logical-type values in a form CEL takes (see the module docstring)."""
    kind = type(value)
    if kind is str:
        if value == NEGATIVE:
            raise _NegativeIndex
        return value
    if kind is dict:
        return {k: _for_rules(v) for k, v in value.items()}
    if kind is list:
        return [_for_rules(v) for v in value]
    if kind is dt.datetime:
        if value.tzinfo is not None:
            return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        return value.isoformat()
    if kind is decimal.Decimal:
        return float(value)
    if kind in (dt.date, dt.time):
        return value.isoformat()
    if kind is uuid.UUID:
        return str(value)
    return value


def _enum(value: Any) -> Any:
    if value == NEGATIVE:
        raise _NegativeIndex
    return value


def _iso(value: Any) -> Any:
    if type(value) is dt.datetime and value.tzinfo is not None:
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return value.isoformat() if hasattr(value, "isoformat") else value


def _decimal(value: Any) -> Any:
    return float(value) if type(value) is decimal.Decimal else value


_LOGICAL: dict[str, Callable[[Any], Any]] = {
    "timestamp-millis": _iso, "timestamp-micros": _iso, "local-timestamp-millis": _iso, "local-timestamp-micros": _iso,
    "date": _iso, "time-millis": _iso, "time-micros": _iso, "decimal": _decimal, "uuid": str,
}


def _converter(schema: Any, named: dict[str, Any], seen: frozenset[str] = frozenset()) -> Callable[[Any], Any] | None:
    """A function that puts the logical-type values of a decoded `schema` value in the form rules
    see, touching only the fields that need it; None when nothing does."""
    if isinstance(schema, str):
        if schema in named:
            if schema in seen:
                return _for_rules  # recursive: the generic walk
            return _converter(named[schema], named, seen | {schema})
        return None
    if isinstance(schema, list):
        if any(_converter(branch, named, seen) for branch in schema):
            return _for_rules  # which branch is known only from the value
        return None
    logical = schema.get("logicalType")
    if logical in _LOGICAL:
        return _LOGICAL[logical]
    kind = schema.get("type")
    if kind == "enum":
        return _enum
    if kind in ("record", "error"):
        inner = seen | {schema.get("name", "")}
        fields = [(f["name"], c) for f in schema.get("fields", []) if (c := _converter(f["type"], named, inner))]
        if not fields:
            return None

        def record(value: dict[str, Any]) -> dict[str, Any]:
            for name, convert in fields:
                value[name] = convert(value[name])
            return value

        return record
    if kind == "array":
        items = _converter(schema["items"], named, seen)
        return None if items is None else (lambda values: [items(v) for v in values])
    if kind == "map":
        values = _converter(schema["values"], named, seen)
        return None if values is None else (lambda entries: {k: values(v) for k, v in entries.items()})
    if isinstance(kind, (dict, list)):
        return _converter(kind, named, seen)
    return None


@dataclass(frozen=True, slots=True)
class _Writer:
    label: str  # "schema id 7 (meter_v1.avsc)"
    schema: Any
    decode: Any = None  # `schema` as the compiled reader is given it (_guard), or as it is

    def __post_init__(self) -> None:
        if self.decode is None:
            object.__setattr__(self, "decode", self.schema)


class AvroSchema:
    """One schema file of a set: `validate(payload bytes)` → (decoded record, errors)."""

    format = "avro"
    __slots__ = ("_convert", "_fingerprints", "_ids", "_read", "_self", "encoding", "file", "name", "parsed", "type_name", "writers")

    def __init__(self, name: str, file: str, parsed: Any, *, encoding: str = "binary",
                 schema_ids: dict[int, tuple[str, Any]] | None = None, writers: dict[str, Any] | None = None):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        self.name = name
        self.file = file
        self.parsed = parsed
        self.encoding = encoding
        self.type_name = parsed.get("name", parsed.get("type")) if isinstance(parsed, dict) else ("union" if isinstance(parsed, list) else str(parsed))
        recursive = False
        for schema in [parsed, *(s for _, s in (schema_ids or {}).values()), *(writers or {}).values()]:
            rec, problem = _check_shape(schema)
            if problem:
                raise ValueError(problem)
            recursive = recursive or rec
        # The compiled reader recurses on the C stack; the pure-Python one stops at Python's limit.
        self._read = _strict_reader if recursive else fastavro.schemaless_reader

        def writer(label: str, schema: Any) -> _Writer:
            return _Writer(label, schema, schema if recursive else _guard(schema, {}))

        # Records are read into the entry's schema whatever the writer's: its logical types decide
        # (and its enums, which are checked for NEGATIVE).
        self._convert = _converter(parsed, _named_schemas(parsed))
        self._self = writer(file, parsed)
        self._ids = {number: writer(f"schema id {number} ({file_})", schema) for number, (file_, schema) in (schema_ids or {}).items()}
        self.writers = dict(writers or {})
        self._fingerprints = {fingerprint(parsed): self._self}
        for file_, schema in self.writers.items():
            self._fingerprints.setdefault(fingerprint(schema), writer(file_, schema))
        if encoding == "confluent" and not self._ids:
            raise ValueError("encoding confluent needs `schema_ids` (Schema Registry id -> schema file)")

    def __repr__(self) -> str:
        return f"AvroSchema({self.name!r}, {self.file!r}, encoding={self.encoding!r})"

    def writer_schemas(self) -> list[tuple[str, Any]]:
        """(label, parsed schema) of every writer schema this entry accepts besides its own."""
        if self.encoding == "confluent":
            return [(w.label, w.schema) for w in self._ids.values()]
        if self.encoding == "single_object":
            return [(w.label, w.schema) for w in self._fingerprints.values()]
        return [(self.file, self.parsed)]

    def validate(self, payload: bytes) -> tuple[Any, list[SchemaError]]:
        writer: _Writer | None = None
        start = 0
        if self.encoding == "confluent":
            if len(payload) < 5:
                return None, [SchemaError("", f"{len(payload)} bytes: too short for the Confluent wire format (magic byte 0 and a 4-byte schema id)")]
            if payload[0] != 0:
                return None, [SchemaError("", f"does not start with the Confluent magic byte 0 (got 0x{payload[0]:02x})")]
            number = int.from_bytes(payload[1:5], "big")
            writer = self._ids.get(number)
            if writer is None:
                known = ", ".join(str(n) for n in sorted(self._ids))
                return None, [SchemaError("", f"schema id {number} is not mapped in the manifest (schema_ids: {known})")]
            start = 5
        elif self.encoding == "single_object":
            if payload[:2] != SINGLE_OBJECT_MARKER or len(payload) < 10:
                return None, [SchemaError("", "does not start with the Avro single-object marker C3 01 and an 8-byte fingerprint")]
            writer = self._fingerprints.get(payload[2:10])
            if writer is None:
                return None, [SchemaError("", f"schema fingerprint {payload[2:10].hex()} matches no schema of this entry "
                                              f"({self.file} or its `writers`)")]
            start = 10
        stream = io.BytesIO(payload)
        stream.seek(start)
        source = writer or self._self
        try:
            if source.schema is self.parsed:
                record = self._read(stream, source.decode, None, return_record_name=False)
            else:
                record = self._read(stream, source.decode, self.parsed, return_record_name=False)
            left = len(payload) - stream.tell()
            if not left and self._convert is not None:
                record = self._convert(record)
        except _NegativeIndex:
            return None, [SchemaError("", f"cannot decode as {self.type_name}: {_explain(IndexError(), 0)}")]
        except SchemaResolutionError as exc:
            if "\x00negative" in str(exc):
                return None, [SchemaError("", f"cannot decode as {self.type_name}: {_explain(IndexError(), 0)}")]
            return None, [SchemaError("", f"a record written with {source.label} cannot be read as {self.type_name}: {exc}")]
        except RecursionError:
            return None, [SchemaError("", f"cannot decode as {self.type_name}: records nested too deeply")]
        except (EOFError, IndexError, UnicodeDecodeError, ValueError, OverflowError, MemoryError, TypeError, KeyError) as exc:
            return None, [SchemaError("", f"cannot decode as {self.type_name}: {_explain(exc, len(payload) - start)}")]
        if left:
            return None, [SchemaError("", f"cannot decode as {self.type_name}: {left} byte{'s' if left > 1 else ''} left over after "
                                          "the record (written with another schema, or more than one record)")]
        return record, []


def _explain(error: BaseException, size: int) -> str:
    if isinstance(error, EOFError):
        detail = str(error)
        if detail.startswith("Expected -"):
            return "a negative length (garbage, or not Avro binary)"
        if detail.startswith("Expected "):
            wanted = detail.split()[1]
            return f"a length of {wanted} bytes in a payload of {size}: truncated, or not Avro binary"
        return f"the payload ends early ({size} bytes): truncated, or written with another schema"
    if isinstance(error, IndexError):
        return "an enum symbol or union branch index out of range (or negative): garbage, or written with another schema"
    if isinstance(error, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    return f"not Avro binary for this schema ({type(error).__name__}: {error})"
