"""Quarantine actions that fail part-way, over plain HTTP against a real console and appliance: the
operator reads what was not done and why, and the audit events record it. Faults at real
boundaries: the appliance's own mosquitto stopped (SIGSTOP), a Parquet file that cannot be replaced
(a directory where its rewrite's temp file must go)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from appliance import admin
from appliance.audit.layout import temp_name
from tests.console.conftest import OPERATOR, OPERATOR_PASSWORD, Browser, Setup
from tests.governance.payloads import temperature
from tests.helpers import Client, scaled, wait_until


def operator(setup: Setup) -> Browser:
    browser = Browser(setup.console_port)
    assert browser.login(OPERATOR, OPERATOR_PASSWORD) == 303
    return browser


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=120)


def quarantined(setup: Setup, client_id: str) -> list[str]:
    done = cli("quarantine", "list", "--state-dir", str(setup.state_dir), "--format", "json")
    assert done.returncode == 0, done.stderr
    return [row["id"] for row in json.loads(done.stdout)["rows"] if row["client_id"] == client_id]


def hold(setup: Setup, client_id: str, device: str, count: int) -> list[str]:
    """Rejected messages (70 °C and up, above the set's maximum of 50) of `client_id` until
    `count` of them are quarantined; their ids, oldest first."""
    client = Client(setup.mqtt_port, client_id=client_id).connect()
    try:
        for n in range(len(quarantined(setup, client_id)), count):
            client.publish(f"sensor/{device}/temperature", temperature(device, 70.0 + n), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
    return sorted(wait_until(lambda: len(ids := quarantined(setup, client_id)) == count and ids,
                             timeout=scaled(30), message="quarantined"), key=int)


def events(setup: Setup, kind: str) -> list[dict[str, Any]]:
    done = cli("audit", "sql", "--state-dir", str(setup.state_dir), "--format", "json",
               f"SELECT detail FROM events WHERE kind = '{kind}' ORDER BY id")
    assert done.returncode == 0, done.stderr
    return [json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"]
            for r in json.loads(done.stdout)["rows"]]


def mosquitto_pid(appliance_pid: int) -> int:
    """The appliance's embedded mosquitto: its child process of that name."""
    children: list[int] = []
    for task in Path(f"/proc/{appliance_pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    found = [pid for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto"]
    assert len(found) == 1, children
    return found[0]


@contextlib.contextmanager
def broker_stopped(setup: Setup) -> Iterator[None]:
    """The broker stopped (SIGSTOP: it accepts connections in the kernel but answers nothing, and
    the appliance's supervisor does not restart it), then continued."""
    assert setup.appliance is not None
    pid = mosquitto_pid(setup.appliance.pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_release_the_broker_does_not_take_is_reported_and_recorded(running: Setup) -> None:
    ids = hold(running, "stuck-release", "sr", 2)
    browser = operator(running)
    running.set_maximum(125)  # the set in force now accepts them: release would publish them
    try:
        with broker_stopped(running):
            status, page = browser.post("/quarantine/release", {"id": ids, "client": "stuck-release"},
                                        csrf=browser.csrf())
    finally:
        running.set_maximum(50)
    assert status == 200, page
    assert f"{ids[0]}: not released: " in page and "did not answer in time" in page
    assert f"{ids[1]}: not tried" in page
    assert 'class="error"' in page and "released (new verdict" not in page
    detail = [d for d in events(running, "quarantine_released") if d.get("failed") == [ids[0]]]
    assert len(detail) == 1, events(running, "quarantine_released")
    assert detail[0]["ids"] == [] and detail[0]["not_attempted"] == [ids[1]]
    assert detail[0]["console_user"] == OPERATOR and "did not answer" in detail[0]["error"]
    assert sorted(quarantined(running, "stuck-release"), key=int) == ids  # neither left the quarantine


def parquet_holding(setup: Setup, decision_id: str) -> Path | None:
    """The Parquet file that holds a decision, once the seal helper has converted its segment."""
    files = str(setup.state_dir / "audit" / "parquet" / "decisions" / "**" / "*.parquet")
    con = duckdb.connect()
    try:
        found = con.execute(f"SELECT DISTINCT filename FROM read_parquet('{files}', filename = true, "
                            f"hive_partitioning = false) WHERE id = {int(decision_id)}").fetchall()
    except duckdb.IOException:  # no file yet
        return None
    finally:
        con.close()
    return Path(found[0][0]) if found else None


def test_a_purge_that_cannot_rewrite_a_file_purges_the_rest_and_says_which_ids_are_left(running: Setup) -> None:
    first = hold(running, "stuck-purge", "sp", 1)[0]
    admin.call(running.state_dir, "audit_seal")  # converted to Parquet; the second message goes to the log
    converted = wait_until(lambda: parquet_holding(running, first), timeout=scaled(60), message="converted")
    ids = hold(running, "stuck-purge", "sp", 2)
    assert ids[0] == first
    blocker = temp_name(converted)
    blocker.mkdir()  # the first message's Parquet file cannot be replaced; today's files are never merged
    browser = operator(running)
    try:
        status, page = browser.post("/quarantine/purge", {"id": ids, "client": "stuck-purge"}, csrf=browser.csrf())
    finally:
        blocker.rmdir()
    assert status == 200, page
    assert f"not purged: {first}: " in page and "could not be rewritten" in page and "purged 1 message(s)" in page
    detail = [d for d in events(running, "quarantine_purged") if d.get("ids") == ids]
    assert len(detail) == 1, events(running, "quarantine_purged")
    assert detail[0]["failed"] == [first] and detail[0]["purged"] == 1 and detail[0]["console_user"] == OPERATOR
    assert converted.name in detail[0]["error"]
    assert quarantined(running, "stuck-purge") == [first]  # still held: purge it again once fixed
