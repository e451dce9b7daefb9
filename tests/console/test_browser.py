"""The console in a real browser (Debian's headless chromium, driven by Selenium through
chromedriver) against a real appliance with real MQTT traffic. Screenshots go to docs/console/
(shown in docs/console.md)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import OPERATOR, OPERATOR_PASSWORD, VIEWER, VIEWER_PASSWORD, Setup
from tests.governance.payloads import temperature
from tests.helpers import Client, chromium, needs_chromium, scaled, wait_until

# Screenshots go to a temp dir; CONSOLE_SCREENSHOTS=docs/console refreshes the ones the docs show.
SCREENSHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tempfile.mkdtemp(prefix="console-shots-"))
PAGE_BUDGET = 80_000  # bytes on the wire for a first visit of the overview (docs/console.md, page weight)
WAIT = scaled(30)

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chromium("--window-size=1360,900", "--lang=en-US", page_load_timeout=WAIT) as browser:
        yield browser


def log_in(driver: Any, setup: Setup, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{setup.url}/login")
    driver.find_element(By.NAME, "user").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait_until(lambda: "/login" not in driver.current_url, timeout=WAIT, message="logged in")


def text_of(driver: Any, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.CSS_SELECTOR, css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def shot(driver: Any, name: str) -> None:
    """The whole page (the window grown to its height for the shot)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], max(size["height"], min(int(height) + 140, 2400)))
    try:
        driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    finally:
        driver.set_window_size(size["width"], size["height"])


def publish(setup: Setup, client_id: str, topic: str, payload: bytes, count: int = 1) -> None:
    client = Client(setup.mqtt_port, client_id=client_id).connect()
    try:
        for _ in range(count):
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def quarantined(setup: Setup, client_id: str) -> list[str]:
    done = cli("appliance", "quarantine", "list", "--state-dir", str(setup.state_dir), "--format", "json")
    assert done.returncode == 0, done.stderr
    return [row["id"] for row in json.loads(done.stdout)["rows"] if row["client_id"] == client_id]


