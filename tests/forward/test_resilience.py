"""Crashes, hung uplinks, TLS and full outboxes: the forwarder keeps buffering and tells."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.forward.outbox import SAVE_EVERY
from appliance.msglog.cursor import Cursor
from tests.forward.harness import (
    CloudBroker,
    Harness,
    Subscriber,
    check_per_sensor_order,
    forwarded,
    free_port,
    harness,
    sensor_rows,
    upstream,
)
from tests.helpers import wait_until
from tests.tls import make_certificates


def _forwarder_process(h: Harness, config: dict, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.forward", "--log", str(h.log_dir), "--cursor", str(h.cursor_path),
         "--upstream", json.dumps(config), "--status-every", "0.2", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )


def test_kill_9_while_draining_then_a_new_forwarder_delivers_the_rest(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    total = 30_000
    try:
        with harness(tmp_path / "state") as h:
            h.add(sensor_rows(h, sensors=6, per_sensor=total // 6, noise_every=50))
            config = {"url": broker.url, "client_id": "gw", "window": 200, "ack_timeout": 5, "backoff_initial": 0.05}
            first = _forwarder_process(h, config)
            try:
                wait_until(lambda: sub.count() >= 3_000, timeout=30, message="draining under way")
            finally:
                os.kill(first.pid, signal.SIGKILL)
                first.wait(10)
            at_kill = sub.count()
            second = _forwarder_process(h, config)
            try:
                wait_until(lambda: len(set(sub.payloads())) >= total, timeout=60, message="all messages after the restart")
                h.add([h.row("end", 0)])  # FIFO: once this arrives, everything sent before it has
                wait_until(lambda: sub.payloads()[-1:] == [b"end:0"], message="end marker")
            finally:
                second.terminate()
                second.wait(10)
            payloads = sub.payloads()[:-1]
            per_sensor, duplicates = check_per_sensor_order(payloads)
            assert per_sensor == {f"sensor-{s}": total // 6 for s in range(6)}
            print(f"\nkill -9 after {at_kill} delivered: {len(payloads)} received for {total} messages, "
                  f"{duplicates} duplicates (sent by the first forwarder after its last cursor save)")
            # At most what was acknowledged since the last save (SAVE_EVERY, or a second's worth)
            # plus a window in flight.
            assert duplicates <= SAVE_EVERY + 200
    finally:
        sub.stop()
        broker.stop()


def _tls_broker_extra(certs_dir: Path, port: int) -> tuple[str, object]:
    certs = make_certificates(certs_dir)
    return (
        f"listener {port} 127.0.0.1\n"
        f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
        "require_certificate true\n"
    ), certs


def test_mutual_tls_and_a_wrong_ca_keeps_buffering(tmp_path: Path):
    tls_port = free_port()
    extra, certs = _tls_broker_extra(tmp_path / "certs", tls_port)
    wrong = make_certificates(tmp_path / "other", ca_name="Some Other CA")
    broker = CloudBroker(tmp_path / "cloud", extra=extra).start()
    wait_until(lambda: socket.create_connection(("127.0.0.1", tls_port)).close() is None)
    sub = Subscriber(broker.port, "sensors/#").start()
    try:
        with harness(tmp_path / "state") as h:
            h.add(sensor_rows(h, sensors=2, per_sensor=50))
            url = f"mqtts://localhost:{tls_port}"
            bad = h.start_forwarder(upstream(url, tls={"ca_file": str(wrong.ca), "cert_file": str(wrong.client_cert),
                                                       "key_file": str(wrong.client_key)}))
            wait_until(lambda: "uplink_down" in h.kinds(), message="uplink_down")
            reason = dict(h.events)["uplink_down"]["reason"]
            assert "certificate" in reason and "verify failed" in reason, reason
            status = bad.status()
            assert not status.uplink_up and status.last_error == reason
            assert status.depth == 100 and sub.count() == 0  # still buffered
            h.stop_forwarder()

            h.events.clear()
            good = h.start_forwarder(upstream(url, tls={"ca_file": str(certs.ca), "cert_file": str(certs.client_cert),
                                                        "key_file": str(certs.client_key)}))
            wait_until(lambda: sub.count() == 100, message="100 messages over mutual TLS")
            wait_until(lambda: good.status().forwarded_total == 100)
            assert h.kinds()[0] == "uplink_up"
    finally:
        sub.stop()
        broker.stop()


@contextmanager
def hung_server(*, connack: bytes | None) -> Iterator[tuple[int, list[int]]]:
    """Accepts and reads, never acknowledges a PUBLISH; sends `connack` after CONNECT if given."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[int] = []
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        sent = False
        while not stop.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            if connack is not None and not sent:
                conn.sendall(connack)
                sent = True

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield port, accepted
    finally:
        stop.set()
        listener.close()
        for conn in conns:
            conn.close()


