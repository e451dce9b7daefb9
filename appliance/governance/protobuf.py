"""Protobuf payloads: a schema set's `.proto` files compiled to a descriptor set, payloads decoded by upb.

`compile_protos` runs protoc in a subprocess through its public interface (`--descriptor_set_out
--include_imports`) and loads the resulting FileDescriptorSet into a DescriptorPool of the set's own,
so two sets (v1 and v2) can define the same message names. protoc is grpcio-tools' (`python -m
grpc_tools.protoc`, with the well-known types it ships) when installed, else a `protoc` on PATH
(Debian's protobuf-compiler). Nothing of protoc stays in the service's memory. A manifest may also
name a precompiled descriptor set (`.binpb`, made with `protoc --descriptor_set_out=X.binpb
--include_imports`), which needs no protoc at all. Imports resolve within the set directory, plus the
well-known types (`google/protobuf/*.proto`).

`ProtobufSchema.validate` decodes a payload and hands rules a plain dict shaped like the message's
JSON form, with three differences a CEL rule author wants: field names as written in the `.proto`,
64-bit integers as numbers (not strings) and `bytes` as bytes. Enum values are their names (an
open-enum value the schema does not know stays a number). Fields without presence (proto3 scalars,
repeated fields, maps) are always there, at their default when the payload leaves them out, so
`payload.battery_mv < 3000` works for a device reporting 0; fields with presence (messages,
`optional`, proto2, oneof members) are left out when unset, so `has(payload.x)` means what it says.

Hostile payloads cannot hurt: upb refuses nesting deeper than 100 levels and length prefixes
longer than the payload with a DecodeError, which becomes a SchemaError like any other.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.unknown_fields import UnknownFieldSet

from appliance.governance.errors import SchemaError

__all__ = ["DESCRIPTOR_SET_SUFFIX", "ProtoCompileError", "ProtobufSchema", "SchemaError", "compile_protos"]

_WELL_KNOWN_PREFIX = "google/protobuf/"
# A manifest file with this suffix is a precompiled FileDescriptorSet, not a .proto source.
DESCRIPTOR_SET_SUFFIX = ".binpb"
# protoc is quick (milliseconds per file); this only stops a hung one. Scaled under emulation.
PROTOC_TIMEOUT_S = 60 * float(os.environ.get("APPLIANCE_TIMEOUT_SCALE", "1"))
# At most this many errors per payload, like the JSON Schema validator.
MAX_ERRORS = 10


class ProtoCompileError(Exception):
    """A .proto file that does not compile. str() is what protoc says, a `file:line:col: problem`
    line per problem; `file`, `line` and `column` (1-based, None when protoc gave none) point at the
    first problem that has a place, and `message` is everything but that place, for a loader that
    prints the place itself."""

    def __init__(self, file: str, line: int | None, message: str, *, column: int | None = None, problems: Sequence[str] = ()):
        self.file = file
        self.line = line
        self.column = column
        self.message = message
        self.problems = list(problems) or [f"{file}: {message}"]
        super().__init__("\n".join(self.problems))


def compile_protos(set_dir: Path, files: Iterable[str]) -> DescriptorPool:
    """Compile `files` (paths relative to `set_dir`) and everything they import into a new pool;
    files ending in `.binpb` are precompiled descriptor sets, loaded as they are.

    Raises ProtoCompileError for a file outside the set, an import that is not in the set (nor a
    well-known type) or anything protoc rejects."""
    root = Path(set_dir).resolve()
    virtuals = [_virtual_path(root, file) for file in files]
    sources = list(dict.fromkeys(v for v in virtuals if not v.endswith(DESCRIPTOR_SET_SUFFIX)))
    pool = DescriptorPool()
    loaded: set[str] = set()
    if sources:
        for proto in _protoc(root, sources).file:
            _check_inside(root, proto.name)
            _add(pool, proto, loaded, sources[0])
    for virtual in dict.fromkeys(v for v in virtuals if v.endswith(DESCRIPTOR_SET_SUFFIX)):
        for proto in _read_descriptor_set(root / virtual, virtual).file:
            _add(pool, proto, loaded, virtual)
    return pool


def _add(pool: DescriptorPool, proto: descriptor_pb2.FileDescriptorProto, loaded: set[str], origin: str) -> None:
    if proto.name in loaded:
        return
    try:
        pool.Add(proto)
    except (TypeError, ValueError, KeyError) as exc:
        # A descriptor set made without --include_imports lacks the files it imports.
        raise ProtoCompileError(origin, None, f"cannot load {proto.name}: {exc} (a descriptor set must be made "
                                              f"with protoc --descriptor_set_out --include_imports)") from None
    loaded.add(proto.name)


def _virtual_path(root: Path, file: str) -> str:
    """The name protoc knows `file` by: a clean path relative to the set, or ProtoCompileError."""
    if Path(file).is_absolute() or not (root / file).resolve().is_relative_to(root):
        raise ProtoCompileError(file, None, "outside the schema set")
    virtual = os.path.normpath(PurePosixPath(Path(file).as_posix()))
    if virtual.startswith("-"):  # protoc would read it as an option
        raise ProtoCompileError(file, None, "a file name must not start with '-'")
    if not (root / virtual).is_file():
        raise ProtoCompileError(file, None, "not found in the schema set")
    return virtual


def _check_inside(root: Path, name: str) -> None:
    # protoc already refuses `..` and absolute imports; a symlink could still lead outside the set.
    if name.startswith(_WELL_KNOWN_PREFIX) and not (root / name).exists():
        return
    if not (root / name).resolve().is_relative_to(root):
        raise ProtoCompileError(name, None, f"links outside the schema set (to {(root / name).resolve()})")


def _read_descriptor_set(path: Path, virtual: str) -> descriptor_pb2.FileDescriptorSet:
    try:
        return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    except OSError as exc:
        raise ProtoCompileError(virtual, None, f"cannot read: {exc.strerror}") from None
    except DecodeError:
        raise ProtoCompileError(virtual, None, "not a descriptor set (make one with protoc --descriptor_set_out=FILE "
                                               "--include_imports)") from None


def protoc_command() -> list[str]:
    """How to run protoc here: grpcio-tools' when installed (it adds its well-known types to the
    import path), else `protoc` on PATH. Finding grpc_tools does not import it."""
    if importlib.util.find_spec("grpc_tools") is not None:
        return [sys.executable, "-m", "grpc_tools.protoc"]
    if (found := shutil.which("protoc")) is not None:
        return [found]
    raise ProtoCompileError("(protoc)", None, "no protoc to compile .proto files: install grpcio-tools or Debian's "
                                              "protobuf-compiler, or name precompiled .binpb descriptor sets")


def _protoc(root: Path, sources: Sequence[str]) -> descriptor_pb2.FileDescriptorSet:
    """One protoc run for all `sources`: their FileDescriptorProtos and their imports', each import
    before the files that use it."""
    with tempfile.TemporaryDirectory(prefix="appliance-protoc-") as scratch:
        out = Path(scratch) / "set.binpb"
        command = [*protoc_command(), "-I.", "--include_imports", f"--descriptor_set_out={out}", *sources]
        try:
            done = subprocess.run(command, cwd=root, capture_output=True, timeout=PROTOC_TIMEOUT_S, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ProtoCompileError(sources[0], None, f"protoc did not finish within {PROTOC_TIMEOUT_S:.0f} s") from None
        except OSError as exc:
            raise ProtoCompileError(sources[0], None, f"cannot run protoc ({command[0]}): {exc.strerror}") from None
        stderr = done.stderr.decode(errors="replace")
        if done.returncode != 0:
            raise _compile_error(sources[0], stderr)
        return _read_descriptor_set(out, sources[0])


_PLACED = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<column>\d+): (?P<message>.*)$")
_UNPLACED = re.compile(r"^(?P<file>[^:]+): (?P<message>.*)$")


def _compile_error(first_source: str, stderr: str) -> ProtoCompileError:
    """ProtoCompileError from protoc's messages, one a line: `file:line:col: problem` or `file: problem`."""
    lines: list[str] = []
    places: list[tuple[str, int | None, int | None, str]] = []
    first: int | None = None  # index of the first problem with a place
    for text in stderr.splitlines():
        text = text.strip()
        if not text or text.startswith("warning:") or ": warning:" in text:
            continue
        if placed := _PLACED.match(text):
            file, message = placed["file"], placed["message"]
            line, column = int(placed["line"]), int(placed["column"])
            first = len(places) if first is None else first
        elif unplaced := _UNPLACED.match(text):
            file, message, line, column = unplaced["file"], unplaced["message"], None, None
        else:
            file, message, line, column = first_source, text, None, None
        lines.append(text)
        places.append((file, line, column, message))
    if not places:
        return ProtoCompileError(first_source, None, "does not compile (protoc gave no reason)")
    file, line, column, message = places[first or 0]
    others = [text for index, text in enumerate(lines) if index != (first or 0)]
    # An import that failed is placed in the importing file; why it failed is a problem without a place.
    message = "; ".join([message, *others])
    return ProtoCompileError(file, line, message, column=column, problems=lines)


