"""The records of the message log, each declared once: `DECISION`, `EVENT` and `FORWARD_ONLY`, and
since record version 2 (`VERSION`) `CONNECTION` and `CONTEXT` (picked from DECISION's fields) with
the compact decision that refers to them (below `AUDITED`).

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
reader must tell old bodies from new ones (version 1 segments, DECISION records only, stay
readable: every reader goes through `Definitions.row` or the seal's stager, which take both).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

_log = logging.getLogger(__name__)

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

    # Set in __post_init__ (generated): the body's fixed-size head, encode(row) -> bytes, decode(body) -> row.
    head: struct.Struct = field(init=False, repr=False, compare=False)
    encode: Callable[[tuple[Any, ...]], bytes] = field(init=False, repr=False, compare=False)
    decode: Callable[[bytes | memoryview], tuple[Any, ...]] = field(init=False, repr=False, compare=False)

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
AUDITED = (DECISION, EVENT)


# -- Version 2: a decision refers to what repeats -------------------------------------------------
#
# A version 1 decision record (kind 1, DECISION above) carries all 27 fields: ~370 bytes for an
# 86-byte payload. Most of them repeat: per connection (client id, username, peer, MQTT version)
# and per topic and mapping (the schema, the topic filter, the config revision...). Version 2
# writes each of those groups once as a small record of its own (CONNECTION, CONTEXT: declared
# from DECISION's own fields, so the types stay in one place) and a COMPACT decision (kind 6) that
# refers to them by their seq: ~120 bytes in all for the same message. Readers expand a compact
# decision back into the DECISION row (`Definitions`), so the audit tables, the Parquet schema,
# the outbox and replay see exactly what they saw before; version 1 records stay readable.
#
# The definitions a segment's decisions refer to are in the same segment, before them: the writer
# starts a new "epoch" whenever it rolls a segment (or a batch fails), `MessageLog.append` refuses
# a record appended for an older epoch, and the sink then writes its definitions again. A segment
# can therefore be read, converted or removed on its own.

VERSION = 2  # of the records' bodies: 1 wrote DECISION records only; 2 adds kinds 4, 5 and 6

_BY_NAME = {f.name: f for f in DECISION_FIELDS}
CONNECTION_FIELDS = tuple(_BY_NAME[n] for n in ("client_id", "username", "peer", "mqtt_version"))
CONTEXT_FIELDS = tuple(_BY_NAME[n] for n in ("topic", "schema_set", "schema_name", "schema_version",
                                             "topic_filter", "config_revision", "dry_run", "forward_qos"))
CONNECTION = RecordKind(4, "connection", CONNECTION_FIELDS, "")
CONTEXT = RecordKind(5, "context", CONTEXT_FIELDS, "")
DEFINITIONS = (CONNECTION, CONTEXT)
COMPACT_DECISION = 6  # the log's kind byte of a compact decision (codec below)
KINDS: dict[int, RecordKind] = {k.code: k for k in (DECISION, EVENT, FORWARD_ONLY, CONNECTION, CONTEXT)}

# A compact decision's own fields (the rest are its connection's and its context's), in the order
# `decode_compact` returns them: "connection" and "context" are the seqs of those records, and
# payload_sha256 is None when the payload is stored (it is computed from it when read).
COMPACT_FIELDS = ("id", "ts", "connection", "context", "qos", "retain", "payload", "payload_size",
                  "payload_sha256", "verdict", "reason_code", "reasons", "latency_us", "is_will",
                  "released_from", "forward", "payload_audited")
assert (set(COMPACT_FIELDS) - {"connection", "context"}) | set(CONNECTION.names) | set(CONTEXT.names) \
    == set(DECISION.names), "every DECISION field is stored in exactly one place"

# Body: <H flags><d ts>, then unsigned LEB128 varints: the id's distance from the one its ts would
# give (zigzag: the clock may have borrowed), the connection's seq, the context's seq, latency_us;
# then, per flag, reason_code (1 byte), released_from (varint), reasons (varint length + UTF-8);
# then either the payload (the rest of the body: its size is its length) or, when it is not
# stored, payload_size (varint) and the 32 raw bytes of its SHA-256.
_COMPACT_HEAD = struct.Struct("<Hd")
F_RETAIN, F_REJECT, F_FORWARD, F_AUDITED, F_WILL = 0x4, 0x8, 0x10, 0x20, 0x40
F_PAYLOAD, F_RELEASED, F_REASONS = 0x80, 0x100, 0x200
_ONE_BYTE = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    """Unsigned LEB128 (n >= 0)."""
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(body: bytes, o: int) -> tuple[int, int]:
    b = body[o]
    if b < 0x80:
        return b, o + 1
    n, shift = b & 0x7F, 7
    while True:
        o += 1
        b = body[o]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, o + 1
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def pack_refs(connection: int, context: int) -> bytes:
    """The two references of a compact decision (the sink keeps them per connection and context)."""
    return varint(connection) + varint(context)


def encode_compact(id_: int, ts: float, refs: bytes, qos: int, retain: bool, payload: bytes | None,
                   payload_size: int, sha256_hex: str | None, verdict: str, reason_code: int, reasons: str,
                   latency_us: int, is_will: bool, released_from: int | None, forward: bool,
                   audited: bool) -> bytes:
    """A compact decision's body; `refs` from pack_refs(connection seq, context seq)."""
    flags = qos | (F_RETAIN if retain else 0) | (F_FORWARD if forward else 0) | (F_AUDITED if audited else 0) \
        | (F_WILL if is_will else 0)
    delta = id_ - (int(ts * 1000) << IdClock.SEQUENCE_BITS)
    parts = [b"", varint(delta << 1 if delta >= 0 else ((-delta) << 1) - 1), refs,
             varint(latency_us if latency_us > 0 else 0)]
    if verdict != "accept":
        flags |= F_REJECT
        parts.append(_ONE_BYTE[reason_code] if reason_code < 128 else bytes((reason_code,)))
    if released_from is not None:
        flags |= F_RELEASED
        parts.append(varint(released_from))
    if reasons != "[]":
        flags |= F_REASONS
        text = reasons.encode()
        parts.append(varint(len(text)))
        parts.append(text)
    if payload is not None:
        flags |= F_PAYLOAD
        parts.append(payload)
    else:
        parts.append(varint(payload_size))
        parts.append(bytes.fromhex(sha256_hex or "") if sha256_hex else bytes(32))
    parts[0] = _COMPACT_HEAD.pack(flags, ts)
    return b"".join(parts)


