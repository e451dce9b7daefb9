"""MQTT over WebSockets listeners end to end: paho-mqtt (`transport="websockets"`) and the
`websockets` library's client through the appliance to its real mosquitto, verdicts read back from
the audit log."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from appliance.audit.query import AuditQuery
from appliance.config import ConfigError
from appliance.mqtt import (
    NEED_DATA, Connack, Connect, Decoder, ProtocolVersion, Puback, Publish, ReasonCode, Suback, Subscribe, Subscription, encode_packet,
)
from appliance.config.base import Address
from appliance.simulate import parse_broker, simulate_command
from appliance.names import Metric
from tests.conftest import make_config
from tests.governance.payloads import temperature
from tests.helpers import TIMEOUT, Client, RunningAppliance, wait_until
from tests.tls import Certificates, make_certificates

REPO = Path(__file__).resolve().parents[2]
V5 = ProtocolVersion.MQTT_5
MAX_PACKET = 64 * 1024
GOOD, BAD = temperature(), temperature(temperature=999)  # schemas/v1: the second is out of range


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, certs: Certificates) -> Iterator[RunningAppliance]:
    """Plain TCP on `listen`, then ws://…/mqtt, then wss://…/ws with client certificates naming the user,
    then ws://…/mqtt for pages of one origin."""
    state = tmp_path_factory.mktemp("ws") / "state"
    config = make_config(state, schemas=str(REPO / "schemas" / "v1"), **{
        "limits.max_packet_size": MAX_PACKET, "limits.connect_timeout": 1.0,
        "listeners": [
            {"listen": "127.0.0.1:0", "transport": "websockets"},
            {"listen": "127.0.0.1:0", "transport": "websockets", "path": "/ws", "tls": {
                "cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "ca_file": str(certs.ca),
                "require_client_certificate": True, "use_identity_as_username": "cn"}},
            {"listen": "127.0.0.1:0", "transport": "websockets", "allowed_origins": ["https://Dashboard.example:8443"]},
        ],
    })
    running = RunningAppliance(config).start()
    try:
        yield running
    finally:
        running.stop()


def ws_port(gateway: RunningAppliance) -> int:
    assert gateway.app.proxy is not None
    return gateway.app.proxy.listeners[1].port


def wss_port(gateway: RunningAppliance) -> int:
    assert gateway.app.proxy is not None
    return gateway.app.proxy.listeners[2].port


def ws_client(port: int, *, version: int = 4, client_id: str = "", path: str = "/mqtt",
              tls: dict[str, Any] | None = None) -> Client:
    """The tests' paho helper, its paho client replaced by one speaking MQTT over WebSockets."""
    client = Client(port, version=version, client_id=client_id)
    protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
    ws = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, transport="websockets")
    ws.ws_set_options(path=path)
    if tls is not None:
        ws.tls_set(**tls)
    for name in ("on_connect", "on_disconnect", "on_message", "on_subscribe", "on_publish"):
        setattr(ws, name, getattr(client.paho, name))
    client.paho = ws
    return client


def audit_rows(gateway: RunningAppliance, sql: str) -> list[tuple[Any, ...]]:
    with AuditQuery(gateway.app.config.state_dir) as audit_log:
        return [tuple(row) for row in audit_log.query(sql).rows]


@contextmanager
def raw_ws(port: int) -> Iterator[RawWs]:
    with connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], compression=None,  # type: ignore[list-item]
                 open_timeout=TIMEOUT) as ws:
        yield RawWs(ws)


