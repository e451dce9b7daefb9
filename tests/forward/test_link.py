"""The forwarder's own MQTT connection (appliance/forward/link.py) against a real mosquitto and a
silent server: acks, QoS 0, big payloads, keepalive, refusals and the broker's DISCONNECT."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.forward.link import Link, LinkClosed, user_properties
from appliance.mqtt import LocalProtocolError, Properties, PropertyId, ProtocolVersion
from appliance.mqtt.client import Connected
from appliance.mqtt.packets import Connack
from appliance.mqtt.writer import encode_packet
from tests.forward.harness import CloudBroker, Subscriber
from tests.forward.test_resilience import hung_server, read_packet
from tests.helpers import wait_until


def link(port: int, *, protocol: int = 5, keepalive: int = 30, client_id: str = "link-test", **kwargs: object) -> Link:
    return Link("127.0.0.1", port, client_id=client_id, protocol=protocol, keepalive=keepalive, **kwargs)  # type: ignore[arg-type]


def drain(conn: Link, pids: set[int], tokens: set[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (pids or tokens) and time.monotonic() < deadline:
        acked, written = conn.poll(0.05)
        pids -= set(acked)
        tokens -= set(written)
    assert not pids and not tokens, (len(pids), len(tokens))


def poll_until_closed(conn: Link, timeout: float, each: Callable[[], object] = lambda: None) -> None:
    """Poll (calling `each` first) until the link raises LinkClosed; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        each()
        conn.poll(0.05)
    raise AssertionError(f"the link is still open after {timeout:g} s")


@pytest.mark.parametrize("protocol", [4, 5])
def test_qos1_acks_qos0_writes_user_properties_and_big_payloads(tmp_path: Path, protocol: int):
    # 3000 in flight: more than mosquitto's default receive maximum (20), which the client core keeps to.
    broker = CloudBroker(tmp_path / "cloud", extra="max_inflight_messages 0\n").start()
    sub = Subscriber(broker.port, version=5).start()
    try:
        conn = link(broker.port, protocol=protocol)
        conn.connect(5)
        big = bytes(range(256)) * 8192  # 2 MB: many partial writes on a non-blocking socket
        pids = {conn.publish(f"t/{i}", b"m%d" % i, 1, False, user_properties([("n", str(i))])) for i in range(3000)}
        assert len(pids) == 3000 and 0 not in pids and conn.inflight == 3000
        pids.add(conn.publish("t/big", big, 1, False))
        assert conn.publish("t/zero", b"z", 0, False, token=77) == 0
        drain(conn, pids, {77})
        assert conn.inflight == 0
        conn.disconnect()
        wait_until(lambda: sub.count() >= 3002, message="3002 messages at the subscriber")
        messages = sub.messages
        numbered = [m for m in messages if m.topic.startswith("t/") and m.topic[2:].isdigit()]
        # In order (mosquitto may deliver the QoS 0 one ahead of QoS 1 messages still queued for the subscriber).
        assert [m.payload for m in numbered] == [b"m%d" % i for i in range(3000)]
        assert {m.topic: m.payload for m in messages if not m.topic[2:].isdigit()} == {"t/big": big, "t/zero": b"z"}
        user = getattr(numbered[1].properties, "UserProperty", None)
        assert user == ([("n", "1")] if protocol == 5 else None)
    finally:
        sub.stop()
        broker.stop()