def decode_compact(body: bytes | memoryview) -> tuple[Any, ...]:
    """A compact decision's own fields (COMPACT_FIELDS order): `decode_compact_staged`'s values with
    the flags spread out into their fields."""
    if type(body) is not bytes:
        body = bytes(body)
    id_, ts, flags, connection, context, latency, reason_code, released, reasons, payload, size, sha = (
        decode_compact_staged(body))
    return (id_, ts, connection, context, flags & 3, bool(flags & F_RETAIN), payload, size, sha,
            "reject" if flags & F_REJECT else "accept", reason_code, reasons, latency, bool(flags & F_WILL),
            released, bool(flags & F_FORWARD), bool(flags & F_AUDITED))


def compact_forward_fields(body: bytes) -> tuple[int, float, int, int, bool, bytes | None]:
    """(id, ts, connection, context, retain, payload) of a compact decision: only what the
    forwarder sends (the rest of its message is in the two definitions). `payload` is None when
    it is not stored. The same values as `decode_compact`, without building the 17 fields (the
    forwarder reads every message it sends once) and without decoding the reasons: their bounds
    are checked, but not that they are UTF-8. A body `decode_compact` refuses as damaged (cut
    short, or with trailing bytes where the SHA-256 is) raises here too: struct.error, IndexError
    or ValueError (ValueError where `decode_compact` raises IndexError for a missing reason code)."""
    flags, ts = _COMPACT_HEAD.unpack_from(body)
    o = _COMPACT_HEAD.size
    zigzag, o = _read_varint(body, o)
    connection, o = _read_varint(body, o)
    context, o = _read_varint(body, o)
    if body[o] < 0x80:  # latency_us, not needed: skip it
        o += 1
    else:
        o = _read_varint(body, o)[1]
    id_ = (int(ts * 1000) << IdClock.SEQUENCE_BITS) + (zigzag >> 1 if not zigzag & 1 else -((zigzag + 1) >> 1))
    if flags & (F_REJECT | F_RELEASED | F_REASONS):
        if flags & F_REJECT:
            if o >= len(body):
                raise ValueError("compact decision: reason code beyond the body")
            o += 1
        if flags & F_RELEASED:
            o = _read_varint(body, o)[1]
        if flags & F_REASONS:
            length, o = _read_varint(body, o)
            if o + length > len(body):
                raise ValueError("compact decision: reasons beyond the body")
            o += length
    if flags & F_PAYLOAD:
        return id_, ts, connection, context, bool(flags & F_RETAIN), body[o:]
    o = _read_varint(body, o)[1]
    if len(body) - o != 32:
        raise ValueError(f"compact decision body: {len(body)} bytes, expected {o + 32}")
    return id_, ts, connection, context, bool(flags & F_RETAIN), None


