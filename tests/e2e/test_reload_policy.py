"""A reload swaps one frozen policy (checks, dry run, revision): every decision record carries the
revision of the config and schema set that judged it, even for messages judged while the reload
is still revoking withdrawn access (which awaits the broker)."""

from __future__ import annotations

import shutil
import threading
from collections import defaultdict
from pathlib import Path

from appliance.audit.records import DECISION, Definitions
from appliance.config import load_config
from appliance.msglog.reader import read_log
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message
from appliance.security import PasswordFile
from tests.governance.payloads import temperature
from tests.helpers import Client, RunningAppliance, wait_until

REPO = Path(__file__).resolve().parents[2]
_SCHEMA_SET, _REVISION, _TOPIC = (DECISION.names.index(n) for n in ("schema_set", "config_revision", "topic"))


def test_no_verdict_is_recorded_under_a_mismatched_revision_across_a_reload(tmp_path):
    schemas = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas" / "v1", schemas)
    passwd = tmp_path / "passwd"
    users = PasswordFile(path=passwd)
    users.set("alice", "alice-pw")
    users.set("bob", "bob-pw")
    users.save()
    config_file = tmp_path / "appliance.yaml"
    config_file.write_text(f"listen: 127.0.0.1:0\nstate_dir: state\nschemas: schemas\nmetrics:\n  enabled: false\n"
                           f"reload_on_change: false\nauth:\n  allow_anonymous: false\n  password_file: {passwd}\n")
    running = RunningAppliance(load_config(config_file), config_path=config_file).start()
    app = running.app
    window: list[int] = []

    def judge_in_the_window(kind: str, detail: dict[str, object]) -> None:
        # Called on the loop while the reload revokes bob's access, just before it awaits the broker
        # to discard his session: a message judged now must be recorded under the new policy.
        if kind == "access_revoked":
            message = Message("sensor/window/temperature", temperature("window"), 1, False,
                              ClientInfo("window", "alice", "127.0.0.1:1", ProtocolVersion.MQTT_5))
            window.append(app.pipeline.judge(message).ticket)

    app.add_event_callback(judge_in_the_window)
    try:
        bob = Client(running.port, version=5, client_id="bob")
        bob.paho.username_pw_set("bob", "bob-pw")
        bob.connect()
        alice = Client(running.port, version=5, client_id="alice")
        alice.paho.username_pw_set("alice", "alice-pw")
        alice.connect()
        stop = threading.Event()

        def publish() -> None:  # real traffic before, during and after the reload
            n = 0
            while not stop.is_set():
                alice.publish("sensor/t1/temperature", temperature(temperature=20 + n % 10), qos=1)
                n += 1

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        wait_until(lambda: app.verdicts.counts["accept"] >= 20, message="traffic before the reload")
        old_revision = app.revision
        manifest = schemas / "manifest.yaml"
        manifest.write_text(manifest.read_text().replace("version: v1", "version: v2"))
        users.delete("bob")
        users.save()
        assert running.call(app.reload("test"))
        assert bob.disconnected.wait(10)
        new_revision = app.revision
        assert new_revision != old_revision and window
        before = app.verdicts.counts["accept"]
        wait_until(lambda: app.verdicts.counts["accept"] >= before + 20, message="traffic after the reload")
        stop.set()
        publisher.join(10)
        alice.disconnect()
        assert app.audit is not None
        running.call(app.audit.sync())
    finally:
        running.stop()

    revisions: dict[str | None, set[str]] = defaultdict(set)
    window_records = []
    definitions = Definitions()  # decisions refer to connection and context records (record version 2)
    for record in read_log(tmp_path / "state" / "log"):
        found = definitions.row(record.seq, record.kind, record.body)
        if found is None or found[0] is not DECISION:
            continue
        row = found[1]
        revisions[row[_SCHEMA_SET]].add(row[_REVISION])
        if row[_TOPIC] == "sensor/window/temperature":
            window_records.append((record.seq, row[_SCHEMA_SET], row[_REVISION]))
    # Each schema set version was recorded under exactly one revision: its own.
    assert dict(revisions) == {"v1": {old_revision}, "v2": {new_revision}}
    assert window_records == [(window[0], "v2", new_revision)]
