"""Realistic audit rows for tests: tuples in records.DECISION_COLUMNS / EVENT_COLUMNS order."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

from appliance.audit.records import IdClock, payload_sha256

SCHEMA_REASON = {"check": "schema", "message": "/temperature: 200 is greater than the maximum of 125",
                 "schema": "temperature:v1", "path": "/temperature"}
TOPIC_REASON = {"check": "topic", "message": "topic not allowed", "schema": None, "path": None}


def epoch(text: str) -> float:
    """'2026-11-27T10:00:00' (UTC) as a float epoch."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def decision(
    record_id: int,
    ts: float,
    *,
    device: str = "dev-1",
    verdict: str = "accept",
    payload: bytes | None = None,
    reasons: list[dict[str, str | None]] | None = None,
    topic: str | None = None,
    schema_version: str = "v1",
    config_revision: str = "rev-a",
    latency_us: int = 40,
) -> tuple[object, ...]:
    if payload is None:
        payload = json.dumps({"device_id": device, "temperature": 21.5, "unit": "C",
                              "ts": int(ts), "battery": 87, "seq": record_id % 100000}).encode()
    if reasons is None:
        reasons = [SCHEMA_REASON] if verdict == "reject" else []
    return (
        record_id, ts, device, "sensor-user", "10.0.0.7:51234", 5,
        topic or f"sensor/{device}/temperature", 1, False, payload, len(payload),
        payload_sha256(payload), "set-1", "temperature", schema_version, "sensor/+/temperature",
        verdict, 0x99 if verdict == "reject" else 0, json.dumps(reasons), latency_us,
        config_revision, False, False, None,
    )


def event(record_id: int, ts: float, kind: str, client_id: str | None = None,
          detail: dict[str, object] | None = None) -> tuple[object, ...]:
    return (record_id, ts, kind, client_id, "10.0.0.7:51234" if client_id else None,
            json.dumps(detail or {}))


def generate(count: int, *, start: float, step: float = 1.0, devices: int = 20,
             reject_every: int = 5, seed: int = 7) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """`count` decisions from `devices` devices, `step` seconds apart from `start`, every
    `reject_every`-th rejected; plus a connect event per device before and a few others."""
    rng = random.Random(seed)
    clock = IdClock()
    events = []
    for index in range(devices):
        at = start - devices + index
        events.append(event(clock.next(at), at, "client_connected", f"dev-{index}",
                            {"keepalive": 60, "clean_start": True}))
    decisions = []
    for index in range(count):
        at = start + index * step
        device = f"dev-{rng.randrange(devices)}"
        rejected = index % reject_every == reject_every - 1
        decisions.append(decision(
            clock.next(at), at, device=device, verdict="reject" if rejected else "accept",
            reasons=[rng.choice([SCHEMA_REASON, TOPIC_REASON])] if rejected else [],
            schema_version="v2" if index > count // 2 else "v1",
            config_revision="rev-b" if index > count // 3 else "rev-a",
            latency_us=rng.randrange(10, 500),
        ))
        if index % 50 == 49:
            events.append(event(clock.next(at), at, "client_disconnected", device, {"reason": "keepalive"}))
    events.append(event(clock.next(start + count * step), start + count * step, "config_reload", None,
                        {"revision": "rev-b"}))
    events.sort()
    return decisions, events
