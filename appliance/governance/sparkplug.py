"""Sparkplug B: the topic namespace, the Tahu payload, BIRTH aliases and sequence numbers, and the
metrics a schema set declares.

A mapping to a `format: sparkplug_b` schema (usually `spBv1.0/#`) checks, for every message:

1. the topic: `spBv1.0/<group>/<type>/<node>` for NBIRTH, NDATA, NDEATH and NCMD,
   `spBv1.0/<group>/<type>/<node>/<device>` for DBIRTH, DDATA, DDEATH and DCMD, and
   `spBv1.0/STATE/<host id>` for a host application's STATE (a JSON payload in Sparkplug 3.0);
2. the payload: it must decode as `org.eclipse.tahu.protobuf.Payload` (built in, sparkplug_b.proto);
3. each metric: its datatype known (from the metric itself, else from the BIRTH that declared its
   name or alias, else from the set's declaration), its value in the field that datatype uses, an
   alias resolved from the node's NBIRTH or the device's DBIRTH;
4. the sequence number: 0-255 on every message of an edge node but NDEATH and the commands sent to
   it; NBIRTH starts the count again, every next message of the node or its devices takes the next
   number (after 255, 0);
5. the declarations: with `node_metrics` / `device_metrics` in the manifest entry, every metric a
   node / device sends must be declared there (`bdSeq` and the spec's `Node Control/`,
   `Device Control/` and `Properties/` metrics need no declaration), with the declared datatype and
   within `min`/`max`.

What BIRTH certificates said (aliases, datatypes, the last sequence number) is kept in one
`SparkplugState` per schema set, shared by all its `sparkplug_b` schemas (a node's topics may map to
several), per group and node, in memory and bounded (`MAX_NODES` nodes of `MAX_DEVICES_PER_NODE`
devices each; past that the least recently used node or device is forgotten): it survives a node's reconnects and
a reload of the schema set, not a restart of the appliance. After a restart, a DATA message that
names its metrics passes, one that only has aliases is rejected until the node's next NBIRTH (ask for
one with `Node Control/Rebirth`), and the first sequence number seen is taken as it is. The state
follows the messages this check passes; a rule that rejects a message afterwards does not undo it.
A message released from quarantine is judged again without its sequence number and leaves the
state as it was (it is an old message, not the node's next one).
A sequence gap is rejected once and the count resumes from the number received (also when a message
is rejected for another reason), so one lost message costs one rejection, not every message until
the next BIRTH.

Rules see `payload` as a map: `message_type`, `group`, `node`, `device` (`""` for node messages),
`timestamp`, `seq` (when present), `metrics` (a list of maps: `name`, `alias`, `datatype` (its
name, e.g. `"Float"`), `value`, `timestamp`, `is_null`) and `values` (metric name → value), so
`payload.values["temperature"] < 80.0` reads naturally.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from google.protobuf.message import DecodeError

from appliance.governance.errors import SchemaError

__all__ = ["DATATYPES", "MESSAGE_TYPES", "MetricSpec", "SparkplugSchema", "SparkplugState", "share_state"]

NAMESPACE = "spBv1.0"
NODE_TYPES = frozenset({"NBIRTH", "NDATA", "NDEATH", "NCMD"})
DEVICE_TYPES = frozenset({"DBIRTH", "DDATA", "DDEATH", "DCMD"})
MESSAGE_TYPES = ("NBIRTH", "NDATA", "NDEATH", "NCMD", "DBIRTH", "DDATA", "DDEATH", "DCMD", "STATE")
# Messages an edge node numbers (Sparkplug 3.0, 6.4.7): not its NDEATH (a will) nor commands to it.
SEQUENCED = frozenset({"NBIRTH", "NDATA", "DBIRTH", "DDATA", "DDEATH"})
MAX_ERRORS = 10

DATATYPES = {
    "Int8": 1, "Int16": 2, "Int32": 3, "Int64": 4, "UInt8": 5, "UInt16": 6, "UInt32": 7, "UInt64": 8,
    "Float": 9, "Double": 10, "Boolean": 11, "String": 12, "DateTime": 13, "Text": 14, "UUID": 15,
    "DataSet": 16, "Bytes": 17, "File": 18, "Template": 19, "PropertySet": 20, "PropertySetList": 21,
    "Int8Array": 22, "Int16Array": 23, "Int32Array": 24, "Int64Array": 25, "UInt8Array": 26,
    "UInt16Array": 27, "UInt32Array": 28, "UInt64Array": 29, "FloatArray": 30, "DoubleArray": 31,
    "BooleanArray": 32, "StringArray": 33, "DateTimeArray": 34,
}
DATATYPE_NAMES = {number: name for name, number in DATATYPES.items()}
# The value field each datatype uses, and for integers their range.
_INT_RANGES = {
    1: (-(2**7), 2**7 - 1), 2: (-(2**15), 2**15 - 1), 3: (-(2**31), 2**31 - 1), 4: (-(2**63), 2**63 - 1),
    5: (0, 2**8 - 1), 6: (0, 2**16 - 1), 7: (0, 2**32 - 1), 8: (0, 2**64 - 1), 13: (0, 2**64 - 1),
}
_FIELD = {
    **{t: "int_value" for t in (1, 2, 3, 5, 6, 7)},
    **{t: "long_value" for t in (4, 8, 13)},
    9: "float_value", 10: "double_value", 11: "boolean_value",
    **{t: "string_value" for t in (12, 14, 15)},
    **{t: "bytes_value" for t in (17, 18, *range(22, 35))},
    16: "dataset_value", 19: "template_value",
}
_ARRAYS = {22: "b", 23: "h", 24: "i", 25: "q", 26: "B", 27: "H", 28: "I", 29: "Q", 30: "f", 31: "d", 34: "q"}
_NUMERIC = frozenset({*_INT_RANGES, 9, 10})
IMPLICIT = ("bdSeq",)
IMPLICIT_PREFIXES = ("Node Control/", "Device Control/", "Properties/")


@cache
def payload_class() -> Any:
    """The message class of the built-in Tahu payload (compiled once per process)."""
    from google.protobuf.message_factory import GetMessageClass

    from appliance.governance.protobuf import compile_protos

    pool = compile_protos(Path(__file__).parent, ["sparkplug_b.proto"])
    return GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric a node or device may send, as the manifest declares it."""

    name: str
    datatype: int
    minimum: float | None = None
    maximum: float | None = None

    @property
    def datatype_name(self) -> str:
        return DATATYPE_NAMES[self.datatype]

    def describe(self) -> dict[str, Any]:
        return {"datatype": self.datatype_name, "min": self.minimum, "max": self.maximum}


