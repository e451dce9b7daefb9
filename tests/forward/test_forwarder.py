"""The forwarder against a real mosquitto as the cloud broker, fed by a real MessageLog."""

from __future__ import annotations

from pathlib import Path

from appliance.forward.forwarder import render_topic
from tests.forward.harness import (
    CloudBroker,
    Subscriber,
    check_per_sensor_order,
    harness,
    sensor_rows,
    upstream,
)
from tests.helpers import wait_until


def test_topic_template_user_properties_and_ack_delete(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "gateways/#", version=5).start()
    try:
        with harness(tmp_path / "state") as h:
            sent = h.row("sensor/1", 0, topic="plant/temp")
            h.add([sent])
            fwd = h.start_forwarder(upstream(broker.url, topic_template="gateways/{gateway_id}/{client_id}/{topic}"))
            wait_until(lambda: sub.count() == 1, message="forwarded message")
            msg = sub.messages[0]
            assert msg.topic == "gateways/gw1/sensor_1/plant/temp"
            props = dict(msg.properties.UserProperty)
            assert props["schema"] == "reading:v1" and props["client-id"] == "sensor/1"
            assert props["message-id"] == str(sent.id)  # the verdict's id: joins with the audit log
            wait_until(lambda: fwd.status().forwarded_total == 1, message="ack")
            assert fwd.outbox.refresh().messages == 0
            assert h.kinds()[0] == "uplink_up" and fwd.status().uplink_up
    finally:
        sub.stop()
        broker.stop()


def test_render_topic():
    assert render_topic("{topic}", topic="a/b", gateway_id="g", client_id="c") == "a/b"
    assert render_topic("x/{gateway_id}/{client_id}/{topic}", topic="a/b", gateway_id="g", client_id="c+#/d") == "x/g/c___d/a/b"


def test_outage_10000_messages_arrive_in_order_once_the_broker_is_back(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()  # persistent session, queued across the restart
    broker.stop()
    try:
        with harness(tmp_path / "state") as h:
            fwd = h.start_forwarder(upstream(broker.url))
            wait_until(lambda: "uplink_down" in h.kinds(), message="uplink_down while the broker is stopped")
            assert h.add(sensor_rows(h, sensors=8, per_sensor=1250, noise_every=10)) == 10_000
            wait_until(lambda: fwd.status().depth == 10_000, message="depth counted")
            assert not fwd.status().uplink_up and fwd.status().oldest_age_s is not None

            broker.start()
            wait_until(lambda: sub.count() >= 10_000, timeout=60, message="10,000 messages at the subscriber")
            wait_until(lambda: fwd.status().forwarded_total == 10_000, message="all acknowledged")
            # Nothing else arrives: a last message goes after everything before it (FIFO).
            h.add([h.row("end", 0)])
            wait_until(lambda: sub.count() >= 10_001, message="end marker")
            payloads = sub.payloads()
            assert len(payloads) == 10_001 and payloads[-1] == b"end:0"
            per_sensor, duplicates = check_per_sensor_order(payloads[:-1])
            assert per_sensor == {f"sensor-{s}": 1250 for s in range(8)}
            assert duplicates == 0
            # The subscriber can have the end marker before the forwarder has its PUBACK, which it
            # reads when it next looks (it does not wake up per PUBACK).
            wait_until(lambda: fwd.status().depth == 0, message="the end marker acknowledged")
            status = fwd.status()
            assert status.depth == 0 and status.oldest_age_s is None and status.last_error is None
            print(f"\noutage: 10,000 forwarded, status {status}")
    finally:
        sub.stop()
        broker.stop()


def test_fifo_rows_added_while_draining_go_after_the_stored_ones(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    try:
        with harness(tmp_path / "state") as h:
            stored = sensor_rows(h, sensors=4, per_sensor=1500)
            h.add(stored)
            fwd = h.start_forwarder(upstream(broker.url, window=50))
            live = []
            for i in range(20):  # live traffic arrives while the backlog drains
                batch = [h.row(f"live-{s}", i) for s in range(4)]
                live += batch
                h.add(batch)
            wait_until(lambda: sub.count() >= len(stored) + len(live), timeout=60, message="everything")
            payloads = sub.payloads()
            assert payloads == [m.payload for m in stored + live]  # exactly the log order, nothing interleaved
            assert fwd.status().forwarded_total <= len(payloads)
    finally:
        sub.stop()
        broker.stop()


def test_a_durable_record_wakes_the_idle_forwarder(tmp_path: Path, monkeypatch):  # noqa: ANN001
    """Live messages do not wait for the next look at the log: the log's durable listener wakes the
    forwarder. With the periodic look pushed out to an hour, only the wake-up can deliver them."""
    from appliance.forward import forwarder as forwarder_module

    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "#", version=5).start()
    try:
        with harness(tmp_path / "state") as h:
            h.start_forwarder(upstream(broker.url))
            wait_until(lambda: "uplink_up" in h.kinds(), message="connected")
            monkeypatch.setattr(forwarder_module, "IDLE_POLL_S", 3600.0)
            wait_until(lambda: h.forwarder is not None and h.forwarder._idle, message="forwarder waiting")  # noqa: SLF001
            for i in range(3):
                h.add([h.row("s", i)])
                wait_until(lambda i=i: sub.count() == i + 1, message=f"live message {i}")
    finally:
        sub.stop()
        broker.stop()


def test_wake_ups_while_the_forwarder_is_busy_are_not_lost(tmp_path: Path, monkeypatch):  # noqa: ANN001
    """Records made durable while the forwarder is reading or sending (not waiting) still wake it:
    with the periodic look pushed out to an hour, every message of a quick series arrives. The cloud
    broker's acknowledgements are read at the next look, not with one wake-up per PUBACK."""
    from appliance.forward import forwarder as forwarder_module

    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "#", version=5).start()
    try:
        with harness(tmp_path / "state") as h:
            fwd = h.start_forwarder(upstream(broker.url))
            wait_until(lambda: "uplink_up" in h.kinds(), message="connected")
            monkeypatch.setattr(forwarder_module, "IDLE_POLL_S", 3600.0)
            wait_until(lambda: h.forwarder is not None and h.forwarder._idle, message="forwarder waiting")  # noqa: SLF001
            for i in range(200):
                h.add([h.row("s", i)])
            wait_until(lambda: sub.count() == 200, message="all 200 live messages")
            # PUBACKs that came after the last look are read at the next one (at most IDLE_POLL_S on).
            monkeypatch.setattr(forwarder_module, "IDLE_POLL_S", 0.05)
            h.add([h.row("s", 200)])
            wait_until(lambda: sub.count() == 201, message="the last one")
            wait_until(lambda: fwd.status().forwarded_total == 201, message="every acknowledgement read")
            assert fwd.status().depth == 0
    finally:
        sub.stop()
        broker.stop()


