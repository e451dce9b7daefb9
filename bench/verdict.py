"""Cost of one verdict on the hot path: the governance check alone, on one core, no sockets.

Cases use the demo schema sets: a valid temperature message with and without the demo's rules,
a valid Protobuf device status, and an invalid temperature message (all errors collected); and the
example sets of the other formats: Avro meter readings (fixtures/avro/v1: headerless and Confluent
framed, with a truncated one) and Sparkplug B device data by alias (fixtures/sparkplug/v1, after the
node's and device's BIRTH; a cycle of 256 messages so every sequence number follows the last).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.scenarios import REPO_SCHEMAS
from appliance.governance import Governance, load_schema_set
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message

# The Avro and Sparkplug B example sets (a checkout's fixtures/; absent from an installed package).
REPO_FIXTURES = REPO_SCHEMAS.parent / "fixtures"
TEMPERATURE = orjson.dumps({"device_id": "t1", "ts": "2026-11-27T12:00:00Z", "temperature": 21.5})
# demo.DeviceStatus{device_id: "d1", state: STATE_OK, battery_mv: 3300, uptime_s: 86400}
DEVICE_STATUS = b"\x0a\x02d1\x10\x01\x18\xe4\x19\x20\x80\xa3\x05"
CLIENT = ClientInfo("t1", None, "192.0.2.1:40000", ProtocolVersion.MQTT_5)


@dataclass(frozen=True)
class VerdictCase:
    name: str
    rules: bool
    topic: str
    payload: bytes
    accepted: bool
    schema_set: str = "v1"  # the demo set, or "avro" / "sparkplug" for fixtures/<name>/v1
    cycle: tuple[bytes, ...] = ()  # payloads sent in turn instead of `payload` (stateful checks)
    prelude: tuple[tuple[str, bytes], ...] = ()  # messages judged once before measuring


CASES = (
    VerdictCase("temperature, valid, no rules", False, "sensor/t1/temperature", TEMPERATURE, True),
    VerdictCase("temperature, valid, demo rules", True, "sensor/t1/temperature", TEMPERATURE, True),
    VerdictCase("device status (protobuf), valid, demo rule", True, "device/d1/status", DEVICE_STATUS, True),
    VerdictCase("temperature, invalid (4 errors)", True, "sensor/t1/temperature", b'{"temperature": 999, "x": 1}', False),
)


def _avro_cases() -> tuple[VerdictCase, ...]:
    import datetime as dt
    import decimal

    from appliance.simulate_formats import meter_reading

    reading = meter_reading({
        "meter_id": "m1", "ts": dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC), "energy_kwh": decimal.Decimal("1234.567"),
        "power_w": 2300.5, "phase": "L2", "site": {"building": "A", "floor": 2},
    })
    return (
        VerdictCase("meter reading (avro), valid, no rules", False, "meter/m1/reading", reading, True, "avro"),
        VerdictCase("meter reading (avro), valid, demo rules", True, "meter/m1/reading", reading, True, "avro"),
        VerdictCase("meter reading (avro, confluent), valid, demo rule", True, "meter/m1/reading/registry",
                    b"\x00\x00\x00\x00\x01" + reading, True, "avro"),
        VerdictCase("meter reading (avro), truncated", True, "meter/m1/reading", reading[:20], False, "avro"),
    )


def _sparkplug_cases() -> tuple[VerdictCase, ...]:
    from appliance.governance.sparkplug import payload_class

    payload = payload_class()
    birth = payload(timestamp=1, seq=0)
    birth.metrics.add(name="bdSeq", datatype=8, long_value=0)
    birth.metrics.add(name="uptime_s", alias=1, datatype=8, long_value=0)
    device = payload(timestamp=1, seq=1)
    device.metrics.add(name="temperature", alias=10, datatype=9, float_value=21.0)
    device.metrics.add(name="speed_rpm", alias=12, datatype=3, int_value=1500)
    prelude = (("spBv1.0/plant1/NBIRTH/edge1", birth.SerializeToString()),
               ("spBv1.0/plant1/DBIRTH/edge1/dev1", device.SerializeToString()))

    def data(unknown_alias: bool) -> tuple[bytes, ...]:
        out = []
        for seq in [*range(2, 256), 0, 1]:
            message = payload(timestamp=2, seq=seq)
            message.metrics.add(alias=10, float_value=21.5)
            message.metrics.add(alias=99 if unknown_alias else 12, int_value=1500)
            out.append(message.SerializeToString())
        return tuple(out)

    topic = "spBv1.0/plant1/DDATA/edge1/dev1"
    return (
        VerdictCase("device data (sparkplug B, 2 metrics by alias), valid, no rules", False, topic, b"", True, "sparkplug",
                    data(False), prelude),
        VerdictCase("device data (sparkplug B, 2 metrics by alias), valid, demo rule", True, topic, b"", True, "sparkplug",
                    data(False), prelude),
        VerdictCase("device data (sparkplug B), unknown alias", True, topic, b"", False, "sparkplug", data(True), prelude),
    )


FORMAT_CASES = (*_avro_cases(), *_sparkplug_cases())
ALL_CASES = (*CASES, *FORMAT_CASES)


def _without_rules(directory: Path) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="verdict-bench-")) / directory.name
    shutil.copytree(directory, copy)
    manifest = copy / "manifest.yaml"
    text = manifest.read_text()
    manifest.write_text(text[: text.index("rules:")] + text[text.index("policy:") :])
    return copy


def measure_audit_recording(*, iterations: int = 20_000, repeats: int = 5) -> float:
    """Median µs the audit sink adds on the event loop per message: building and encoding the
    decision record and appending it to the message log's queue (framing, CRC, lock). The log is
    opened but its writer thread is not started, so nothing is written while it is timed (the
    writer does the I/O, off the loop); stopping it afterwards writes the records out."""
    from appliance.audit.records import IdClock
    from appliance.audit.sink import AuditSink
    from appliance.msglog import MessageLog
    from appliance.pipeline import ACCEPT

    message = Message("sensor/t1/temperature", TEMPERATURE, 1, False, CLIENT, received_at=time.time())
    samples = []
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        for repeat in range(repeats):
            log = MessageLog(Path(tmp) / f"log-{repeat}")  # a fresh queue each repeat
            log.open()
            try:
                sink = AuditSink(log, IdClock(), record_payloads=True, config_revision="bench", dry_run=False)
                start = time.perf_counter_ns()
                for _ in range(iterations):
                    sink.record(message, ACCEPT, 5)
                samples.append((time.perf_counter_ns() - start) / iterations / 1000)
                if log.last_seq != iterations:
                    raise RuntimeError(f"the sink appended {log.last_seq} records, expected {iterations}")
            finally:
                log.stop()
    return statistics.median(samples)


def measure(schemas: Path = REPO_SCHEMAS / "v1", *, iterations: int = 20_000, repeats: int = 5,
            cases: tuple[VerdictCase, ...] = ALL_CASES) -> list[tuple[VerdictCase, float]]:
    """Median µs per verdict for each case (each repeat times `iterations` verdicts)."""
    directories = {"v1": schemas, "avro": REPO_FIXTURES / "avro" / "v1", "sparkplug": REPO_FIXTURES / "sparkplug" / "v1"}
    results = []
    for case in cases:
        directory = directories[case.schema_set]
        if case.rules:
            governance = Governance(load_schema_set(directory))
        else:
            plain = _without_rules(directory)
            try:
                governance = Governance(load_schema_set(plain))
            finally:
                shutil.rmtree(plain.parent)
        for topic, payload in case.prelude:
            governance.check(Message(topic, payload, 1, False, CLIENT))
        payloads = case.cycle or (case.payload,)
        verdict = governance.check(Message(case.topic, payloads[0], 1, False, CLIENT))
        if verdict.accepted != case.accepted:
            raise RuntimeError(f"{case.name}: expected accepted={case.accepted}, got {verdict}")
        samples = []
        if not case.cycle:
            for _ in range(repeats):
                start = time.perf_counter_ns()
                for _ in range(iterations):
                    governance.check(Message(case.topic, case.payload, 1, False, CLIENT))
                samples.append((time.perf_counter_ns() - start) / iterations / 1000)
        else:
            count = len(payloads)
            turn = 1
            for _ in range(repeats):
                start = time.perf_counter_ns()
                for _ in range(iterations):
                    governance.check(Message(case.topic, payloads[turn % count], 1, False, CLIENT))
                    turn += 1
                samples.append((time.perf_counter_ns() - start) / iterations / 1000)
            last = governance.check(Message(case.topic, payloads[turn % count], 1, False, CLIENT))
            if last.accepted != case.accepted:  # the state kept up: no sequence gap along the way
                raise RuntimeError(f"{case.name}: expected accepted={case.accepted} at the end, got {last}")
        results.append((case, statistics.median(samples)))
    return results
