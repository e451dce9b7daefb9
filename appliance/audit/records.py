"""The records of the message log, each declared once: `DECISION`, `EVENT` and `FORWARD_ONLY`.

A declaration is a list of `Field`s (name, codec type, nullability, DuckDB type, whether the audit
tables show it). Everything else is generated from it: the column tuples (`DECISION_COLUMNS`,
`EVENT_COLUMNS`: names and order of the audit tables, unchanged since the DuckDB store), the binary
body codec of the log records, the staging and final SQL types and the conversions between them.

A record travels as a plain tuple in the declaration's field order (one is built per message on the
event loop, so no objects). The body is a `struct` for the fixed-size fields (a bitmask of which
nullable fields are NULL first, then numbers, then the lengths of the variable fields) followed by
the variable fields' bytes (UTF-8 strings, payloads, JSON text) in order. Encoding a decision with
a 100-byte payload takes ~1.5 µs and decoding ~1.5 µs (see `python -m appliance.audit.records`).
Changing a declaration changes the format: add fields only at the end and bump `VERSION` if a
reader must tell old bodies from new ones.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REASON_TYPE = 'STRUCT("check" VARCHAR, message VARCHAR, "schema" VARCHAR, path VARCHAR)[]'

# Codec types: struct code for the fixed part (or the length prefix of a variable field).
_FIXED = {"i64": "q", "f64": "d", "i32": "i", "u8": "B", "bool": "?", "verdict": "B"}
_VARIABLE = {"str": "H", "text": "I", "bytes": "I", "sha256": "32s"}  # the length prefix (sha256: 32 raw bytes)
VERDICTS = ("accept", "reject")


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str           # codec type: i64 f64 i32 u8 bool verdict | str (<64 KiB) text bytes sha256
    sql: str            # DuckDB type in the audit tables
    nullable: bool = False
    audit: bool = True  # a column of the audit table (False: kept in the log only)
    stage_sql: str | None = None   # type while loading, when it differs (converted by `convert`)
    convert: str | None = None     # SQL turning the staged value into the column's value

    def __post_init__(self) -> None:
        if self.type not in _FIXED and self.type not in _VARIABLE:
            raise ValueError(f"{self.name}: unknown codec type {self.type!r}")



DECISION_FIELDS = (
    # milliseconds since the epoch << 20 | sequence (see IdClock): unique and sortable
    Field("id", "i64", "BIGINT"),
    Field("ts", "f64", "TIMESTAMPTZ", stage_sql="DOUBLE", convert="to_timestamp(ts)"),  # when read (UTC)
    Field("client_id", "str", "VARCHAR"),
    Field("username", "str", "VARCHAR", nullable=True),
    Field("peer", "str", "VARCHAR"),  # the client's real address "host:port"
    Field("mqtt_version", "u8", "UTINYINT"),  # 3, 4 (3.1.1) or 5
    Field("topic", "str", "VARCHAR"),
    Field("qos", "u8", "UTINYINT"),
    Field("retain", "bool", "BOOLEAN"),
    # In the log: the payload whenever it is kept (audited or to forward). In the audit table:
    # the payload only when `payload_audited`, NULL otherwise and once retention or a purge removed it.
    Field("payload", "bytes", "BLOB", nullable=True,
          convert="CASE WHEN payload_audited THEN payload END"),
    Field("payload_size", "i32", "INTEGER"),
    Field("payload_sha256", "sha256", "VARCHAR"),  # hex in rows and tables, 32 raw bytes in the log
    Field("schema_set", "str", "VARCHAR", nullable=True),  # the schema set's version, NULL without one
    Field("schema_name", "str", "VARCHAR", nullable=True),  # "temperature" of "temperature:v1"
    Field("schema_version", "str", "VARCHAR", nullable=True),  # "v1" of "temperature:v1"
    Field("topic_filter", "str", "VARCHAR", nullable=True),  # the mapping that applied
    Field("verdict", "verdict", "VARCHAR"),  # 'accept' or 'reject'
    Field("reason_code", "u8", "UTINYINT"),  # the MQTT 5 reason code the publisher got
    Field("reasons", "text", REASON_TYPE, stage_sql="VARCHAR",  # JSON text in rows and the log
          convert=f"CAST(CAST(reasons AS JSON) AS {REASON_TYPE})"),
    Field("latency_us", "i32", "INTEGER"),  # time spent judging
    Field("config_revision", "str", "VARCHAR"),  # hash of the config and schema set in force
    Field("dry_run", "bool", "BOOLEAN"),
    Field("is_will", "bool", "BOOLEAN"),
    # for a message released from quarantine, the id of the original verdict
    Field("released_from", "i64", "BIGINT", nullable=True),
    # Log only: the forwarder's part of the record.
    Field("forward", "bool", "BOOLEAN", audit=False),  # to forward to the cloud broker
    Field("forward_qos", "u8", "UTINYINT", nullable=True, audit=False),  # NULL: upstream's default
    Field("payload_audited", "bool", "BOOLEAN", audit=False),  # record_payloads was on for it
)

EVENT_FIELDS = (
    Field("id", "i64", "BIGINT"),  # same clock as decisions
    Field("ts", "f64", "TIMESTAMPTZ", stage_sql="DOUBLE", convert="to_timestamp(ts)"),
    Field("kind", "str", "VARCHAR"),  # client_connected, client_disconnected, config_reload, ...
    Field("client_id", "str", "VARCHAR", nullable=True),  # NULL when not about a client
    Field("peer", "str", "VARCHAR", nullable=True),
    Field("detail", "text", "JSON", stage_sql="VARCHAR", convert="CAST(detail AS JSON)"),
)

# A message to forward that has no audit row of its own: what the upgrade imports from an old
# outbox (its verdict is already in the audit tables), and a dead letter for the cloud (id: the
# rejection's verdict id; appliance/deadletter).
FORWARD_ONLY_FIELDS = (
    Field("id", "i64", "BIGINT"),  # the verdict's id
    Field("ts", "f64", "TIMESTAMPTZ", stage_sql="DOUBLE", convert="to_timestamp(ts)"),
    Field("client_id", "str", "VARCHAR"),
    Field("topic", "str", "VARCHAR"),
    Field("payload", "bytes", "BLOB"),
    Field("qos", "u8", "UTINYINT", nullable=True),  # QoS towards the cloud broker; NULL: upstream's
    Field("retain", "bool", "BOOLEAN"),
    Field("schema", "str", "VARCHAR", nullable=True),  # "temperature:v1"
)


def _compile(name: str, fields: tuple[Field, ...]) -> tuple[struct.Struct, Callable[..., bytes], Callable[..., tuple[Any, ...]]]:
    """The body's struct and generated encode(row) -> bytes / decode(body) -> row functions."""
    nullable = [f for f in fields if f.nullable]
    if len(nullable) > 32:
        raise ValueError(f"{name}: more than 32 nullable fields")
    bit = {f.name: 1 << i for i, f in enumerate(nullable)}
    fixed = [f for f in fields if f.type in _FIXED]
    variable = [f for f in fields if f.type in _VARIABLE]
    layout = "<I" + "".join(_FIXED[f.type] for f in fixed) + "".join(_VARIABLE[f.type] for f in variable)
    head = struct.Struct(layout)
    args = [f"v{i}" for i in range(len(fields))]
    var = {f.name: f"v{fields.index(f)}" for f in fields}

    enc = ["def encode(row):", f"    {', '.join(args)}, = row", "    n = 0"]
    packed: list[str] = []
    for f in fixed:
        v = var[f.name]
        value = f"({v} != 'accept')" if f.type == "verdict" else v
        if f.nullable:
            enc.append(f"    if {v} is None: n |= {bit[f.name]}; {v} = 0")
        packed.append(value)
    tails: list[str] = []
    for f in variable:
        v = var[f.name]
        if f.type == "sha256":
            packed.append(f"_fromhex({v})")
            continue
        data = f"b{v}"
        conversion = f"{v}.encode()" if f.type in ("str", "text") else v
        if f.nullable:
            enc.append(f"    if {v} is None: n |= {bit[f.name]}; {data} = b''")
            enc.append(f"    else: {data} = {conversion}")
        else:
            enc.append(f"    {data} = {conversion}")
        packed.append(f"len({data})")
        tails.append(data)
    enc.append(f"    return b''.join((_pack(n, {', '.join(packed)}), {', '.join(tails)}))")

    dec = ["def decode(body):", "    if type(body) is not bytes: body = bytes(body)", f"    n, {', '.join(var[f.name] for f in fixed)}, "
           + ", ".join(f"l{i}" for i in range(len(variable))) + ", = _unpack_from(body)",
           f"    o = {head.size}"]
    for i, f in enumerate(variable):
        v = var[f.name]
        if f.type == "sha256":
            dec.append(f"    {v} = l{i}.hex()")
            continue
        piece = f"body[o:o + l{i}]"
        value = f"{piece}.decode()" if f.type in ("str", "text") else piece
        if f.nullable:
            dec.append(f"    {v} = None if n & {bit[f.name]} else {value}")
        else:
            dec.append(f"    {v} = {value}")
        dec.append(f"    o += l{i}")
    for f in fixed:
        v = var[f.name]
        if f.type == "verdict":
            dec.append(f"    {v} = _VERDICTS[{v}]")
        if f.nullable:
            dec.append(f"    if n & {bit[f.name]}: {v} = None")
    dec.append(f"    if o != len(body): raise ValueError('{name} body: %d bytes, expected %d' % (len(body), o))")
    dec.append(f"    return ({', '.join(args)},)")
    namespace: dict[str, Any] = {"_pack": head.pack, "_unpack_from": head.unpack_from,
                                 "_fromhex": bytes.fromhex, "_VERDICTS": VERDICTS}
    # Generated code (from the declaration only, no outside input): a straight-line function per
    # kind runs ~3x faster than a loop over the fields.
    exec(compile("\n".join(enc) + "\n\n" + "\n".join(dec) + "\n", f"<{name} codec>", "exec"), namespace)  # noqa: S102
    return head, namespace["encode"], namespace["decode"]