# --- payloads -----------------------------------------------------------------------------------

_Convert = Callable[[Any], Any]
_DECODE_PREFIX = re.compile(r"^Error parsing message(?: with type '[^']*')?: ")


@dataclass(frozen=True, slots=True)
class _Shape:
    """How to walk one message type, worked out once per type and schema."""

    # (key, converter or None for as-is, has presence): every declared field, in declaration order.
    fields: tuple[tuple[str, _Convert | None, bool], ...]
    # Message-typed fields, for the unknown-field check: (name, SINGLE/REPEATED/MAP).
    nested: tuple[tuple[str, int], ...]
    extendable: bool


_SINGLE, _REPEATED, _MAP = range(3)


class ProtobufSchema:
    """One message type of a compiled schema set: `validate(payload bytes)` → (dict, errors)."""

    format = "protobuf"
    __slots__ = ("_class", "_decode_failed", "_shapes", "allow_unknown_fields", "message_type", "name")

    def __init__(self, name: str, pool: DescriptorPool, message_type: str, *, allow_unknown_fields: bool = False):
        try:
            descriptor = pool.FindMessageTypeByName(message_type)
        except KeyError:
            raise ValueError(f"message type {message_type!r} is not defined by the compiled .proto files") from None
        self.name = name
        self.message_type = message_type
        self.allow_unknown_fields = allow_unknown_fields
        self._class: type[Message] = GetMessageClass(descriptor)
        self._shapes: dict[str, _Shape] = {}
        self._decode_failed = f"cannot decode as {message_type}"

    def __repr__(self) -> str:
        return f"ProtobufSchema({self.name!r}, {self.message_type!r})"

    @property
    def descriptor(self) -> Any:
        """The message type's descriptor (for static compatibility checks)."""
        return self._class.DESCRIPTOR

    def validate(self, payload: bytes) -> tuple[dict[str, Any] | None, list[SchemaError]]:
        message = self._class()
        try:
            message.ParseFromString(payload)
        except DecodeError as exc:
            return None, [SchemaError("", f"{self._decode_failed}: {_explain(exc)}")]
        # upb decodes a message with missing required fields without complaint; it only tells.
        if not message.IsInitialized():
            return None, _missing_required(message)
        if not self.allow_unknown_fields:
            unknown = self._unknown_fields(message, "", [])
            if unknown:
                return None, unknown[:MAX_ERRORS]
        try:
            return self._to_dict(message), []
        except _NotText as exc:
            return None, [SchemaError("", f"string field {exc.args[0]} is not valid UTF-8")]

    def _to_dict(self, message: Message) -> dict[str, Any]:
        # getattr per declared field beats ListFields() for the small messages sensors send, and
        # gives fields without presence their default for free.
        descriptor = message.DESCRIPTOR
        shape = self._shapes.get(descriptor.full_name) or self._shape(descriptor)
        out = {}
        for key, convert, presence in shape.fields:
            if presence and not message.HasField(key):
                continue
            value = getattr(message, key)
            out[key] = value if convert is None else convert(value)
        if shape.extendable:
            for field, value in message.ListFields():
                if field.is_extension:
                    convert = self._converter(field)
                    out[f"[{field.full_name}]"] = value if convert is None else convert(value)
        return out

    def _unknown_fields(self, message: Message, path: str, errors: list[SchemaError]) -> list[SchemaError]:
        """An error for every message in the tree (this one included) that carries fields its type
        does not declare, naming their numbers: all the wire tells about them."""
        unknown = UnknownFieldSet(message)
        if len(unknown):
            errors.append(SchemaError(path, _describe_unknown(message, unknown)))
        descriptor = message.DESCRIPTOR
        shape = self._shapes.get(descriptor.full_name) or self._shape(descriptor)
        for name, kind in shape.nested:
            if len(errors) >= MAX_ERRORS:
                break
            if kind == _SINGLE:
                if message.HasField(name):
                    self._unknown_fields(getattr(message, name), f"{path}/{name}", errors)
            elif kind == _REPEATED:
                for index, item in enumerate(getattr(message, name)):
                    self._unknown_fields(item, f"{path}/{name}/{index}", errors)
            else:
                for key, item in getattr(message, name).items():
                    self._unknown_fields(item, f"{path}/{name}/{_escape(str(key))}", errors)
        # Extensions are rare on the wire and unknown fields inside them rarer: not walked.
        return errors

    def _shape(self, descriptor: Any) -> _Shape:  # upb's Descriptor or the typed stub's
        fields = []
        nested = []
        for field in descriptor.fields:
            repeated = field.is_repeated  # maps too
            fields.append((field.name, self._converter(field), field.has_presence and not repeated))
            if _is_map(field):
                if _map_value(field).type == FieldDescriptor.TYPE_MESSAGE:
                    nested.append((field.name, _MAP))
            elif field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
                nested.append((field.name, _REPEATED if repeated else _SINGLE))
        shape = _Shape(tuple(fields), tuple(nested), bool(descriptor.extension_ranges))
        self._shapes[descriptor.full_name] = shape
        return shape

    def _converter(self, field: FieldDescriptor) -> _Convert | None:
        if _is_map(field):
            value = self._single(_map_value(field))
            if value is None:
                return dict
            return lambda entries: {k: value(v) for k, v in entries.items()}
        single = self._single(field)
        if field.is_repeated:
            if single is None:
                return list
            return lambda values: [single(v) for v in values]
        return single

    def _single(self, field: FieldDescriptor) -> _Convert | None:
        if field.type == FieldDescriptor.TYPE_ENUM:
            enum = field.enum_type
            assert enum is not None
            names = {number: value.name for number, value in enum.values_by_number.items()}
            return lambda number: names.get(number, number)
        if field.type == FieldDescriptor.TYPE_FLOAT:
            return _float32
        if field.type == FieldDescriptor.TYPE_STRING:
            return _text(field.full_name)
        if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
            special = _WELL_KNOWN.get(_submessage(field).full_name)
            return special or self._to_dict
        return None


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and _submessage(field).GetOptions().map_entry


