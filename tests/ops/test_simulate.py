"""`appliance simulate` against a real appliance enforcing schemas/v1."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from appliance.governance import Governance, load_schema_set
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message
from appliance.config.base import Address
from appliance.simulate import (
    STATUS_FAULTS,
    TEMPERATURE_FAULTS,
    VALID,
    Traffic,
    simulate,
    simulate_command,
)
from tests.conftest import make_config
from tests.helpers import RunningAppliance

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas" / "v1"


@pytest.fixture
def v1_appliance(tmp_path: Path) -> Iterator[RunningAppliance]:
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(SCHEMAS), log_level="info")).start()
    try:
        yield running
    finally:
        running.stop()


def test_the_plan_takes_turns_and_mixes_faults():
    traffic = Traffic(4, 0.5, seed=1, clock=lambda: "2026-11-27T12:00:00Z")
    plan = [traffic.next() for _ in range(400)]
    assert [p.sensor for p in plan[:5]] == ["sim000", "sim001", "sim002", "sim003", "sim000"]
    assert {p.topic for p in plan if p.valid} == {"sensor/sim000/temperature", "device/sim001/status",
                                                  "sensor/sim002/temperature", "device/sim003/status"}
    assert {p.kind for p in plan} == {VALID, *TEMPERATURE_FAULTS, *STATUS_FAULTS}
    valid = next(p for p in plan if p.valid and p.topic.startswith("sensor/"))
    body = orjson.loads(valid.payload)
    assert body["device_id"] == valid.sensor and body["ts"] == "2026-11-27T12:00:00Z" and 15 <= body["temperature"] <= 30


def test_every_planned_message_gets_the_verdict_its_kind_says():
    """The plan alone, judged by the demo schema set (no broker): valid is accepted, every fault rejected."""
    governance = Governance(load_schema_set(SCHEMAS))
    traffic = Traffic(6, 0.5, seed=7)
    wrong = []
    for _ in range(600):
        planned = traffic.next()
        client = ClientInfo(planned.sensor, None, "192.0.2.1:4000", ProtocolVersion.MQTT_5)
        verdict = governance.check(Message(planned.topic, planned.payload, 1, False, client))
        if verdict.accepted != planned.valid:
            wrong.append((planned.kind, planned.topic, verdict))
    assert wrong == []


def test_simulated_traffic_matches_the_appliances_verdicts(v1_appliance: RunningAppliance):
    lines: list[str] = []
    tally = simulate(address=Address(host="127.0.0.1", port=v1_appliance.port), sensors=20, rate=200, invalid_rate=0.2,
                     duration=2, qos=1, protocol=5, seed=3, report=lines.append)
    assert tally.total > 0 and tally.invalid > 0 and tally.failed == tally.disconnects == 0
    counts = v1_appliance.app.verdicts.counts
    assert (counts["accept"], counts["reject"]) == (tally.valid, tally.invalid)
    # MQTT 5 and QoS 1: every message was answered, and the PUBACKs tell the rejections apart.
    assert tally.acked == tally.valid
    assert sum(tally.rejected.values()) == tally.invalid
    assert set(tally.rejected) <= {"0x99 Payload format invalid", "0x90 Topic name invalid"}
    assert tally.rejected["0x90 Topic name invalid"] == tally.sent["topic_not_allowed"]
    assert lines and "sent" in lines[0]  # the live summary


def test_mqtt_311_counts_acks_only(v1_appliance: RunningAppliance):
    tally = simulate(address=Address(host="127.0.0.1", port=v1_appliance.port), sensors=2, rate=100, invalid_rate=0.5,
                     duration=0.3, qos=1, protocol=4, seed=5)
    counts = v1_appliance.app.verdicts.counts
    assert (counts["accept"], counts["reject"]) == (tally.valid, tally.invalid)
    assert tally.acked == tally.total and not tally.rejected  # 3.1.1 publishers get a plain PUBACK


def test_the_command_prints_a_final_tally(v1_appliance: RunningAppliance):
    result = CliRunner().invoke(simulate_command, ["--sensors", "4", "--rate", "50", "--invalid-rate", "0.25",
                                                   "--broker", f"127.0.0.1:{v1_appliance.port}", "--duration", "0.5",
                                                   "--seed", "2"])
    assert result.exit_code == 0, result.output
    sent = Counter(v1_appliance.app.verdicts.counts)
    assert f"sent {sent['accept'] + sent['reject']} messages" in result.output
    assert f"acked (accepted): {sent['accept']}" in result.output
    assert f"rejected: {sent['reject']}" in result.output


def test_an_unreachable_broker_is_a_clear_error(tmp_path: Path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = CliRunner().invoke(simulate_command, ["--broker", f"127.0.0.1:{port}", "--duration", "1"])
    assert result.exit_code == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.output