@dataclass(frozen=True)
class RecordKind:
    """One kind of log record: its code (the log's `kind` byte), fields, codec and audit table."""

    code: int
    name: str
    fields: tuple[Field, ...]
    table: str  # the audit table its rows go to ("": not audited)

    def __post_init__(self) -> None:
        head, encode, decode = _compile(self.name, self.fields)
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "encode", encode)
        object.__setattr__(self, "decode", decode)

    # Set in __post_init__ (generated): encode(row) -> bytes, decode(body) -> row.
    encode: Callable[[tuple[Any, ...]], bytes] = None  # type: ignore[assignment]
    decode: Callable[[bytes | memoryview], tuple[Any, ...]] = None  # type: ignore[assignment]

    @property
    def names(self) -> tuple[str, ...]:
        """Every field, in record order."""
        return tuple(f.name for f in self.fields)

    @property
    def columns(self) -> tuple[str, ...]:
        """The audit table's columns, in order."""
        return tuple(f.name for f in self.fields if f.audit)

    def table_ddl(self, name: str | None = None, *, temp: bool = False) -> str:
        cols = ", ".join(f'"{f.name}" {f.sql}' for f in self.fields if f.audit)
        return f"CREATE {'TEMP ' if temp else ''}TABLE {name or self.table} ({cols})"

    def stage_ddl(self, name: str, *, temp: bool = True) -> str:
        """A table holding every field as it is in a row (ts a double, JSON as text)."""
        cols = ", ".join(f'"{f.name}" {f.stage_sql or f.sql}' for f in self.fields)
        return f"CREATE OR REPLACE {'TEMP ' if temp else ''}TABLE {name} ({cols})"

    def select_from_stage(self) -> str:
        """The SELECT list turning staged fields into the audit table's columns."""
        return ", ".join(f'{f.convert} AS "{f.name}"' if f.convert else f'"{f.name}"'
                         for f in self.fields if f.audit)

    def empty_select(self) -> str:
        """A typed, empty SELECT with the audit table's columns (a view over no files yet)."""
        cols = ", ".join(f'CAST(NULL AS {f.sql}) AS "{f.name}"' for f in self.fields if f.audit)
        return f"SELECT {cols} WHERE FALSE"


