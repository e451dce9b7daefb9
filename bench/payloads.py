"""The benchmark's messages: demo temperature readings (schemas/v1), one in ten invalid.

Every reading is unique (device id + timestamp), so loss and duplicates can be counted, and it
fits the demo schema exactly (`additionalProperties: false`): the publish time travels in `ts`,
an RFC 3339 date-time with microseconds, from which subscribers compute latency. Readings with
`seq % 10 == 9` are invalid, alternately out of range (temperature 999.5) and with a device id that
does not match the topic, so the governance path rejects exactly those and the CEL rule and the
JSON Schema both do work.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

BASE_TS = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
TOPIC_FILTER = "sensor/+/temperature"


def topic(device: str) -> str:
    return f"sensor/{device}/temperature"


def is_invalid(seq: int) -> bool:
    return seq % 10 == 9


def timestamp(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def synthetic_ts(seq: int) -> str:
    """A distinct timestamp per sequence number, for pre-built loads that do not measure latency."""
    return (BASE_TS + timedelta(milliseconds=seq)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def reading(device: str, seq: int, ts: str) -> bytes:
    temperature = 15.0 + (seq % 100) / 10
    device_id = device
    if is_invalid(seq):
        if seq % 20 == 9:
            temperature = 999.5  # above the schema's maximum of 125
        else:
            device_id = f"{device}-x"  # the CEL rule device_id == topic[1] fails
    return b'{"device_id":"%s","ts":"%s","temperature":%.1f}' % (device_id.encode(), ts.encode(), temperature)


def probe(tag: str) -> tuple[str, bytes]:
    """A valid reading on its own topic: published before the clock starts, to know subscribers are ready."""
    device = f"{tag}-probe"
    return topic(device), reading(device, 0, synthetic_ts(0))


def device_of(payload: bytes) -> bytes:
    """The device id field, cheaply (payloads are built by `reading`)."""
    start = payload.index(b'"device_id":"') + 13
    return payload[start : payload.index(b'"', start)]


def ts_of(payload: bytes) -> str:
    start = payload.index(b'"ts":"') + 6
    return payload[start : payload.index(b'"', start)].decode()
