"""Protobuf compatibility from descriptors, after buf's breaking-change rules (WIRE category), judged
for a validating gateway.

The appliance decodes a payload as the mapped message and, unless the schema says
`allow_unknown_fields: true`, rejects any field its message type does not declare (in nested
messages too). So a field that plain protobuf readers would skip is a rejection here:

- a field added in the new set: new messages that carry it are rejected by the old set (breaks
  FORWARD under strict decoding of the old schema; a note when the old schema allows unknown fields);
- a field deleted in the new set: old messages that carry it are rejected by the new set (breaks
  BACKWARD under strict decoding of the new schema; when unknown fields are allowed it only breaks
  if the number is not reserved, buf's FIELD_NO_DELETE_UNLESS_NUMBER_RESERVED).

Type changes within a wire-compatible group (int32/uint32/int64/uint64/bool, sint32/sint64,
fixed32/sfixed32, fixed64/sfixed64) decode without error and are notes; string/bytes differ only in
the UTF-8 check. Paths read like the declaration: `demo.DeviceStatus.firmware = 5`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from replay.compat.model import BOTH, NARROWING, NEITHER, WIDENING, Direction, Finding

T = FieldDescriptor
_GROUPS = {
    T.TYPE_INT32: "varint", T.TYPE_UINT32: "varint", T.TYPE_INT64: "varint", T.TYPE_UINT64: "varint", T.TYPE_BOOL: "varint",
    T.TYPE_SINT32: "zigzag", T.TYPE_SINT64: "zigzag",
    T.TYPE_FIXED32: "fixed32", T.TYPE_SFIXED32: "fixed32",
    T.TYPE_FIXED64: "fixed64", T.TYPE_SFIXED64: "fixed64",
    T.TYPE_STRING: "text", T.TYPE_BYTES: "text",
}
_TYPE_NAMES = {
    getattr(T, name): name.removeprefix("TYPE_").lower() for name in dir(T) if name.startswith("TYPE_")
}
_STRICT = "strict decoding: the appliance rejects unknown fields unless allow_unknown_fields is set"


def compare_messages(old: Descriptor, new: Descriptor, *, old_strict: bool, new_strict: bool) -> list[Finding]:
    """Findings for the message a schema maps to, and every message and enum reachable from it."""
    diff = _ProtoDiff(old_strict, new_strict)
    if old.full_name != new.full_name:
        old_package, new_package = old.file.package, new.file.package
        kind = "package renamed" if old_package != new_package else "message renamed"
        diff.add(kind, new.full_name, old.full_name, new.full_name, NEITHER,
                 detail="binary payloads carry no type name, so validation is unaffected; generated code, "
                        "Any type URLs and buf (PACKAGE_NO_DELETE / MESSAGE_NO_DELETE) do care")
    diff.message(old, new)
    return diff.findings


class _ProtoDiff:
    def __init__(self, old_strict: bool, new_strict: bool):
        self.old_strict = old_strict
        self.new_strict = new_strict
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, kind: str, path: str, old: Any, new: Any, breaks: frozenset[Direction], *, proven: bool = True, detail: str = "") -> None:
        self.findings.append(Finding(kind, path, old, new, breaks, proven, detail))

    def message(self, old: Descriptor, new: Descriptor) -> None:
        key = (old.full_name, new.full_name)
        if key in self._seen:
            return
        self._seen.add(key)
        if old.full_name.startswith("google.protobuf.") and old.full_name == new.full_name:
            return  # well-known types are the same in every set
        old_proto, new_proto = _proto(old), _proto(new)
        for number in sorted(set(old.fields_by_number) | set(new.fields_by_number)):
            of, nf = old.fields_by_number.get(number), new.fields_by_number.get(number)
            if of is not None and nf is not None:
                self.field(old, of, new, nf, old_proto, new_proto)
            elif of is not None:
                self.deleted(of, new, new_proto)
            elif nf is not None:
                self.added(old, nf, old_proto)

    def deleted(self, field: FieldDescriptor, new: Descriptor, new_proto: descriptor_pb2.DescriptorProto) -> None:
        path = f"{new.full_name}.{field.name} = {field.number}"
        reserved = _reserved(new_proto, field.number, field.name)
        if self.new_strict:
            self.add("field deleted", path, _describe(field), None, NARROWING,
                     detail=f"the new set rejects old messages that carry it ({_STRICT})"
                            + ("" if reserved else "; its number is not reserved either"))
        elif not reserved:
            self.add("field deleted without reserving its number", path, _describe(field), None, NARROWING,
                     detail="buf FIELD_NO_DELETE_UNLESS_NUMBER_RESERVED: a later field may reuse the number with another meaning")
        else:
            self.add("field deleted (number reserved)", path, _describe(field), None, NEITHER,
                     detail="the new schema allows unknown fields and skips it")
        if field.is_required:
            self.add("required field deleted", path, _describe(field), None, WIDENING,
                     detail="new messages without it are rejected by the old set (proto2 required)")

    def added(self, old: Descriptor, field: FieldDescriptor, old_proto: descriptor_pb2.DescriptorProto) -> None:
        path = f"{_parent(field).full_name}.{field.name} = {field.number}"
        if field.is_required:
            self.add("required field added", path, None, _describe(field), NARROWING,
                     detail="old messages do not carry it and are rejected by the new set (proto2 required)")
        if self.old_strict:
            self.add("field added", path, None, _describe(field), WIDENING,
                     detail="protobuf readers skip unknown fields, but the old set rejects new messages that carry it "
                            f"({_STRICT}): set allow_unknown_fields on the old schema to accept them")
        else:
            self.add("field added", path, None, _describe(field), NEITHER,
                     detail="the old schema allows unknown fields and skips it")
        if _reserved(old_proto, field.number, field.name):
            self.add("reserved field number or name used", path, None, _describe(field), NEITHER,
                     detail="the old schema reserved it: check that old data never carried a field with this number")

    def field(
        self,
        old_message: Descriptor,
        old: FieldDescriptor,
        new_message: Descriptor,
        new: FieldDescriptor,
        old_proto: descriptor_pb2.DescriptorProto,
        new_proto: descriptor_pb2.DescriptorProto,
    ) -> None:
        path = f"{new_message.full_name}.{new.name} = {new.number}"
        if old.name != new.name:
            if old.name in new_message.fields_by_name or new.name in old_message.fields_by_name:
                self.add("field number reused", path, _describe(old), _describe(new), BOTH,
                         detail="the number now carries another field of both schemas: values change meaning")
            elif _type(old) != _type(new):
                self.add("field number reused", path, _describe(old), _describe(new), BOTH,
                         detail="another name and another type under the same number: a different field")
            else:
                self.add("field renamed", path, old.name, new.name, NEITHER,
                         detail="wire-compatible; rules and decoded payloads use .proto names, so rules naming "
                                f"{old.name!r} need updating")
        elif old.json_name != new.json_name:
            self.add("JSON name changed", path, old.json_name, new.json_name, NEITHER,
                     detail="binary payloads are unaffected; JSON renderings of the message change")
        self.type(old, new, path)
        if old.is_repeated != new.is_repeated:
            if new.is_repeated:
                self.add("field became repeated", path, "singular", "repeated", WIDENING,
                         detail="new messages with several values (or a packed encoding) are not read as one value by the old set")
            else:
                self.add("field no longer repeated", path, "repeated", "singular", NARROWING,
                         detail="old messages with several values (or packed numbers) are not read as one value by the new set")
        if old.is_required != new.is_required:
            if new.is_required:
                self.add("field became required", path, "optional", "required", NARROWING,
                         detail="old messages without it are rejected by the new set")
            else:
                self.add("field no longer required", path, "required", "optional", WIDENING,
                         detail="new messages without it are rejected by the old set")
        elif not old.is_repeated and not new.is_repeated and old.has_presence != new.has_presence:
            self.add("field presence changed", path, _presence(old), _presence(new), NEITHER,
                     detail="wire-compatible; `has(payload.x)` in rules and defaults in decoded payloads change")
        self.oneof(old, new, path, old_proto, new_proto)
        if old.has_default_value != new.has_default_value or (
            old.has_default_value and old.default_value != new.default_value
        ):
            self.add("default value changed", path, old.default_value, new.default_value, NEITHER,
                     detail="proto2 default: decoded payloads without the field change value")

    def type(self, old: FieldDescriptor, new: FieldDescriptor, path: str) -> None:
        message_types = (T.TYPE_MESSAGE, T.TYPE_GROUP)
        if old.type in message_types and new.type in message_types:
            if old.type != new.type:
                self.add("field type changed", path, _type(old), _type(new), BOTH, detail="group and message are encoded differently")
                return
            old_type, new_type = _message_type(old), _message_type(new)
            if old_type.full_name != new_type.full_name:
                self.add("message type renamed", path, old_type.full_name, new_type.full_name, NEITHER,
                         detail="compared by structure below")
            self.message(old_type, new_type)
            return
        if old.type == new.type == T.TYPE_ENUM:
            self.enum(_enum_type(old), _enum_type(new), path)
            return
        if old.type == new.type:
            return
        group_old, group_new = _GROUPS.get(old.type), _GROUPS.get(new.type)
        if group_old is not None and group_old == group_new:
            if group_old == "text":
                # bytes accept any byte string, string only UTF-8.
                breaks = WIDENING if new.type == T.TYPE_BYTES else NARROWING
                self.add("field type changed (string/bytes)", path, _type(old), _type(new), breaks, proven=False,
                         detail="wire-compatible, but string fields must hold UTF-8: only non-UTF-8 values are affected")
            else:
                self.add("field type changed (wire-compatible)", path, _type(old), _type(new), NEITHER,
                         detail="buf WIRE allows it; values outside the smaller type are truncated or reinterpreted, not rejected")
            return
        if {old.type, new.type} <= {T.TYPE_ENUM, *(t for t, g in _GROUPS.items() if g == "varint")}:
            enum = old.enum_type if old.type == T.TYPE_ENUM else new.enum_type
            if enum is not None and not enum.is_closed:
                self.add("field type changed (enum/integer)", path, _type(old), _type(new), NEITHER,
                         detail="an open enum is a varint on the wire; rules see names on one side and numbers on the other")
                return
        self.add("field type changed", path, _type(old), _type(new), BOTH, detail="not wire-compatible (buf FIELD_SAME_TYPE)")

    def oneof(
        self,
        old: FieldDescriptor,
        new: FieldDescriptor,
        path: str,
        old_proto: descriptor_pb2.DescriptorProto,
        new_proto: descriptor_pb2.DescriptorProto,
    ) -> None:
        old_oneof, new_oneof = _real_oneof(old, old_proto), _real_oneof(new, new_proto)
        if old_oneof is None and new_oneof is None:
            return
        if old_oneof is None:
            self.add("field moved into a oneof", path, None, new_oneof.name, NARROWING, proven=False,
                     detail="old messages that set several of its members keep only the last one (buf FIELD_SAME_ONEOF)")
        elif new_oneof is None:
            self.add("field moved out of a oneof", path, old_oneof.name, None, WIDENING, proven=False,
                     detail="new messages may set fields the old set treats as alternatives (buf FIELD_SAME_ONEOF)")
        elif sorted(f.number for f in old_oneof.fields) != sorted(f.number for f in new_oneof.fields):
            self.add("oneof members changed", path, _members(old_oneof), _members(new_oneof), BOTH, proven=False,
                     detail="messages setting several of the members keep only the last one (buf FIELD_SAME_ONEOF)")
        elif old_oneof.name != new_oneof.name:
            self.add("oneof renamed", path, old_oneof.name, new_oneof.name, NEITHER)

    def enum(self, old: EnumDescriptor, new: EnumDescriptor, path: str) -> None:
        key = (old.full_name, new.full_name)
        if key in self._seen:
            return
        self._seen.add(key)
        new_proto = descriptor_pb2.EnumDescriptorProto()
        new.CopyToProto(new_proto)
        old_names = {v.name: v.number for v in old.values}
        new_names = {v.name: v.number for v in new.values}
        where = f"{path} ({new.full_name})"
        for number in sorted(set(old.values_by_number) | set(new.values_by_number)):
            ov, nv = old.values_by_number.get(number), new.values_by_number.get(number)
            if ov is not None and nv is None:
                reserved = any(r.start <= number <= r.end for r in new_proto.reserved_range) or ov.name in new_proto.reserved_name
                if new.is_closed:
                    self.add("enum value removed", where, f"{ov.name} = {number}", None, NARROWING,
                             detail="a closed (proto2) enum keeps unknown values as unknown fields: old messages with it "
                                    + ("are rejected by the new set" if self.new_strict else "lose it"))
                elif not reserved:
                    self.add("enum value removed without reserving its number", where, f"{ov.name} = {number}", None, NARROWING,
                             proven=False, detail="old messages decode, but rules see the number instead of a name, and the "
                                                 "number can be reused (buf ENUM_VALUE_NO_DELETE_UNLESS_NUMBER_RESERVED)")
                else:
                    self.add("enum value removed (number reserved)", where, f"{ov.name} = {number}", None, NEITHER,
                             detail="an open enum keeps the number; rules see a number instead of a name")
            elif nv is not None and ov is None:
                if old.is_closed:
                    self.add("enum value added", where, None, f"{nv.name} = {number}", WIDENING,
                             detail="a closed (proto2) enum: the old set "
                                    + ("rejects new messages with it" if self.old_strict else "drops it from new messages"))
                else:
                    self.add("enum value added", where, None, f"{nv.name} = {number}", NEITHER,
                             detail="an open enum: the old set decodes it as a number")
            elif ov is not None and nv is not None and ov.name != nv.name:
                if new_names.get(ov.name, number) != number or old_names.get(nv.name, number) != number:
                    self.add("enum value number reused", where, f"{ov.name} = {number}", f"{nv.name} = {number}", BOTH,
                             detail="the number now means another value of both schemas")
                else:
                    self.add("enum value renamed", where, ov.name, nv.name, NEITHER,
                             detail="wire-compatible; rules and decoded payloads see enum values by name")


def _proto(message: Descriptor) -> descriptor_pb2.DescriptorProto:
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    return proto


def _reserved(proto: descriptor_pb2.DescriptorProto, number: int, name: str) -> bool:
    # Message reserved ranges are end-exclusive in descriptors.
    return any(r.start <= number < r.end for r in proto.reserved_range) or name in proto.reserved_name


def _real_oneof(field: FieldDescriptor, proto: descriptor_pb2.DescriptorProto) -> Any:
    """The field's oneof, unless it is the synthetic one of a proto3 `optional` field."""
    oneof = field.containing_oneof
    if oneof is None:
        return None
    for declared in proto.field:
        if declared.number == field.number and declared.proto3_optional:
            return None
    return oneof