def compact_ts_forward(body: bytes) -> tuple[float, bool]:
    """(ts, forward) of a compact decision without decoding it (the outbox reads every record)."""
    flags, ts = _COMPACT_HEAD.unpack_from(body)
    return ts, bool(flags & F_FORWARD)


_Expand = Callable[[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]], tuple[Any, ...]]


def _expander() -> _Expand:
    """expand(compact, connection, context) -> the DECISION row (generated from the declarations)."""
    sources: dict[str, str] = {}
    for where, names in (("c", COMPACT_FIELDS), ("n", CONNECTION.names), ("x", CONTEXT.names)):
        for i, name in enumerate(names):
            sources.setdefault(name, f"{where}[{i}]")
    sha = sources["payload_sha256"]
    sources["payload_sha256"] = f"({sha} if {sha} is not None else _sha256({sources['payload']}).hexdigest())"
    code = f"def expand(c, n, x):\n    return ({', '.join(sources[name] for name in DECISION.names)},)\n"
    namespace: dict[str, Any] = {"_sha256": hashlib.sha256}
    exec(compile(code, "<compact decision expander>", "exec"), namespace)  # noqa: S102 (declarations only)
    return cast(_Expand, namespace["expand"])  # exec gives no types: the generated code has the signature above


expand_compact = _expander()


def compact_from_row(row: tuple[Any, ...], connection: int, context: int) -> bytes:
    """A DECISION row as a compact decision referring to these records (rewrites, tests)."""
    r = dict(zip(DECISION.names, row, strict=True))
    stored = r["payload"]
    return encode_compact(r["id"], r["ts"], pack_refs(connection, context), r["qos"], r["retain"], stored,
                          r["payload_size"], None if stored is not None else r["payload_sha256"], r["verdict"],
                          r["reason_code"], r["reasons"], r["latency_us"], r["is_will"], r["released_from"],
                          r["forward"], r["payload_audited"])


# Staging compact decisions in DuckDB (the seal helper): decisions keep their two references and
# the definitions go to two small tables, so a segment of ~110k decisions stages in ~25 MB instead of
# repeating every string per row (which spilled to disk under the helper's memory limit).
def _stage_field(name: str) -> Field:
    if name in ("connection", "context"):
        return Field(name, "i64", "BIGINT")
    f = _BY_NAME[name]
    return replace(f, nullable=True) if name == "payload_sha256" else f


