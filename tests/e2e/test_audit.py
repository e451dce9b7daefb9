"""The audit log end to end: verdicts of real traffic, queried with SQL while the appliance runs,
exported to Parquet, released from quarantine, and intact after kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pytest

from appliance.audit.query import AuditQuery

from appliance import admin
from tests.conftest import make_config
from tests.e2e.test_governance import CASES
from tests.governance.payloads import temperature
from tests.helpers import Client, RunningAppliance, wait_until
from tests.processes import free_port, start_appliance

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=120)


def sql(state_dir: Path, query: str) -> list[dict[str, object]]:
    result = cli("audit", "sql", query, "--state-dir", str(state_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["truncated"] is False
    return document["rows"]


@pytest.fixture
def audited(tmp_path):
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(REPO / "schemas" / "v1"))).start()
    try:
        yield running
    finally:
        running.stop()


def test_verdicts_of_a_known_mix_queried_while_running(audited, tmp_path):
    pub = Client(audited.port, version=5, client_id="mix-1").connect()
    for topic, payload, _ in CASES:
        pub.publish(topic, payload, qos=1)
    pub.disconnect()
    state = tmp_path / "state"
    rows = sql(state, "SELECT verdict, count(*) AS n FROM decisions GROUP BY verdict ORDER BY verdict")
    expected_rejects = sum(1 for *_, ok in CASES if not ok)
    assert rows == [{"verdict": "accept", "n": len(CASES) - expected_rejects}, {"verdict": "reject", "n": expected_rejects}]
    rejected = sql(state, "SELECT topic, reason_code, reasons[1].\"check\" AS first_check, schema_name, schema_version, "
                          "client_id, peer, mqtt_version FROM decisions WHERE verdict = 'reject' ORDER BY id")
    assert [r["topic"] for r in rejected] == [t for t, _, ok in CASES if not ok]
    assert {r["first_check"] for r in rejected} == {"schema", "rule", "topic"}
    assert all(r["client_id"] == "mix-1" and r["mqtt_version"] == 5 and str(r["peer"]).startswith("127.0.0.1:") for r in rejected)
    topic_row = next(r for r in rejected if r["topic"] == "secret/door_code")
    assert topic_row["reason_code"] == 0x90
    schema_row = next(r for r in rejected if r["first_check"] == "schema")
    assert (schema_row["schema_name"], schema_row["schema_version"]) == ("temperature", "v1")
    events = sql(state, "SELECT kind FROM events WHERE client_id = 'mix-1' ORDER BY id")
    assert [e["kind"] for e in events] == ["client_connected", "client_disconnected"]


def test_payloads_hashes_and_latency_are_recorded(audited, tmp_path):
    pub = Client(audited.port, version=4).connect()
    pub.publish("sensor/t1/temperature", temperature(), qos=1)
    pub.disconnect()
    [row] = sql(tmp_path / "state", "SELECT payload_size, payload_sha256, latency_us >= 0 AS timed, "
                                    "decode(payload) AS text, config_revision FROM decisions")
    import hashlib

    assert row["payload_size"] == len(temperature())
    assert row["payload_sha256"] == hashlib.sha256(temperature()).hexdigest()
    assert row["text"] == temperature().decode() and row["timed"] is True and len(row["config_revision"]) == 12


@pytest.mark.parametrize("query", [
    "DELETE FROM decisions",
    "ATTACH '/tmp/x.duckdb' AS x",
    "COPY decisions TO '/tmp/out.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT 1; DROP TABLE decisions",
])
def test_unsafe_sql_is_refused_clearly(audited, tmp_path, query):
    result = cli("audit", "sql", query, "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1
    assert "Error:" in result.stderr and "not allowed" in result.stderr.lower() or "only" in result.stderr.lower()
    assert sql(tmp_path / "state", "SELECT count(*) AS n FROM decisions") is not None


def test_export_to_parquet_and_read_back(audited, tmp_path):
    pub = Client(audited.port, version=5).connect()
    for topic, payload, _ in CASES:
        pub.publish(topic, payload, qos=1)
    pub.disconnect()
    out = tmp_path / "export"
    result = cli("audit", "export", "--state-dir", str(tmp_path / "state"), "--since", "2000-01-01", "--to", str(out))
    assert result.returncode == 0, result.stderr
    files = list((out / "decisions").glob("day=*/*.parquet"))
    assert files, list(out.rglob("*"))
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/decisions/**/*.parquet', hive_partitioning = true)").fetchall()[0][0]
    assert count == len(CASES)


@contextmanager
def a_quarantined_reading(tmp_path: Path) -> Iterator[tuple[RunningAppliance, Path, Path, dict[str, Any]]]:
    """An appliance on a copy of the v1 schemas (tmp_path/schemas) that has quarantined one temperature
    above the v1 maximum: (the appliance, its state dir, the schemas dir, the quarantine list's row)."""
    schemas = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas" / "v1", schemas)
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(schemas))).start()
    try:
        pub = Client(running.port, version=5).connect()
        pub.publish("sensor/t1/temperature", temperature(temperature=150), qos=1)  # above the v1 maximum
        pub.disconnect()
        listing = cli("quarantine", "list", "--state-dir", str(state), "--format", "json")
        [entry] = json.loads(listing.stdout)["rows"]
        yield running, state, schemas, entry
    finally:
        running.stop()