def _members(oneof: Any) -> list[str]:
    return [f"{f.name} = {f.number}" for f in oneof.fields]


def _parent(field: FieldDescriptor) -> Descriptor:
    parent = field.containing_type
    assert parent is not None, f"{field.full_name} is an extension"
    return parent


def _message_type(field: FieldDescriptor) -> Descriptor:
    message = field.message_type
    assert message is not None, f"{field.full_name} is not a message field"
    return message


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    enum = field.enum_type
    assert enum is not None, f"{field.full_name} is not an enum field"
    return enum


def _type(field: FieldDescriptor) -> str:
    if field.type in (T.TYPE_MESSAGE, T.TYPE_GROUP):
        return _message_type(field).full_name
    if field.type == T.TYPE_ENUM:
        return _enum_type(field).full_name
    return _TYPE_NAMES.get(field.type, str(field.type))


def _presence(field: FieldDescriptor) -> str:
    return "explicit presence" if field.has_presence else "implicit presence"


def _describe(field: FieldDescriptor) -> str:
    oneof = field.containing_oneof
    synthetic = oneof is not None and oneof.name.lstrip("_X") == field.name.lstrip("_X")  # proto3 `optional`
    optional = field.has_presence and field.type not in (T.TYPE_MESSAGE, T.TYPE_GROUP) and (oneof is None or synthetic)
    label = "repeated " if field.is_repeated else "required " if field.is_required else "optional " if optional else ""
    return f"{label}{_type(field)} {field.name} = {field.number}"
