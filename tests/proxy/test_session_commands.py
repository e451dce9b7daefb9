"""The commands a session returns: their order, one write per leg per input, bytes held for the
broker until its leg is open."""

from __future__ import annotations

from appliance.mqtt import (
    Connack, Connect, Disconnect, Pingreq, Properties, PropertyId, Puback, Publish, ReasonCode, encode_packet,
)
from appliance.proxy.commands import (
    AwaitDurable, CloseBroker, CloseClient, Count, OpenBroker, Record, SendToBroker, SendToClient,
)
from appliance.proxy.session import SYNC_HINT_INFLIGHT, State
from appliance.names import Metric
from tests.proxy.test_session import V5, RejectBad, Transcript
from tests.proxy.test_session_durability import Store


def test_bytes_for_the_broker_wait_for_its_leg_in_one_write():
    t = Transcript(V5, open_broker=False)
    commands = t.session.client_data(encode_packet(Connect(client_id="dev", protocol_version=V5), V5))
    assert commands == [OpenBroker()]
    assert t.session.holds_broker_data
    t.run(t.session.client_data(encode_packet(Pingreq(), V5)))  # the client pipelines
    [send] = t.session.broker_connected()
    assert send == SendToBroker(encode_packet(Connect(client_id="dev", protocol_version=V5), V5) + encode_packet(Pingreq(), V5))
    assert not t.session.holds_broker_data
    assert t.session.client_data(encode_packet(Pingreq(), V5)) == [SendToBroker(encode_packet(Pingreq(), V5))]


def test_a_bad_packet_before_the_broker_leg_opens_drops_the_held_connect():
    t = Transcript(V5, open_broker=False)
    t.client(Connect(client_id="dev", protocol_version=V5))
    t.client_bytes(b"\x00\x00")  # packet type 0 is reserved
    assert not t.session.holds_broker_data  # the broker gets nothing of this connection
    assert t.session.broker_connected() == []
    [connack] = t.to_client()
    assert connack.reason_code == ReasonCode.MALFORMED_PACKET
    assert t.closed_client and t.closed_broker and t.session.state is State.CLOSED


def test_the_packets_before_a_disconnecting_one_are_written_before_the_close():
    t = Transcript(V5, [RejectBad(action="disconnect")])
    t.connect()
    ok = Publish("t", b"ok", qos=1, packet_id=1)
    commands = t.session.client_data(encode_packet(ok, V5) + encode_packet(Publish("t", b"bad", qos=1, packet_id=2), V5))
    assert [type(c) for c in commands] == [SendToClient, SendToBroker, CloseBroker, CloseClient]
    assert commands[1] == SendToBroker(encode_packet(ok, V5))
    reason = Properties(((PropertyId.REASON_STRING, "bad payload"),))
    assert commands[0] == SendToClient(encode_packet(Disconnect(ReasonCode.PAYLOAD_FORMAT_INVALID, reason), V5))
    assert commands[3] == CloseClient("disconnected by policy: bad payload")
    assert t.session.client_data(encode_packet(Pingreq(), V5)) == []  # closed: nothing more is read


def test_notes_come_after_the_client_bytes_and_before_the_close():
    t = Transcript(V5)
    t.client(Connect(client_id="x" * 10, protocol_version=V5))
    t.to_broker()
    t.broker(Connack())
    t.to_client()
    commands = t.session.client_data(b"\x30\xff\xff\xff\x7f")  # a PUBLISH of 256 MB
    assert [type(c) for c in commands] == [SendToClient, Count, Record, CloseBroker, CloseClient]
    assert commands[1] == Count((Metric.LIMIT_EXCEEDED, "packet_size"))


def test_acks_waiting_for_the_log_ask_for_its_commit():
    store = Store()
    t = Transcript(V5, checks=[RejectBad()], durability=store)
    t.session._pipeline.sinks += (store,)
    t.connect()
    t.client(Publish("a/b", b"ok", qos=1, packet_id=1))
    assert t.session.broker_data(encode_packet(Puback(1), V5)) == [AwaitDurable(sync_now=False)]
    for pid in range(2, SYNC_HINT_INFLIGHT + 2):
        t.client(Publish("a/b", b"ok", qos=1, packet_id=pid))
    # The client has its window full: it is blocked on us, the sync is asked for at once.
    assert t.session.broker_data(encode_packet(Puback(2), V5)) == [AwaitDurable(sync_now=True)]
    store.settled_seq = 2
    assert t.session.release_acks() == [SendToClient(encode_packet(Puback(1), V5) + encode_packet(Puback(2), V5))]