def test_overview_updates_when_messages_flow(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    log_in(driver, running, OPERATOR, OPERATOR_PASSWORD)
    driver.get(f"{running.url}/")
    wait_until(lambda: text_of(driver, "#live") == "live", timeout=WAIT, message="the event stream open")
    wait_until(lambda: text_of(driver, "[data-field=service]") == "running", timeout=WAIT, message="service running")
    before = int(text_of(driver, "[data-field=accepted_total]") or 0)
    rejected = int(text_of(driver, "[data-field=rejected_total]") or 0)
    publish(running, "overview-sensor", "sensor/o1/temperature", temperature("o1", 21.0), count=5)
    publish(running, "overview-sensor", "sensor/o1/temperature", temperature("o1", 90.0), count=2)
    wait_until(lambda: int(text_of(driver, "[data-field=accepted_total]") or 0) >= before + 5, timeout=WAIT,
               message="the overview counting the new messages")
    wait_until(lambda: int(text_of(driver, "[data-field=rejected_total]") or 0) >= rejected + 2, timeout=WAIT,
               message="the overview counting the rejected ones")
    assert driver.find_elements(By.CSS_SELECTOR, "#chart-rates .uplot"), "the rates chart is drawn"
    wait_until(lambda: int(driver.execute_script("return document.body.dataset.points || 0")) >= 2, timeout=WAIT,
               message="points added to the charts live")
    assert text_of(driver, "[data-field=schema_set]") == "v1"
    assert driver.find_elements(By.ID, "reload"), "an operator's overview offers the reload (docs/console.md)"
    shot(driver, "overview")


def page_weight(driver: Any) -> dict[str, int]:
    """Bytes of the page and everything it loaded (not the event stream, which stays open)."""
    return dict(driver.execute_script("""
        const all = [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
          .filter(e => !e.name.includes('/events') && !e.name.includes('/stream'));
        return {wire: all.reduce((n, e) => n + e.transferSize, 0),
                decoded: all.reduce((n, e) => n + e.decodedBodySize, 0), requests: all.length};
    """))


def test_page_weight_of_a_first_visit_is_small(driver: Any, running: Setup) -> None:
    log_in(driver, running, VIEWER, VIEWER_PASSWORD)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.clearBrowserCache", {})
    weights = {}
    for page in ("/", "/verdicts", "/quarantine", "/sql"):
        driver.execute_cdp_cmd("Network.clearBrowserCache", {})
        driver.get(f"{running.url}{page}")
        wait_until(lambda: driver.execute_script("return document.readyState") == "complete", timeout=WAIT,
                   message="page loaded")
        weights[page] = page_weight(driver)
    print("page weight (first visit):", json.dumps(weights))
    assert weights["/"]["wire"] < PAGE_BUDGET, weights
    assert all(w["wire"] < PAGE_BUDGET for w in weights.values()), weights
    # Static files are cached: a second visit loads only the page itself.
    driver.get(f"{running.url}/verdicts")
    wait_until(lambda: driver.execute_script("return document.readyState") == "complete", timeout=WAIT,
               message="page loaded")
    again = page_weight(driver)
    assert again["wire"] < 10_000, again


def test_rejected_message_shows_in_the_tail_and_opens_with_its_reason_at_the_field(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    log_in(driver, running, VIEWER, VIEWER_PASSWORD)
    driver.get(f"{running.url}/verdicts?verdict=reject")
    wait_until(lambda: text_of(driver, "#live") == "live", timeout=WAIT, message="the event stream open")
    publish(running, "hot-sensor", "sensor/h1/temperature", temperature("h1", 70.0))
    row = wait_until(lambda: [r for r in driver.find_elements(By.CSS_SELECTOR, "#tail tr")
                              if "sensor/h1/temperature" in r.text], timeout=WAIT, message="the rejection in the tail")[0]
    assert "reject" in row.text and "hot-sensor" in row.text
    row.click()
    flagged = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#detail .payload .line.flagged"),
                         timeout=WAIT, message="the message opened")
    line = [f for f in flagged if f.get_attribute("data-path") == "/temperature"]
    assert line, [f.text for f in flagged]
    code = line[0].find_element(By.CSS_SELECTOR, ".code").text
    reason = line[0].find_element(By.CSS_SELECTOR, ".reason").text
    assert '"temperature": 70' in code
    assert "maximum" in reason and "50" in reason
    shot(driver, "verdicts")


def test_release_from_the_quarantine_reaches_a_subscriber(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    payload = temperature("r1", 70.0)
    publish(running, "release-me", "sensor/r1/temperature", payload)
    ids = wait_until(lambda: quarantined(running, "release-me"), timeout=WAIT, message="quarantined")
    subscriber = Client(running.mqtt_port, client_id="release-subscriber").connect()
    subscriber.subscribe("sensor/r1/temperature", qos=1)
    running.set_maximum(125)  # the set in force now accepts it: release re-judges with it
    try:
        log_in(driver, running, OPERATOR, OPERATOR_PASSWORD)
        driver.get(f"{running.url}/quarantine?group=client")
        shot(driver, "quarantine")
        driver.get(f"{running.url}/quarantine?client=release-me")
        box = driver.find_element(By.CSS_SELECTOR, f"#qlist input[name=id][value='{ids[0]}']")
        box.click()
        driver.find_element(By.ID, "release").click()
        wait_until(lambda: _alert(driver), timeout=WAIT, message="the confirmation").accept()
        wait_until(lambda: "released" in text_of(driver, "#qlist .outcome"), timeout=WAIT, message="released")
        received = subscriber.expect(1, timeout=WAIT)
        assert received[0].payload == payload
    finally:
        subscriber.disconnect()
        running.set_maximum(50)
    assert quarantined(running, "release-me") == []
    done = cli("appliance", "audit", "sql", "--state-dir", str(running.state_dir), "--format", "json",
               "SELECT detail FROM events WHERE kind = 'quarantine_released'")
    details = [json.loads(row["detail"]) if isinstance(row["detail"], str) else row["detail"]
               for row in json.loads(done.stdout)["rows"]]
    assert any(d.get("console_user") == OPERATOR and ids[0] in d["ids"] for d in details), details


def test_purge_removes_the_payload(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    publish(running, "purge-me", "sensor/p1/temperature", temperature("p1", 99.0))
    ids = wait_until(lambda: quarantined(running, "purge-me"), timeout=WAIT, message="quarantined")
    log_in(driver, running, OPERATOR, OPERATOR_PASSWORD)
    driver.get(f"{running.url}/quarantine?client=purge-me")
    driver.find_element(By.CSS_SELECTOR, f"#qlist input[name=id][value='{ids[0]}']").click()
    driver.find_element(By.ID, "purge").click()
    wait_until(lambda: _alert(driver), timeout=WAIT, message="the confirmation").accept()
    wait_until(lambda: "purged 1" in text_of(driver, "#qlist .outcome"), timeout=WAIT, message="purged")
    driver.get(f"{running.url}/messages/{ids[0]}")
    assert driver.find_elements(By.CSS_SELECTOR, ".payload-gone")
    assert "99" not in text_of(driver, "body").split("Payload", 1)[1]
    shown = cli("appliance", "quarantine", "show", ids[0], "--state-dir", str(running.state_dir))
    assert shown.returncode != 0 and "no quarantined message" in shown.stderr
    done = cli("appliance", "audit", "sql", "--state-dir", str(running.state_dir), "--format", "json",
               f"SELECT payload IS NULL AS gone FROM decisions WHERE id = {ids[0]}")
    assert json.loads(done.stdout)["rows"] == [{"gone": True}]
    done = cli("appliance", "audit", "sql", "--state-dir", str(running.state_dir), "--format", "json",
               "SELECT detail FROM events WHERE kind = 'quarantine_purged'")
    details = [json.loads(row["detail"]) if isinstance(row["detail"], str) else row["detail"]
               for row in json.loads(done.stdout)["rows"]]
    assert any(d.get("console_user") == OPERATOR and d["ids"] == [ids[0]] and d["purged"] == 1 for d in details), details


SQL = "SELECT client_id, verdict, count(*) AS n FROM decisions GROUP BY ALL ORDER BY ALL"


def test_sql_results_match_the_cli(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    log_in(driver, running, VIEWER, VIEWER_PASSWORD)
    driver.get(f"{running.url}/sql")
    box = driver.find_element(By.NAME, "q")
    box.clear()
    box.send_keys(SQL)
    driver.find_element(By.ID, "run").click()
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#result tbody tr"), timeout=WAIT, message="results")
    header = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#result thead th")]
    rows = [[td.text for td in tr.find_elements(By.CSS_SELECTOR, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "#result tbody tr")]
    done = cli("appliance", "audit", "sql", "--state-dir", str(running.state_dir), "--format", "csv", SQL)
    assert done.returncode == 0, done.stderr
    expected = list(csv.reader(io.StringIO(done.stdout)))
    assert [header, *rows] == expected
    shot(driver, "sql")
    # A cookbook query is one click away.
    driver.find_element(By.CSS_SELECTOR, "details.cookbook summary").click()
    driver.find_element(By.CSS_SELECTOR, "[data-cookbook=top-offending-devices]").click()
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#result thead th"), timeout=WAIT, message="cookbook")
    assert "usual_reason" in text_of(driver, "#result thead")


def test_a_viewer_cannot_release(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    publish(running, "viewer-sees", "sensor/v1/temperature", temperature("v1", 80.0))
    ids = wait_until(lambda: quarantined(running, "viewer-sees"), timeout=WAIT, message="quarantined")
    log_in(driver, running, VIEWER, VIEWER_PASSWORD)
    driver.get(f"{running.url}/quarantine?client=viewer-sees")
    assert driver.find_elements(By.CSS_SELECTOR, f"#qlist input[name=id][value='{ids[0]}']")
    assert not driver.find_elements(By.ID, "release") and not driver.find_elements(By.ID, "purge")
    # Even a request made by hand from the page, with the viewer's own CSRF token, is refused.
    status = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const token = JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token'];
        fetch('/quarantine/release', {method: 'POST', headers: {'X-CSRF-Token': token,
              'Content-Type': 'application/x-www-form-urlencoded'}, body: 'id=' + arguments[0]})
          .then(r => done(r.status));
    """, ids[0])
    assert status == 403
    assert quarantined(running, "viewer-sees") == ids


def test_clients_page_lists_a_connected_client(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    client = Client(running.mqtt_port, client_id="boiler-7", version=5).connect()
    try:
        client.publish("sensor/boiler-7/temperature", temperature("boiler-7", 60.0), qos=1).wait_for_publish(10)
        log_in(driver, running, VIEWER, VIEWER_PASSWORD)

        def row() -> list[str]:
            driver.get(f"{running.url}/clients")
            for tr in driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr"):
                cells = [td.text for td in tr.find_elements(By.CSS_SELECTOR, "td")]
                if cells[0] == "boiler-7" and cells[6] == "1":
                    return cells
            return []

        cells = wait_until(row, timeout=WAIT, message="the client listed with its reject")
        assert cells[3] == "MQTT 5" and cells[5] == "1"
        shot(driver, "clients")
    finally:
        client.disconnect()


def test_schema_trial_counts_match_the_replay_cli(driver: Any, running: Setup) -> None:
    from selenium.webdriver.common.by import By

    log_in(driver, running, OPERATOR, OPERATOR_PASSWORD)
    driver.get(f"{running.url}/trials")
    driver.find_element(By.ID, "trial-dir").send_keys("v2")
    driver.find_element(By.ID, "trial-run").click()
    wait_until(lambda: driver.find_elements(By.ID, "trial-result"), timeout=scaled(120), message="the trial's report")
    shown = {dd.get_attribute("data-total"): int(dd.text)
             for dd in driver.find_elements(By.CSS_SELECTOR, "#trial-totals dd")}
    done = cli("replay.cli", "--against", str(running.candidates / "v2"), "--state-dir", str(running.state_dir),
               "--baseline", str(running.schemas), "--format", "json", "--fail-on", "never", "--jobs", "1")
    assert done.returncode == 0, done.stderr
    totals = json.loads(done.stdout)["totals"]
    assert shown == {key: totals[key] for key in shown}
    assert shown["replayed"] > 0
    # The revisions that judged the traffic: before and after the reloads of the release test.
    revisions = driver.find_elements(By.CSS_SELECTOR, "#revisions tbody tr")
    assert len(revisions) >= 2 and all("v1" in r.text for r in revisions)
    driver.find_element(By.ID, "trial-diff").click()
    wait_until(lambda: driver.find_elements(By.ID, "diff-result"), timeout=WAIT, message="the diff")
    shot(driver, "trials")


def _alert(driver: Any) -> Any:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None
