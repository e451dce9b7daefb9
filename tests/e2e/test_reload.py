"""Hot reload: schema and config changes swap in atomically; a broken change keeps the old set."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson

from tests.governance.payloads import temperature
from tests.helpers import Client, RunningAppliance, wait_until
from tests.processes import appliance_process, free_port, output

REPO = Path(__file__).resolve().parents[2]


def reload_results(running: RunningAppliance) -> list[str]:
    return [detail["result"] for kind, detail in running.events if kind == "config_reload"]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp-edit")
    tmp.write_text(text)
    tmp.replace(path)


def setup(tmp_path: Path) -> tuple[Path, Path]:
    schemas = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas" / "v1", schemas)
    config = tmp_path / "appliance.yaml"
    config.write_text("listen: 127.0.0.1:0\nstate_dir: state\nschemas: schemas\nmetrics:\n  listen: 127.0.0.1:0\n")
    return schemas, config


def start(config: Path) -> RunningAppliance:
    from appliance.config import load_config

    return RunningAppliance(load_config(config), config_path=config).start()


def test_schema_change_under_load(tmp_path):
    schemas, config = setup(tmp_path)
    running = start(config)
    try:
        sub = Client(running.port, version=5).connect()
        sub.subscribe("sensor/#", qos=1)
        pub = Client(running.port, version=5, client_id="t1").connect()
        stop = threading.Event()
        sent: list[tuple[bytes, int]] = []  # (payload, PUBACK reason code)

        def publish() -> None:
            seq = 0
            while not stop.is_set():
                payload = temperature(temperature=round(20 + seq * 0.001, 3))
                info = pub.publish("sensor/t1/temperature", payload, qos=1)
                sent.append((payload, pub.acks[info.mid].value))
                seq += 1

        thread = threading.Thread(target=publish)
        thread.start()
        wait_until(lambda: len(sent) > 200, message="traffic before the change")
        schema = schemas / "temperature.json"
        write_atomically(schema, schema.read_text().replace('"maximum": 125', '"maximum": 10'))  # now all rejected
        wait_until(lambda: reload_results(running) == ["ok"], message="reload")
        count_at_reload = len(sent)
        wait_until(lambda: len(sent) > count_at_reload + 200, message="traffic after the change")
        stop.set()
        thread.join(10)
        codes = [code for _, code in sent]
        # Accepted up to the swap, rejected after it: never a mix once the new set is in.
        first_rejected = codes.index(0x99)
        assert all(code < 0x80 for code in codes[:first_rejected])
        assert all(code == 0x99 for code in codes[first_rejected:])
        delivered = [m.payload for m in sub.expect(first_rejected, timeout=20)]
        assert delivered == [payload for payload, _ in sent[:first_rejected]]  # nothing accepted was lost
        sub.expect_none(within=0.3)
        sub.disconnect()
        pub.disconnect()
    finally:
        running.stop()


def test_broken_schema_keeps_the_old_set(tmp_path):
    schemas, config = setup(tmp_path)
    running = start(config)
    try:
        (schemas / "temperature.json").write_text('{"type": "object", ')
        wait_until(lambda: reload_results(running) == ["failed"], message="failed reload")
        [detail] = [d for kind, d in running.events if kind == "config_reload"]
        assert "temperature.json:1" in str(detail["error"])
        assert running.app.reloads == {"failed": 1}
        pub = Client(running.port, version=5).connect()
        assert pub.acks[pub.publish("sensor/t1/temperature", temperature(), qos=1).mid].value < 0x80  # v1 still judges
        assert pub.acks[pub.publish("sensor/t1/temperature", b"{}", qos=1).mid].value == 0x99
        pub.disconnect()
    finally:
        running.stop()


def test_config_change_applies_live_or_says_restart(tmp_path):
    schemas, config = setup(tmp_path)
    running = start(config)
    try:
        config.write_text(config.read_text() + "dry_run: true\n")
        wait_until(lambda: reload_results(running) == ["ok"], message="reload")
        pub = Client(running.port, version=5).connect()
        assert pub.acks[pub.publish("sensor/t1/temperature", b"{}", qos=1).mid].value < 0x80  # dry run: delivered
        config.write_text(config.read_text().replace("listen: 127.0.0.1:0\nstate_dir", "listen: 127.0.0.1:1\nstate_dir"))
        wait_until(lambda: len(reload_results(running)) == 2, message="second reload")
        last = [d for kind, d in running.events if kind == "config_reload"][-1]
        assert last["needs_restart"] == ["listen"]
        pub.disconnect()
    finally:
        running.stop()


def test_sighup_reloads_a_running_process(tmp_path):
    schemas, config = setup(tmp_path)
    port = free_port()
    config.write_text(config.read_text().replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}", 1)
                      + "reload_on_change: false\n")
    with appliance_process(["--config", str(config)], port=port, cwd=tmp_path) as proc:
        def reloads() -> dict[str, int]:
            result = subprocess.run([sys.executable, "-m", "appliance", "status", "--state-dir", str(tmp_path / "state"), "--json"],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr + output(proc)
            return orjson.loads(result.stdout)["reloads"]

        assert reloads() == {}
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads() == {"ok": 1}, message="SIGHUP reload")


def test_a_reload_that_names_another_schema_dir_watches_that_one(tmp_path):
    v1, config = setup(tmp_path)
    v2 = tmp_path / "schemas-v2"
    shutil.copytree(REPO / "schemas" / "v2", v2)
    running = start(config)
    try:
        write_atomically(config, config.read_text().replace("schemas: schemas\n", "schemas: schemas-v2\n"))
        wait_until(lambda: reload_results(running) == ["ok"], message="reload onto v2")
        assert running.app.watcher.schema_dir == v2.resolve()  # no longer v1
        schema = v2 / "temperature.json"
        write_atomically(schema, schema.read_text().replace('"maximum": 125', '"maximum": 10'))
        wait_until(lambda: reload_results(running) == ["ok", "ok"], message="reload after an edit in v2")
        pub = Client(running.port, version=5).connect()
        assert pub.acks[pub.publish("sensor/t1/temperature", temperature(temperature=20), qos=1).mid].value == 0x99
        pub.disconnect()
    finally:
        running.stop()


def test_reverting_a_restart_only_key_needs_no_restart(tmp_path):
    schemas, config = setup(tmp_path)
    running = start(config)
    try:
        original = config.read_text()
        write_atomically(config, original.replace("listen: 127.0.0.1:0\nstate_dir", "listen: 127.0.0.1:1\nstate_dir"))
        wait_until(lambda: len(reload_results(running)) == 1, message="first reload")
        write_atomically(config, original)
        wait_until(lambda: len(reload_results(running)) == 2, message="second reload")
        needs = [d["needs_restart"] for kind, d in running.events if kind == "config_reload"]
        assert needs == [["listen"], []]
    finally:
        running.stop()
