"""`appliance run` and `appliance check` as a user runs them: real processes, stopped by signals."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.broker import render_mosquitto_conf
from tests.helpers import Client
from tests.processes import appliance_process, free_port, mosquitto_process, output, start_appliance

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=60)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _external_config(tmp_path: Path, port: int, broker: str) -> Path:
    config = tmp_path / "appliance.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nstate_dir: state\nmetrics:\n  listen: 127.0.0.1:0\nbroker:\n  mode: external\n{broker}")
    return config


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_until_signal_then_exit_0(tmp_path, signum):
    port = free_port()
    config = tmp_path / "appliance.yaml"
    config.write_text("listen: 127.0.0.1:1\nstate_dir: state\nmetrics:\n  listen: 127.0.0.1:0\nbroker:\n  mode: embedded\n")
    with appliance_process(["--config", str(config), "--listen", f"127.0.0.1:{port}", "--verbose"], port=port) as proc:
        mosquitto = [pid for pid in _children(proc.pid) if "mosquitto" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(mosquitto) == 1
        assert (tmp_path / "state" / "mosquitto" / "mosquitto.conf").exists()  # relative to the config file
        client = Client(port, version=5).connect()
        client.subscribe("x", qos=1)
        client.publish("x", b"1", qos=1)
        client.expect(1)
        proc.send_signal(signum)
        assert proc.wait(20) == 0, output(proc)
        client.disconnected.wait(5)
        assert client.disconnected.is_set()
        assert client.disconnect_reason.value == 0x8B  # MQTT 5: server shutting down
        assert not Path(f"/proc/{mosquitto[0]}").exists() or "zombie" in Path(f"/proc/{mosquitto[0]}/status").read_text()


def test_broken_config_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("listen: 127.0.0.1:1883\nbroker:\n  mode: [oops\n")
    result = _cli("run", "--config", str(config))
    assert result.returncode == 1
    assert f"{config}:4:1: YAML syntax error" in result.stderr  # where PyYAML notices the unclosed list
    config.write_text("listen: 127.0.0.1:1883\nbroker:\n  mode: sideways\nunknown_key: 1\n")
    output = _cli("run", "--config", str(config)).stderr
    assert "broker.mode" in output and "unknown_key" in output


def test_listen_address_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_appliance(["--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "s"),
                                "--metrics-listen", "127.0.0.1:0"])
        assert proc.wait(20) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in output(proc)


def test_external_broker_mode(tmp_path):
    """Front a mosquitto the user runs, with credentials the proxy presents in place of the client's."""
    broker_port, port = free_port(), free_port()
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "gateway", "s3cret"], check=True)
    conf = render_mosquitto_conf(port=broker_port, data_dir=tmp_path / "ext", extra=[]).replace(
        "allow_anonymous true", f"allow_anonymous false\npassword_file {passwd}"
    )
    config = _external_config(tmp_path, port, f"  host: 127.0.0.1\n  port: {broker_port}\n  username: gateway\n  password: s3cret\n")
    with mosquitto_process(conf, tmp_path / "ext", broker_port), appliance_process(["--config", str(config)], port=port) as proc:
        sub = Client(port, version=4)
        sub.paho.username_pw_set("someone", "their-own")
        sub.connect()
        sub.subscribe("ext/#", qos=1)
        pub = Client(port, version=5).connect()
        pub.publish("ext/1", b"through", qos=1)
        assert sub.expect(1)[0].payload == b"through"
        assert _children(proc.pid) == []  # no embedded mosquitto in external mode
        sub.disconnect()
        pub.disconnect()


def _tls_mosquitto(port: int, certs: object, *, require_certificate: bool) -> str:
    return (
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
        f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"  # type: ignore[attr-defined]
        + ("require_certificate true\n" if require_certificate else "")
    )


def test_external_broker_over_mutual_tls(tmp_path):
    from tests.tls import make_certificates

    certs = make_certificates(tmp_path / "certs")
    broker_port, port = free_port(), free_port()
    config = _external_config(tmp_path, port, (
        f"  host: localhost\n  port: {broker_port}\n"
        f"  tls:\n    ca_file: {certs.ca}\n    cert_file: {certs.client_cert}\n    key_file: {certs.client_key}\n"
    ))
    with mosquitto_process(_tls_mosquitto(broker_port, certs, require_certificate=True), tmp_path / "ext", broker_port), \
            appliance_process(["--config", str(config)], port=port):
        sub = Client(port, version=5).connect()
        sub.subscribe("tls/#", qos=1)
        pub = Client(port, version=4).connect()
        pub.publish("tls/1", b"encrypted upstream", qos=1)
        assert sub.expect(1)[0].payload == b"encrypted upstream"
        sub.disconnect()
        pub.disconnect()