def test_quarantine_release_after_a_schema_fix(tmp_path):
    with a_quarantined_reading(tmp_path) as (running, state, schemas, entry):
        shown = cli("quarantine", "show", str(entry["id"]), "--state-dir", str(state))
        assert '"temperature": 150' in shown.stdout and "maximum" in shown.stdout
        still = cli("quarantine", "release", str(entry["id"]), "--state-dir", str(state))
        assert still.returncode == 1 and "still rejected" in still.stdout
    manifest_schema = schemas / "temperature.json"
    manifest_schema.write_text(manifest_schema.read_text().replace('"maximum": 125', '"maximum": 200'))
    running = RunningAppliance(make_config(state, schemas=str(schemas))).start()
    try:
        sub = Client(running.port, version=5).connect()
        sub.subscribe("sensor/#", qos=1)
        released = cli("quarantine", "release", str(entry["id"]), "--state-dir", str(state))
        assert released.returncode == 0, released.stdout + released.stderr
        assert sub.expect(1)[0].payload == temperature(temperature=150)
        # Both release attempts left a verdict linked to the original: rejected, then accepted.
        rows = sql(state, f"SELECT verdict FROM decisions WHERE released_from = {entry['id']} ORDER BY id")
        assert rows == [{"verdict": "reject"}, {"verdict": "accept"}]
        assert json.loads(cli("quarantine", "list", "--state-dir", str(state), "--format", "json").stdout)["rows"] == []
        sub.disconnect()
    finally:
        running.stop()


def test_queries_work_on_a_stopped_appliance(tmp_path):
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(REPO / "schemas" / "v1"))).start()
    pub = Client(running.port, version=5).connect()
    pub.publish("sensor/t1/temperature", b"{}", qos=1)
    pub.disconnect()
    running.stop()
    assert not admin.socket_path(state).exists()
    assert sql(state, "SELECT count(*) AS n FROM quarantine") == [{"n": 1}]
    refused = cli("quarantine", "purge", "--all", "--state-dir", str(state))  # no --yes, nobody to say yes
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    assert sql(state, "SELECT count(*) AS n FROM quarantine") == [{"n": 1}]
    purged = cli("quarantine", "purge", "--all", "--yes", "--state-dir", str(state))
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert sql(state, "SELECT count(*) AS n FROM quarantine") == [{"n": 0}]
    assert sql(state, "SELECT count(*) AS n FROM decisions") == [{"n": 1}]  # the verdict stays
    [event] = sql(state, "SELECT detail FROM events WHERE kind = 'quarantine_purged'")
    assert json.loads(event["detail"])["ids"] == "all" and json.loads(event["detail"])["by"]["user"]