def _submessage(field: FieldDescriptor) -> Descriptor:
    descriptor = field.message_type
    assert descriptor is not None, f"{field.full_name} is not a message field"
    return descriptor


def _map_value(field: FieldDescriptor) -> FieldDescriptor:
    return _submessage(field).fields_by_name["value"]


def _float32(value: float) -> float:
    """A float field's value as the shortest decimal that is the same float32, as in JSON: 21.1, not
    21.100000381469727, so `payload.temperature == 21.1` holds."""
    if not math.isfinite(value):
        return value
    for digits in range(6, 10):  # 9 significant digits always round-trip a float32
        shorter = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", shorter))[0] == value:
            return shorter
    return value


class _NotText(Exception):
    """A string field of a proto2 message holds bytes that are not UTF-8 (proto3 checks at decoding)."""


def _text(field_name: str) -> _Convert:
    # upb hands such a field over as bytes rather than str: a rule would see the wrong type.
    def text(value: Any) -> Any:
        if type(value) is bytes:
            raise _NotText(field_name)
        return value

    return text


def _unwrap(message: Message) -> Any:
    return message.value  # type: ignore[attr-defined]  # a wrapper type's generated field: not in types-protobuf's Message


def _json(message: Message) -> Any:
    return json_format.MessageToDict(message)


