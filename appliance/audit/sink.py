"""The pipeline sink that turns every verdict into a decision record in the message log (on the
event loop: encode ~2 µs and an append to the writer's queue, no I/O). Its return value is the
record's sequence number: the ticket a publisher's acknowledgement waits for."""

from __future__ import annotations

import hashlib
import time
from typing import Protocol

import orjson

from appliance.audit.records import DECISION, EVENT, IdClock
from appliance.pipeline import Message, Policy, Verdict

_NO_REASONS = "[]"
_DECISION = DECISION.code
_encode_decision = DECISION.encode


class Appender(Protocol):
    """Where records go: the message log (`MessageLog.append`)."""

    def append(self, kind: int, body: bytes) -> int: ...


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
        schema_name, schema_version = self._split_schema(verdict.schema)
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
        self.last_id = self._clock.next(received)
        dry_run = policy.dry_run
        if audited and not verdict.accepted and not dry_run:
            self.quarantined_bytes += len(payload)
        row = (
            self.last_id,
            received,
            client.client_id,
            client.username,
            client.peer,
            int(client.protocol_version),
            message.topic,
            message.qos,
            message.retain,
            payload if audited or forward else None,  # stored once, for the audit and the forwarder
            len(payload),
            hashlib.sha256(payload).hexdigest(),
            verdict.schema_set,
            schema_name,
            schema_version,
            verdict.topic_filter,
            outcome,
            code,
            reasons,
            latency_us,
            policy.revision,
            dry_run,
            message.is_will,
            message.released_from,
            forward,
            verdict.forward_qos,
            audited,
        )
        return self._log.append(_DECISION, _encode_decision(row))


def event_record(clock: IdClock, kind: str, detail: dict[str, object], now: float | None = None) -> bytes:
    """An event's log record body (connects, reloads, uplink changes...)."""
    now = time.time() if now is None else now
    client_id = detail.get("client_id")
    peer = detail.get("peer")
    rest = {k: v for k, v in detail.items() if k not in ("client_id", "peer")}
    return EVENT.encode((clock.next(now), now, kind, client_id, peer, orjson.dumps(rest, default=str).decode()))