@dataclass(slots=True)
class _Scope:
    """What a BIRTH declared, for a node or one of its devices."""

    aliases: dict[int, tuple[str, int]] = field(default_factory=dict)  # alias -> (name, datatype)
    datatypes: dict[str, int] = field(default_factory=dict)  # name -> datatype


# Bounds of the state, so that a client inventing node or device ids cannot grow it: past them the
# least recently used node (device of the node) is forgotten, and its aliases need a rebirth.
MAX_NODES = 100_000
MAX_DEVICES_PER_NODE = 1_000


@dataclass(slots=True)
class _Node:
    scope: _Scope | None = None  # None until an NBIRTH was seen
    devices: OrderedDict[str, _Scope] = field(default_factory=OrderedDict)  # least recently used first
    seq: int | None = None  # the last sequence number seen

    def device(self, device: str) -> _Scope | None:
        scope = self.devices.get(device)
        if scope is not None:
            self.devices.move_to_end(device)
        return scope

    def add_device(self, device: str, scope: _Scope) -> None:
        self.devices[device] = scope
        self.devices.move_to_end(device)
        if len(self.devices) > MAX_DEVICES_PER_NODE:
            self.devices.popitem(last=False)


class SparkplugState:
    """BIRTH certificates and sequence numbers seen, per (group, node). In memory, bounded: at most
    `MAX_NODES` nodes of `MAX_DEVICES_PER_NODE` devices each, the least recently used forgotten."""

    MAX_NODES = MAX_NODES

    def __init__(self) -> None:
        self.nodes: OrderedDict[tuple[str, str], _Node] = OrderedDict()  # least recently used first

    def node(self, group: str, node: str) -> _Node:
        key = (group, node)
        found = self.nodes.get(key)
        if found is None:
            if len(self.nodes) >= self.MAX_NODES:
                self.nodes.popitem(last=False)
            found = self.nodes[key] = _Node()
        else:
            self.nodes.move_to_end(key)
        return found


def share_state(schemas: Iterable[object], state: SparkplugState | None = None) -> None:
    """Gives every `sparkplug_b` schema among `schemas` (those of one set) one state: `state`, else
    the first one's. A node's messages may map to several schemas (node topics to one, device topics
    to another), but its BIRTHs, aliases and sequence numbers are one story."""
    found = [schema for schema in schemas if isinstance(schema, SparkplugSchema)]
    if found:
        shared = state if state is not None else found[0].state
        for schema in found:
            schema.state = shared