def test_kill_9_under_load_keeps_every_acknowledged_verdict(tmp_path):
    """QoS 1 publishers through a real `appliance run` process; kill -9 mid-stream; after a restart
    every message a publisher saw acknowledged has its verdict in the audit log."""
    
    state = tmp_path / "state"
    port = free_port()
    config = tmp_path / "appliance.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nstate_dir: state\nschemas: {REPO / 'schemas' / 'v1'}\nlog_level: warning\nmetrics:\n  listen: 127.0.0.1:0\n")

    def start() -> subprocess.Popen[str]:
        return start_appliance(["--config", str(config)], port=port)

    proc = start()
    acked: dict[str, set[bytes]] = {}
    publishers = []
    for n in range(4):
        client = Client(port, version=5 if n % 2 else 4, client_id=f"t{n}").connect()
        acked[client.paho._client_id.decode()] = set()
        publishers.append(client)
    stop = threading.Event()

    def publish(client: Client) -> None:
        name = client.paho._client_id.decode()
        seq = 0
        while not stop.is_set() and client.connected.is_set():
            # Unique payloads; every fifth one is out of range (rejected, and still acknowledged).
            payload = temperature(device_id=name, temperature=round(seq * 0.001, 3) if seq % 5 else 1000 + seq)
            info = client.paho.publish(f"sensor/{name}/temperature", payload, qos=1)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                return
            if info.is_published():
                acked[name].add(payload)
            seq += 1

    threads = [threading.Thread(target=publish, args=(c,)) for c in publishers]
    for t in threads:
        t.start()
    wait_until(lambda: sum(len(v) for v in acked.values()) >= 400, timeout=60, message="some traffic")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    for c in publishers:
        c.paho.loop_stop()
    total = sum(len(v) for v in acked.values())
    assert total >= 400
    proc = start()  # recovery cuts a torn tail; the log continues after it
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    with AuditQuery(state) as audit_log:
        recorded = {bytes(row[0]) for row in audit_log.query("SELECT payload FROM decisions", max_rows=1 << 40).rows}
    missing = [p for payloads in acked.values() for p in payloads if p not in recorded]
    assert not missing, f"{len(missing)} of {total} acknowledged messages have no verdict, e.g. {missing[:3]}"


def test_audit_sql_says_when_it_cut_the_result_and_can_return_everything(audited):
    pub = Client(audited.port, version=5).connect()
    for n in range(3):
        pub.publish("sensor/t1/temperature", temperature(temperature=20 + n), qos=1)
    pub.disconnect()
    state = str(audited.app.config.state_dir)
    query = "SELECT id FROM decisions"
    cut = cli("audit", "sql", query, "--state-dir", state, "--format", "json", "--max-rows", "2")
    assert cut.returncode == 0, cut.stderr
    answer = json.loads(cut.stdout)
    assert answer["truncated"] is True and len(answer["rows"]) == 2
    table = cli("audit", "sql", query, "--state-dir", state, "--max-rows", "2").stdout
    assert "2 rows (truncated: more rows matched; add a LIMIT or raise --max-rows)" in table
    csv_cut = cli("audit", "sql", query, "--state-dir", state, "--format", "csv", "--max-rows", "2")
    assert len(csv_cut.stdout.splitlines()) == 3 and "truncated at 2 rows" in csv_cut.stderr
    everything = cli("audit", "sql", query, "--state-dir", state, "--format", "csv", "--max-rows", "0")
    assert len(everything.stdout.splitlines()) == 4 and everything.stderr == ""


