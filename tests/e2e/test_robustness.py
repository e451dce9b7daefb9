"""Bad input, many clients and a dying broker: each failure closes only the client it concerns."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from appliance.mqtt import (
    NEED_DATA, Connack, Connect, Decoder, Disconnect, PropertyId, ProtocolVersion, Publish, ReasonCode, Suback,
    Subscribe, Subscription, encode_packet,
)
from appliance.names import Metric
from tests.helpers import Client, RawClient, wait_until


@pytest.fixture
def bystander(appliance):
    """A subscriber and a publisher that must keep working while others misbehave."""
    sub = Client(appliance.port, version=5).connect()
    sub.subscribe("alive/#", qos=1)
    pub = Client(appliance.port, version=5).connect()

    def still_served(tag: str) -> None:
        pub.publish(f"alive/{tag}", tag.encode(), qos=1)
        [got] = sub.expect(1)
        assert got.payload == tag.encode()

    still_served("before")
    yield still_served
    sub.disconnect()
    pub.disconnect()


def test_garbage_bytes_close_only_that_connection(appliance, bystander):
    raw = RawClient(appliance.port)
    raw.send_raw(os.urandom(64) + b"\x00" * 16)
    assert raw.closed_by_peer()
    bystander("after-garbage")


def test_connect_claiming_256mb_is_refused_at_once(appliance, bystander):
    raw = RawClient(appliance.port)
    # Fixed header of a CONNECT whose remaining length is 268,435,455 bytes; nothing else follows.
    raw.send_raw(b"\x10\xff\xff\xff\x7f")
    assert raw.closed_by_peer()
    bystander("after-huge-connect")


def test_publish_over_max_packet_size_gets_0x95(tmp_path):
    from tests.conftest import make_config
    from tests.helpers import RunningAppliance

    running = RunningAppliance(make_config(tmp_path, **{"limits.max_packet_size": 4096})).start()
    try:
        raw = RawClient(running.port)
        raw.send(Connect(client_id="big", protocol_version=ProtocolVersion.MQTT_5))
        connack = raw.receive()
        assert connack.reason_code == 0
        # Advertised, so that a well-behaved MQTT 5 client never sends a larger packet.
        assert connack.properties.get(PropertyId.MAXIMUM_PACKET_SIZE) == 4096
        raw.send(Publish("t", b"x" * 5000, qos=1, packet_id=1))
        assert raw.receive() == Disconnect(ReasonCode.PACKET_TOO_LARGE)
        assert raw.receive() is None
        # Counted and recorded like every other limit (docs/security.md).
        wait_until(lambda: running.app.proxy.counters[(Metric.LIMIT_EXCEEDED, "packet_size")] == 1, message="the count")
        [event] = [detail for kind, detail in running.events if kind == "limit_exceeded"]
        assert event["limit"] == "packet_size" and event["client_id"] == "big" and "5" in str(event["detail"])
    finally:
        running.stop()


def test_connect_and_a_bad_publish_in_one_write(tmp_path, caplog):
    """A client that pipelines CONNECT and a PUBLISH the proxy must refuse gets an answer (MQTT 5: a
    CONNACK with the reason), not a bare EOF, and the close is logged once."""
    import logging

    from tests.conftest import make_config
    from tests.helpers import RunningAppliance

    running = RunningAppliance(make_config(tmp_path, **{"limits.max_packet_size": 4096})).start()
    try:
        with caplog.at_level(logging.INFO, logger="appliance.proxy.server"):
            for name, bad, code in [
                ("big", encode_packet(Publish("t", b"x" * 5000, qos=0), ProtocolVersion.MQTT_5), ReasonCode.PACKET_TOO_LARGE),
                ("malformed", b"\x30\x02\x00\x05", ReasonCode.MALFORMED_PACKET),  # topic length beyond the packet
            ]:
                raw = RawClient(running.port)
                raw.send_raw(encode_packet(Connect(client_id=name, protocol_version=ProtocolVersion.MQTT_5),
                                           ProtocolVersion.MQTT_5) + bad)
                answer = raw.receive()
                assert isinstance(answer, Connack) and answer.reason_code == code, (name, answer)
                assert raw.receive() is None
            bystander = Client(running.port, version=5).connect()  # the appliance still serves others
            bystander.disconnect()
    finally:
        running.stop()  # every flush of those connections (a late broker leg, its CONNACK) has happened
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("closing 'big'", "closing 'malformed'"))]
    assert [line.split(" (")[0] for line in lines] == ["closing 'big'", "closing 'malformed'"], lines


def test_client_that_never_sends_connect_times_out(appliance, bystander):
    raw = RawClient(appliance.port)  # connect_timeout is 1 s in the test config
    assert raw.closed_by_peer()
    bystander("after-silent-client")


def test_disconnect_mid_packet(appliance, bystander):
    raw = RawClient(appliance.port)
    raw.send(Connect(client_id="half", protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive().reason_code == 0
    packet = encode_packet(Publish("alive/half", b"x" * 100, qos=1, packet_id=1), ProtocolVersion.MQTT_5)
    raw.send_raw(packet[:40])
    raw.close()
    bystander("after-half-packet")


def test_first_packet_not_connect(appliance, bystander):
    raw = RawClient(appliance.port)
    raw.send(Publish("alive/x", b"sneaky"))
    assert raw.receive() is None
    bystander("after-no-connect")


def test_protocol_error_after_connect_gets_mqtt5_disconnect(appliance, bystander):
    raw = RawClient(appliance.port)
    raw.send(Connect(client_id="twice", protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive().reason_code == 0
    raw.send(Connect(client_id="twice", protocol_version=ProtocolVersion.MQTT_5))
    assert raw.receive() == Disconnect(ReasonCode.PROTOCOL_ERROR)
    assert raw.receive() is None
    bystander("after-second-connect")


def test_unsupported_protocol_version(appliance):
    raw = RawClient(appliance.port, ProtocolVersion.MQTT_3_1_1)  # the answer every version can read
    raw.send_raw(b"\x10\x0c\x00\x04MQTT\x07\x02\x00\x3c\x00\x00")  # protocol level 7
    assert raw.receive() == Connack(reason_code=1)
    assert raw.receive() is None


def test_500_concurrent_clients(appliance):
    """500 MQTT 5 clients connect at once, each subscribes to its own topic and gets its message."""
    port = appliance.port
    count = 500

    async def one(i: int, ready: asyncio.Barrier) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        decoder = Decoder(version=ProtocolVersion.MQTT_5)

        async def receive():  # noqa: ANN202
            while (packet := decoder.next_packet()) is NEED_DATA:
                data = await reader.read(65536)
                assert data, "connection closed"
                decoder.receive_data(data)
            return packet

        v5 = ProtocolVersion.MQTT_5
        writer.write(encode_packet(Connect(client_id=f"c{i}", protocol_version=v5), v5))
        writer.write(encode_packet(Subscribe(1, (Subscription(f"many/{i}", qos=1),)), v5))
        assert (await receive()).reason_code == 0
        assert isinstance(await receive(), Suback)
        await ready.wait()  # every client is subscribed: now publish to the next one
        writer.write(encode_packet(Publish(f"many/{(i + 1) % count}", f"hello {i}".encode()), v5))
        packet = await receive()
        writer.write(encode_packet(Disconnect(), v5))
        writer.close()
        return packet.payload

    async def main() -> list[bytes]:
        ready = asyncio.Barrier(count)
        return await asyncio.wait_for(asyncio.gather(*(one(i, ready) for i in range(count))), 60)

    payloads = asyncio.run(main())
    assert sorted(payloads) == sorted(f"hello {i}".encode() for i in range(count))


def test_mosquitto_killed_is_restarted_and_clients_reconnect(appliance):
    broker = appliance.app.broker
    old_pid = broker.pid
    sub = Client(appliance.port, version=5).connect()
    sub.subscribe("r/#", qos=1)
    os.kill(old_pid, signal.SIGKILL)
    sub.disconnected.wait(10)
    assert sub.disconnected.is_set(), "client not told that the broker died"
    wait_until(lambda: broker.restarts == 1 and broker.endpoint() is not None, message="mosquitto restarted")
    assert broker.pid != old_pid
    assert any(kind == "broker_restart" for kind, _ in appliance.events)
    sub.paho.loop_stop()
    again = Client(appliance.port, version=5).connect()
    again.subscribe("r/#", qos=1)
    pub = Client(appliance.port, version=5).connect()
    pub.publish("r/1", b"after restart", qos=1)
    [got] = again.expect(1)
    assert got.payload == b"after restart"
    again.disconnect()
    pub.disconnect()


def test_subscriber_that_never_reads_is_contained(tmp_path):
    """Flow control: a stuck subscriber's broker leg stops being read; the proxy's buffer for it
    stays bounded and everyone else is served."""
    from tests.conftest import make_config
    from tests.helpers import RunningAppliance

    high = 64 * 1024
    running = RunningAppliance(make_config(tmp_path, **{"limits.write_buffer_high": high})).start()
    try:
        stuck = RawClient(running.port)
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.send(Connect(client_id="stuck", protocol_version=ProtocolVersion.MQTT_5))
        assert stuck.receive().reason_code == 0
        stuck.send(Subscribe(1, (Subscription("flood/#", qos=0),)))
        assert isinstance(stuck.receive(), Suback)
        # From now on `stuck` reads nothing.
        alive_sub = Client(running.port, version=5).connect()
        alive_sub.subscribe("alive/#", qos=1)
        pub = Client(running.port, version=5).connect()
        chunk = b"x" * 100_000
        for _ in range(300):  # 30 MB towards a client that reads nothing
            pub.publish("flood/x", chunk, qos=0, wait=False)
        pub.publish("alive/1", b"still here", qos=1)
        assert alive_sub.expect(1)[0].payload == b"still here"

        def stuck_leg():  # noqa: ANN202
            legs = [c for c in running.app.proxy.clients if c.session and c.session.client and c.session.client.client_id == "stuck"]
            return legs[0] if legs and legs[0].broker is not None and legs[0].broker._reading_paused else None

        leg = wait_until(stuck_leg, message="the stuck client's broker leg paused")
        # Bounded by the high-water mark plus what one read of the broker leg can bring (uvloop reads
        # up to 256 KiB at a time) plus one message.
        assert leg.transport.get_write_buffer_size() <= high + 256 * 1024 + len(chunk)
        pub.publish("alive/2", b"and still", qos=1)
        assert alive_sub.expect(1)[0].payload == b"and still"
        alive_sub.disconnect()
        pub.disconnect()
        stuck.close()
    finally:
        running.stop()


def test_pipelined_connect_publish_disconnect_then_half_close(appliance):
    """A client that sends everything in one write and shuts its side at once still gets its
    message delivered (the broker leg was still opening when the EOF came)."""
    sub = Client(appliance.port, version=5).connect()
    sub.subscribe("burst/#", qos=1)
    v5 = ProtocolVersion.MQTT_5
    raw = RawClient(appliance.port)
    raw.send_raw(b"".join(encode_packet(p, v5) for p in (
        Connect(client_id="burst", protocol_version=v5), Publish("burst/1", b"one shot"), Disconnect(),
    )))
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.receive().reason_code == 0  # the CONNACK still comes back
    assert sub.expect(1)[0].payload == b"one shot"
    sub.disconnect()
