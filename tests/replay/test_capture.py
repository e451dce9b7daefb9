"""`replay capture` against a real broker (the appliance in front of its embedded mosquitto), and
the capture replayed."""

from __future__ import annotations

import json
import threading

from replay.capture import capture_to_file, parse_broker
from tests.conftest import make_config
from tests.governance.payloads import temperature
from tests.helpers import Client, RunningAppliance
from tests.replay.conftest import V1, V2


def test_parse_broker():
    assert parse_broker("mqtt://localhost:1884") == ("localhost", 1884, False, None, None)
    assert parse_broker("mqtts://u:p%40ss@h") == ("h", 8883, True, "u", "p@ss")


def test_capture_then_replay(tmp_path, run):
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(V1))).start()
    out = tmp_path / "capture.ndjson"
    ready = threading.Event()
    result: list[int] = []
    try:
        thread = threading.Thread(target=lambda: result.append(capture_to_file(
            f"mqtt://127.0.0.1:{running.port}", ["sensor/#"], out, count=3, ready=ready)))
        thread.start()
        assert ready.wait(10)
        publisher = Client(running.port, client_id="t1").connect()
        for index in range(3):
            publisher.publish("sensor/t1/temperature", temperature(temperature=20 + index), qos=1)
        thread.join(20)
        publisher.disconnect()
    finally:
        running.stop()
    assert result == [3]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["topic"] for line in lines] == ["sensor/t1/temperature"] * 3
    replayed = run("--from", out, "--against", V2, "--baseline", V1, "--format", "json")
    assert replayed.exit_code == 1
    assert json.loads(replayed.stdout)["totals"]["newly_rejected"] == 3