# Well-known types rules see in their JSON form: Timestamp "2026-11-27T12:00:00Z" (CEL:
# `timestamp(payload.ts)`), Duration "1.5s", Struct/Value/ListValue as JSON values, wrappers as
# their value (left out when unset, so `has()` tells null from zero). Any and Empty stay messages.
_WELL_KNOWN: dict[str, _Convert] = {
    "google.protobuf.Timestamp": _json,
    "google.protobuf.Duration": _json,
    "google.protobuf.FieldMask": _json,
    "google.protobuf.Struct": _json,
    "google.protobuf.Value": _json,
    "google.protobuf.ListValue": _json,
    **{
        f"google.protobuf.{wrapper}": _unwrap
        for wrapper in ("DoubleValue", "Int64Value", "UInt64Value", "Int32Value", "UInt32Value", "BoolValue", "StringValue", "BytesValue")
    },
    "google.protobuf.FloatValue": lambda message: _float32(message.value),
}


def _explain(error: DecodeError) -> str:
    text = _DECODE_PREFIX.sub("", str(error))
    if "MaxDepth" in text:
        return "messages nested too deeply (more than 100 levels)"
    return text[:1].lower() + text[1:]


_INIT_PATH = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")


def _missing_required(message: Message) -> list[SchemaError]:
    errors = []
    for dotted in message.FindInitializationErrors()[:MAX_ERRORS]:  # type: ignore[attr-defined]  # missing from types-protobuf's Message
        # "inner.x", "items[0].x": a JSON pointer like the JSON Schema validator's ("/items/0/x").
        pointer = "".join("/" + _escape(index or name) for index, name in _INIT_PATH.findall(dotted))
        errors.append(SchemaError(pointer, f"required field {dotted!r} is missing"))
    return errors


def _escape(token: str) -> str:
    """A JSON pointer token (RFC 6901): a map key may hold "/" or "~"."""
    return token.replace("~", "~0").replace("/", "~1")


def _describe_unknown(message: Message, unknown: UnknownFieldSet) -> str:
    descriptor = message.DESCRIPTOR
    numbers = sorted({field.field_number for field in unknown})  # type: ignore[attr-defined]  # types-protobuf's UnknownFieldSet has no __iter__
    undeclared = [n for n in numbers if n not in descriptor.fields_by_number]
    # A closed (proto2) enum keeps a value it does not know among the unknown fields, under the
    # enum field's own number.
    bad_enums = [descriptor.fields_by_number[n].name for n in numbers if n in descriptor.fields_by_number]
    parts = []
    if undeclared:
        parts.append(f"unknown field{'s' if len(undeclared) > 1 else ''} {', '.join(map(str, undeclared))} (not in {descriptor.full_name})")
    if bad_enums:
        parts.append(f"enum value not defined for {', '.join(repr(n) for n in bad_enums)}")
    return "; ".join(parts)
