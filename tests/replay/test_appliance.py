"""Replaying what a real appliance recorded (schemas/v1, demo traffic): from its state dir (its
Parquet files and the tail of its message log) while it runs, and once it has stopped."""

from __future__ import annotations

import json

from tests.conftest import make_config
from tests.governance.payloads import device_status, temperature
from tests.helpers import Client, RunningAppliance
from tests.replay.conftest import V1, V2

TEMPERATURES = 6
STATUSES = 4


def _check_v2_report(report: dict) -> None:
    groups = {g["topic_filter"]: g for g in report["groups"]}
    temp, status = groups["sensor/+/temperature"], groups["device/+/status"]
    assert temp["schema"] == "temperature:v2"
    assert (temp["replayed"], temp["newly_rejected"], temp["still_accepted"]) == (TEMPERATURES, TEMPERATURES, 0)
    [reason] = temp["reasons"]
    assert (reason["check"], reason["message"], reason["breaking"]) == ("schema", '"unit" is a required property', TEMPERATURES)
    assert 1 <= len(reason["samples"]) <= 3 and reason["samples"][0]["client_id"] == "gw-1"
    assert json.loads(reason["samples"][0]["payload"])["device_id"] == "t1"
    assert (status["schema"], status["replayed"], status["still_accepted"], status["breaking"]) == ("device_status:v2", STATUSES, STATUSES, 0)
    assert report["recorded_with"] == {"v1": TEMPERATURES + STATUSES}
    assert report["result"] == "breaking" and report["exit_code"] == 1


def test_replay_the_appliance_recording_running_then_stopped(tmp_path, run):
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(V1))).start()
    try:
        client = Client(running.port, version=5, client_id="gw-1").connect()
        for index in range(TEMPERATURES):
            client.publish("sensor/t1/temperature", temperature(temperature=20.0 + index), qos=1)
        for _ in range(STATUSES):
            client.publish("device/d1/status", device_status(), qos=1)
        client.disconnect()

        live_v2 = run("--state-dir", state, "--against", V2, "--format", "json")
        assert live_v2.exit_code == 1, live_v2.output
        report = json.loads(live_v2.stdout)
        assert f"the audit log of {state}" in report["source"]
        _check_v2_report(report)

        live_v1 = run("--state-dir", state, "--against", V1, "--format", "json")
        assert live_v1.exit_code == 0, live_v1.output
        assert json.loads(live_v1.stdout)["totals"]["breaking"] == 0
    finally:
        running.stop()

    stopped_v2 = run("--state-dir", state, "--against", V2, "--format", "json")
    assert stopped_v2.exit_code == 1, stopped_v2.output
    report = json.loads(stopped_v2.stdout)
    assert f"the audit log of {state}" in report["source"]
    _check_v2_report(report)

    stopped_v1 = run("--state-dir", state, "--against", V1)
    assert stopped_v1.exit_code == 0, stopped_v1.output
    assert "compatible" in stopped_v1.stdout

    with_baseline = run("--state-dir", state, "--against", V2, "--baseline", V1, "--format", "json")
    static = json.loads(with_baseline.stdout)["static"]
    assert static["old"]["version"] == "v1" and static["new"]["version"] == "v2"
    if static["available"]:
        assert static["breaking"] >= 1
        assert all(u["schema"] != "temperature:v2" for u in static["unaffected"])


def test_an_appliance_that_recorded_nothing(tmp_path, run):
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(V1))).start()
    try:
        result = run("--state-dir", state, "--against", V2)
    finally:
        running.stop()
    assert result.exit_code == 2
    assert "nothing to replay" in result.stderr
    stopped = run("--state-dir", state, "--against", V2)
    assert stopped.exit_code == 2 and "nothing to replay" in stopped.stderr