class SparkplugSchema:
    """`format: sparkplug_b`: `validate_topic(topic, payload)` → (decoded map, errors)."""

    format = "sparkplug_b"
    needs_topic = True

    def __init__(self, name: str, *, node_metrics: dict[str, MetricSpec] | None = None,
                 device_metrics: dict[str, MetricSpec] | None = None):
        self.name = name
        self.node_metrics = node_metrics
        self.device_metrics = device_metrics
        self.state = SparkplugState()
        self._payload = payload_class()

    def __repr__(self) -> str:
        return f"SparkplugSchema({self.name!r})"

    def validate(self, payload: bytes) -> tuple[Any, list[SchemaError]]:
        """A Sparkplug payload cannot be judged without its topic (the message type is in it)."""
        return None, [SchemaError("", "a Sparkplug B payload is checked with its topic (validate_topic)")]

    def validate_topic(self, topic: str, payload: bytes, *, live: bool = True) -> tuple[Any, list[SchemaError]]:
        """`live=False` judges a message again (a release from quarantine): aliases resolve from the
        state, but its sequence number is not checked and nothing is recorded."""
        levels = topic.split("/")
        if levels[0] != NAMESPACE:
            return None, [SchemaError("", f"topic {topic!r} is not in the Sparkplug B namespace ({NAMESPACE}/...)")]
        if len(levels) >= 2 and levels[1] == "STATE":
            return self._state(levels, payload)
        if len(levels) < 4 or len(levels) > 5 or not all(levels):
            return None, [SchemaError("", f"topic {topic!r} is not {NAMESPACE}/<group>/<message type>/<edge node>[/<device>]")]
        group, kind, node_id = levels[1], levels[2], levels[3]
        device = levels[4] if len(levels) == 5 else None
        if kind in NODE_TYPES:
            if device is not None:
                return None, [SchemaError("", f"{kind} is a node message: the topic has no device level ({NAMESPACE}/{group}/{kind}/{node_id})")]
        elif kind in DEVICE_TYPES:
            if device is None:
                return None, [SchemaError("", f"{kind} is a device message: the topic needs a device level ({NAMESPACE}/{group}/{kind}/{node_id}/<device>)")]
        else:
            return None, [SchemaError("", f"unknown Sparkplug message type {kind!r} (expected one of {', '.join(MESSAGE_TYPES)})")]
        message = self._payload()
        try:
            message.ParseFromString(payload)
        except DecodeError as exc:
            return None, [SchemaError("", f"cannot decode as a Sparkplug B payload: {str(exc)[:200]}")]
        return _Check(self, group, kind, node_id, device, live).run(message)

    def _state(self, levels: list[str], payload: bytes) -> tuple[Any, list[SchemaError]]:
        if len(levels) != 3 or not levels[2]:
            return None, [SchemaError("", f"a STATE topic is {NAMESPACE}/STATE/<host application id>")]
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None, [SchemaError("", "a STATE payload is JSON: {\"online\": true or false, \"timestamp\": ms since 1970}")]
        errors = []
        if not isinstance(body, dict):
            return None, [SchemaError("", "a STATE payload is a JSON object")]
        if not isinstance(body.get("online"), bool):
            errors.append(SchemaError("/online", "a STATE payload needs `online`, true or false"))
        if type(body.get("timestamp")) is not int or body["timestamp"] < 0:
            errors.append(SchemaError("/timestamp", "a STATE payload needs `timestamp`, ms since 1970"))
        if errors:
            return None, errors
        return {"message_type": "STATE", "host": levels[2], **body}, []


