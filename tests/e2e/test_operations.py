"""What an operator sees: Prometheus metrics, health endpoints and `appliance status`."""

from __future__ import annotations

import json
import os
import platform
import socket
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import make_config
from tests.governance.payloads import temperature
from tests.helpers import TIMEOUT_SCALE, Client, RunningAppliance, wait_until

REPO = Path(__file__).resolve().parents[2]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        if metric_name == name and ",".join(sorted(label_text.rstrip("}").split(","))) == wanted:
            return float(value)
    return None


def test_metrics_and_health(tmp_path):
    running = RunningAppliance(make_config(tmp_path / "state", schemas=str(REPO / "schemas" / "v1"))).start()
    try:
        port = running.app.metrics_server.port
        pub = Client(running.port, version=5).connect()
        pub.publish("sensor/t1/temperature", temperature(), qos=1)
        pub.publish("sensor/t1/temperature", b"{}", qos=1)
        pub.publish("events/x", b"free", qos=1)
        code, text = get(port, "/metrics")
        assert code == 200
        valid = metric(text, "mqtt_proxy_messages_total", status="valid", topic_filter="sensor/+/temperature", schema="temperature:v1")
        invalid = metric(text, "mqtt_proxy_messages_total", status="invalid", topic_filter="sensor/+/temperature", schema="temperature:v1")
        assert (valid, invalid) == (1.0, 1.0)
        assert metric(text, "mqtt_proxy_messages_total", status="valid", topic_filter="none", schema="none") == 1.0
        assert metric(text, "mqtt_proxy_validation_duration_seconds_count") == 3.0
        assert metric(text, "mqtt_proxy_connection_status") == 1.0
        assert metric(text, "mqtt_proxy_connected_clients") == 1.0
        assert metric(text, "mqtt_proxy_uptime_seconds") > 0
        assert metric(text, "mqtt_proxy_quarantine_size_bytes") is not None
        assert metric(text, "mqtt_proxy_audit_healthy") == 1.0
        assert metric(text, "mqtt_proxy_state_dir_free_bytes") > 0
        # What every exporter has, from prometheus_client's own collectors.
        rss = metric(text, "process_resident_memory_bytes")
        # Under qemu-user (make test-arm64) /proc/self/stat reports an RSS of 0: only its presence counts there.
        assert rss is not None and (rss > 10_000_000 or TIMEOUT_SCALE > 1)
        assert metric(text, "process_open_fds") > 0
        assert 'python_info{' in text
        build = next(line for line in text.splitlines() if line.startswith("mqtt_proxy_build_info{"))
        assert 'version="0.1.0"' in build and f'machine="{platform.machine()}"' in build and build.endswith(" 1.0")
        assert get(port, "/healthz") == (200, "ok\n")
        code, body = get(port, "/readyz")
        assert code == 200 and json.loads(body)["checks"]["schema_set"] == "v1"
        pub.disconnect()

        os.kill(running.app.broker.pid, signal.SIGKILL)
        wait_until(lambda: running.app.broker.restarts == 1 and running.app.broker.endpoint() is not None,
                   message="mosquitto restarted")
        text = get(port, "/metrics")[1]
        assert metric(text, "mqtt_proxy_broker_restarts_total") == 1.0
    finally:
        running.stop()


def get6(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://[::1]:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def test_metrics_on_ipv6_loopback(tmp_path):
    running = RunningAppliance(make_config(tmp_path / "state", **{"metrics.listen": "[::1]:0"})).start()
    try:
        port = running.app.metrics_server.port
        assert get6(port, "/healthz") == (200, "ok\n")
        code, text = get6(port, "/metrics")
        assert code == 200 and "mqtt_proxy_uptime_seconds" in text
    finally:
        running.stop()


def test_metrics_port_in_use_says_so(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "appliance.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nstate_dir: state\nmetrics:\n  listen: 127.0.0.1:{port}\n")
    try:
        result = subprocess.run([sys.executable, "-m", "appliance", "run", "--config", str(config)], capture_output=True,
                                text=True, timeout=120)
    finally:
        taken.close()
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use by another program" in result.stderr
    assert "metrics.listen" in result.stderr


def test_node_exporter_port_is_named():
    from appliance.metrics import _in_use

    assert "node_exporter" in _in_use("0.0.0.0", 9100) and "node_exporter" not in _in_use("0.0.0.0", 9200)
    assert _in_use("::1", 9100).startswith("[::1]:9100 ")


def test_readyz_is_503_while_the_broker_is_down(tmp_path):
    # A broker restart delay long enough to observe the gap.
    config = make_config(tmp_path / "state", **{"broker.restart_backoff_initial": 30})
    running = RunningAppliance(config).start()
    try:
        port = running.app.metrics_server.port
        os.kill(running.app.broker.pid, signal.SIGKILL)
        wait_until(lambda: running.app.broker.endpoint() is None, message="broker seen down")
        code, body = get(port, "/readyz")
        assert code == 503 and json.loads(body)["checks"]["broker"] is False
    finally:
        running.stop()


def test_appliance_status_command(tmp_path):
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state, schemas=str(REPO / "schemas" / "v1"))).start()
    try:
        pub = Client(running.port, version=4).connect()
        pub.publish("sensor/t1/temperature", temperature(), qos=1)
        pub.disconnect()
        result = subprocess.run([sys.executable, "-m", "appliance", "status", "--state-dir", str(state), "--json"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["ready"] is True and report["messages"] == {"accept": 1}
        human = subprocess.run([sys.executable, "-m", "appliance", "status", "--state-dir", str(state)],
                               capture_output=True, text=True, timeout=30)
        assert "ready: True" in human.stdout and "schema_set: v1" in human.stdout
    finally:
        running.stop()
    stopped = subprocess.run([sys.executable, "-m", "appliance", "status", "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 1 and "no appliance" in stopped.stderr


def test_ctrl_c_stops_without_a_broker_crash(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group, mosquitto included: that is a
    stop, not a crash to log as an ERROR and restart."""
    from tests.processes import can_connect, free_port

    port, state = free_port(), tmp_path / "state"
    log = tmp_path / "out.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--listen", f"127.0.0.1:{port}",
                                 "--state-dir", str(state), "--metrics-listen", "127.0.0.1:0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: proc.poll() is None and can_connect(port) or proc.poll() is not None, timeout=30,
                       message="the appliance listening")
            assert proc.poll() is None, log.read_text()
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            [mosquitto] = [int(pid) for pid in children if "mosquitto" in Path(f"/proc/{pid}/comm").read_text()]
            # Whether mosquitto or the appliance handles the SIGINT first is a race; the broker must
            # not get it at all (its own process group), so that only the appliance decides to stop it.
            assert os.getpgid(mosquitto) != proc.pid
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "mosquitto exited" not in text and "ERROR" not in text, text
    events = subprocess.run([sys.executable, "-m", "appliance", "audit", "sql", "--state-dir", str(state), "--format", "json",
                             "SELECT kind FROM events WHERE kind LIKE 'broker_%'"], capture_output=True, text=True, timeout=60)
    assert events.returncode == 0, events.stderr
    assert json.loads(events.stdout)["rows"] == []