def test_a_backlog_is_drained_without_waiting_for_wake_ups(tmp_path: Path, monkeypatch):  # noqa: ANN001
    """The forwarder waits for a wake-up only once it has read the outbox to its end: a backlog
    larger than one read (500 messages) and than its window drains with no wake-up at all."""
    from appliance.forward import forwarder as forwarder_module

    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "#", version=5).start()
    try:
        with harness(tmp_path / "state") as h:
            fwd = h.start_forwarder(upstream(broker.url, window=30))
            wait_until(lambda: "uplink_up" in h.kinds(), message="connected")
            monkeypatch.setattr(forwarder_module, "IDLE_POLL_S", 3600.0)
            monkeypatch.setattr(forwarder_module, "ACK_LOOK_S", 3600.0)
            wait_until(lambda: h.forwarder is not None and h.forwarder._idle, message="forwarder waiting")  # noqa: SLF001
            fwd.outbox.waiter = None  # no wake-up from here on: only the first one below
            h.add([h.row("s", i) for i in range(1234)])
            fwd.wake()
            wait_until(lambda: sub.count() == 1234, message="the whole backlog")
    finally:
        sub.stop()
        broker.stop()


def test_a_message_the_cloud_cannot_take_is_dropped_not_retried_forever(tmp_path: Path):
    """Over the broker's MQTT 5 Maximum Packet Size, a message would close the connection on
    every attempt and hold up everything behind it (FIFO): it is dropped with an event."""
    broker = CloudBroker(tmp_path / "cloud", extra="max_packet_size 1000\n").start()
    sub = Subscriber(broker.port, "#", version=5).start()
    try:
        with harness(tmp_path / "state") as h:
            rows = [h.row("s", 0, payload=b"small-0"), h.row("s", 1, payload=b"x" * 5000), h.row("s", 2, payload=b"small-2")]
            h.add(rows)
            fwd = h.start_forwarder(upstream(broker.url))
            wait_until(lambda: sub.count() == 2, message="the two small messages")
            assert sub.payloads() == [b"small-0", b"small-2"]
            wait_until(lambda: fwd.outbox.refresh().messages == 0, message="outbox empty")
            drops = [detail for kind, detail in h.events if kind == "outbox_dropped"]
            assert len(drops) == 1 and drops[0]["reason"] == "too_large" and drops[0]["first_id"] == rows[1].id
            assert "1000" in drops[0]["detail"]
            assert fwd.status().dropped_total == 1 and h.kinds().count("uplink_up") == 1  # no reconnects
    finally:
        sub.stop()
        broker.stop()