class _Check:
    """One message against the schema's declarations and state."""

    __slots__ = ("device", "errors", "group", "kind", "live", "node_id", "schema")

    def __init__(self, schema: SparkplugSchema, group: str, kind: str, node_id: str, device: str | None, live: bool = True):
        self.live = live
        self.schema = schema
        self.group = group
        self.kind = kind
        self.node_id = node_id
        self.device = device
        self.errors: list[SchemaError] = []

    def where(self) -> str:
        return f"{self.group}/{self.node_id}" + (f"/{self.device}" if self.device is not None else "")

    def run(self, message: Any) -> tuple[Any, list[SchemaError]]:
        kind = self.kind
        state = self.schema.state.node(self.group, self.node_id)
        birth = kind in ("NBIRTH", "DBIRTH")
        seq = message.seq if message.HasField("seq") else None
        next_seq: int | None = None
        if kind in SEQUENCED:
            if seq is None:
                self.errors.append(SchemaError("/seq", f"{kind} needs a sequence number (seq)"))
            elif seq > 255:
                self.errors.append(SchemaError("/seq", f"seq {seq} is out of range (0-255)"))
            else:
                next_seq = seq if self.live else None
                if self.live and kind != "NBIRTH" and state.seq is not None and seq != (state.seq + 1) % 256:
                    self.errors.append(SchemaError("/seq", f"seq {seq} out of order for {self.group}/{self.node_id}: expected "
                                                           f"{(state.seq + 1) % 256} (messages lost, or sent out of order)"))
        # Aliases and datatypes this message can use: a BIRTH declares its own.
        if kind == "NBIRTH":
            scope: _Scope | None = _Scope()
        elif kind == "DBIRTH":
            scope = _Scope()
            if state.scope is None:
                pass  # the NBIRTH may predate the appliance's start: the DBIRTH still stands on its own
        elif self.device is None:
            scope = state.scope
        else:
            scope = state.device(self.device)
        declared = self.schema.device_metrics if self.device is not None else self.schema.node_metrics
        metrics = []
        values: dict[str, Any] = {}
        for index, metric in enumerate(message.metrics):
            if len(self.errors) >= MAX_ERRORS:
                break
            decoded = self.metric(index, metric, scope, birth, declared)
            if decoded is not None:
                metrics.append(decoded)
                if decoded["name"]:
                    values[decoded["name"]] = decoded["value"]
        if next_seq is not None:
            # The node sent this number whatever else is wrong with the message: the count goes on
            # from it, so a gap or a bad message costs one rejection, not all until the next BIRTH.
            state.seq = next_seq
        if self.errors:
            return None, self.errors[:MAX_ERRORS]
        if not self.live:
            pass
        elif kind == "NBIRTH":
            state.scope = scope
            state.devices.clear()  # a new session of the node: its devices are born again
        elif kind == "DBIRTH":
            assert scope is not None
            state.add_device(self.device or "", scope)
        decoded_payload: dict[str, Any] = {
            "message_type": kind, "group": self.group, "node": self.node_id, "device": self.device or "",
            "timestamp": message.timestamp, "metrics": metrics, "values": values,
        }
        if seq is not None:
            decoded_payload["seq"] = seq
        if message.HasField("uuid"):
            decoded_payload["uuid"] = message.uuid
        if message.HasField("body"):
            decoded_payload["body"] = message.body
        return decoded_payload, []

    def metric(self, index: int, metric: Any, scope: _Scope | None, birth: bool,
               declared: dict[str, MetricSpec] | None) -> dict[str, Any] | None:
        path = f"/metrics/{index}"
        name = metric.name if metric.HasField("name") else None
        if type(name) is bytes:  # proto2 strings are not checked for UTF-8 when decoded
            return self.fail(path, "a metric name is not valid UTF-8")
        alias = metric.alias if metric.HasField("alias") else None
        datatype = metric.datatype if metric.HasField("datatype") else None
        if birth:
            if name is None:
                return self.fail(path, f"a {self.kind} metric needs a name (it declares the metric)")
            if datatype is None:
                return self.fail(path, f"{self.kind} metric {name!r} needs a datatype")
            assert scope is not None
            if alias is not None:
                if alias in scope.aliases and scope.aliases[alias][0] != name:
                    return self.fail(path, f"alias {alias} is declared twice in this {self.kind} ({scope.aliases[alias][0]!r} and {name!r})")
                scope.aliases[alias] = (name, datatype)
            scope.datatypes[name] = datatype
        elif name is None:
            if alias is None:
                return self.fail(path, "a metric needs a name or an alias")
            known = scope.aliases.get(alias) if scope is not None else None
            if known is None:
                source = "NBIRTH" if self.device is None else "DBIRTH"
                if scope is None:
                    return self.fail(path, f"alias {alias} cannot be resolved: no {source} seen for {self.where()} "
                                           "since the appliance started (the node should be asked to rebirth)")
                return self.fail(path, f"alias {alias} was not declared in the {source} of {self.where()}")
            name = known[0]
            datatype = datatype if datatype is not None else known[1]
        if datatype is None and scope is not None:
            datatype = scope.datatypes.get(name)
        spec = None
        if declared is not None and not _implicit(name):
            spec = declared.get(name)
            if spec is None:
                return self.fail(path, f"metric {name!r} is not declared for {'devices' if self.device is not None else 'nodes'} in the schema set")
        elif declared is not None:
            spec = declared.get(name)
        if datatype is None and spec is not None:
            datatype = spec.datatype
        if datatype is None:
            return self.fail(path, f"metric {name!r} has no datatype, and no BIRTH or declaration gives one")
        if datatype not in DATATYPE_NAMES:
            return self.fail(path, f"metric {name!r}: unknown datatype {datatype}")
        if spec is not None and spec.datatype != datatype:
            return self.fail(path, f"metric {name!r} is {DATATYPE_NAMES[datatype]}, declared {spec.datatype_name}")
        is_null = metric.is_null
        value: Any = None
        if not is_null:
            carried = metric.WhichOneof("value")
            expected = _FIELD.get(datatype)
            if carried is None:
                if not birth:
                    return self.fail(path, f"metric {name!r} has no value (and is_null is not set)")
            elif carried != expected:
                return self.fail(path, f"metric {name!r} is {DATATYPE_NAMES[datatype]} but carries {carried} (expected {expected})")
            else:
                value = _value(datatype, getattr(metric, carried))
                if isinstance(value, str) and value.startswith("\0error:"):
                    return self.fail(path, f"metric {name!r}: {value[7:]}")
                if spec is not None and datatype in _NUMERIC and isinstance(value, (int, float)):
                    if spec.minimum is not None and value < spec.minimum:
                        return self.fail(path, f"metric {name!r} = {value} is below the declared minimum {spec.minimum}")
                    if spec.maximum is not None and value > spec.maximum:
                        return self.fail(path, f"metric {name!r} = {value} is above the declared maximum {spec.maximum}")
        return {
            "name": name, "alias": alias if alias is not None else -1, "datatype": DATATYPE_NAMES[datatype],
            "value": value, "timestamp": metric.timestamp, "is_null": is_null,
        }

    def fail(self, path: str, message: str) -> dict[str, Any] | None:
        """Records the error; returns None, the metric that was not decoded (`return self.fail(...)`)."""
        self.errors.append(SchemaError(path, message))
        return None


