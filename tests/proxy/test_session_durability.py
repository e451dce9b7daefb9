"""Acknowledgements wait for the message log: transcripts with a store whose records become durable
(or fail, as on a full disk) when the test says so. No sockets."""

from __future__ import annotations

import pytest

from appliance.mqtt import Disconnect, Puback, Publish, ReasonCode
from appliance.pipeline import FailedTickets, Message, Policy, Verdict
from appliance.proxy.commands import AwaitDurable
from appliance.proxy.session import SYNC_HINT_INFLIGHT, State
from appliance.names import Metric
from tests.proxy.test_session import V3, V5, RejectBad, Transcript


class Store:
    """A sink handing out tickets, and the Durability the acks wait on."""

    def __init__(self) -> None:
        self.last = 0
        self.settled_seq = 0
        self.last_failed = 0
        self._failed = FailedTickets()
        self.syncs_requested = 0

    def record(self, message: Message, verdict: Verdict, latency_us: int, delivered: bool, policy: Policy) -> int:
        self.last += 1
        return self.last

    def failed(self, seq: int) -> bool:
        return seq in self._failed

    def fail(self, first: int, last: int) -> None:
        self._failed.add(first, last)
        self.last_failed = max(self.last_failed, last)
        self.settled_seq = max(self.settled_seq, last)

    def request_sync(self) -> None:
        self.syncs_requested += 1


def transcript(version, store: Store) -> Transcript:  # noqa: ANN001
    t = Transcript(version, checks=[RejectBad()], durability=store)
    t.session._pipeline.sinks += (store,)
    t.connect()
    return t


@pytest.mark.parametrize("version", [V3, V5])
def test_broker_ack_waits_until_the_record_is_durable(version):
    store = Store()
    t = transcript(version, store)
    t.client(Publish("a/b", b"ok", qos=1, packet_id=1))
    assert t.to_broker() == [Publish("a/b", b"ok", qos=1, packet_id=1)]
    t.broker(Puback(1))
    assert t.to_client() == []
    assert t.session.waiting_for_durability
    store.settled_seq = 1
    t.run(t.session.release_acks())
    assert t.to_client() == [Puback(1)]


def test_failed_record_gets_quota_exceeded_instead_of_success_in_mqtt5():
    store = Store()
    t = transcript(V5, store)
    t.client(Publish("a/b", b"ok", qos=1, packet_id=1), Publish("a/b", b"ok2", qos=1, packet_id=2))
    t.to_broker()
    t.broker(Puback(1), Puback(2))
    store.settled_seq = 1
    store.fail(2, 2)
    t.run(t.session.release_acks())
    first, second = t.to_client()
    assert first == Puback(1)
    assert isinstance(second, Puback) and second.packet_id == 2 and second.reason_code == ReasonCode.QUOTA_EXCEEDED
    assert t.session.state is State.CONNECTED
    assert (Metric.AUDIT_UNAVAILABLE, "") in t.counts


def test_failed_record_closes_a_311_client_without_acknowledging_it():
    store = Store()
    t = transcript(V3, store)
    t.client(Publish("a/b", b"ok", qos=1, packet_id=1), Publish("a/b", b"ok2", qos=1, packet_id=2))
    t.to_broker()
    t.broker(Puback(1), Puback(2))
    store.settled_seq = 1
    store.fail(2, 2)
    t.run(t.session.release_acks())
    assert t.to_client() == [Puback(1)]  # the earlier one was stored: acked; the failed one never
    assert t.session.state is State.CLOSED and t.closed_client


def test_failed_record_of_a_qos2_message_closes_even_in_mqtt5():
    store = Store()
    t = transcript(V5, store)
    t.client(Publish("a/b", b"ok", qos=2, packet_id=7))
    t.to_broker()
    store.fail(1, 1)
    from appliance.mqtt import Pubrec
    t.broker(Pubrec(7))
    assert t.to_client() == [Disconnect(ReasonCode.QUOTA_EXCEEDED)]
    assert t.session.state is State.CLOSED


def test_a_rejected_message_keeps_its_reject_ack_when_its_record_fails():
    store = Store()
    t = transcript(V5, store)
    t.client(Publish("a/b", b"bad", qos=1, packet_id=3))
    store.fail(1, 1)
    t.run(t.session.release_acks())
    [ack] = t.to_client()
    assert ack.reason_code == ReasonCode.PAYLOAD_FORMAT_INVALID  # never a success, nothing to lose


def test_a_client_with_its_window_full_is_blocked_on_durability():
    store = Store()
    t = transcript(V3, store)
    for pid in range(1, SYNC_HINT_INFLIGHT):
        t.client(Publish("a/b", b"ok", qos=1, packet_id=pid))
    assert not t.session.blocked_on_durability
    t.client(Publish("a/b", b"ok", qos=1, packet_id=SYNC_HINT_INFLIGHT))
    assert t.session.blocked_on_durability


def test_a_blocked_client_asks_for_a_sync_before_the_broker_acked_and_only_while_a_record_is_not_durable():
    # Blocked on us as soon as its PUBLISHes are judged: the sync then runs during the broker's round
    # trip. Once its records are durable, what it waits for is the broker: no sync to ask for.
    store = Store()
    t = transcript(V3, store)
    for pid in range(1, SYNC_HINT_INFLIGHT + 1):
        t.client(Publish("a/b", b"ok", qos=1, packet_id=pid))
    assert not t.session.waiting_for_durability  # no broker ack yet
    assert t.session.blocked_on_durability
    assert t.commands[-1] == AwaitDurable(sync_now=True)  # asked for before the broker's ack
    store.settled_seq = store.last
    assert not t.session.blocked_on_durability
    t.client(Publish("a/b", b"ok", qos=1, packet_id=SYNC_HINT_INFLIGHT + 1))
    assert t.session.blocked_on_durability
    for pid in range(1, SYNC_HINT_INFLIGHT + 2):
        t.broker(Puback(pid))
    store.settled_seq = store.last
    t.run(t.session.release_acks())
    assert t.to_client() == [Puback(pid) for pid in range(1, SYNC_HINT_INFLIGHT + 2)]
    assert not t.session.blocked_on_durability


def test_failed_tickets_are_ranges():
    failed = FailedTickets(keep=2)
    failed.add(5, 7)
    failed.add(10, 10)
    assert [s in failed for s in (4, 5, 7, 8, 10, 11)] == [False, True, True, False, True, False]
    failed.add(20, 30)
    assert 5 not in failed and 25 in failed and 10 in failed


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_clocked_by_our_acks_is_blocked_with_one_message_in_flight():
    """A device that sends its next message as soon as it hears back (one at a time) would wait the
    whole sync window per message; one that publishes at its own pace batches syncs."""
    store, clock = Store(), FakeClock()
    t = Transcript(V3, checks=[RejectBad()], durability=store, clock=clock)
    t.session._pipeline.sinks += (store,)
    t.connect()
    t.client(Publish("a/b", b"ok", qos=1, packet_id=1))
    assert not t.session.blocked_on_durability  # its own pace, as far as we know
    t.broker(Puback(1))
    store.settled_seq = 1
    t.run(t.session.release_acks())
    assert t.to_client() == [Puback(1)]
    clock.now += 0.0005  # the next one right after the ack: clocked by our acks
    t.client(Publish("a/b", b"ok", qos=1, packet_id=2))
    assert t.session.blocked_on_durability
    t.broker(Puback(2))
    store.settled_seq = 2
    t.run(t.session.release_acks())
    clock.now += 0.1  # later, at its own pace
    t.client(Publish("a/b", b"ok", qos=1, packet_id=3))
    assert not t.session.blocked_on_durability
