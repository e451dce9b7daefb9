"""The sans-IO client core (appliance/mqtt/client.py) as byte transcripts: what it sends, what it
makes of the server's bytes, and how it answers a server that breaks the protocol. No sockets."""

from __future__ import annotations

import pytest

from appliance.mqtt import (
    LocalProtocolError, Properties, PropertyId, ProtocolVersion, ReasonCode as RC,
    RemoteProtocolError, Subscription,
)
from appliance.mqtt.client import (
    NEED_DATA, Client, ClientState, NeedData, Connected, ConnectionRefused, Disconnected, Event, MessageReceived,
    PacketTooLarge, PingResponse, Published, PublishReceived, ReleaseReceived, ServerLimits, Subscribed,
    Unsubscribed,
)

V311, V5 = ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def events(client: Client, data: bytes) -> list[Event]:
    client.receive_data(data)
    out: list[Event] = []
    while (event := client.next_event()) is not NEED_DATA:
        assert not isinstance(event, NeedData)
        out.append(event)
    return out


def connected(version: ProtocolVersion = V311, connack: str | None = None, **kwargs: object) -> Client:
    client = Client("c", version=version, **kwargs)  # type: ignore[arg-type]
    client.connect()
    default = "2002 0000" if version == V311 else "2003 0000 00"
    [event] = events(client, h(connack or default))
    assert isinstance(event, Connected)
    return client


def test_connect_bytes_311_and_5_with_properties() -> None:
    assert Client("c", keepalive=60).connect() == h("100d 0004 4d515454 04 02 003c 0001 63")
    client = Client("c", version=V5, keepalive=30, clean_start=False, username="u", password=b"p",
                    session_expiry_interval=3600, receive_maximum=10, maximum_packet_size=1 << 20)
    assert client.connect() == h(
        "1021 0004 4d515454 05 c0 001e 0d 1100000e10 21000a 2700100000 0001 63 0001 75 0001 70")
    with pytest.raises(LocalProtocolError, match="session expiry interval needs MQTT 5"):
        Client("c", session_expiry_interval=10)


def test_connack_limits_shape_what_is_published() -> None:
    # Receive maximum 2, maximum QoS 1, no retain, maximum packet size 40, server keepalive 5,
    # assigned client identifier "x".
    client = connected(V5, "2016 0000 13 21 0002 24 01 25 00 27 00000028 13 0005 12 0001 78", keepalive=60)
    assert client.limits == ServerLimits(receive_maximum=2, maximum_qos=1, retain_available=False,
                                         maximum_packet_size=40, server_keepalive=5, assigned_client_id="x")
    assert (client.keepalive, client.client_id, client.state) == (5, "x", ClientState.CONNECTED)
    pid, data = client.publish("t", b"hi", qos=2, retain=True)  # lowered to QoS 1, not retained
    assert (pid, data) == (1, h("3208 000174 0001 00 6869"))
    with pytest.raises(PacketTooLarge, match="41 bytes, the server takes packets up to 40"):
        client.publish("t", b"x" * 33, qos=1)
    assert client.publish("t", b"", qos=1)[0] == 2  # the refused one took no packet id
    assert (client.inflight, client.send_quota) == (2, 0)
    with pytest.raises(LocalProtocolError, match=r"receive maximum \(2\) is reached"):
        client.publish("t", b"", qos=1)
    assert client.publish("t", b"q0", qos=0) == (0, h("3006 000174 00 7130"))  # QoS 0 is not counted
    assert events(client, h("4002 0001 4003 0002 87")) == [Published(1), Published(2, 0x87)]
    client.publish("t", b"", qos=1)
    assert events(client, h("4004 0003 10 00")) == [Published(3, 0x10)]  # no matching subscribers
    assert Published(2, 0x87).refused and client.send_quota == 2
    with pytest.raises(PacketTooLarge, match="topic of 70000 bytes"):
        client.publish("t" * 70_000, b"", qos=1)


def test_publish_bytes_packet_ids_wrap_and_skip_those_in_flight() -> None:
    client = connected()
    user = Properties.user([("k", "v")])
    with pytest.raises(LocalProtocolError, match="properties need MQTT 5"):
        client.publish("t", b"x", 1, properties=user)
    v5 = connected(V5)
    assert v5.publish("a/b", b"x", 1, True, user) == (1, h("3310 0003 612f62 0001 07 260001 6b 000176 78"))
    held, _ = client.publish("t", b"", 1)  # stays in flight through the wrap
    assert held == 1
    pids = []
    for _ in range(65_535 + 10):
        pid, _ = client.publish("t", b"", 1)
        pids.append(pid)
        assert events(client, h("4002") + pid.to_bytes(2, "big")) == [Published(pid)]
    assert pids[:2] == [2, 3] and pids[65_533] == 65_535 and pids[65_534] == 2  # 1 skipped