def test_external_broker_with_wrong_ca_refuses_clients_cleanly(tmp_path):
    from tests.tls import make_certificates

    certs = make_certificates(tmp_path / "certs")
    other = make_certificates(tmp_path / "other", ca_name="Other CA")
    broker_port, port = free_port(), free_port()
    config = _external_config(tmp_path, port, f"  host: localhost\n  port: {broker_port}\n  tls:\n    ca_file: {other.ca}\n")
    with mosquitto_process(_tls_mosquitto(broker_port, certs, require_certificate=False), tmp_path / "ext", broker_port), \
            appliance_process(["--config", str(config)], port=port) as proc:
        client = Client(port, version=5)
        client.connect(expect_success=False)
        assert client.connect_result.value == 0x88  # Server unavailable: the broker could not be reached
        client.paho.loop_stop()
        proc.terminate()
        proc.wait(20)
    assert "certificate verify failed" in output(proc).lower()


def test_check_demo_config_and_sets():
    result = _cli("check", "--config", str(REPO / "fixtures" / "demo" / "appliance.yaml"))
    assert result.returncode == 0, result.stderr
    assert "schema set v1" in result.stdout and "ok" in result.stdout
    result = _cli("check", "--schemas", str(REPO / "schemas" / "v2"))
    assert result.returncode == 0 and "schema set v2" in result.stdout


def test_check_and_run_refuse_a_broken_set(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(REPO / "schemas" / "v1", broken)
    (broken / "temperature.json").write_text('{"type": "object",')
    result = _cli("check", "--schemas", str(broken))
    assert result.returncode == 1
    assert f"{broken / 'temperature.json'}:1:" in result.stderr
    result = _cli("run", "--schemas", str(broken), "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
                  "--metrics-listen", "127.0.0.1:0")
    assert result.returncode == 1 and "temperature.json" in result.stderr
    assert not (tmp_path / "s" / "mosquitto").exists()  # refused before starting anything


def test_check_needs_something_to_check():
    result = _cli("check")
    assert result.returncode == 2 and "--config" in result.stderr


def test_check_names_every_missing_file(tmp_path):
    config = tmp_path / "appliance.yaml"
    config.write_text(
        "auth:\n  password_file: passwd\n  acl_file: acl\n"
        "listeners:\n  - listen: 127.0.0.1:8883\n    tls: {cert_file: server.pem, key_file: server.key}\n"
        "broker:\n  mode: external\n  port: 1883\n  tls: {ca_file: broker-ca.pem}\n"
        "upstream:\n  url: mqtts://cloud.example:8883\n  tls: {ca_file: cloud-ca.pem, cert_file: gw.pem, key_file: gw.key}\n"
    )
    result = _cli("check", "--config", str(config))
    assert result.returncode == 1, result.stdout
    for key, name in [("auth.password_file", "passwd"), ("auth.acl_file", "acl"),
                      ("listeners[0].tls.cert_file", "server.pem"), ("listeners[0].tls.key_file", "server.key"),
                      ("broker.tls.ca_file", "broker-ca.pem"), ("upstream.tls.ca_file", "cloud-ca.pem"),
                      ("upstream.tls.cert_file", "gw.pem"), ("upstream.tls.key_file", "gw.key")]:
        assert f"{key}: {tmp_path / name}: No such file or directory" in result.stderr, result.stderr
    assert "ok" not in result.stdout


def test_check_names_a_file_that_is_not_what_it_should_be(tmp_path):
    (tmp_path / "broker-ca.pem").write_text("not a certificate\n")
    config = tmp_path / "appliance.yaml"
    config.write_text("broker:\n  mode: external\n  port: 1883\n  tls: {ca_file: broker-ca.pem}\n")
    result = _cli("check", "--config", str(config))
    assert result.returncode == 1 and f"broker.tls: {tmp_path / 'broker-ca.pem'}" in result.stderr, result.stderr


def test_external_broker_tls_error_names_the_file(tmp_path):
    config = _external_config(tmp_path, free_port(), "  port: 1883\n  tls: {ca_file: missing-ca.pem}\n")
    result = _cli("run", "--config", str(config))
    assert result.returncode == 1
    assert f"{tmp_path / 'missing-ca.pem'}: No such file or directory" in result.stderr, result.stderr


def test_a_state_dir_it_cannot_write_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("a file, not a directory\n")
    state = tmp_path / "afile" / "state"  # cannot be created, even by root (tests run as root)
    result = _cli("run", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and str(state) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_second_appliance_on_the_same_state_dir_is_a_one_line_error(tmp_path):
    port, state = free_port(), tmp_path / "state"
    with appliance_process(["--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--metrics-listen", "127.0.0.1:0"],
                           port=port) as first:
        result = _cli("run", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
        assert result.returncode == 1
        assert "Traceback" not in result.stderr and str(state) in result.stderr and "another appliance" in result.stderr, \
            result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert first.poll() is None  # the first one is unharmed
        assert Client(port, version=5).connect().disconnect() is None
