"""What the pages answer, over plain HTTP against a real console and appliance: downloads equal the
CLI's results, the live tail's filters, a Protobuf payload decoded, the overview's figures."""

from __future__ import annotations

import csv
import http.client
import io
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import duckdb
import pytest

from appliance import admin
from tests.console.conftest import VIEWER, VIEWER_PASSWORD, Browser, Setup
from tests.governance.payloads import device_status, temperature
from tests.helpers import Client, wait_until

SQL = "SELECT id, client_id, topic, verdict, payload_size, ts FROM decisions ORDER BY id"


@pytest.fixture(scope="module")
def traffic(running: Setup) -> Setup:
    client = Client(running.mqtt_port, client_id="pages-sensor").connect()
    for value in (20.0, 70.0, 21.0):
        client.publish("sensor/pg/temperature", temperature("pg", value), qos=1).wait_for_publish(10)
    client.publish("device/pg/status", device_status("pg", battery_mv=2900), qos=1).wait_for_publish(10)
    client.publish("device/pg/status", device_status("other", battery_mv=2900), qos=1).wait_for_publish(10)
    client.disconnect()
    return running


def viewer(setup: Setup) -> Browser:
    browser = Browser(setup.console_port)
    assert browser.login(VIEWER, VIEWER_PASSWORD) == 303
    return browser


def cli_csv(setup: Setup, sql: str) -> list[list[str]]:
    done = subprocess.run([sys.executable, "-m", "appliance", "audit", "sql", "--state-dir", str(setup.state_dir),
                           "--format", "csv", sql], capture_output=True, text=True, timeout=120, check=True)
    return list(csv.reader(io.StringIO(done.stdout)))