DECISION = RecordKind(1, "decision", DECISION_FIELDS, "decisions")
EVENT = RecordKind(2, "event", EVENT_FIELDS, "events")
FORWARD_ONLY = RecordKind(3, "forward_only", FORWARD_ONLY_FIELDS, "")
KINDS: dict[int, RecordKind] = {k.code: k for k in (DECISION, EVENT, FORWARD_ONLY)}
AUDITED = (DECISION, EVENT)

# The audit tables' columns, in order (generated; the names and order the DuckDB store had).
DECISION_COLUMNS = DECISION.columns
EVENT_COLUMNS = EVENT.columns


class IdClock:
    """Unique, sortable 63-bit ids: milliseconds since the epoch in the high bits, a counter in the
    low 20 bits (a million ids per millisecond before borrowing from the next). Never goes backwards,
    even when the wall clock does, as long as the last id is handed to `start_after`."""

    SEQUENCE_BITS = 20

    def __init__(self, start_after: int = 0):
        self._last = start_after
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        """The last id handed out (or start_after)."""
        return self._last

    def next(self, now: float | None = None) -> int:
        candidate = int((time.time() if now is None else now) * 1000) << self.SEQUENCE_BITS
        with self._lock:
            self._last = candidate if candidate > self._last else self._last + 1
            return self._last


