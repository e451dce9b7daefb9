"""The pipeline sink that turns every verdict into a decision record in the message log (on the
event loop: encode ~2 µs and an append to the writer's queue, no I/O). Its return value is the
record's sequence number: the ticket a publisher's acknowledgement waits for.

Decisions are written in the compact form (records.py, version 2): what repeats per connection and
per topic and mapping goes into a CONNECTION and a CONTEXT record, written the first time a
decision of the current log epoch needs it (so once per segment), and the decision refers to them
by seq."""

from __future__ import annotations

import hashlib
import time
from typing import Protocol

import orjson

from appliance.audit.records import (
    COMPACT_DECISION,
    CONNECTION,
    CONTEXT,
    EVENT,
    IdClock,
    encode_compact,
    varint,
)
from appliance.msglog.log import EpochChanged
from appliance.pipeline import Message, Policy, Verdict
from appliance.names import EventKind

_NO_REASONS = "[]"
_CONNECTION, _CONTEXT = CONNECTION.code, CONTEXT.code
_encode_connection, _encode_context = CONNECTION.encode, CONTEXT.encode
# Definitions kept per epoch before the sink starts over (a topic per message would grow them):
# starting over only writes definitions again, the log stays readable.
MAX_DEFINITIONS = 50_000


class Appender(Protocol):
    """Where records go: the message log (`MessageLog.append`, `MessageLog.epoch`)."""

    @property
    def epoch(self) -> int: ...

    def append(self, kind: int, body: bytes, epoch: int | None = None) -> int: ...


class AuditSink:
    def __init__(
        self,
        log: Appender,
        clock: IdClock,
        *,
        record_payloads: bool,
        forward: bool = False,
    ):
        """With `forward`, accepted messages (dry run: all delivered ones) whose mapping forwards them
        are marked for the forwarder in the same record: the log is the outbox."""
        self._forward = forward
        self._log = log
        self._clock = clock
        self._record_payloads = record_payloads
        self._schema_parts: dict[str | None, tuple[str | None, str | None]] = {None: (None, None)}
        self.last_id = 0  # id of the last verdict recorded
        self.quarantined_bytes = 0  # payload bytes of rejected messages recorded (the quarantine grows)
        # The definitions written in the log's current epoch: key -> varint of their seq.
        self._epoch = -1
        self._connections: dict[tuple[object, ...], bytes] = {}
        self._contexts: dict[tuple[object, ...], bytes] = {}

    def _split_schema(self, schema: str | None) -> tuple[str | None, str | None]:
        parts = self._schema_parts.get(schema)
        if parts is None:
            assert schema is not None
            name, _, version = schema.partition(":")
            parts = self._schema_parts[schema] = (name, version or None)
        return parts

    def record(self, message: Message, verdict: Verdict, latency_us: int, delivered: bool, policy: Policy) -> int:
        """Records the verdict under the policy that judged it: its revision and dry run."""
        client = message.client
        payload = message.payload
        received = message.received_at or time.time()
        if verdict.accepted:
            outcome, code, reasons = "accept", 0, _NO_REASONS
        else:
            outcome, code = "reject", int(verdict.reason_code)
            reasons = orjson.dumps(
                [{"check": r.check, "message": r.message, "schema": r.schema, "path": r.path} for r in verdict.reasons]
            ).decode()
        # Forward what was delivered locally: accepted messages, and in dry run the rejected ones
        # that were delivered anyway (never what an enforced check such as the ACL refused).
        forward = self._forward and delivered and verdict.forward and not message.is_will
        # A release that fails again keeps the original in quarantine, without a second copy.
        audited = self._record_payloads and (verdict.accepted or message.released_from is None)
        self.last_id = record_id = self._clock.next(received)
        dry_run = policy.dry_run
        if audited and not verdict.accepted and not dry_run:
            self.quarantined_bytes += len(payload)
        stored = audited or forward  # the payload is stored once, for the audit and the forwarder
        connection_key = (client.client_id, client.username, client.peer, client.protocol_version)
        # The schema as the verdict names it ("temperature:v1"): split into the record's name and
        # version only when the context is defined, not per message.
        context_key = (message.topic, verdict.schema_set, verdict.schema, verdict.topic_filter,
                       policy.revision, dry_run, verdict.forward_qos)
        log = self._log
        while True:
            epoch = log.epoch
            if epoch != self._epoch:
                self._epoch = epoch
                self._connections.clear()
                self._contexts.clear()
            try:
                connection = self._connections.get(connection_key)
                if connection is None:
                    connection = self._define(self._connections, _CONNECTION,
                                              _encode_connection(self._connection_fields(connection_key)),
                                              connection_key, epoch)
                context = self._contexts.get(context_key)
                if context is None:
                    context = self._define(self._contexts, _CONTEXT, _encode_context(self._context_fields(context_key)),
                                           context_key, epoch)
                body = encode_compact(
                    record_id, received, connection + context, message.qos, message.retain,
                    payload if stored else None, len(payload),
                    None if stored else hashlib.sha256(payload).hexdigest(), outcome, code, reasons, latency_us,
                    message.is_will, message.released_from, forward, audited)
                return log.append(COMPACT_DECISION, body, epoch)
            except EpochChanged:
                continue  # the log rolled meanwhile: define them again in the new segment

    @staticmethod
    def _connection_fields(key: tuple[object, ...]) -> tuple[object, ...]:
        """CONNECTION's fields from the sink's key (the protocol version as a number)."""
        client_id, username, peer, version = key
        assert isinstance(version, int)
        return client_id, username, peer, int(version)

    def _context_fields(self, key: tuple[object, ...]) -> tuple[object, ...]:
        """CONTEXT's fields from the sink's key (the schema split into name and version)."""
        topic, schema_set, schema, topic_filter, revision, dry_run, forward_qos = key
        assert schema is None or isinstance(schema, str)
        return (topic, schema_set, *self._split_schema(schema), topic_filter, revision, dry_run, forward_qos)

    def _define(self, table: dict[tuple[object, ...], bytes], kind: int, body: bytes,
                key: tuple[object, ...], epoch: int) -> bytes:
        if len(table) >= MAX_DEFINITIONS:
            table.clear()
        ref = table[key] = varint(self._log.append(kind, body, epoch))
        return ref


def event_record(clock: IdClock, kind: EventKind, detail: dict[str, object], now: float | None = None) -> bytes:
    """An event's log record body (connects, reloads, uplink changes...)."""
    now = time.time() if now is None else now
    client_id = detail.get("client_id")
    peer = detail.get("peer")
    rest = {k: v for k, v in detail.items() if k not in ("client_id", "peer")}
    return EVENT.encode((clock.next(now), now, kind, client_id, peer, orjson.dumps(rest, default=str).decode()))
