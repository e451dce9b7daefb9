"""`appliance simulate --payload avro|sparkplug`: the plans match the example sets' verdicts, offline
and through a running appliance."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.governance import Governance, load_schema_set
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message
from appliance.config.base import Address
from appliance.simulate import make_traffic, simulate, simulate_command
from tests.conftest import make_config
from tests.helpers import RunningAppliance

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {"avro": REPO / "fixtures" / "avro" / "v1", "sparkplug": REPO / "fixtures" / "sparkplug" / "v1"}


@pytest.mark.parametrize("payload", ["avro", "sparkplug"])
def test_every_planned_message_gets_the_verdict_its_kind_says(payload):
    governance = Governance(load_schema_set(EXAMPLES[payload]))
    traffic = make_traffic(payload, 4, 0.4, seed=11)
    wrong, kinds = [], set()
    for _ in range(1200):  # Sparkplug: more than 256 per node, so the sequence wraps
        planned = traffic.next()
        kinds.add(planned.kind)
        client = ClientInfo(planned.sensor, None, "192.0.2.1:4000", ProtocolVersion.MQTT_5)
        verdict = governance.check(Message(planned.topic, planned.payload, 1, False, client))
        if verdict.accepted != planned.valid:
            wrong.append((planned.kind, planned.topic, verdict))
    assert wrong == []
    assert len(kinds) == 6  # valid and every fault


@pytest.mark.parametrize("payload", ["avro", "sparkplug"])
def test_simulated_traffic_through_the_appliance(tmp_path, payload):
    appliance = RunningAppliance(make_config(tmp_path / "state", schemas=str(EXAMPLES[payload]))).start()
    try:
        tally = simulate(address=Address(host="127.0.0.1", port=appliance.port), sensors=4, rate=200, invalid_rate=0.2,
                         duration=1.5, qos=1, protocol=5, seed=5, payload=payload)
        assert tally.total > 0 and tally.invalid > 0 and tally.failed == tally.disconnects == 0
        counts = appliance.app.verdicts.counts
        assert (counts["accept"], counts["reject"]) == (tally.valid, tally.invalid)
        assert tally.acked == tally.valid and sum(tally.rejected.values()) == tally.invalid
    finally:
        appliance.stop()


def test_the_command_takes_payload():
    result = CliRunner().invoke(simulate_command, ["--help"])
    assert "--payload [demo|avro|sparkplug]" in result.output