COMPACT_STAGE_FIELDS = tuple(_stage_field(n) for n in COMPACT_FIELDS)


def _stage_cols(fields: tuple[Field, ...]) -> str:
    return ", ".join(f'"{f.name}" {f.stage_sql or f.sql}' for f in fields)


def compact_stage_ddl(decisions: str, connections: str, contexts: str) -> list[str]:
    """CREATE statements for the three staging tables (rows: `stage_row`, CONNECTION and CONTEXT
    rows with their seq first)."""
    return [f"CREATE OR REPLACE TEMP TABLE {decisions} ({_stage_cols(COMPACT_STAGE_FIELDS)})",
            f'CREATE OR REPLACE TEMP TABLE {connections} ("connection" BIGINT, {_stage_cols(CONNECTION.fields)})',
            f'CREATE OR REPLACE TEMP TABLE {contexts} ("context" BIGINT, {_stage_cols(CONTEXT.fields)})']


def compact_stage_view(view: str, decisions: str, connections: str, contexts: str) -> str:
    """A view over the staging tables with DECISION's staged fields (what DECISION.stage_ddl holds),
    so `DECISION.select_from_stage()` reads it like a staging table of whole rows."""
    cols = []
    for name in DECISION.names:
        if name == "payload_sha256":
            cols.append('coalesce(d."payload_sha256", sha256(d."payload")) AS "payload_sha256"')
        else:
            table = "n" if name in CONNECTION.names else "x" if name in CONTEXT.names else "d"
            cols.append(f'{table}."{name}"')
    return (f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT {', '.join(cols)} FROM {decisions} d "
            f'JOIN {connections} n ON n."connection" = d."connection" JOIN {contexts} x ON x."context" = d."context"')


# Staging compact decisions for a query's tail (query.py): `appliance audit sql` decodes every
# record not converted yet each time it opens, so per record it does only what Python must (split
# the body) and leaves the rest to the SQL that reads the staging table: the flags (QoS, retain,
# verdict...) stay one integer, the SHA-256 of a stored payload is computed by DuckDB, and the
# repeated strings are the definitions' (joined, as the seal helper's staging view does). Loading
# the 63,000 records of half a segment took 0.30-0.34 s this way, 0.59-0.63 s as whole rows
# (docs/audit.md); this decode is 1.15 µs of a record's ~5 µs (decode_compact's own decode, before
# it was built on this one: 1.9 µs).
TAIL_STAGE_FIELDS = (
    Field("id", "i64", "BIGINT"),
    Field("ts", "f64", "DOUBLE"),
    Field("flags", "i32", "INTEGER"),  # the compact body's flags (F_*): qos, retain, reject, forward...
    Field("connection", "i64", "BIGINT"),
    Field("context", "i64", "BIGINT"),
    Field("latency_us", "i32", "INTEGER"),
    Field("reason_code", "i32", "INTEGER"),
    Field("released_from", "i64", "BIGINT", nullable=True),
    Field("reasons", "text", "VARCHAR"),
    Field("payload", "bytes", "BLOB", nullable=True),
    Field("payload_size", "i32", "INTEGER"),
    Field("payload_sha256", "str", "VARCHAR", nullable=True),  # hex; NULL when the payload is stored
)
# The DECISION fields the tail's staging table does not hold as they are: SQL over it (`d`).
_FROM_FLAGS = {
    "qos": "CAST(d.flags & 3 AS UTINYINT)",
    "retain": f"(d.flags & {F_RETAIN}) <> 0",
    "forward": f"(d.flags & {F_FORWARD}) <> 0",
    "payload_audited": f"(d.flags & {F_AUDITED}) <> 0",
    "is_will": f"(d.flags & {F_WILL}) <> 0",
    "verdict": f"CASE WHEN (d.flags & {F_REJECT}) <> 0 THEN 'reject' ELSE 'accept' END",
    "reason_code": "CAST(d.reason_code AS UTINYINT)",
    "payload_sha256": "coalesce(d.payload_sha256, sha256(d.payload))",
}
assert set(COMPACT_FIELDS) <= set(_FROM_FLAGS) | {f.name for f in TAIL_STAGE_FIELDS}


