"""The local republisher against a real mosquitto that is down, comes up, and goes away: dead letters
wait in a bounded queue, are sent once the broker is there, and what cannot be sent is dropped,
counted and reported; the sink itself never waits."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from appliance.broker import BrokerEndpoint
from appliance.deadletter.republisher import DeadLetterSink, Letter, LocalRepublisher
from appliance.republish import DeadLetter, parse_template
from appliance.mqtt import ProtocolVersion, ReasonCode
from appliance.mqtt.properties import Properties
from appliance.pipeline import ClientInfo, Message, Reason, Verdict
from tests.forward.harness import CloudBroker, Subscriber
from tests.helpers import wait_until


class Loop:
    """An event loop in a thread, as the appliance runs the republisher's caller."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, func, *args):  # noqa: ANN001, ANN201
        async def call():  # noqa: ANN202
            return func(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def wait(self, coro, timeout: float = 30):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop():
    running = Loop()
    yield running
    running.close()


def letter(n: int, qos: int = 1) -> Letter:
    return Letter(n, f"deadletter/t/{n}", f"payload {n}".encode(), qos, False, Properties.EMPTY)


def test_queued_while_the_broker_is_down_sent_when_it_is_up(tmp_path: Path, loop: Loop):
    broker = CloudBroker(tmp_path / "broker")
    up = threading.Event()
    dropped: list[tuple[int | None, str]] = []
    republisher = LocalRepublisher(lambda: BrokerEndpoint("127.0.0.1", broker.port) if up.is_set() else None,
                                   on_drop=lambda item, reason: dropped.append((item.verdict_id, reason)), max_queue=5)
    consumer = None
    try:
        accepted = [loop.run(republisher.submit, letter(n, qos=n % 2)) for n in range(7)]
        assert accepted == [True] * 5 + [False] * 2  # the bound: the caller drops (and reports) the rest
        assert republisher.queued == 5 and republisher.published == 0 and not republisher.connected
        broker.start()
        consumer = Subscriber(broker.port, "deadletter/#").start()
        up.set()
        wait_until(lambda: consumer.count() >= 5, timeout=30, message="queued dead letters delivered")
        assert [m.payload for m in consumer.messages] == [f"payload {n}".encode() for n in range(5)]  # in order
        wait_until(lambda: republisher.published == 5, message="counted")
        assert republisher.queued == 0 and republisher.connected and dropped == []

        # The broker goes away: the next ones wait again, and are sent once it is back.
        broker.stop()
        wait_until(lambda: not republisher.connected, message="connection lost seen")
        assert loop.run(republisher.submit, letter(10)) and loop.run(republisher.submit, letter(11))
        broker.start()
        wait_until(lambda: b"payload 11" in consumer.payloads(), timeout=30, message="sent after the restart")
        assert b"payload 10" in consumer.payloads()
    finally:
        loop.wait(republisher.stop())
        if consumer is not None:
            consumer.stop()
        broker.stop()
    assert dropped == []


def test_what_is_left_at_stop_is_dropped_and_reported(loop: Loop):
    dropped: list[tuple[int | None, str]] = []
    republisher = LocalRepublisher(lambda: None, on_drop=lambda item, reason: dropped.append((item.verdict_id, reason)))
    assert loop.run(republisher.submit, letter(1)) and loop.run(republisher.submit, letter(2))
    loop.wait(republisher.stop())
    wait_until(lambda: len(dropped) == 2, message="drops reported on the loop")
    assert [verdict_id for verdict_id, _ in dropped] == [1, 2]
    assert "stopped" in dropped[0][1] and republisher.dropped == 2
    assert not loop.run(republisher.submit, letter(3))  # stopped: refused at once


CLIENT = ClientInfo("t1", None, "127.0.0.1:5000", ProtocolVersion.MQTT_5)


def _dead_letter(**kwargs: object) -> DeadLetter:
    parts = parse_template("deadletter/{topic}", lambda message: pytest.fail(message))
    assert parts is not None
    return DeadLetter("deadletter/{topic}", parts, **kwargs)  # type: ignore[arg-type]


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []

    def append(self, kind: int, body: bytes) -> int:
        self.records.append((kind, body))
        return 100 + len(self.records)


def test_the_sink_republishes_only_live_rejections():
    from appliance.audit.records import FORWARD_ONLY

    events: list[tuple[str, dict[str, object]]] = []
    log = Log()
    sink = DeadLetterSink(local=None, log=log, verdict_id=lambda: 42, on_event=lambda k, d: events.append((k, d)))
    dead = _dead_letter(local=False, cloud=True, envelope=False)
    verdict = Verdict.reject(Reason("schema", "bad"), schema="temperature:v1", dead_letter=dead)
    message = Message("sensor/t1/temperature", b"{}", 1, False, CLIENT, received_at=1.0)
    # Not republished: a release that fails again, a will, an acceptance, a verdict without dead letter.
    assert sink.record(message._replace(released_from=7), verdict, 0, False) == 0
    assert sink.record(message._replace(is_will=True), verdict, 0, False) == 0
    assert sink.record(message, Verdict(True, dead_letter=dead), 0, True) == 0
    assert sink.record(message, Verdict.reject(Reason("schema", "bad")), 0, False) == 0
    # Nor a rejection for the mapping's rate limit: a flood past it would become a flood of dead letters.
    limited = Verdict.reject(Reason("rule", "rate"), reason_code=ReasonCode.QUOTA_EXCEEDED, dead_letter=dead)
    assert sink.record(message, limited, 0, False) == 0
    assert log.records == [] and events == []
    # A live rejection: the forward-only record is its ticket (the publisher's ack waits for it).
    assert sink.record(message, verdict, 0, False) == 101
    [(kind, body)] = log.records
    assert kind == FORWARD_ONLY.code
    assert FORWARD_ONLY.decode(body) == (42, 1.0, "t1", "deadletter/sensor/t1/temperature", b"{}", 1, False, "temperature:v1")
    assert [kind for kind, _ in events] == ["dead_letter"]
    # Local wanted but no local connection: dropped, counted, reported.
    lonely = DeadLetterSink(local=None, log=None, verdict_id=lambda: 43, on_event=lambda k, d: events.append((k, d)))
    both = Verdict.reject(Reason("rule", "bad"), dead_letter=_dead_letter(local=True, cloud=True))
    assert lonely.record(message, both, 0, False) == 0
    assert [kind for kind, _ in events[1:]] == ["dead_letter", "dead_letter_dropped", "dead_letter_dropped"]
    assert lonely.totals() == {("local", "dropped"): 1, ("cloud", "dropped"): 1}


def test_the_sink_drops_what_the_full_queue_cannot_take_and_says_so(loop: Loop):
    events: list[tuple[str, dict[str, object]]] = []
    local = LocalRepublisher(lambda: None, on_drop=lambda item, reason: events.append(("late", {"reason": reason})),
                             max_queue=1)
    sink = DeadLetterSink(local=local, log=None, verdict_id=lambda: 5, on_event=lambda k, d: events.append((k, d)))
    verdict = Verdict.reject(Reason("schema", "bad"), dead_letter=_dead_letter())
    message = Message("sensor/t1/temperature", b"{}", 1, False, CLIENT)
    assert loop.run(sink.record, message, verdict, 0, False) == 0  # local only: nothing durable to wait for
    assert loop.run(sink.record, message, verdict, 0, False) == 0
    assert [kind for kind, _ in events] == ["dead_letter", "dead_letter", "dead_letter_dropped"]
    assert "queue full (1 dead letters" in str(events[2][1]["reason"]) and events[2][1]["to"] == "local"
    assert sink.totals()[("local", "queued")] == 1 and sink.totals()[("local", "dropped")] == 1
    loop.wait(sink.stop())
    wait_until(lambda: len(events) == 4, message="the queued one dropped at stop")
    assert events[3] == ("late", {"reason": "the appliance stopped before the broker took it"})
    assert sink.totals()[("local", "dropped")] == 2
    loop.run(sink.record, message, verdict, 0, False)
    assert events[-1][1]["reason"] == "the appliance is stopping"
