"""Cost of one verdict on the hot path: the governance check alone, on one core, no sockets.

Cases use the demo schema sets: a valid temperature message with and without the demo's rules,
a valid Protobuf device status, and an invalid temperature message (all errors collected).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from appliance.bench.scenarios import REPO_SCHEMAS
from appliance.governance import Governance, load_schema_set
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message

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


CASES = (
    VerdictCase("temperature, valid, no rules", False, "sensor/t1/temperature", TEMPERATURE, True),
    VerdictCase("temperature, valid, demo rules", True, "sensor/t1/temperature", TEMPERATURE, True),
    VerdictCase("device status (protobuf), valid, demo rule", True, "device/d1/status", DEVICE_STATUS, True),
    VerdictCase("temperature, invalid (4 errors)", True, "sensor/t1/temperature", b'{"temperature": 999, "x": 1}', False),
)


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


def measure(schemas: Path = REPO_SCHEMAS / "v1", *, iterations: int = 20_000, repeats: int = 5) -> list[tuple[VerdictCase, float]]:
    """Median µs per verdict for each case (each repeat times `iterations` verdicts)."""
    plain = _without_rules(schemas)
    try:
        checks = {True: Governance(load_schema_set(schemas)), False: Governance(load_schema_set(plain))}
    finally:
        shutil.rmtree(plain.parent)
    results = []
    for case in CASES:
        governance = checks[case.rules]
        message = Message(case.topic, case.payload, 1, False, CLIENT)
        verdict = governance.check(message)
        if verdict.accepted != case.accepted:
            raise RuntimeError(f"{case.name}: expected accepted={case.accepted}, got {verdict}")
        samples = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for _ in range(iterations):
                governance.check(Message(case.topic, case.payload, 1, False, CLIENT))
            samples.append((time.perf_counter_ns() - start) / iterations / 1000)
        results.append((case, statistics.median(samples)))
    return results
