"""Access control and limits with real clients (paho, raw sockets) through a running appliance."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest

from appliance.mqtt import Connack, Connect, ProtocolVersion, Publish, ReasonCode, encode_packet
from appliance.names import Metric
from tests.conftest import make_config
from tests.helpers import Client, RawClient, RunningAppliance, wait_until
from tests.tls import make_certificates

V5 = ProtocolVersion.MQTT_5

ACL = """
user alice
topic readwrite alice/#
topic read public/#
user sensor-1
topic readwrite s/#
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def secured(tmp_path, certs):
    passwd = tmp_path / "passwd"
    if shutil.which("mosquitto_passwd"):
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "alice", "alice-pw"], check=True)
    else:  # pragma: no cover - the Makefile installs mosquitto-clients
        from appliance.security import PasswordFile
        p = PasswordFile(path=passwd)
        p.set("alice", "alice-pw")
        p.save()
    (tmp_path / "acl").write_text(ACL)
    config = make_config(tmp_path / "state", **{
        "auth.allow_anonymous": False, "auth.password_file": str(passwd), "auth.acl_file": str(tmp_path / "acl"),
        "listeners": [{"listen": "127.0.0.1:0", "tls": {
            "cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "ca_file": str(certs.ca),
            "require_client_certificate": True, "use_identity_as_username": "cn"}}],
        "limits.max_connections_per_address": 40,
    })
    running = RunningAppliance(config).start()
    running.certs = certs
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("version", [4, 5])
def test_passwords_from_mosquitto_passwd(secured, version):
    good = Client(secured.port, version=version, client_id="a1")
    good.paho.username_pw_set("alice", "alice-pw")
    good.connect()
    good.disconnect()
    bad = Client(secured.port, version=version, client_id="a2")
    bad.paho.username_pw_set("alice", "nope")
    bad.connect(expect_success=False)
    assert bad.connect_result.value == ReasonCode.BAD_USER_NAME_OR_PASSWORD  # paho maps 3.1.1 code 4 to 0x86
    anonymous = Client(secured.port, version=version, client_id="a3").connect(expect_success=False)
    assert anonymous.connect_result.value == ReasonCode.NOT_AUTHORIZED  # 3.1.1: code 5
    for c in (bad, anonymous):
        c.paho.loop_stop()
    wait_until(lambda: [e for e in secured.events if e[0] == "auth_failed"][1:], message="auth_failed events")
    assert secured.app.proxy.counters[(Metric.AUTH_FAILURES, "bad_credentials")] >= 1  # paho may retry


@pytest.mark.parametrize("version", [4, 5])
def test_acl_on_subscribe_and_publish(secured, version):
    alice = Client(secured.port, version=version, client_id="alice-1")
    alice.paho.username_pw_set("alice", "alice-pw")
    alice.connect()
    codes = alice.subscribe([("secret/#", 1), ("alice/in", 1), ("#", 0), ("public/x", 0)])
    values = [getattr(c, "value", c) for c in codes]
    failure = ReasonCode.NOT_AUTHORIZED if version == 5 else 0x80
    assert values == [failure, 1, failure, 0]
    alice.publish("alice/in", b"mine", qos=1)
    assert alice.expect(1)[0].payload == b"mine"
    denied = alice.publish("public/x", b"not mine", qos=1)
    if version == 5:
        assert alice.acks[denied.mid].value == ReasonCode.NOT_AUTHORIZED
    alice.expect_none()
    _, verdict = secured.verdicts.recent[-1]
    assert not verdict.accepted and verdict.reasons[0].check == "acl"
    alice.disconnect()


def test_tls_client_certificate_names_the_user(secured):
    port = secured.app.proxy.listeners[1].port
    certs = secured.certs
    device = Client(port, version=5, client_id="dev-1")
    device.paho.tls_set(ca_certs=str(certs.ca), certfile=str(certs.client_cert), keyfile=str(certs.client_key))
    device.connect()  # no password: the certificate (CN sensor-1) is the credential
    assert [getattr(c, "value", c) for c in device.subscribe([("s/#", 1), ("alice/#", 1)])] == [1, ReasonCode.NOT_AUTHORIZED]
    device.publish("s/t", b"hello", qos=1)
    assert device.expect(1)[0].payload == b"hello"
    device.disconnect()
    # Without a client certificate the connection fails (TLS 1.3 reports it at the first read).
    context = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(encode_packet(Connect(client_id="dev-2", protocol_version=V5), V5))
                assert tls.recv(1024) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass


def test_embedded_mosquitto_refuses_anyone_but_the_appliance(secured):
    endpoint = secured.app.broker.endpoint()
    raw = RawClient(endpoint.port)
    raw.send(Connect(client_id="bypass", protocol_version=V5))
    assert raw.receive().reason_code in (ReasonCode.NOT_AUTHORIZED, ReasonCode.BAD_USER_NAME_OR_PASSWORD)
    raw = RawClient(endpoint.port)
    raw.send(Connect(client_id="bypass", protocol_version=V5, username="appliance", password=b"guess"))
    assert raw.receive().reason_code != 0
    conf = (secured.app.config.state_dir / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "password_file" in conf


def test_connections_per_address(secured):
    socks = [socket.create_connection(("127.0.0.1", secured.port)) for _ in range(40)]
    wait_until(lambda: len(secured.app.proxy.clients) == 40, message="40 connections counted")
    extra = RawClient(secured.port)
    assert extra.closed_by_peer()
    assert secured.app.proxy.counters[(Metric.LIMIT_EXCEEDED, "connections_per_address")] == 1
    for sock in socks:
        sock.close()
    wait_until(lambda: not secured.app.proxy.per_address, message="address count back to zero")


def test_reconnect_storm_with_one_client_id(appliance):
    baseline = len(appliance.app.proxy.clients)
    raws = []
    for _ in range(60):
        raw = RawClient(appliance.port)
        raw.send(Connect(client_id="same-id", protocol_version=V5))
        raws.append(raw)
    # mosquitto keeps the last one (session takeover: the others get DISCONNECT 0x8E and are closed).
    last = raws[-1]
    assert isinstance(last.receive(), Connack)
    for raw in raws[:-1]:
        raw.receive_all()
    last.send(Publish("storm/ping", b"x", qos=0))
    wait_until(lambda: len(appliance.app.proxy.clients) == baseline + 1, message="only the last connection left")
    last.close()
    wait_until(lambda: len(appliance.app.proxy.clients) == baseline, message="no leaked legs")
    Client(appliance.port, version=5).connect().disconnect()  # still responsive


def test_partial_packet_after_connect_ends_with_the_keepalive(appliance):
    raw = RawClient(appliance.port)
    raw.send(Connect(client_id="slow", protocol_version=V5, keepalive=1))
    assert raw.receive().reason_code == 0
    packet = encode_packet(Publish("slow/t", b"x" * 1000, qos=1, packet_id=1), V5)
    raw.send_raw(packet[:100])  # and never the rest
    [leg] = [c for c in appliance.app.proxy.clients if c.session and c.session.client and c.session.client.client_id == "slow"]
    assert leg.session.buffered[0] <= appliance.app.config.limits.max_packet_size
    # mosquitto drops the client after 1.5 x keepalive without a complete packet; the proxy follows.
    packets = raw.receive_all()  # returns once the connection is closed
    assert all(getattr(p, "reason_code", None) == ReasonCode.KEEP_ALIVE_TIMEOUT for p in packets), packets
    wait_until(lambda: leg not in appliance.app.proxy.clients, message="the slow client's legs released")


def test_limits_and_refusals_are_metrics(secured):
    import urllib.request

    bad = Client(secured.port, version=5, client_id="m1")
    bad.paho.username_pw_set("alice", "nope")
    bad.connect(expect_success=False)
    bad.paho.loop_stop()
    wait_until(lambda: secured.app.proxy.counters[(Metric.AUTH_FAILURES, "bad_credentials")], message="counted")
    port = secured.app.metrics_server.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'mqtt_proxy_auth_failures_total{reason="bad_credentials"}' in text


def test_reload_revokes_withdrawn_read_rights_and_their_broker_session(secured, tmp_path):
    """After the ACL stops granting alice/#, alice's open connection is closed and her persistent
    session is gone from the broker: reconnecting with the same id delivers nothing on alice/#."""
    from tests.forward.harness import _session_expiry

    def as_alice(**kwargs):  # noqa: ANN003, ANN202
        client = Client(secured.port, version=5, **kwargs)
        client.paho.username_pw_set("alice", "alice-pw")
        return client

    alice = as_alice(client_id="alice-phone", clean=False, properties=_session_expiry()).connect()
    alice.subscribe("alice/#", qos=1)
    (tmp_path / "acl").write_text(ACL.replace("topic readwrite alice/#\n", "topic write alice/#\n"))
    assert secured.call(secured.app.reload("test"))
    assert alice.disconnected.wait(10)
    assert alice.disconnect_reason.value == ReasonCode.NOT_AUTHORIZED
    alice.paho.loop_stop()
    assert any(kind == "access_revoked" for kind, _ in secured.events)
    writer = as_alice().connect()
    writer.publish("alice/x", b"after the revocation", qos=1)
    again = as_alice(client_id="alice-phone", clean=False, properties=_session_expiry()).connect()
    again.expect_none(within=0.5)
    again.disconnect()
    writer.disconnect()
