"""MQTT over WebSockets from a real browser: Debian's headless chromium (driven by Selenium through
chromedriver) opens fixtures/web/publish.html from disk, whose mqtt.js (the vendored browser bundle,
nothing fetched at test time) publishes through the appliance's ws:// listener to its real mosquitto.
A paho subscriber on the TCP listener sees what passed; the verdicts are read back from the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit.query import AuditQuery
from appliance.mqtt import ReasonCode
from tests.conftest import make_config
from tests.governance.payloads import temperature
from tests.helpers import Client, RunningAppliance, chromium, needs_chromium, scaled, wait_until

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "fixtures" / "web" / "publish.html"
WAIT = scaled(30)
TOPIC = "sensor/b1/temperature"

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAppliance]:
    """schemas/v1 (a temperature of 999 is out of range) with a ws://…/mqtt listener beside TCP."""
    state = tmp_path_factory.mktemp("ws-browser") / "state"
    listener = {"listen": "127.0.0.1:0", "transport": "websockets", "path": "/mqtt"}
    config = make_config(state, schemas=str(REPO / "schemas" / "v1"), listeners=[listener])
    running = RunningAppliance(config).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chromium(page_load_timeout=WAIT) as browser:
        yield browser


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


@pytest.mark.parametrize("version", [5, 4])
def test_mqttjs_in_chromium_publishes_through_a_ws_listener(appliance: RunningAppliance, driver: Any,
                                                             version: int) -> None:
    assert appliance.app.proxy is not None
    ws_port = appliance.app.proxy.listeners[1].port
    client_id = f"browser-mqttjs-v{version}"
    good, bad, fence = temperature("b1", 20.5), temperature("b1", 999), temperature("b1", 21.5)
    sub = Client(appliance.port, version=5).connect()  # a TCP client sees what the browser sent
    sub.subscribe("sensor/+/temperature", qos=1)

    driver.get(PAGE.as_uri())
    driver.execute_script("window.publishAll(arguments[0], arguments[1], arguments[2], arguments[3], arguments[4])",
                          f"ws://127.0.0.1:{ws_port}/mqtt", version, client_id, TOPIC,
                          [good.decode(), bad.decode(), fence.decode()])
    acks = wait_until(lambda: text_of(driver, "acks") or text_of(driver, "error"), timeout=WAIT,
                      message="the page's PUBACK reason codes")
    assert text_of(driver, "error") == ""
    assert text_of(driver, "connected") == "yes"
    # MQTT 5 says why the middle one was refused; 3.1.1 has no reason code, the PUBACK is plain.
    rejected = int(ReasonCode.PAYLOAD_FORMAT_INVALID) if version == 5 else 0
    assert acks == f"0,{rejected},0"

    # The valid messages reached mosquitto in order; the invalid one, sent between them, did not.
    assert [(m.topic, m.payload) for m in sub.expect(2)] == [(TOPIC, good), (TOPIC, fence)]
    sub.disconnect()

    query = f"SELECT verdict, qos, mqtt_version, reason_code FROM decisions WHERE client_id = '{client_id}' ORDER BY id"
    wait_until(lambda: len(audit_rows(appliance, query)) >= 3, message="three verdicts in the audit log")
    assert audit_rows(appliance, query) == [
        ("accept", 1, version, 0), ("reject", 1, version, 0x99), ("accept", 1, version, 0)]


def audit_rows(appliance: RunningAppliance, sql: str) -> list[tuple[Any, ...]]:
    with AuditQuery(appliance.app.config.state_dir) as audit_log:
        return [tuple(row) for row in audit_log.query(sql).rows]