def read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet from a blocking socket: (first byte, the rest after the remaining length)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = conn.recv(n - len(data))
            assert more, "the client closed"
            data += more
        return data

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        byte = exactly(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return first, exactly(length)


def test_messages_acknowledged_in_the_read_that_ends_the_connection_are_not_sent_again(tmp_path: Path):
    """A broker acknowledges every message and disconnects in the same write (a shutdown): the
    PUBACKs count, the outbox is empty, and the next connection has nothing to send again."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sessions: list[int] = []  # PUBLISHes received, per connection
    conns: list[socket.socket] = []

    def serve(conn: socket.socket, first: bool) -> None:
        try:
            read_packet(conn)  # CONNECT
            conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK (MQTT 5)
            pids: list[int] = []
            while True:
                kind, body = read_packet(conn)
                if kind >> 4 != 3:
                    continue
                n = int.from_bytes(body[:2], "big")
                pids.append(int.from_bytes(body[2 + n:4 + n], "big"))
                sessions[-1] += 1
                if first and len(pids) == 10:  # all PUBACKs and a DISCONNECT (server shutting down), one write
                    conn.sendall(b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid in pids) + b"\xe0\x02\x8b\x00")
        except (AssertionError, OSError):
            return

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            sessions.append(0)
            threading.Thread(target=serve, args=(conn, len(conns) == 1), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with harness(tmp_path / "state") as h:
            h.add(sensor_rows(h, sensors=1, per_sensor=10))
            fwd = h.start_forwarder(upstream(f"mqtt://127.0.0.1:{port}", protocol=5))
            wait_until(lambda: len(sessions) >= 2 and fwd.status().uplink_up, message="connected again")
            downs = [detail["reason"] for kind, detail in h.events if kind == "uplink_down"]
            assert downs and "server shutting down" in downs[0], downs
            status = fwd.status()
            assert status.depth == 0 and status.forwarded_total == 10
            assert sessions[0] == 10
    finally:
        listener.close()
        for conn in conns:
            conn.close()


@pytest.mark.parametrize(("connack", "expected"), [
    (None, "no CONNACK within"),
    (b"\x20\x02\x00\x00", "no acknowledgement within"),  # MQTT 3.1.1 CONNACK accepted, then silence
])
def test_hung_uplink_is_torn_down_and_reconnected(tmp_path: Path, connack: bytes | None, expected: str):
    with hung_server(connack=connack) as (port, accepted), harness(tmp_path / "state") as h:
        h.add(sensor_rows(h, sensors=1, per_sensor=10))
        fwd = h.start_forwarder(upstream(f"mqtt://127.0.0.1:{port}", protocol=4, ack_timeout=0.3, backoff_initial=0.05))
        wait_until(lambda: len(accepted) >= 3, message="reconnects after the ack timeout")
        downs = [detail["reason"] for kind, detail in h.events if kind == "uplink_down"]
        assert downs and all(expected in reason for reason in downs), downs
        status = fwd.status()
        assert status.last_error is not None and expected in status.last_error
        assert status.depth == 10 and status.forwarded_total == 0 and status.forward_rate == 0
        assert status.oldest_age_s is not None and status.oldest_age_s > 0.3


def test_overflow_drop_oldest_numbers_add_up(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    broker.stop()
    try:
        with harness(tmp_path / "state") as h:
            config = upstream(broker.url, outbox={"max_messages": 300, "policy": "drop_oldest"})
            fwd = h.start_forwarder(config)
            enqueued = h.add(sensor_rows(h, sensors=5, per_sensor=200))
            wait_until(lambda: fwd.status().dropped_total == 700, message="drops")
            drops = wait_until(lambda: [detail for kind, detail in h.events if kind == "outbox_dropped"], message="event")
            assert sum(d["count"] for d in drops) == 700 and {d["reason"] for d in drops} == {"max_messages"}
            assert fwd.status().depth == 300
            broker.start()
            wait_until(lambda: sub.count() == 300, timeout=30, message="the newest 300")
            wait_until(lambda: fwd.status().forwarded_total == 300, message="acks")
            status = fwd.status()
            wait_until(lambda: fwd.outbox.refresh().messages == 0)
            assert status.forwarded_total + status.dropped_total + fwd.outbox.refresh().messages == enqueued
            assert fwd.outbox.cursor == h.log.durable_seq  # everything acknowledged or dropped
            assert sorted(sub.payloads()) == sorted(f"sensor-{s}:{i}".encode() for i in range(140, 200) for s in range(5))
            print(f"\ndrop_oldest: enqueued {enqueued} = forwarded {status.forwarded_total} + dropped {status.dropped_total} + 0")
    finally:
        sub.stop()
        broker.stop()


def test_overflow_reject_new_keeps_everything_and_reports_full(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    broker.stop()
    try:
        with harness(tmp_path / "state") as h:
            fwd = h.start_forwarder(upstream(broker.url, outbox={"max_bytes": 2_000, "policy": "reject_new"}))
            rejected = accepted = 0
            for i in range(200):  # what the pipeline does: ask before accepting each message
                if fwd.outbox.is_full():
                    rejected += 1
                    continue
                accepted += h.add([h.row("sensor-0", accepted)])
                fwd.outbox.refresh()  # the pipeline sees the counters at most refresh_interval late
            assert fwd.outbox.is_full() and rejected > 0
            assert fwd.status().dropped_total == 0 and "outbox_dropped" not in h.kinds()
            broker.start()
            wait_until(lambda: sub.count() == accepted, timeout=30, message="every accepted message")
            wait_until(lambda: fwd.status().forwarded_total == accepted)
            assert not fwd.outbox.is_full()
            check_per_sensor_order(sub.payloads())
            print(f"\nreject_new: {accepted} accepted and forwarded, {rejected} rejected (0x97), 0 dropped")
    finally:
        sub.stop()
        broker.stop()


def test_expired_messages_are_dropped_while_the_uplink_is_down(tmp_path: Path):
    with harness(tmp_path / "state") as h:
        old = time.time() - 3600
        h.add([h.row("s", i, ts=old) for i in range(20)] + [h.row("s", i) for i in range(20, 25)])
        fwd = h.start_forwarder(upstream(f"mqtt://127.0.0.1:{free_port()}", outbox={"max_age": "10m"}))
        wait_until(lambda: fwd.status().dropped_total == 20, message="TTL drops")
        (detail,) = wait_until(lambda: [d for kind, d in h.events if kind == "outbox_dropped"], message="event")
        assert detail["reason"] == "expired" and detail["count"] == 20 and len(detail["messages"]) == 20
        assert fwd.status().depth == 5


def test_missing_tls_files_back_off_instead_of_stopping_the_forwarder(tmp_path: Path):
    with harness(tmp_path / "state") as h:
        h.add(sensor_rows(h, sensors=1, per_sensor=3))
        forwarder = h.start_forwarder(upstream(f"mqtts://localhost:{free_port()}",
                                               tls={"ca_file": str(tmp_path / "not-there.pem")}))
        wait_until(lambda: "TLS files" in (forwarder.status().last_error or ""), message="TLS error reported")
        assert forwarder._thread is not None and forwarder._thread.is_alive()  # backing off, not dead
        assert forwarder.status().depth == 3
        assert "not-there.pem" in (forwarder.status().last_error or "")  # the file is named


def test_uplink_down_is_logged_once_then_reminded_not_per_retry(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="appliance.forward.forwarder")
    with harness(tmp_path / "state") as h:
        forwarder = h.start_forwarder(upstream(f"mqtt://127.0.0.1:{free_port()}", backoff_initial="0.01s",
                                               backoff_max="0.02s"))
        wait_until(lambda: sum("reconnecting" in r.getMessage() for r in caplog.records) >= 5,
                   message="several retries")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "uplink" in r.getMessage()]
    assert len(warnings) == 1 and "uplink down" in warnings[0].getMessage()


def test_a_crash_between_sending_and_saving_the_cursor_resends(tmp_path: Path):
    """At-least-once: a forwarder whose cursor save never happened (here: saves held off for an
    hour) dies after the cloud acknowledged everything; the next one starts from the saved cursor
    and sends it all again. Duplicates, no loss, per-sensor order kept."""
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    total = 2_000
    try:
        with harness(tmp_path / "state") as h:
            h.add(sensor_rows(h, sensors=4, per_sensor=total // 4, noise_every=20))
            config = {"url": broker.url, "client_id": "gw", "window": 100, "ack_timeout": 5, "backoff_initial": 0.05}
            first = _forwarder_process(h, config, "--save-interval", "3600", "--save-every", "1000000000")
            try:
                wait_until(lambda: sub.count() >= total, timeout=60, message="everything delivered once")
            finally:
                os.kill(first.pid, signal.SIGKILL)
                first.wait(10)
            assert Cursor(h.cursor_path).load() == 0  # acknowledged, never saved
            second = _forwarder_process(h, config)
            try:
                wait_until(lambda: sub.count() >= 2 * total, timeout=60, message="everything again")
            finally:
                second.terminate()  # a clean stop saves the cursor
                second.wait(10)
            per_sensor, duplicates = check_per_sensor_order(sub.payloads())
            assert per_sensor == {f"sensor-{s}": total // 4 for s in range(4)} and duplicates == total
            assert Cursor(h.cursor_path).load() == h.log.durable_seq
    finally:
        sub.stop()
        broker.stop()


def test_a_restart_resumes_from_the_cursor_without_loss_or_duplicates(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    try:
        with harness(tmp_path / "state") as h:
            first = sensor_rows(h, sensors=3, per_sensor=300, noise_every=7)
            h.add(first)
            fwd = h.start_forwarder(upstream(broker.url))
            wait_until(lambda: fwd.status().forwarded_total == 900, timeout=30, message="first batch acknowledged")
            h.stop_forwarder()  # saves the cursor
            assert Cursor(h.cursor_path).load() == h.log.durable_seq
            later = [h.row(f"sensor-{s}", i) for i in range(300, 500) for s in range(3)]
            h.add(later)  # arrives while no forwarder runs
            fwd = h.start_forwarder(upstream(broker.url))
            assert fwd.outbox.depth().messages == 600  # rebuilt from the log after the cursor
            wait_until(lambda: sub.count() >= 1500, timeout=30, message="the rest after the restart")
            wait_until(lambda: fwd.status().forwarded_total == 600)
            per_sensor, duplicates = check_per_sensor_order(sub.payloads())
            assert per_sensor == {f"sensor-{s}": 500 for s in range(3)} and duplicates == 0
    finally:
        sub.stop()
        broker.stop()


def test_stored_messages_go_before_live_ones_after_an_uplink_outage(tmp_path: Path):
    broker = CloudBroker(tmp_path / "cloud").start()
    sub = Subscriber(broker.port, "sensors/#").start()
    broker.stop()
    try:
        with harness(tmp_path / "state") as h:
            fwd = h.start_forwarder(upstream(broker.url, window=20))
            wait_until(lambda: "uplink_down" in h.kinds(), message="uplink down")
            stored = sensor_rows(h, sensors=4, per_sensor=1000, noise_every=9)
            h.add(stored)
            wait_until(lambda: fwd.outbox.depth().messages == 4000, message="stored while down")
            broker.start()
            live = []
            for i in range(30):  # live traffic while the backlog drains
                batch = [h.row(f"live-{s}", i) for s in range(3)]
                live += batch
                h.add(batch)
            wait_until(lambda: sub.count() >= 4000 + len(live), timeout=60, message="everything")
            expected = [m.payload for m in stored + live if forwarded(m)]
            assert sub.payloads() == expected  # the log's order: stored first, nothing interleaved
            assert "uplink_up" in h.kinds()
    finally:
        sub.stop()
        broker.stop()


def test_bounds_are_applied_while_a_connect_waits_for_its_connack(tmp_path: Path):
    """A broker that accepts TCP but never answers CONNECT holds the forwarder for ack_timeout (here
    an hour): the bounds, and the counters reject_new relies on, keep being applied meanwhile."""
    with hung_server(connack=None) as (port, accepted), harness(tmp_path / "state") as h:
        old = time.time() - 3600
        h.add([h.row("s", i, ts=old) for i in range(20)])
        fwd = h.start_forwarder(upstream(f"mqtt://127.0.0.1:{port}", protocol=4, ack_timeout=3600,
                                         outbox={"max_age": "10m", "max_messages": 30, "policy": "reject_new"}))
        wait_until(lambda: accepted, message="connecting")
        h.add([h.row("s", i) for i in range(20, 50)])
        wait_until(lambda: fwd.status().dropped_total == 20, message="TTL drops during the connect")
        wait_until(lambda: fwd.outbox.is_full(), message="reject_new sees the new messages")
        assert fwd.status().depth == 30 and not fwd.status().uplink_up
