"""`appliance run` under a stand-in for systemd: the notify socket sees READY, WATCHDOG, RELOADING
and STOPPING, and the embedded mosquitto (which speaks sd_notify too) stays quiet."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import scaled

ROOT = Path(__file__).resolve().parents[2]


def test_appliance_run_talks_to_systemd(tmp_path: Path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(scaled(30))
    config = tmp_path / "appliance.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nstate_dir: {tmp_path / 'state'}\nschemas: {ROOT / 'schemas' / 'v1'}\n"
                      "metrics:\n  listen: 127.0.0.1:0\n")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000")
    received: list[str] = []

    def until(prefix: str) -> str:
        while True:
            message = notify.recv(4096).decode()
            received.append(message)
            if message.startswith(prefix):
                return message

    with notify, (tmp_path / "log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                                   env=env, stderr=log, cwd=ROOT)
        try:
            ready = until("READY=1")
            assert "STATUS=serving MQTT on 127.0.0.1:" in ready and "schema set v1" in ready
            until("WATCHDOG=1")
            process.send_signal(signal.SIGHUP)
            assert until("RELOADING=1\nMONOTONIC_USEC=")
            until("READY=1")
            process.send_signal(signal.SIGTERM)
            until("STOPPING=1")
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    # Only the appliance's own messages: mosquitto did not inherit $NOTIFY_SOCKET.
    firsts = [message.split("\n")[0] for message in received if message != "WATCHDOG=1"]
    assert firsts == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], (tmp_path / "log").read_text()