def test_packet_ids_wrap_and_skip_those_in_flight(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud", extra="max_inflight_messages 0\n").start()
    try:
        conn = link(broker.port)
        conn.connect(5)
        seen: list[int] = []
        for _ in range(3):  # 90,000 messages: the ids wrap past 65535 and acks still match
            pids = [conn.publish("t", b"x", 1, False) for _ in range(30_000)]
            seen += pids
            drain(conn, set(pids), set())
        assert max(seen) == 65535 and seen[65535] == 1
        conn.disconnect()
    finally:
        broker.stop()
    with hung_server(connack=b"\x20\x02\x00\x00") as (port, _):  # never acknowledges
        conn = link(port, protocol=4)
        conn.connect(5)
        held = [conn.publish("t", b"x", 1, False) for _ in range(65_535)]
        assert sorted(held) == list(range(1, 65_536))  # every id once: none reused while in flight
        conn.close()


def test_keepalive_pings_an_idle_link_and_a_silent_server_is_hung(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    try:
        conn = link(broker.port, keepalive=1)
        conn.connect(5)
        deadline = time.monotonic() + 2.5  # pings at 0.75 s, 1.5 s, 2.25 s; mosquitto closes at 1.5 × keepalive without them
        while time.monotonic() < deadline:
            assert conn.poll(0.05) == ([], [])
        conn.disconnect()
    finally:
        broker.stop()
    with hung_server(connack=b"\x20\x02\x00\x00") as (port, _):
        conn = link(port, protocol=4, keepalive=1)
        conn.connect(5)
        with pytest.raises(LinkClosed, match="no PINGRESP within 1 s"):
            poll_until_closed(conn, 5)
        conn.close()


def test_refused_connect_and_the_brokers_disconnect_say_why(tmp_path: Path):
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    broker = CloudBroker(tmp_path / "cloud", extra=f"allow_anonymous false\npassword_file {passwords}\n").start()
    try:
        for protocol, reason in ((5, "not authorized"), (4, "not authorized")):
            with pytest.raises(LinkClosed, match=f"the cloud broker refused the connection: .*{reason}"):
                link(broker.port, protocol=protocol).connect(5)
    finally:
        broker.stop()
    # mosquitto 2.0 closes without a DISCONNECT; a broker shutting down (EMQX, HiveMQ) sends one
    # and then closes: its reason is what the status shows, not just "connection lost".
    with socket.create_server(("127.0.0.1", 0)) as server:
        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)  # CONNECT
                conn.sendall(b"\x20\x03\x00\x00\x00" + b"\xe0\x02\x8b\x00")  # CONNACK, DISCONNECT 0x8B

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        conn = link(server.getsockname()[1])
        conn.connect(5)
        with pytest.raises(LinkClosed, match=r"sent DISCONNECT: server shutting down \(0x8b\)"):
            poll_until_closed(conn, 5)
        conn.close()
        thread.join(5)


@pytest.mark.parametrize(("ending", "why"), [(b"\xe0\x02\x8b\x00", "sent DISCONNECT"), (b"\x00\x00", "protocol error")])
def test_pubacks_read_with_the_brokers_disconnect_are_handed_over(tmp_path: Path, ending: bytes, why: str):
    """A broker acknowledging messages and then disconnecting (or breaking the protocol), both in
    one read: the client core
    counts the PUBLISHes as acknowledged, so the link hands their packet ids to the caller with
    the LinkClosed (else the messages would be sent again on the next connection)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                read_packet(conn)  # CONNECT
                conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK
                pids: list[int] = []
                while len(pids) < 3:
                    first, body = read_packet(conn)
                    if first >> 4 == 3:  # PUBLISH, QoS 1: topic, packet id
                        n = int.from_bytes(body[:2], "big")
                        pids.append(int.from_bytes(body[2 + n:4 + n], "big"))
                # The PUBACKs and a DISCONNECT (server shutting down) or a packet of a reserved type, in one write.
                conn.sendall(b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid in pids) + ending)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(1024):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        conn = link(server.getsockname()[1])
        conn.connect(5)
        pids = {conn.publish(f"t/{i}", b"m", 1, False) for i in range(3)}
        acked: list[int] = []
        deadline = time.monotonic() + 10
        with pytest.raises(LinkClosed, match=why) as ended:
            while time.monotonic() < deadline:
                acked += conn.poll(0.05)[0]  # in case they arrive in separate reads
        acked += ended.value.acked
        assert sorted(acked) == sorted(pids)
        assert conn.inflight == 0
        conn.close()
        thread.join(5)


def test_receive_maximum_and_unreachable_broker(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud", extra="max_inflight_messages 7\n").start()
    try:
        conn = link(broker.port)
        conn.connect(5)
        assert conn.receive_maximum == 7
        conn.disconnect()
        conn = link(broker.port, protocol=4)
        conn.connect(5)
        assert conn.receive_maximum is None
        conn.disconnect()
        port = broker.port
    finally:
        broker.stop()
    with pytest.raises(LinkClosed, match=f"cannot connect to 127.0.0.1:{port}"):
        link(port).connect(2)


def test_a_broker_that_stops_reading_is_hung_even_at_qos0(tmp_path: Path):
    """QoS 0 has no acknowledgement to time out: bytes that wait `write_timeout` without any being
    written end the connection (the forwarder then reconnects and starts over)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        accepted: list[socket.socket] = []

        def serve() -> None:
            conn, _ = server.accept()
            accepted.append(conn)
            conn.recv(1024)  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK (3.1.1), then never reads again

        threading.Thread(target=serve, daemon=True).start()
        conn = link(server.getsockname()[1], protocol=4, keepalive=30, write_timeout=0.5)
        conn.connect(5)
        with pytest.raises(LinkClosed, match=r"nothing written for 0.5 s \(\d+ bytes waiting\): uplink hung"):
            poll_until_closed(conn, 10, each=lambda: conn.publish("t", b"x" * 65536, 0, False, token=1))
        conn.close()
        for sock in accepted:
            sock.close()


def test_connack_limits_server_keepalive_qos_retain_and_packet_size(tmp_path: Path):
    """An MQTT 5 broker's CONNACK caps what we send: its Server Keep Alive replaces ours, QoS and
    retain are lowered to what it allows, and a message over its Maximum Packet Size is refused
    here (TooLarge) instead of getting the connection closed."""
    from appliance.forward.link import TooLarge

    broker = CloudBroker(tmp_path / "cloud", extra="max_keepalive 10\nmax_qos 0\nretain_available false\nmax_packet_size 1000\n").start()
    sub = Subscriber(broker.port, version=5).start()
    try:
        conn = link(broker.port, keepalive=60)
        conn.connect(5)
        assert (conn.keepalive, conn.maximum_qos, conn.retain_available, conn.maximum_packet_size) == (10, 0, False, 1000)
        assert conn.publish("t/a", b"fits", 1, True, token=5) == 0  # sent at QoS 0, not retained
        with pytest.raises(TooLarge, match="1000"):
            conn.publish("t/b", b"x" * 2000, 1, False)
        with pytest.raises(TooLarge, match="topic of 70000 bytes"):
            conn.publish("t" * 70_000, b"x", 1, False)
        drain(conn, set(), {5})
        def delivered() -> bool:
            conn.poll(0.05)  # the link is ours to drive
            return sub.count() >= 1

        wait_until(delivered, message="the message at the subscriber")
        assert [(m.topic, m.payload, m.retain) for m in sub.messages] == [("t/a", b"fits", False)]
        conn.disconnect()
    finally:
        sub.stop()
        broker.stop()


def test_sockets_numbered_above_1024_work(tmp_path: Path):
    """The proxy holds thousands of client sockets: the link's descriptor may be numbered over
    1024, which select() cannot watch."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [socket.socket() for _ in range(1100)]
    broker = CloudBroker(tmp_path / "cloud").start()
    try:
        conn = link(broker.port)
        conn.connect(5)
        assert conn._sock is not None and conn._sock.fileno() >= 1024  # noqa: SLF001
        drain(conn, {conn.publish("t", b"x", 1, False)}, set())
        conn.disconnect()
    finally:
        broker.stop()
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_pubacks_with_an_error_reason_are_answers_and_counted(tmp_path: Path):
    """mosquitto answers a PUBLISH its ACL forbids with PUBACK 0x87 (MQTT 5): acknowledged, so
    not sent again, and counted by reason for the forwarder's warning."""
    acl = tmp_path / "acl"
    acl.write_text("topic write allowed/#\n")
    broker = CloudBroker(tmp_path / "cloud", extra=f"acl_file {acl}\n").start()
    try:
        conn = link(broker.port)
        conn.connect(5)
        pids = {conn.publish("allowed/a", b"1", 1, False), conn.publish("denied/b", b"2", 1, False)}
        drain(conn, pids, set())
        assert conn.refused == {0x87: 1}
        conn.disconnect()
    finally:
        broker.stop()


def test_close_forgets_what_the_poll_object_watched(tmp_path: Path):
    """close() drops the poll object and what it watched (the socket's mask, the wake descriptor):
    nothing of the closed connection is left to be taken for the state of a new one."""
    broker = CloudBroker(tmp_path / "cloud").start()
    wake_r, wake_w = os.pipe()
    try:
        conn = link(broker.port)
        conn.connect(5)
        conn.publish("t", b"x", 1, False)
        conn.poll(0.01, wake_r)
        assert conn._poller is not None and conn._poll_wake == wake_r
        conn.close()
        assert (conn._poller, conn._poll_mask, conn._poll_wake) == (None, 0, None)
    finally:
        os.close(wake_r)
        os.close(wake_w)
        broker.stop()


def test_a_pingresp_that_arrived_while_the_thread_was_busy_counts(tmp_path: Path):
    """The forwarder thread can be busy (an outbox scan, a slow commit) past the keepalive after a
    PINGREQ: the PINGRESP waiting in the socket is read before the deadline is judged."""
    broker = CloudBroker(tmp_path / "cloud").start()
    try:
        conn = link(broker.port, keepalive=1)
        conn.connect(5)
        def ping_out() -> bool:
            conn.poll(0)  # sends the PINGREQ when due and reads at once (the PINGRESP is not back yet)
            return conn.client.ping_outstanding

        wait_until(ping_out, timeout=5, message="a PINGREQ out")
        time.sleep(1.3)  # busy elsewhere; mosquitto answers meanwhile
        assert conn.poll(0) == ([], [])
        assert not conn.client.ping_outstanding
        conn.disconnect()
    finally:
        broker.stop()


def _connected_link(protocol: int, limits: tuple[tuple[PropertyId, int], ...]) -> Link:
    """A Link whose client has had a CONNACK with these MQTT 5 limits (no socket: publishing only queues)."""
    conn = link(1, protocol=protocol)
    version = ProtocolVersion.MQTT_5 if protocol == 5 else ProtocolVersion.MQTT_3_1_1
    conn.client.connect()
    conn.client.receive_data(encode_packet(Connack(False, 0, Properties(limits if protocol == 5 else ())), version))
    assert isinstance(conn.client.next_event(), Connected)
    return conn


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("limits", [
    (),
    ((PropertyId.MAXIMUM_QOS, 0), (PropertyId.RETAIN_AVAILABLE, 0)),
    ((PropertyId.MAXIMUM_PACKET_SIZE, 300), (PropertyId.RECEIVE_MAXIMUM, 3)),
])
def test_publish_message_queues_the_bytes_publish_would_with_the_same_limits_and_errors(
        protocol: int, limits: tuple[tuple[PropertyId, int], ...]) -> None:
    """The forwarder's publish_message() puts PUBLISHes together from a template per topic and
    user properties: byte for byte what publish() with ("message-id", id) first would queue,
    the same packet ids, QoS and retain lowered and errors raised alike."""
    from appliance.forward.link import TooLarge

    generic, templated = _connected_link(protocol, limits), _connected_link(protocol, limits)
    cases = [
        ("plant/s-1/reading", b'{"t": 21.5}', 1, False, 1 << 40, (("client-id", "s-1"), ("schema", "reading:v1"))),
        ("plant/s-1/reading", b"", 1, True, 5, (("client-id", "s-1"), ("schema", "reading:v1"))),
        ("big", b"y" * 400, 1, False, 7, ()),  # over a 300-byte Maximum Packet Size
        ("plant/s-1/reading", b"x" * 200, 0, True, 6, (("client-id", "s-1"),)),
        ("dé/ünïcode", b"\x00\xff" * 70, 1, False, 123456789012345, (("client-id", "ç/1"),)),
        ("t" * 70_000, b"x", 1, False, 8, ()),  # a topic over 65,535 bytes
        ("no/#/wildcards", b"x", 1, False, 9, ()),  # not a topic name
        ("plant/s-2/reading", b"z" * 60, 1, False, 10, (("client-id", "s-2"),)),
        ("plant/s-2/reading", b"z" * 61, 1, False, 11, (("client-id", "s-2"),)),  # past a receive maximum of 3
    ]
    outcomes = []
    for i, (topic, payload, qos, retain, message_id, user) in enumerate(cases):
        results = []
        for conn in (generic, templated):
            try:
                if conn is generic:
                    result: object = conn.publish(topic, payload, qos, retain,
                                                  user_properties((("message-id", str(message_id)), *user)), token=i)
                else:
                    result = conn.publish_message(topic, payload, qos, retain, message_id, user, token=i)
            except Exception as exc:  # noqa: BLE001 - compared below: the same kind of error, or none
                result = type(exc)
            results.append((result, bytes(conn._out), list(conn._unwritten), conn.inflight))  # noqa: SLF001
        assert results[0] == results[1], (i, results)
        outcomes.append(results[0][0])
    assert TooLarge in outcomes and LocalProtocolError in outcomes
    if protocol == 5 and limits and limits[0] == (PropertyId.MAXIMUM_PACKET_SIZE, 300):
        assert outcomes[2] is TooLarge and outcomes[-1] is LocalProtocolError  # the packet size; the window