_REFS: dict[bytes, tuple[int, int, int]] = {}  # decode_compact_staged's: 8 bytes -> (connection, context, length)


def decode_compact_staged(body: bytes) -> tuple[Any, ...]:
    """A compact decision as TAIL_STAGE_FIELDS: its fields with the flags kept as one integer and
    no SHA-256 computed (see `tail_stage_select`; `decode_compact` spreads the flags out). Raises
    ValueError or IndexError on a damaged body."""
    flags, ts = _COMPACT_HEAD.unpack_from(body)
    zigzag = body[10]  # _COMPACT_HEAD.size: the id's distance, then the two references, latency_us
    if zigzag < 0x80:
        o = 11
    else:
        zigzag, o = _read_varint(body, 10)
    # The references repeat (one pair per connection and topic): decoded once per 8 bytes that
    # start with them, when both end inside those bytes (which then decide them).
    key = body[o:o + 8]
    refs = _REFS.get(key)
    if refs is None:
        connection, end = _read_varint(body, o)
        context, end = _read_varint(body, end)
        refs = (connection, context, end - o)
        if end - o <= len(key):
            if len(_REFS) >= 4096:
                _REFS.clear()
            _REFS[key] = refs
    connection, context, used = refs
    o += used
    latency = body[o]
    if latency < 0x80:
        o += 1
    else:
        latency, o = _read_varint(body, o)
    id_ = (int(ts * 1000) << 20) + (zigzag >> 1 if not zigzag & 1 else -((zigzag + 1) >> 1))
    reason_code = 0
    released = None
    reasons = "[]"
    if flags & (F_REJECT | F_RELEASED | F_REASONS):
        if flags & F_REJECT:
            reason_code = body[o]
            o += 1
        if flags & F_RELEASED:
            released, o = _read_varint(body, o)
        if flags & F_REASONS:
            length, o = _read_varint(body, o)
            if o + length > len(body):
                raise ValueError("compact decision: reasons beyond the body")
            reasons = body[o:o + length].decode()
            o += length
    if flags & F_PAYLOAD:
        return id_, ts, flags, connection, context, latency, reason_code, released, reasons, body[o:], len(body) - o, None
    size, o = _read_varint(body, o)
    if len(body) - o != 32:
        raise ValueError(f"compact decision body: {len(body)} bytes, expected {o + 32}")
    return id_, ts, flags, connection, context, latency, reason_code, released, reasons, None, size, body[o:].hex()


def tail_stage_ddl(decisions: str, connections: str, contexts: str) -> list[str]:
    """CREATE statements for the tail's staging tables (rows: `decode_compact_staged`, CONNECTION
    and CONTEXT rows with their seq first). Not TEMP: a query's cursors must see them."""
    return [f"CREATE OR REPLACE TABLE {decisions} ({_stage_cols(TAIL_STAGE_FIELDS)})",
            f'CREATE OR REPLACE TABLE {connections} ("connection" BIGINT, {_stage_cols(CONNECTION.fields)})',
            f'CREATE OR REPLACE TABLE {contexts} ("context" BIGINT, {_stage_cols(CONTEXT.fields)})']


def tail_stage_select(decisions: str, connections: str, contexts: str) -> str:
    """A SELECT of DECISION's staged fields (what DECISION.stage_ddl holds) from the tail's staging
    table and the two definition tables: `DECISION.select_from_stage()` reads it as a table."""
    staged = {f.name for f in TAIL_STAGE_FIELDS}
    cols = []
    for name in DECISION.names:
        if name in CONNECTION.names:
            cols.append(f'n."{name}"')
        elif name in CONTEXT.names:
            cols.append(f'x."{name}"')
        elif name in _FROM_FLAGS:
            cols.append(f'{_FROM_FLAGS[name]} AS "{name}"')
        else:
            assert name in staged, name
            cols.append(f'd."{name}"')
    return (f"SELECT {', '.join(cols)} FROM {decisions} d JOIN {connections} n ON n.\"connection\" = d.\"connection\" "
            f'JOIN {contexts} x ON x."context" = d."context"')


