"""The "Dead-letter topics" section of docs/schemas.md: its example loads, and its error is the one
the appliance prints."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from appliance.governance import SchemaSetError, load_schema_set
from tests.deadletter.conftest import REPO, V1

SECTION = (REPO / "docs" / "schemas.md").read_text().split("## Dead-letter topics\n", 1)[1].split("\n## ", 1)[0]


def _example_set(directory: Path, example: str) -> Path:
    shutil.copytree(V1, directory)
    manifest = directory / "manifest.yaml"
    text = manifest.read_text()
    start, end = text.index("topic_patterns:"), text.index("schema_files:")
    # The example first: its line numbers are the manifest's.
    manifest.write_text(example + "\n" + text[:start] + text[end:])
    return directory


def test_the_example_loads_as_documented(tmp_path):
    example = SECTION.split("```yaml\n", 1)[1].split("```", 1)[0]
    loaded = load_schema_set(_example_set(tmp_path / "set", example))
    by_filter = dict(iter(loaded.mappings))
    temp, status = by_filter["sensor/+/temperature"].dead_letter, by_filter["device/+/status"].dead_letter
    assert temp is not None and status is not None
    assert (temp.destinations, temp.envelope, temp.qos, temp.retain) == (("local", "cloud"), True, 1, False)
    assert temp.topic("sensor/t1/temperature", "t1", "temperature:v1", "schema") == "deadletter/sensor/t1/temperature"
    assert (status.destinations, status.envelope, status.qos) == (("local",), False, None)
    assert status.topic("device/d1/status", "d1", "device_status:v1", "schema") == "invalid/d1/device_status:v1"


def test_the_documented_loop_error_is_the_real_one(tmp_path):
    example = SECTION.split("```yaml\n", 1)[1].split("```", 1)[0].replace("deadletter/{topic}", "events/dead/{topic}")
    with pytest.raises(SchemaSetError) as caught:
        load_schema_set(_example_set(tmp_path / "set", example))
    [problem] = caught.value.problems
    documented = SECTION.split("```\n/etc/mqtt-appliance/schemas/manifest.yaml:", 1)[1].split("```", 1)[0]
    # The same line (that of `topic:` under republish) and the same message.
    assert problem.split("manifest.yaml:", 1)[1] == " ".join(documented.split())


def test_every_placeholder_is_documented():
    from appliance.deadletter.spec import PLACEHOLDERS

    assert [p for p in PLACEHOLDERS if f"`{{{p}}}`" not in SECTION] == []
    assert re.search(r"\| `\{topic\}` \|", SECTION)


def test_the_documented_envelope_is_what_the_appliance_builds():
    import json

    from appliance.deadletter.republisher import envelope
    from appliance.governance import Governance
    from appliance.mqtt import ProtocolVersion
    from appliance.pipeline import ClientInfo, Message
    from tests.governance.payloads import temperature

    documented = json.loads(SECTION.split("```json\n", 1)[1].split("```", 1)[0])
    message = Message("sensor/t1/temperature", temperature(temperature=999), 1, False,
                      ClientInfo("t1", None, "192.0.2.7:51234", ProtocolVersion.MQTT_5), received_at=1796531412.345)
    verdict = Governance(load_schema_set(V1)).check(message)
    assert json.loads(envelope(message, verdict, int(documented["verdict_id"]))) == documented
