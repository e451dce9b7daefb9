"""Recordings for replay tests, made the way the appliance makes them: decision rows written to a
real message log and exported to Parquet by the appliance's own export, the previous version's
`audit.duckdb` (tests/audit/legacy.py), NDJSON captures as `replay capture` writes them."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from appliance.audit.archive import export_range
from appliance.audit.records import IdClock
from tests.audit.legacy import write_duckdb
from tests.audit.logfiles import build_state
from tests.governance.payloads import device_status, temperature

START = 1_795_766_400.0  # 2026-11-27T08:00:00Z

TEMPERATURE_OVER = {"check": "schema", "message": "150 is greater than the maximum of 125",
                    "schema": "temperature:v1", "path": "/temperature"}


def demo_messages(count: int, *, start: float = START) -> Iterator[tuple[float, str, bytes, str, str, str | None]]:
    """(ts, topic, payload, client_id, verdict as v1 judged it, topic_filter) for a demo mix: per 10
    messages, 5 valid temperatures, 1 too hot, 3 device statuses and 1 unmapped event."""
    for index in range(count):
        at = start + index * 0.01
        kind = index % 10
        device = f"t{index % 7}"
        if kind < 5:
            yield at, f"sensor/{device}/temperature", temperature(device, 20.0 + index % 10), device, "accept", "sensor/+/temperature"
        elif kind == 5:
            yield at, f"sensor/{device}/temperature", temperature(device, 150 + index % 5), device, "reject", "sensor/+/temperature"
        elif kind < 9:
            yield at, f"device/d{index % 3}/status", device_status(f"d{index % 3}"), f"d{index % 3}", "accept", "device/+/status"
        else:
            yield at, "events/door/open", b'{"door": 1}', "door-1", "accept", None


def decision_rows(messages: Iterable[tuple[float, str, bytes, str, str, str | None]]) -> Iterator[tuple[object, ...]]:
    clock = IdClock()
    for at, topic, payload, client_id, verdict, topic_filter in messages:
        schema = {"sensor/+/temperature": ("temperature", "v1"), "device/+/status": ("device_status", "v1")}.get(topic_filter or "", (None, None))
        reasons = [TEMPERATURE_OVER] if verdict == "reject" else []
        yield (
            clock.next(at), at, client_id, None, "10.0.0.7:51234", 4, topic, 1, False, payload, len(payload),
            hashlib.sha256(payload).hexdigest(), "v1", schema[0], schema[1], topic_filter, verdict,
            0x99 if verdict == "reject" else 0, json.dumps(reasons), 40, "rev-a", False, False, None,
        )


def write_audit_log(path: Path, rows: Iterable[tuple[object, ...]]) -> None:
    """The previous version's audit.duckdb holding these decisions (replay still reads it)."""
    write_duckdb(path, decisions=rows)


def export(rows: Iterable[tuple[object, ...]], state_dir: Path, to_dir: Path) -> None:
    """These decisions in a state dir's log and Parquet files, exported as `appliance audit export`
    does (`to_dir/decisions/day=.../*.parquet`)."""
    build_state(state_dir, rows)
    export_range(state_dir, to_dir, since=None, until=None)


def write_ndjson(path: Path, messages: Iterable[tuple[float, str, bytes, str, str, str | None]], *, verdicts: bool = True) -> None:
    with path.open("wb") as out:
        for at, topic, payload, client_id, verdict, _ in messages:
            line: dict[str, object] = {"ts": at, "topic": topic, "payload_b64": base64.b64encode(payload).decode(),
                                       "qos": 1, "retain": False, "client_id": client_id}
            if verdicts:
                line["verdict"] = verdict
            out.write(orjson.dumps(line) + b"\n")