def test_qos2_flow_both_ways() -> None:
    client = connected(V5)
    pid, _ = client.publish("t", b"x", 2)
    assert events(client, h("5002 0001")) == [PublishReceived(1)]
    assert client.release(1) == h("6202 0001")
    assert events(client, h("7002 0001")) == [Published(1)]
    assert client.inflight == 0
    client.publish("t", b"x", 2)
    assert events(client, h("5003 0002 80")) == [Published(2, 0x80)]  # refused by PUBREC: over
    # The server's QoS 2 message: PUBREC, its PUBREL, PUBCOMP; a resent PUBLISH is a duplicate.
    [received] = events(client, h("3407 000174 0009 00 7a"))
    assert isinstance(received, MessageReceived) and received.publish.packet_id == 9
    assert client.acknowledge(9) == h("5002 0009")
    [again] = events(client, h("3c07 000174 0009 00 7a"))
    assert isinstance(again, MessageReceived) and again.duplicate
    assert client.acknowledge(9) == h("5002 0009")
    assert events(client, h("6202 0009")) == [ReleaseReceived(9)]
    assert client.complete(9) == h("7002 0009")
    [qos1] = events(client, h("3207 000174 000a 00 79"))
    assert isinstance(qos1, MessageReceived) and client.acknowledge(10) == h("4002 000a")
    with pytest.raises(LocalProtocolError):
        client.acknowledge(10)


def test_subscribe_and_unsubscribe() -> None:
    client = connected()
    pid, data = client.subscribe((Subscription("a/#", 1), Subscription("b", 0)))
    assert (pid, data) == (1, h("820c 0001 0003 612f23 01 0001 62 00"))
    assert events(client, h("9004 0001 0180")) == [Subscribed(1, (1, 0x80))]
    pid, data = client.unsubscribe(("a/#",))
    assert (pid, data) == (2, h("a207 0002 0003 612f23"))
    assert events(client, h("b002 0002")) == [Unsubscribed(2)]


def test_keepalive_from_the_clock_passed_in() -> None:
    client = connected(keepalive=60)
    client.sent(100.0)
    assert not client.ping_due(144.9)
    assert client.ping_due(145.0)
    assert client.ping(145.0) == h("c000")
    assert not client.ping_due(200.0)  # one PINGREQ at a time
    assert not client.pingresp_overdue(205.0) and client.pingresp_overdue(205.1)
    assert events(client, h("d000")) == [PingResponse()]
    assert not client.ping_outstanding and not client.pingresp_overdue(300.0)
    assert not connected(keepalive=0).ping_due(1e9)


@pytest.mark.parametrize("version, connack, reason", [
    (V311, "2002 0005", "not authorized"),
    (V311, "2002 0001", "unacceptable protocol version"),
    (V5, "2003 0087 00", "not authorized (0x87)"),
    (V5, "2003 0084 00", "unsupported protocol version (0x84)"),
    (V5, "2003 00f0 00", "0xf0"),
])
def test_connack_refusals(version: ProtocolVersion, connack: str, reason: str) -> None:
    client = Client("c", version=version)
    client.connect()
    [event] = events(client, h(connack))
    assert isinstance(event, ConnectionRefused) and event.reason == reason
    assert client.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError, match="cannot publish while closed"):
        client.publish("t", b"")


def test_the_servers_disconnect_and_ours() -> None:
    client = connected(V5)
    [event] = events(client, h("e002 8b00"))
    assert event == Disconnected(0x8B, "server shutting down (0x8b)")
    assert client.state is ClientState.CLOSED
    assert connected(V5).disconnect(RC.PROTOCOL_ERROR) == h("e001 82")
    assert connected(V311).disconnect(RC.PROTOCOL_ERROR) == h("e000")  # no reason codes in 3.1.1
    assert Client("c").disconnect() == b""  # nothing was sent: nothing to end