def _implicit(name: str) -> bool:
    return name in IMPLICIT or name.startswith(IMPLICIT_PREFIXES)


def _value(datatype: int, raw: Any) -> Any:
    """A metric's value as rules see it; a string starting with NUL-"error:" says why it is invalid."""
    if datatype in _INT_RANGES:
        value = raw
        low, high = _INT_RANGES[datatype]
        if low < 0:  # signed types travel as two's complement in the unsigned field
            bits = 32 if datatype in (1, 2, 3) else 64
            if value >= 2 ** (bits - 1):
                value -= 2**bits
        if not low <= value <= high:
            return f"\0error:{value} is out of range for {DATATYPE_NAMES[datatype]}"
        return value
    if datatype == 9:
        from appliance.governance.protobuf import _float32

        return _float32(raw)
    if datatype in _ARRAYS:
        code = _ARRAYS[datatype]
        size = struct.calcsize(code)
        if len(raw) % size:
            return f"\0error:{len(raw)} bytes is not a whole number of {DATATYPE_NAMES[datatype][:-5]} values"
        values = list(struct.unpack(f"<{len(raw) // size}{code}", raw))
        return [v for v in values] if code != "f" else [v if not math.isfinite(v) else float(f"{v:.9g}") for v in values]
    if datatype == 32:  # BooleanArray: a 4-byte count, then the bits, most significant first
        if len(raw) < 4:
            return "\0error:a BooleanArray needs its 4-byte count"
        count = int.from_bytes(raw[:4], "little")
        if len(raw) - 4 < (count + 7) // 8:
            return f"\0error:a BooleanArray of {count} values needs {(count + 7) // 8} bytes of bits"
        bits = raw[4:]
        return [bool(bits[i // 8] & (0x80 >> (i % 8))) for i in range(count)]
    if datatype == 33:  # StringArray: NUL-terminated UTF-8 strings
        if raw and not raw.endswith(b"\0"):
            return "\0error:a StringArray must end with a NUL byte"
        try:
            return [part.decode() for part in raw[:-1].split(b"\0")] if raw else []
        except UnicodeDecodeError:
            return "\0error:a StringArray holds invalid UTF-8"
    if datatype in (16, 19):
        from google.protobuf import json_format

        return json_format.MessageToDict(raw, preserving_proto_field_name=True)
    return raw