def test_csv_and_parquet_downloads_hold_the_query_result(traffic: Setup, tmp_path: Path) -> None:
    browser = viewer(traffic)
    query = urllib.parse.quote(SQL)
    status, headers, text = browser.request("GET", f"/sql/download?format=csv&q={query}")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert "attachment" in headers["content-disposition"]
    assert list(csv.reader(io.StringIO(text))) == cli_csv(traffic, SQL)
    connection = http.client.HTTPConnection("127.0.0.1", traffic.console_port, timeout=60)
    connection.request("GET", f"/sql/download?format=parquet&q={query}",
                       headers={"Cookie": "; ".join(f"{k}={v}" for k, v in browser.cookies.items())})
    response = connection.getresponse()
    data = response.read()
    assert response.status == 200 and data[:4] == b"PAR1"
    (tmp_path / "r.parquet").write_bytes(data)
    con = duckdb.connect()
    rows = con.execute(f"SELECT * FROM read_parquet('{tmp_path / 'r.parquet'}') ORDER BY id").fetchall()
    types = [d[1] for d in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{tmp_path / 'r.parquet'}')").fetchall()]
    assert types[0] == "BIGINT" and types[-1] == "TIMESTAMP WITH TIME ZONE"
    expected = cli_csv(traffic, SQL)[1:]
    assert [[str(v) for v in row[:5]] for row in rows] == [row[:5] for row in expected]


def test_the_sql_page_shows_the_first_rows_and_says_so(traffic: Setup) -> None:
    browser = viewer(traffic)
    status, page = browser.get("/sql?q=" + urllib.parse.quote("SELECT * FROM range(1500)"))
    assert status == 200
    assert page.count("<tr><td>") == 1000
    assert "only the first 1000 are shown" in page


def events(browser: Browser, path: str, wanted: int) -> list[dict[str, object]]:
    """The verdicts a tail stream sends first (its backlog), read until `wanted` rows came."""
    connection = http.client.HTTPConnection("127.0.0.1", browser.port, timeout=30)
    connection.request("GET", path, headers={"Cookie": "; ".join(f"{k}={v}" for k, v in browser.cookies.items())})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    rows: list[dict[str, object]] = []
    event = None
    try:
        while len(rows) < wanted:
            line = response.fp.readline().decode()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "verdicts":
                rows += json.loads(line.split(":", 1)[1])
    finally:
        connection.close()
    return rows


def test_the_tail_filters_by_topic_client_verdict_and_reason(traffic: Setup) -> None:
    browser = viewer(traffic)
    wait_until(lambda: len(events(browser, "/verdicts/stream?client=pages-sensor", 5)) >= 5, message="the tail")
    rejected = events(browser, "/verdicts/stream?client=pages-sensor&verdict=reject", 2)
    assert {r["verdict"] for r in rejected} == {"reject"}
    assert {r["topic"] for r in rejected} == {"sensor/pg/temperature", "device/pg/status"}
    by_topic = events(browser, "/verdicts/stream?client=pages-sensor&topic=device/%2B/status", 2)
    assert {r["topic"] for r in by_topic} == {"device/pg/status"}
    by_reason = events(browser, "/verdicts/stream?client=pages-sensor&reason=maximum", 1)
    assert by_reason and all("maximum" in str(r["reason"]) for r in by_reason)
    assert all(r["verdict"] == "reject" for r in events(browser, "/verdicts/stream?client=pages-sensor&reason=rule", 1))


def test_a_protobuf_payload_opens_decoded_with_the_reason_at_its_field(traffic: Setup) -> None:
    browser = viewer(traffic)
    rows = events(browser, "/verdicts/stream?client=pages-sensor&topic=device/%2B/status&verdict=reject", 1)
    status, page = browser.get(f"/messages/{rows[0]['id']}")
    assert status == 200
    assert "(protobuf)" in page
    assert "&#34;deviceId&#34;: &#34;other&#34;" in page or "&#34;device_id&#34;: &#34;other&#34;" in page
    # The rule's reason has no path; it sits at the first payload field its expression reads.
    line = [part for part in page.split('<div class="line') if 'data-path="/device_id"' in part][0]
    assert "flagged" in line and "device_matches_topic" in line


def test_the_overview_reports_the_service(traffic: Setup) -> None:
    browser = viewer(traffic)
    wait_until(lambda: ">running<" in browser.get("/")[1], message="the overview's first sample")
    page = browser.get("/")[1]
    assert 'data-field="schema_set">v1<' in page
    status = admin.call(traffic.state_dir, "status")["status"]
    assert f'data-field="revision">{status["config_revision"]}<' in page
    status_code, chart = browser.get("/api/chart")
    assert status_code == 200 and "points" in json.loads(chart)


def test_the_chart_starts_with_the_hour_before_the_console(traffic: Setup) -> None:
    """A console started now shows the traffic already recorded (the audit log's last hour)."""
    import asyncio
    import time

    from appliance.console.monitor import CHART_SEED_STEP_S, Monitor
    from appliance.console.store import Store

    store = Store(traffic.state_dir)
    try:
        later = time.time() + CHART_SEED_STEP_S  # every bucket of the test's traffic has ended by then
        monitor = Monitor(traffic.state_dir, store, clock=lambda: later)
        asyncio.run(monitor._seed_chart())
        accepted = sum(point[1] * CHART_SEED_STEP_S for point in monitor.chart)
        rejected = sum(point[2] * CHART_SEED_STEP_S for point in monitor.chart)
        counts = cli_csv(traffic, "SELECT count(*) FILTER (WHERE verdict = 'accept'), "
                                  "count(*) FILTER (WHERE verdict = 'reject') FROM decisions")[1]
        assert (round(accepted), round(rejected)) == (int(counts[0]), int(counts[1]))
        times = [point[0] for point in monitor.chart]
        assert times == sorted(times) and len(times) >= 1
    finally:
        store.close()


def test_the_overview_shows_the_outbox_while_the_uplink_is_down(tmp_path: Path) -> None:
    """Forwarding to a cloud broker that is not there: accepted messages wait in the outbox, and
    the overview says how many and for how long."""
    import re

    from tests.console.conftest import start_console, stop, write_setup
    from tests.processes import appliance_process, free_port

    setup = write_setup(tmp_path)
    config = json.loads(setup.config.read_text())
    config["upstream"] = {"url": f"mqtt://127.0.0.1:{free_port()}"}  # nobody listens there
    setup.config.write_text(json.dumps(config))
    with appliance_process(["--config", str(setup.config)], port=setup.mqtt_port):
        console = start_console(setup)
        try:
            client = Client(setup.mqtt_port, client_id="outbox-sensor").connect()
            for value in (20.0, 21.0, 22.0):
                client.publish("sensor/ob/temperature", temperature("ob", value), qos=1).wait_for_publish(10)
            client.disconnect()
            browser = viewer(setup)

            def outbox() -> tuple[str, str, str] | None:
                page = browser.get("/")[1]
                depth = re.search(r'data-field="outbox_depth">([^<]*)<', page)
                oldest = re.search(r'data-field="outbox_oldest_s" data-format="duration">([^<]*)<', page)
                uplink = re.search(r'data-field="uplink">([^<]*)<', page)
                assert depth and oldest and uplink
                return (depth[1], oldest[1], uplink[1]) if depth[1] == "3" else None

            depth, oldest, uplink = wait_until(outbox, message="three messages in the outbox")
            assert uplink.startswith("down")
            assert oldest.endswith((" s", " min"))
        finally:
            stop(console)


def test_the_store_reads_the_log_again_only_when_it_changed(traffic: Setup) -> None:
    from appliance.console.store import Store

    def last_seq() -> int:
        return int(admin.call(traffic.state_dir, "audit_sync")["last_seq"])

    store = Store(traffic.state_dir, sync=last_seq)
    try:
        store.revisions()
        taken = store._opened_at
        store.revisions()
        assert store._opened_at == taken  # nothing written since: the same snapshot
        client = Client(traffic.mqtt_port, client_id="store-sensor").connect()
        client.publish("sensor/st/temperature", temperature("st", 22.0), qos=1).wait_for_publish(10)
        client.disconnect()
        columns, rows = store._fetch("SELECT count(*) FROM decisions WHERE client_id = 'store-sensor'", [])
        assert rows == [(1,)] and store._opened_at > taken
        store.invalidate()
        before = store._opened_at
        store.revisions()
        assert store._opened_at > before  # after an action: always a new snapshot
    finally:
        store.close()