@pytest.mark.parametrize("name, version, setup, server, code", [
    ("puback-not-in-flight", V311, [], "4002 0007", RC.PACKET_IDENTIFIER_NOT_FOUND),
    ("puback-for-qos2", V5, [("publish", 2)], "4002 0001", RC.PROTOCOL_ERROR),
    ("pubcomp-before-pubrec", V5, [("publish", 2)], "7002 0001", RC.PROTOCOL_ERROR),
    ("pubrec-for-qos1", V5, [("publish", 1)], "5002 0001", RC.PROTOCOL_ERROR),
    ("suback-unknown", V311, [], "9003 0001 00", RC.PACKET_IDENTIFIER_NOT_FOUND),
    ("suback-wrong-count", V311, [("subscribe", 0)], "9004 0001 0000", RC.PROTOCOL_ERROR),
    ("pubrel-unknown", V311, [], "6202 0003", RC.PACKET_IDENTIFIER_NOT_FOUND),
    ("second-connack", V311, [], "2002 0000", RC.PROTOCOL_ERROR),
    ("pingreq-from-server", V311, [], "c000", RC.PROTOCOL_ERROR),
    ("topic-alias-from-server", V5, [], "3007 0000 03 230001 7a", RC.TOPIC_ALIAS_INVALID),
    ("oversized", V311, [], "3013 0001 74" + "00" * 16, RC.PACKET_TOO_LARGE),
    ("malformed-puback", V311, [("publish", 1)], "4003 0001 00", RC.MALFORMED_PACKET),
    ("puback-leftovers-v5", V5, [("publish", 1)], "4005 0001 00 00 ff", RC.MALFORMED_PACKET),
    ("puback-property-not-allowed", V5, [("publish", 1)], "4006 0001 00 02 2301", RC.PROTOCOL_ERROR),
    ("publish-id-in-use", V311, [], "3205 000174 0001" + "3205 000174 0001", RC.PACKET_IDENTIFIER_IN_USE),
])
def test_a_misbehaving_server_is_a_remote_protocol_error(name: str, version: ProtocolVersion,
                                                          setup: list[tuple[str, int]], server: str, code: RC) -> None:
    client = connected(version, maximum_packet_size=20)
    for action, qos in setup:
        if action == "publish":
            client.publish("t", b"x", qos)
        else:
            client.subscribe((Subscription("t", qos),))
    with pytest.raises(RemoteProtocolError) as caught:
        events(client, h(server))
    assert caught.value.reason_code == code
    assert client.state is ClientState.CLOSED
    assert client.disconnect(caught.value.reason_code)[:1] == b"\xe0"


def test_before_the_connack() -> None:
    client = Client("c")
    client.connect()
    with pytest.raises(RemoteProtocolError, match="PUBACK for packet id 1"):  # nothing is in flight
        events(client, h("4002 0001"))
    client = Client("c", version=V5)
    client.connect()
    assert events(client, h("e002 8700")) == [Disconnected(0x87, "not authorized (0x87)")]
    client = Client("c")
    client.connect()
    with pytest.raises(RemoteProtocolError, match="SUBACK before CONNACK"):
        events(client, h("9003 0001 00"))
    client = Client("c")
    client.connect()
    with pytest.raises(RemoteProtocolError, match="session present after a clean start") as caught:
        events(client, h("2002 0100"))
    assert caught.value.reason_code == RC.PROTOCOL_ERROR
    persistent = Client("c", clean_start=False)
    persistent.connect()
    assert events(persistent, h("2002 0100")) == [Connected(True, ServerLimits())]


def test_the_servers_receive_maximum_is_ours() -> None:
    client = connected(V5, receive_maximum=2)
    events(client, h("3207 000174 0001 00 61 3207 000174 0002 00 62"))
    with pytest.raises(RemoteProtocolError) as caught:
        events(client, h("3207 000174 0003 00 63"))
    assert caught.value.reason_code == RC.RECEIVE_MAXIMUM_EXCEEDED


def test_local_misuse() -> None:
    client = Client("c")
    with pytest.raises(LocalProtocolError, match="cannot publish while new"):
        client.publish("t", b"")
    client.connect()
    with pytest.raises(LocalProtocolError, match="cannot connect while connecting"):
        client.connect()
    with pytest.raises(LocalProtocolError, match="cannot publish while connecting"):
        client.publish("t", b"")
    events(client, h("2002 0000"))
    with pytest.raises(LocalProtocolError, match="no PUBREC to answer"):
        client.release(1)
    with pytest.raises(LocalProtocolError, match="wildcard"):
        client.publish("a/+", b"")
    with pytest.raises(LocalProtocolError, match="payload must be bytes"):
        client.publish("t", "text")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="qos must be 0, 1 or 2"):
        client.publish("t", b"", 3)
    assert client.inflight == 0


TRANSCRIPT = h("2003 0000 00" "4002 0001" "5002 0002" "d000" "3308 000174 0003 00 7a7a" "e000")