def record_id(kind: int, body: bytes) -> int | None:
    """The id of a decision or event record (None for other kinds)."""
    if kind in (DECISION.code, EVENT.code):
        return int.from_bytes(body[4:12], "little", signed=True)
    if kind == COMPACT_DECISION:  # the id's distance from its ts's is the first varint after the head
        _flags, ts = _COMPACT_HEAD.unpack_from(body)
        zigzag = _read_varint(body, _COMPACT_HEAD.size)[0]
        return (int(ts * 1000) << IdClock.SEQUENCE_BITS) + (zigzag >> 1 if not zigzag & 1 else -((zigzag + 1) >> 1))
    return None


def placeholder(kind: RecordKind) -> tuple[Any, ...]:
    """What a definition record that is no longer in the log reads as: "?" for its strings."""
    return tuple("?" if f.type == "str" and not f.nullable else False if f.type == "bool"
                 else 0 if not f.nullable else None for f in kind.fields)


class Definitions:
    """The CONNECTION and CONTEXT records a reader has seen (by seq), to expand compact decisions.

    Read a log in seq order and hand every record to `row()`: definitions are remembered and
    return None; decisions of both versions and events come back as (kind, row) in their table's
    full form. `lookup(seq)`, when given, finds a definition this reader has not seen (it started
    after it): it reads the segment holding that seq. A definition the log no longer has (only
    after a failed write, once the segment before was removed) reads as `placeholder()`, counted
    in `missing`."""

    def __init__(self, lookup: Callable[[int], tuple[int, bytes] | None] | None = None):
        self._defs: dict[int, tuple[Any, ...]] = {}
        self._lookup = lookup
        self.missing = 0

    def __len__(self) -> int:
        return len(self._defs)

    def add(self, seq: int, kind: int, body: bytes) -> bool:
        """Remember a definition record; False if it is not one."""
        if kind == CONNECTION.code:
            self._defs[seq] = CONNECTION.decode(body)
        elif kind == CONTEXT.code:
            self._defs[seq] = CONTEXT.decode(body)
        else:
            return False
        return True

    def forget_before(self, seq: int) -> None:
        """Drop the definitions below `seq` (their segments are no longer read)."""
        for old in [s for s in self._defs if s < seq]:
            del self._defs[old]

    def get(self, seq: int, kind: RecordKind) -> tuple[Any, ...]:
        found = self._defs.get(seq)
        if found is None:
            record = self._lookup(seq) if self._lookup is not None else None
            if record is not None and record[0] == kind.code:
                self.add(seq, *record)
                return self._defs[seq]
            self.missing += 1
            _log.warning("%s record %d is not in the message log: decisions referring to it read as %r",
                         kind.name, seq, placeholder(kind))
            found = self._defs[seq] = placeholder(kind)  # looked up once
        return found

    def decision(self, body: bytes) -> tuple[Any, ...]:
        """A compact decision's full DECISION row."""
        c = decode_compact(body)
        return expand_compact(c, self.get(c[2], CONNECTION), self.get(c[3], CONTEXT))

    def row(self, seq: int, kind: int, body: bytes) -> tuple[RecordKind, tuple[Any, ...]] | None:
        """(DECISION or EVENT, its row) for an audited record; None for anything else (definitions
        are remembered)."""
        if kind == COMPACT_DECISION:
            return DECISION, self.decision(body)
        if kind == DECISION.code:
            return DECISION, DECISION.decode(body)
        if kind == EVENT.code:
            return EVENT, EVENT.decode(body)
        self.add(seq, kind, body)
        return None

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