def payload_sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def ts_of_id(record_id: int) -> float:
    return (record_id >> IdClock.SEQUENCE_BITS) / 1000.0


# An outbox row of the SQLite journal (the store before the message log): an accepted message
# waiting to be forwarded. Kept for the upgrade that imports them (as FORWARD_ONLY records, which
# have the same fields in the same order).
OUTBOX_COLUMNS = (
    "id",         # INTEGER PRIMARY KEY: the decision id
    "ts",         # REAL: when the proxy read the message (epoch seconds)
    "client_id",  # TEXT: the publishing sensor
    "topic",      # TEXT: the topic as published
    "payload",    # BLOB
    "qos",        # INTEGER: QoS towards the cloud broker (the mapping's forward_qos); NULL: upstream.qos
    "retain",     # INTEGER 0/1
    "schema",     # TEXT: the schema name that judged it ("temperature:v1"), NULL when none
)
assert FORWARD_ONLY.names == OUTBOX_COLUMNS


def _benchmark(count: int = 200_000) -> None:
    """Prints µs per encode and decode of a typical decision (100-byte payload) and event."""
    import json

    payload = json.dumps({"device_id": "sensor-0042", "temperature": 21.53, "humidity": 48.2,
                          "unit": "C", "ts": 1764900000, "battery": 87}).encode()[:100].ljust(100)
    decision = (1 << 40, time.time(), "sensor-0042", None, "10.0.0.7:51234", 5,
                "sensor/sensor-0042/temperature", 1, False, payload, len(payload),
                payload_sha256(payload), "v3", "temperature", "v1", "sensor/+/temperature",
                "accept", 0, "[]", 41, "3f2a9c1b", False, False, None, True, None, False)
    event = (1 << 40, time.time(), "client_connected", "sensor-0042", "10.0.0.7:51234",
             '{"keepalive": 60, "clean_start": true}')
    for kind, row in ((DECISION, decision), (EVENT, event)):
        encode, decode = kind.encode, kind.decode
        body = encode(row)
        assert decode(body) == row
        best_e = best_d = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(count):
                encode(row)
            best_e = min(best_e, (time.perf_counter() - start) / count * 1e6)
            start = time.perf_counter()
            for _ in range(count):
                decode(body)
            best_d = min(best_d, (time.perf_counter() - start) / count * 1e6)
        print(f"{kind.name}: {len(body)} bytes, encode {best_e:.2f} µs, decode {best_d:.2f} µs")


if __name__ == "__main__":
    _benchmark()
