"""The per-client limits: in flight, the message rate's token bucket, what the CONNACK advertises."""

from __future__ import annotations

import pytest

from appliance.mqtt import Properties, PropertyId
from appliance.proxy.commands import Count, Notes, Record
from appliance.proxy.limits import MAX_THROTTLE_PAUSE_S, MessageRate, SessionLimits, advertised, inflight_exceeded
from appliance.names import Metric


def test_inflight_limit():
    notes = Notes("p")
    assert not inflight_exceeded(SessionLimits(), 10_000, notes)  # 0: no limit
    assert not inflight_exceeded(SessionLimits(max_inflight=2), 1, notes)
    assert notes.commands == []
    assert inflight_exceeded(SessionLimits(max_inflight=2), 2, notes)
    assert [type(c) for c in notes.commands] == [Count, Record]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_pauses_for_the_debt_and_records_once():
    clock, notes = Clock(), Notes("p")
    rate = MessageRate(SessionLimits(message_rate=10, message_burst=2), clock, notes)
    assert [rate.take(), rate.take()] == [0.0, 0.0]  # the burst
    assert rate.take() == pytest.approx(0.1)
    assert rate.take() == pytest.approx(0.2)
    clock.now += 0.5  # five tokens back, at most the burst
    assert [rate.take(), rate.take()] == [0.0, 0.0]
    assert rate.take() == pytest.approx(0.1)
    assert [c.key for c in notes.commands if isinstance(c, Count)] == [(Metric.LIMIT_EXCEEDED, "message_rate")] * 3
    assert len([c for c in notes.commands if isinstance(c, Record)]) == 1  # one event per connection


def test_one_pause_is_bounded():
    rate = MessageRate(SessionLimits(message_rate=1, message_burst=1), Clock(), Notes("p"))
    pauses = [rate.take() for _ in range(5)]
    assert pauses[-1] == MAX_THROTTLE_PAUSE_S  # the debt (4 s) carries over; the pause does not


def test_connack_advertises_the_proxy_limits():
    limits = SessionLimits(max_inflight=5, max_packet_size=1000)
    broker = Properties(((PropertyId.RECEIVE_MAXIMUM, 20), (PropertyId.MAXIMUM_PACKET_SIZE, 5000)))
    props = advertised(broker, limits)
    assert (props.get(PropertyId.RECEIVE_MAXIMUM), props.get(PropertyId.MAXIMUM_PACKET_SIZE)) == (5, 1000)
    stricter = Properties(((PropertyId.RECEIVE_MAXIMUM, 3), (PropertyId.MAXIMUM_PACKET_SIZE, 500)))
    assert advertised(stricter, limits) is stricter  # the broker's own are lower: unchanged
    assert advertised(Properties.EMPTY, SessionLimits(max_packet_size=1000)).get(PropertyId.RECEIVE_MAXIMUM) is None