def _transcript_events(chunks: list[bytes]) -> list[Event]:
    client = Client("c", version=V5)
    client.connect()
    out: list[Event] = []
    for i, chunk in enumerate(chunks):
        client.receive_data(chunk)
        while (event := client.next_event()) is not NEED_DATA:
            assert not isinstance(event, NeedData)
            out.append(event)
            if isinstance(event, Connected):
                client.publish("t", b"1", 1)
                client.publish("t", b"2", 2)
                client.sent(0.0)
                client.ping(1.0)
    return out


@pytest.mark.parametrize("split", ["whole", "bytewise", "trailing"])
def test_input_whole_byte_at_a_time_and_with_trailing_bytes(split: str) -> None:
    if split == "whole":
        chunks = [TRANSCRIPT]
    elif split == "bytewise":
        chunks = [TRANSCRIPT[i:i + 1] for i in range(len(TRANSCRIPT))]
    else:
        chunks = [TRANSCRIPT + h("4002")]  # half of another packet: waits for more
    got = _transcript_events(chunks)
    assert [type(e) for e in got] == [Connected, Published, PublishReceived, PingResponse, MessageReceived,
                                      Disconnected]
    assert got[1] == Published(1) and got[2] == PublishReceived(2)
    assert isinstance(got[4], MessageReceived) and got[4].publish.payload == b"zz"


def test_user_properties_are_checked() -> None:
    assert Properties.user([("a", "b")]) == Properties(((PropertyId.USER_PROPERTY, ("a", "b")),))
    with pytest.raises(LocalProtocolError, match="USER_PROPERTY"):
        Properties.user([("a", 1)])  # type: ignore[list-item]


def _acks_stream(version: ProtocolVersion) -> bytes:
    """PUBACKs for packet ids 1..12 in flight, in the shapes a server sends (MQTT 5: with a reason
    code, refused ones, with an empty or a real property list), a PINGRESP in between and one
    PUBACK for an id that is not in flight at the end (a protocol error)."""
    if version == V311:
        return h("4002 0001 4002 0002 d000 4002 0003" + "".join(f"4002 {i:04x}" for i in range(4, 13)) + "4002 0063")
    return h("4002 0001 4003 0002 10 d000 4004 0003 87 00 4003 0004 00" + "".join(f"4002 {i:04x}" for i in range(5, 12))
             + "4008 000c 00 04 1f 0001 78" + "4002 0063")  # 12: a reason string; 99: not in flight


def _read_acks(client: Client, chunks: list[bytes], bulk: bool) -> tuple[list[tuple[int, int]], list[object]]:
    acks: list[tuple[int, int]] = []
    others: list[object] = []
    for chunk in chunks:
        client.receive_data(chunk)
        while True:
            if bulk:
                acks += client.next_pubacks()
            try:
                event = client.next_event()
            except RemoteProtocolError:
                others.append(RemoteProtocolError)
                return acks, others
            if event is NEED_DATA:
                break
            if isinstance(event, Published):
                acks.append((event.packet_id, event.reason_code))
            else:
                others.append(type(event))
    return acks, others


@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("split", ["whole", "bytewise", "threes"])
def test_next_pubacks_takes_what_next_event_would_whole_or_in_pieces(version: ProtocolVersion, split: str) -> None:
    """The forwarder's bulk PUBACK read gives the same (packet id, reason code)s in the same order,
    leaves the window as next_event() does, stops at anything else (next_event() then takes it) and
    leaves a PUBACK for an id not in flight to next_event()'s protocol error."""
    stream = _acks_stream(version)
    chunks = {"whole": [stream], "bytewise": [stream[i:i + 1] for i in range(len(stream))],
              "threes": [stream[i:i + 3] for i in range(0, len(stream), 3)]}[split]
    results = []
    for bulk in (False, True):
        client = connected(version)
        for i in range(12):
            client.publish("t", b"%d" % i, 1)
        assert client.inflight == 12
        acks, others = _read_acks(client, chunks, bulk)
        results.append((acks, others, client.inflight, client.send_quota))
    assert results[0] == results[1]
    acks, others, inflight, _ = results[1]
    assert [pid for pid, _ in acks] == list(range(1, 13)) and inflight == 0
    assert others == [PingResponse, RemoteProtocolError]
    if version == V5:
        assert dict(acks)[3] == 0x87 and dict(acks)[2] == 0x10


def test_next_pubacks_compacts_what_it_read() -> None:
    client = connected(V311)
    pids = [client.publish("t", b"x", 1)[0] for _ in range(20_000)]
    client.receive_data(b"".join(h("4002") + pid.to_bytes(2, "big") for pid in pids) + h("40"))
    assert [pid for pid, _ in client.next_pubacks()] == pids
    assert client._frames.buffered == 1 and len(client._frames._buf) == 1  # the half PUBACK left