class RawWs:
    """The websockets library's client speaking our MQTT codec: exact frames for bad input."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.decoder = Decoder(version=V5)

    def mqtt_connect(self, client_id: str) -> None:
        self.ws.send(encode_packet(Connect(client_id=client_id, protocol_version=V5), V5))
        assert isinstance(self.receive(), Connack)

    def receive(self) -> Any:
        while (packet := self.decoder.next_packet()) is NEED_DATA:
            data = self.ws.recv(timeout=TIMEOUT)
            assert isinstance(data, bytes), f"a text frame from the appliance: {data!r}"
            self.decoder.receive_data(data)
        return packet

    def closed_with(self) -> int | None:
        """The close code the appliance sent once it closed the connection."""
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                self.ws.recv(timeout=TIMEOUT)
        return closed.value.rcvd.code if closed.value.rcvd is not None else None


def publish(topic: str, payload: bytes, pid: int, qos: int = 1) -> bytes:
    return encode_packet(Publish(topic=topic, payload=payload, qos=qos, packet_id=pid if qos else None), V5)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1])
def test_paho_over_websockets_is_governed_and_audited(gateway: RunningAppliance, version: int, qos: int) -> None:
    client_id = f"ws-{version}-{qos}"
    sub = ws_client(ws_port(gateway), version=version).connect()
    sub.subscribe("sensor/+/temperature", qos=1)
    pub = ws_client(ws_port(gateway), version=version, client_id=client_id).connect()
    infos = [pub.publish("sensor/t1/temperature", payload, qos=qos) for payload in (GOOD, BAD, GOOD)]
    [first, second] = sub.expect(2)
    assert (first.payload, second.payload) == (GOOD, GOOD)
    if qos == 1:  # the rejected message is answered too; MQTT 5 says why
        rejected = pub.acks[infos[1].mid]
        assert rejected.value == (ReasonCode.PAYLOAD_FORMAT_INVALID if version == 5 else 0)
    pub.disconnect()
    sub.disconnect()
    query = f"SELECT verdict, qos, mqtt_version FROM decisions WHERE client_id = '{client_id}' ORDER BY id"
    wait_until(lambda: len(audit_rows(gateway, query)) >= 3, message="three verdicts in the audit log")
    assert audit_rows(gateway, query) == [("accept", qos, version), ("reject", qos, version), ("accept", qos, version)]


def test_wss_with_a_client_certificate_names_the_user(gateway: RunningAppliance, certs: Certificates) -> None:
    tls = {"ca_certs": str(certs.ca), "certfile": str(certs.client_cert), "keyfile": str(certs.client_key)}
    pub = ws_client(wss_port(gateway), version=5, client_id="wss-1", path="/ws", tls=tls).connect()
    sub = Client(gateway.port, version=5).connect()  # a TCP client sees what a WebSocket client sent
    sub.subscribe("sensor/#", qos=1)
    info = pub.publish("sensor/t1/temperature", GOOD, qos=1)
    assert pub.acks[info.mid].value == 0
    assert sub.expect(1)[0].payload == GOOD
    pub.disconnect()
    sub.disconnect()
    assert audit_rows(gateway, "SELECT username, verdict FROM decisions WHERE client_id = 'wss-1'") == [("sensor-1", "accept")]
    # Without a client certificate the TLS handshake fails, as on a TCP listener.
    context = ssl.create_default_context(cafile=str(certs.ca))
    with pytest.raises((OSError, WebSocketException)):  # ssl.SSLError is an OSError
        with connect(f"wss://localhost:{wss_port(gateway)}/ws", ssl=context, subprotocols=["mqtt"],  # type: ignore[list-item]
                     open_timeout=TIMEOUT) as ws:
            ws.recv(timeout=TIMEOUT)


@pytest.mark.parametrize(("path", "subprotocols", "status", "text"), [
    ("/mqtt", ["mqttv3.1"], 400, "invalid subprotocol; expected one of mqtt"),
    ("/mqtt", None, 400, "missing subprotocol"),
    ("/other", ["mqtt"], 404, "the path is /mqtt"),
])
def test_handshake_refusals_are_clear(gateway: RunningAppliance, path: str, subprotocols: list[str] | None,
                                      status: int, text: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{ws_port(gateway)}{path}", subprotocols=subprotocols, open_timeout=TIMEOUT)  # type: ignore[arg-type]
    response = refused.value.response
    assert response.status_code == status
    assert text in response.body.decode()


@pytest.mark.parametrize(("origin", "status"), [
    ("https://dashboard.example:8443", 101),  # origins compare without case
    (None, 101),  # not a browser: its credentials decide
    ("https://evil.example", 403),
    ("http://dashboard.example:8443", 403),
    ("null", 403),  # a sandboxed page or a file
])
def test_allowed_origins_refuse_other_sites_pages(gateway: RunningAppliance, origin: str | None, status: int) -> None:
    assert gateway.app.proxy is not None
    port = gateway.app.proxy.listeners[3].port
    headers = {"Origin": origin} if origin is not None else None
    if status == 101:
        with connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], origin=origin,  # type: ignore[list-item,arg-type]
                     open_timeout=TIMEOUT) as ws:
            raw = RawWs(ws)
            raw.mqtt_connect(f"origin-{status}")
        return
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], additional_headers=headers,  # type: ignore[list-item]
                open_timeout=TIMEOUT)
    response = refused.value.response
    assert response.status_code == 403 and f"Origin {origin} may not connect" in response.body.decode()
    # The listeners without allowed_origins take any page (documented: set it where browsers reach).
    with connect(f"ws://127.0.0.1:{ws_port(gateway)}/mqtt", subprotocols=["mqtt"], additional_headers=headers,  # type: ignore[list-item]
                 open_timeout=TIMEOUT) as ws:
        RawWs(ws).mqtt_connect("origin-any")


def test_many_packets_in_one_frame_and_one_packet_over_many_frames(gateway: RunningAppliance) -> None:
    sub = Client(gateway.port, version=5).connect()
    sub.subscribe("sensor/#", qos=1)
    with raw_ws(ws_port(gateway)) as raw:
        many_packets_in_one_frame_and_one_packet_over_many_frames(raw)
    assert [m.payload for m in sub.expect(4)] == [GOOD] * 4
    sub.disconnect()


def many_packets_in_one_frame_and_one_packet_over_many_frames(raw: RawWs) -> None:
    # CONNECT and three PUBLISHes in one frame: CONNACK, then three acknowledgements.
    raw.ws.send(encode_packet(Connect(client_id="frames-1", protocol_version=V5), V5)
                + b"".join(publish("sensor/t1/temperature", payload, pid) for pid, payload in ((1, GOOD), (2, BAD), (3, GOOD))))
    assert isinstance(raw.receive(), Connack)
    acks = [raw.receive() for _ in range(3)]
    assert [(a.packet_id, a.reason_code) for a in acks] == [(1, 0), (2, ReasonCode.PAYLOAD_FORMAT_INVALID), (3, 0)]
    assert all(isinstance(a, Puback) for a in acks)
    # One PUBLISH a few bytes per message, then one as a fragmented message (continuation frames).
    packet = publish("sensor/t1/temperature", GOOD, 4)
    for start in range(0, len(packet), 7):
        raw.ws.send(packet[start:start + 7])
    assert raw.receive().packet_id == 4
    fragmented = publish("sensor/t1/temperature", GOOD, 5)
    raw.ws.send([fragmented[i:i + 5] for i in range(0, len(fragmented), 5)])
    assert raw.receive().packet_id == 5


def test_a_text_frame_closes_with_1003_and_nothing_else_is_affected(gateway: RunningAppliance) -> None:
    bystander = ws_client(ws_port(gateway), version=5, client_id="bystander-1").connect()
    bystander.subscribe("sensor/#", qos=1)
    with raw_ws(ws_port(gateway)) as raw:
        raw.mqtt_connect("texter-1")
        raw.ws.send(publish("sensor/t1/temperature", GOOD, 1))
        assert raw.receive().packet_id == 1  # fine so far
        raw.ws.send("{\"temperature\": 1}")
        assert raw.closed_with() == 1003
    closed = wait_until(lambda: [d for kind, d in gateway.events
                                 if kind == "client_disconnected" and d["client_id"] == "texter-1"],
                        message="client_disconnected of the texter")
    assert "text frame" in str(closed[0]["reason"]) and "1003" in str(closed[0]["reason"])
    # The bystander got the message sent before, and still works.
    assert bystander.expect(1)[0].payload == GOOD
    info = bystander.publish("sensor/t1/temperature", GOOD, qos=1)
    assert bystander.acks[info.mid].value == 0 and bystander.expect(1)[0].payload == GOOD
    bystander.disconnect()


def test_an_oversized_frame_closes_with_1009_and_counts_as_the_packet_size_limit(gateway: RunningAppliance) -> None:
    assert gateway.app.proxy is not None
    before = gateway.app.proxy.counters[(Metric.LIMIT_EXCEEDED, "packet_size")]
    with raw_ws(ws_port(gateway)) as raw:
        raw.mqtt_connect("big-1")
        raw.ws.send(b"\x00" * (MAX_PACKET + 1))
        assert raw.closed_with() == 1009
    wait_until(lambda: gateway.app.proxy is not None and gateway.app.proxy.counters[(Metric.LIMIT_EXCEEDED, "packet_size")] == before + 1,
               message="the packet_size limit counted")
    event = [d for kind, d in gateway.events if kind == "limit_exceeded" and "WebSocket frame" in str(d.get("detail"))]
    assert event and event[-1]["limit"] == "packet_size"
    with raw_ws(ws_port(gateway)) as other:  # others are not affected
        other.mqtt_connect("big-2")
        other.ws.send(publish("sensor/t1/temperature", GOOD, 1))
        assert other.receive().packet_id == 1


def test_simulate_over_websockets(gateway: RunningAppliance) -> None:
    before = gateway.app.verdicts.counts.copy()
    result = CliRunner().invoke(simulate_command, ["--sensors", "4", "--rate", "50", "--invalid-rate", "0.25",
                                                   "--broker", f"ws://127.0.0.1:{ws_port(gateway)}/mqtt",
                                                   "--duration", "0.5", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert f"-> ws://127.0.0.1:{ws_port(gateway)}/mqtt" in result.output
    counts = gateway.app.verdicts.counts
    accepted, rejected = counts["accept"] - before["accept"], counts["reject"] - before["reject"]
    assert accepted > 0 and rejected > 0
    assert f"acked (accepted): {accepted}" in result.output and f"rejected: {rejected}" in result.output
    assert parse_broker("ws://gw") == (Address(host="gw", port=80), "/mqtt")
    assert parse_broker("gw") == (Address(host="gw", port=1883), None)
    with pytest.raises(ValueError, match="ws://HOST:PORT/PATH"):
        parse_broker("wss://gw/mqtt")


@pytest.mark.parametrize("clean", [True, False])
def test_the_will_follows_how_the_websocket_client_left(gateway: RunningAppliance, clean: bool) -> None:
    watcher = Client(gateway.port, version=5).connect()
    watcher.subscribe(f"events/{clean}/#", qos=1)
    device = ws_client(ws_port(gateway), version=5, client_id=f"will-{clean}")
    device.will(f"events/{clean}/will", b"offline", qos=1).connect()
    if clean:
        device.disconnect()  # DISCONNECT, then a close frame: no will
    else:
        device.paho.loop_stop()  # the TCP connection gone without a close frame: the will goes out
        raw = device.paho.socket()._socket  # type: ignore[union-attr]  # under paho's WebSocket wrapper
        raw.shutdown(socket.SHUT_RDWR)
        raw.close()
    if not clean:
        assert watcher.expect(1)[0].topic == f"events/{clean}/will"
    marker = Client(gateway.port, version=5).connect()
    marker.publish(f"events/{clean}/marker", b"m", qos=1)
    assert watcher.expect(1)[0].topic == f"events/{clean}/marker"
    watcher.expect_none()
    watcher.disconnect()
    marker.disconnect()


def test_a_handshake_that_never_finishes_is_closed_by_the_connect_timeout(gateway: RunningAppliance) -> None:
    with socket.create_connection(("127.0.0.1", ws_port(gateway)), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: gw\r\n")  # and nothing more
        assert sock.recv(1024) == b""  # closed after limits.connect_timeout, without an answer


@pytest.mark.parametrize("after_connect", [False, True])
def test_a_close_frame_from_the_client_is_answered(gateway: RunningAppliance, after_connect: bool) -> None:
    with raw_ws(ws_port(gateway)) as raw:
        if after_connect:
            raw.mqtt_connect("closer-1")
        raw.ws.close()
        close = raw.ws.protocol.close_rcvd
        assert close is not None and close.code == 1000


def test_a_websocket_subscriber_that_never_reads_is_contained(gateway: RunningAppliance) -> None:
    """Flow control through the WebSocket layer: the stuck client's broker leg stops being read."""
    v5 = ProtocolVersion.MQTT_5
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{ws_port(gateway)}/mqtt"), subprotocols=[Subprotocol("mqtt")])
    sock = socket.create_connection(("127.0.0.1", ws_port(gateway)), timeout=TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    decoder = Decoder(version=v5)

    def send(*packets: Any) -> None:
        for packet in packets:
            protocol.send_binary(encode_packet(packet, v5))
        sock.sendall(b"".join(protocol.data_to_send()))

    def receive() -> Any:
        while (packet := decoder.next_packet()) is NEED_DATA:
            protocol.receive_data(sock.recv(65536))
            for event in protocol.events_received():
                if isinstance(event, Frame):
                    decoder.receive_data(bytes(event.data))
        return packet

    protocol.send_request(protocol.connect())
    sock.sendall(b"".join(protocol.data_to_send()))
    while protocol.state is not State.OPEN:
        protocol.receive_data(sock.recv(65536))
    send(Connect(client_id="stuck-ws", protocol_version=v5), Subscribe(1, (Subscription("events/flood", qos=0),)))
    assert isinstance(receive(), Connack) and isinstance(receive(), Suback)
    # From now on the stuck client reads nothing.
    alive = Client(gateway.port, version=5).connect()
    alive.subscribe("events/alive", qos=1)
    pub = Client(gateway.port, version=5).connect()
    chunk = b"x" * 50_000
    for _ in range(200):  # 10 MB towards a client that reads nothing
        pub.publish("events/flood", chunk, qos=0, wait=False)
    pub.publish("events/alive", b"still here", qos=1)
    assert alive.expect(1)[0].payload == b"still here"
    assert gateway.app.proxy is not None
    proxy = gateway.app.proxy

    def stuck_leg() -> Any:
        legs = [c for c in proxy.clients if c.session and c.session.client and c.session.client.client_id == "stuck-ws"]
        return legs[0] if legs and legs[0].broker is not None and legs[0].broker._reading_paused else None

    leg = wait_until(stuck_leg, message="the stuck WebSocket client's broker leg paused")
    high = gateway.app.config.limits.write_buffer_high
    assert leg.transport.get_write_buffer_size() <= high + 256 * 1024 + 2 * len(chunk)
    alive.disconnect()
    pub.disconnect()
    sock.close()


@pytest.mark.parametrize(("listener", "message"), [
    ({"listen": "127.0.0.1:8083", "path": "/mqtt"}, "path needs transport: websockets"),
    ({"listen": "127.0.0.1:8083", "transport": "websockets", "path": "mqtt"}, "an HTTP path like /mqtt"),
    ({"listen": "127.0.0.1:8083", "transport": "websocket"}, "transport"),
    ({"listen": "127.0.0.1:8083", "allowed_origins": ["https://a.example"]}, "allowed_origins needs transport: websockets"),
    ({"listen": "127.0.0.1:8083", "transport": "websockets", "allowed_origins": ["https://a.example/page"]}, "an origin like"),
    ({"listen": "127.0.0.1:8083", "transport": "websockets", "allowed_origins": ["a.example"]}, "an origin like"),
])
def test_listener_config_errors(tmp_path: Path, listener: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, listeners=[listener])
    ok = make_config(tmp_path, listeners=[{"listen": "127.0.0.1:8083", "transport": "websockets"}]).listeners[0]
    assert (ok.websocket_path, ok.tls) == ("/mqtt", None)
