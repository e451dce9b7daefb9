"""Demo payloads, valid and invalid, shared by governance tests and end-to-end tests."""

from __future__ import annotations

import orjson


def temperature(device_id: str = "t1", temperature: float = 21.5, **extra: object) -> bytes:
    body: dict[str, object] = {"device_id": device_id, "ts": "2026-11-27T12:00:00Z", "temperature": temperature}
    body.update(extra)
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def device_status(device_id: str = "d1", state: int = 1, battery_mv: int = 3300, uptime_s: int = 86400,
                  firmware: str | None = None, extra_field: int | None = None) -> bytes:
    """demo.DeviceStatus in protobuf wire format, written by hand so the tests need no codegen."""
    raw = device_id.encode()
    out = b"\x0a" + _varint(len(raw)) + raw + b"\x10" + _varint(state) + b"\x18" + _varint(battery_mv) + b"\x20" + _varint(uptime_s)
    if firmware is not None:
        out += b"\x2a" + _varint(len(firmware)) + firmware.encode()
    if extra_field is not None:
        out += b"\x78" + _varint(extra_field)  # field 15, varint: unknown to the demo schemas
    return out
