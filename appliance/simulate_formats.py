"""Simulated traffic for the Avro and Sparkplug B example sets (`appliance simulate --payload`).

- `AvroTraffic` (fixtures/avro/v1): electricity meters publishing `demo.meter.MeterReading` records,
  headerless Avro binary on `meter/<id>/reading`.
- `SparkplugTraffic` (fixtures/sparkplug/v1): each sensor is a Sparkplug B edge node `<id>` of group
  `plant1` with one device `dev1`; it sends its NBIRTH and DBIRTH first, then DDATA by alias with
  sequence numbers, as a real edge node does.

Both plan messages like `simulate.Traffic` (seeded, no I/O), with faults each example set rejects;
`Planned` (one planned message) is declared here and used by all three.
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import random
import time
from dataclasses import dataclass
from typing import Any

import fastavro

VALID = "valid"


@dataclass(frozen=True, slots=True)
class Planned:
    sensor: str
    topic: str
    payload: bytes
    kind: str  # VALID or one of the faults

    @property
    def valid(self) -> bool:
        return self.kind == VALID


AVRO_FAULTS = ("truncated", "not_avro", "wrong_meter", "negative_energy", "topic_not_allowed")
SPARKPLUG_FAULTS = ("unknown_alias", "out_of_range", "undeclared_metric", "not_sparkplug", "wrong_group")

# The schema of fixtures/avro/v1/meter_reading.avsc with site.avsc inlined (a test checks they agree).
METER_READING: dict[str, Any] = {
    "type": "record", "name": "MeterReading", "namespace": "demo.meter",
    "fields": [
        {"name": "meter_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "energy_kwh", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 3}},
        {"name": "power_w", "type": ["null", "double"], "default": None},
        {"name": "phase", "type": {"type": "enum", "name": "Phase", "symbols": ["L1", "L2", "L3"]}},
        {"name": "site", "type": {"type": "record", "name": "Site", "fields": [
            {"name": "building", "type": "string"}, {"name": "floor", "type": "int"}]}},
    ],
}
_PARSED = fastavro.parse_schema(METER_READING)


def meter_reading(record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, _PARSED, record)
    return out.getvalue()


class AvroTraffic:
    def __init__(self, sensors: int, invalid_rate: float, *, seed: int | None = None):
        if sensors < 1:
            raise ValueError("at least one sensor")
        self.sensors = [f"meter{i:03d}" for i in range(sensors)]
        self.invalid_rate = invalid_rate
        self._rng = random.Random(seed)
        self._turn = 0
        self._energy = {sensor: decimal.Decimal("1000.000") for sensor in self.sensors}

    def next(self) -> Planned:
        sensor = self.sensors[self._turn % len(self.sensors)]
        self._turn += 1
        rng = self._rng
        kind = rng.choice(AVRO_FAULTS) if rng.random() < self.invalid_rate else VALID
        self._energy[sensor] += decimal.Decimal(rng.randint(1, 500)) / 1000
        record: dict[str, Any] = {
            "meter_id": sensor, "ts": dt.datetime.now(dt.UTC).replace(microsecond=0),
            "energy_kwh": self._energy[sensor], "power_w": round(rng.uniform(100, 3000), 1) if rng.random() < 0.8 else None,
            "phase": rng.choice(("L1", "L2", "L3")), "site": {"building": "A", "floor": rng.randint(0, 4)},
        }
        topic = f"meter/{sensor}/reading"
        if kind == "wrong_meter":
            record["meter_id"] = sensor + "-x"
        elif kind == "negative_energy":
            record["energy_kwh"] = -record["energy_kwh"]
        elif kind == "topic_not_allowed":
            topic = f"meter/{sensor}/config"
        payload = meter_reading(record)
        if kind == "truncated":
            payload = payload[: len(payload) // 2]
        elif kind == "not_avro":
            payload = b'{"meter_id": "%s"}' % sensor.encode()
        return Planned(sensor, topic, payload, kind)


class SparkplugTraffic:
    GROUP = "plant1"

    def __init__(self, sensors: int, invalid_rate: float, *, seed: int | None = None):
        from appliance.governance.sparkplug import payload_class

        if sensors < 1:
            raise ValueError("at least one sensor")
        self.sensors = [f"edge{i:03d}" for i in range(sensors)]
        self.invalid_rate = invalid_rate
        self._payload = payload_class()
        self._rng = random.Random(seed)
        self._turn = 0
        self._seq: dict[str, int] = {}
        self._started = time.monotonic()

    def _message(self, node: str, **fields: Any) -> Any:
        message = self._payload(timestamp=int(time.time() * 1000), **fields)
        return message

    def _next_seq(self, node: str) -> int:
        seq = self._seq[node] = (self._seq[node] + 1) % 256
        return seq

    def next(self) -> Planned:
        node = self.sensors[self._turn % len(self.sensors)]
        self._turn += 1
        base = f"spBv1.0/{self.GROUP}"
        if node not in self._seq:  # born first: NBIRTH (seq 0), then the device's DBIRTH
            self._seq[node] = 0
            birth = self._message(node, seq=0)
            birth.metrics.add(name="bdSeq", datatype=8, long_value=0)
            birth.metrics.add(name="uptime_s", alias=1, datatype=8, long_value=0)
            birth.metrics.add(name="firmware", alias=2, datatype=12, string_value="1.4.2")
            return Planned(node, f"{base}/NBIRTH/{node}", birth.SerializeToString(), VALID)
        if self._seq[node] == 0:
            device = self._message(node, seq=self._next_seq(node))
            device.metrics.add(name="temperature", alias=10, datatype=9, float_value=21.0)
            device.metrics.add(name="running", alias=11, datatype=11, boolean_value=True)
            device.metrics.add(name="speed_rpm", alias=12, datatype=3, int_value=1500)
            return Planned(node, f"{base}/DBIRTH/{node}/dev1", device.SerializeToString(), VALID)
        rng = self._rng
        kind = rng.choice(SPARKPLUG_FAULTS) if rng.random() < self.invalid_rate else VALID
        data = self._message(node, seq=self._next_seq(node))
        data.metrics.add(alias=10, float_value=round(rng.uniform(18, 30), 1))
        data.metrics.add(alias=12, int_value=rng.randint(1400, 1600))
        topic = f"{base}/DDATA/{node}/dev1"
        if kind == "unknown_alias":
            data.metrics.add(alias=99, float_value=1.0)
        elif kind == "out_of_range":
            data.metrics[0].float_value = 400.0
        elif kind == "undeclared_metric":
            data.metrics.add(name="humidity", datatype=9, float_value=40.0)
        elif kind == "wrong_group":
            topic = f"spBv1.0/plant9/DDATA/{node}/dev1"
        payload = data.SerializeToString()
        if kind == "not_sparkplug":
            payload = b"\xff" + payload
        if kind in ("not_sparkplug", "wrong_group"):
            # The appliance cannot read this number (or counts it for another node): not spent.
            self._seq[node] = (self._seq[node] - 1) % 256
        return Planned(node, topic, payload, kind)