def test_quarantine_ids_survive_jq_and_unknown_ids_are_errors(audited):
    pub = Client(audited.port, version=5).connect()
    pub.publish("sensor/t1/temperature", b"{}", qos=1)
    pub.publish("sensor/t1/temperature", b"[]", qos=1)
    pub.disconnect()
    state = str(audited.app.config.state_dir)
    listing = json.loads(cli("quarantine", "list", "--state-dir", state, "--format", "json", "--limit", "1").stdout)
    [entry] = listing["rows"]
    assert listing["truncated"] is True and isinstance(entry["id"], str) and int(entry["id"]) > 2**53
    assert "(truncated: more rows matched; raise --limit)" in cli("quarantine", "list", "--state-dir", state, "--limit", "1").stdout
    # The id as jq prints it with and without -r: both name the message.
    for form in (entry["id"], json.dumps(entry["id"])):
        shown = cli("quarantine", "show", form, "--state-dir", state)
        assert shown.returncode == 0 and f"id: {entry['id']}" in shown.stdout, shown.stderr
    unknown = "42"
    released = cli("quarantine", "release", unknown, "--state-dir", state)
    assert released.returncode == 1 and released.stdout.strip() == "42: no quarantined message with this id"
    purged = cli("quarantine", "purge", unknown, entry["id"], "--state-dir", state)
    assert purged.returncode == 1 and "purged 1 message(s)" in purged.stdout
    assert "42: no quarantined message with this id" in purged.stderr
    refused = subprocess.run([sys.executable, "-m", "appliance", "quarantine", "purge", "--all", "--state-dir", state],
                             input="n\n", capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Purge every quarantined payload" in refused.stderr
    assert len(sql(Path(state), "SELECT id FROM quarantine")) == 1  # nothing purged
    assert "purged 1 message(s)" in cli("quarantine", "purge", "--all", "--yes", "--state-dir", state).stdout
    events = sql(Path(state), "SELECT detail FROM events WHERE kind = 'quarantine_purged' ORDER BY id")
    details = [json.loads(e["detail"]) for e in events]
    assert [(d["ids"], d["purged"]) for d in details] == [([entry["id"]], 1), ("all", 1)]
    assert all(d["by"]["uid"] == os.getuid() and d["by"]["pid"] > 0 for d in details)


def _unshare_works() -> bool:
    try:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /tmp"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def test_replay_and_export_when_the_appliance_has_a_private_tmp(tmp_path):
    """The shipped unit has PrivateTmp=yes: the appliance's /tmp is not the caller's. Replay and
    export must still hand the recording over (through the state dir, which both see)."""
    if not _unshare_works():
        pytest.skip("unshare --mount is not permitted here")
    if any(Path(p).resolve().is_relative_to("/tmp") for p in (sys.executable, REPO)):
        pytest.skip("this checkout (or its Python) is under /tmp, which the private /tmp would hide")
    import tempfile

    from tests.processes import can_connect, free_port

    state = Path(tempfile.mkdtemp(prefix="appliance-state-", dir="/var/tmp"))  # outside /tmp: both must see it
    port = free_port()
    log = (tmp_path / "appliance.log").open("w")
    appliance = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs tmpfs /tmp && exec "$@"', "sh", sys.executable, "-m", "appliance", "run",
         "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--metrics-listen", "127.0.0.1:0",
         "--schemas", str(REPO / "schemas" / "v1")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: appliance.poll() is not None or can_connect(port), timeout=60, message="the appliance")
        assert appliance.poll() is None, (tmp_path / "appliance.log").read_text()
        pub = Client(port, version=5).connect()
        pub.publish("sensor/t1/temperature", temperature(), qos=1)
        pub.disconnect()

        out = tmp_path / "export"  # under the caller's /tmp, which the appliance cannot see
        exported = cli("audit", "export", "--state-dir", str(state), "--since", "2000-01-01", "--to", str(out))
        assert exported.returncode == 0, exported.stderr
        assert "exported 1 decisions" in exported.stdout and str(out) in exported.stdout
        files = list((out / "decisions").glob("day=*/*.parquet"))
        assert files, exported.stdout
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/decisions/**/*.parquet')").fetchall() == [(1,)]

        replayed = subprocess.run([str(Path(sys.executable).with_name("replay")), "--state-dir", str(state),
                                   "--against", str(REPO / "schemas" / "v1"), "--format", "json"],
                                  capture_output=True, text=True, timeout=120)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert json.loads(replayed.stdout)["totals"]["replayed"] == 1
    finally:
        appliance.terminate()
        appliance.wait(30)
        log.close()
        shutil.rmtree(state, ignore_errors=True)


def test_purge_refuses_while_an_appliance_holds_the_state_dir_without_answering(tmp_path):
    """A starting appliance holds the state dir's lock before its admin socket is up: an offline
    purge then would rewrite the segment its log writer has open. The CLI says so instead."""
    from appliance.statedir import claim

    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(REPO / "schemas" / "v1"))).start()
    pub = Client(running.port, version=5).connect()
    pub.publish("sensor/t1/temperature", b"{}", qos=1)
    pub.disconnect()
    running.stop()
    lock = claim(state)  # what `appliance run` holds from before its log opens until it has stopped
    try:
        refused = cli("quarantine", "purge", "--all", "--yes", "--state-dir", str(state))
        assert refused.returncode == 1 and "try again" in refused.stderr, refused.stderr
    finally:
        lock.close()
    assert sql(state, "SELECT count(*) AS n FROM quarantine") == [{"n": 1}]  # nothing was rewritten
    purged = cli("quarantine", "purge", "--all", "--yes", "--state-dir", str(state))
    assert purged.returncode == 0 and "purged 1" in purged.stdout
