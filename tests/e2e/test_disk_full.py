"""A full disk, on a real small filesystem (a tmpfs mounted for the test; needs root), with the real
appliance, its mosquitto and real MQTT clients. Nothing acknowledged with a success code is lost:
while the message log cannot write, QoS 1/2 publishes are refused (MQTT 5: 0x97 Quota exceeded;
3.1.1: no ack, the connection closes and the device resends) instead of acknowledged; QoS 0 keeps
flowing to local subscribers with its lost records counted; health stays down while the disk is full
and the appliance recovers by itself when space returns, also after a restart on the full disk."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import broker
from appliance.audit.query import AuditQuery
from appliance.config import BrokerConfig
from appliance.mqtt import Connect, ProtocolVersion, Publish, Pubrec
from appliance.names import EventKind
from tests.conftest import make_config
from tests.e2e.test_operations import get, metric
from tests.forward.harness import CloudBroker, Subscriber
from tests.helpers import Client, RawClient, RunningAppliance, scaled, wait_until
from tests.msglog.test_disk import fill
from tests.processes import free_port, output, start_appliance

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a size-limited tmpfs: needs root")

QUOTA_EXCEEDED = 0x97
HEALTH_EVENTS = ("log_degraded", "log_recovered")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_with_qos1(pub: Client, topic: str) -> tuple[list[bytes], list[bytes]]:
    """~1 KB QoS 1 payloads, 10 in flight as a pipelining device keeps them, until the log refuses
    some: (acknowledged with success, refused). Every refusal must be 0x97."""
    accepted: list[bytes] = []
    refused: list[bytes] = []
    sent = 0
    while len(refused) < 20 and sent < 20_000:
        batch = [(f'{{"n":{sent + i},"pad":"{"x" * 1000}"}}'.encode()) for i in range(10)]
        infos = [pub.publish(f"{topic}/{sent + i}", payload, qos=1, wait=False) for i, payload in enumerate(batch)]
        for payload, info in zip(batch, infos, strict=True):
            info.wait_for_publish(30)
            code = pub.acks[info.mid]
            (refused if code.is_failure else accepted).append(payload)
            if code.is_failure:
                assert code.value == QUOTA_EXCEEDED, code
        sent += len(batch)
    assert refused, f"the disk never filled after {sent} messages"
    return accepted, refused


def health_events(events: list[tuple[str, dict[str, object]]]) -> list[str]:
    return [kind for kind, _ in events if kind in HEALTH_EVENTS]


def qos0_flows(pub: Client, local: Client, topic: str, count: int = 20) -> list[bytes]:
    """~1 KB QoS 0 messages from `pub` reach the local subscriber `local` (subscribed to `topic`/#):
    more than a failed batch cut back frees, so some of their records are lost on a full disk."""
    payloads = [f'{{"qos0":{n},"pad":"{"z" * 1000}"}}'.encode() for n in range(count)]
    for n, payload in enumerate(payloads):
        pub.publish(f"{topic}/{n}", payload, qos=0)
    assert [m.payload for m in local.expect(count)] == payloads
    return payloads


def fill_log_with_qos0(pub: Client, healthy: Callable[[], bool]) -> int:
    """The disk is full but the log may still have room (its preallocated tail, a partial page):
    ~1 KB QoS 0 messages until it has none; returns how many were sent."""
    sent = 0
    while healthy() and sent < 5_000:
        for _ in range(50):
            pub.publish(f"plant/bulk/{sent}", f'{{"bulk":{sent},"pad":"{"y" * 1000}"}}', qos=0)
            sent += 1
        # A QoS 1 round trip: everything before it was judged and handed to the log.
        pub.publish("plant/bulk/marker", b"{}", qos=1, wait=False).wait_for_publish(30)
    assert not healthy(), f"the log still writes after {sent} messages"
    return sent


@needs_root
@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_full_disk_refuses_instead_of_losing_and_recovers(tmp_path: Path, small_fs: Path, policy: str):
    """Filled by QoS 1 load with the uplink down, under both outbox policies: with reject_new the
    previous design acknowledged 16 messages it then lost, and refused QoS 0 as "outbox full"."""
    cloud = CloudBroker(tmp_path / "cloud").start()
    # The cloud consumer's persistent session exists before the uplink goes down (mosquitto saves it
    # on SIGTERM): whatever is forwarded once the cloud is back is queued for it, even if the
    # forwarder sends everything before the consumer's SUBSCRIBE arrives.
    Subscriber(cloud.port, "plant/#").start().stop()
    cloud.stop()  # the uplink is down
    state = small_fs / "state"
    config = make_config(state, **{
        "upstream.url": cloud.url, "upstream.backoff_initial": "0.1s", "upstream.backoff_max": "0.5s",
        "audit.segment_bytes": "256KiB", "upstream.outbox.policy": policy,
    })
    running = RunningAppliance(config).start()
    try:
        local = Client(running.port, version=5, client_id="local").connect()
        local.subscribe("plant/zero/#", qos=0)
        pub = Client(running.port, version=5, client_id="filler").connect()
        accepted, refused = fill_with_qos1(pub, "plant/fill")
        assert not running.app.audit.healthy
        wait_until(lambda: health_events(running.events), message="the log_degraded event")  # via the loop
        assert health_events(running.events) == ["log_degraded"]

        # Still full: QoS 0 reaches the local subscriber (whatever the outbox policy), its records
        # are counted as lost, health stays down (no flapping), QoS 1 is still refused.
        lost = running.app.audit.status()["lost_records"]
        qos0 = qos0_flows(pub, local, "plant/zero")
        wait_until(lambda: running.app.audit.status()["lost_records"] > lost, message="the QoS 0 gap counted")
        info = pub.publish("plant/fill/more", b'{"more":1}', qos=1)
        assert pub.acks[info.mid].value == QUOTA_EXCEEDED
        refused.append(b'{"more":1}')
        assert not running.app.audit.healthy and health_events(running.events) == ["log_degraded"]

        # Space returns: the log writes again by itself, and publishes are acknowledged again.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        wait_until(lambda: running.app.audit.healthy, timeout=30, message="the log writes again")
        wait_until(lambda: len(health_events(running.events)) > 1, message="the log_recovered event")  # via the loop
        assert health_events(running.events) == ["log_degraded", "log_recovered"]
        for n in range(5):
            payload = f'{{"after":{n}}}'.encode()
            info = pub.publish(f"plant/after/{n}", payload, qos=1)
            assert not pub.acks[info.mid].is_failure
            accepted.append(payload)
        pub.disconnect()
        local.disconnect()

        # The uplink comes back: every acknowledged message reaches the cloud, no refused one does;
        # the consumer connects only once the cloud has acknowledged them all (its session queued them).
        cloud.start()
        wait_until(lambda: running.app.outbox.refresh().messages == 0, timeout=scaled(30),
                   message="the outbox forwarded")
        subscriber = Subscriber(cloud.port, "plant/#").start()
        try:
            wanted = set(accepted)
            wait_until(lambda: wanted <= set(subscriber.payloads()), timeout=scaled(30),
                       message=f"{len(wanted)} acknowledged messages in the cloud")
            assert not set(refused) & set(subscriber.payloads())
            print(f"\n{policy}: {len(accepted)} acknowledged and forwarded, {len(refused)} refused (0x97), "
                  f"{len(qos0)} QoS 0 delivered locally while full")
        finally:
            subscriber.stop()
    finally:
        running.stop()
        cloud.stop()
    with AuditQuery(state) as audit_log:
        recorded = {bytes(row[0]) for row in
                    audit_log.query("SELECT payload FROM decisions WHERE payload IS NOT NULL", max_rows=1 << 40).rows}
    missing = [p for p in accepted if p not in recorded]
    assert not missing, f"{len(missing)} of {len(accepted)} acknowledged messages have no verdict"


@needs_root
@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_without_durable_acks_a_full_disk_still_refuses_qos1(small_fs: Path, policy: str):
    """`audit.durable_acks: false` acknowledges without waiting for the sync, but not on a disk the
    log already knows is full: QoS 1 is refused (0x97) there too, and QoS 0 keeps flowing."""
    config = make_config(small_fs / "state", **{
        "audit.durable_acks": False, "upstream.url": f"mqtt://127.0.0.1:{free_port()}", "upstream.outbox.policy": policy,
    })
    running = RunningAppliance(config).start()
    try:
        local = Client(running.port, version=5, client_id="local").connect()
        local.subscribe("plant/zero/#", qos=0)
        pub = Client(running.port, version=5, client_id="pub").connect()
        fill(small_fs)
        fill_log_with_qos0(pub, lambda: running.app.audit.healthy)
        info = pub.publish("plant/full", b'{"full":1}', qos=1)
        assert pub.acks[info.mid].value == QUOTA_EXCEEDED
        qos0_flows(pub, local, "plant/zero")
        pub.disconnect()
        local.disconnect()
    finally:
        running.stop()


def metrics(port: int) -> str:
    code, text = get(port, "/metrics")
    assert code == 200
    return text


def stop_cleanly(proc: subprocess.Popen[str]) -> str:
    """SIGTERM: exit 0 without a traceback; returns what the appliance printed."""
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(scaled(30))
    printed = output(proc)
    assert status == 0, printed[-3000:]
    assert "Traceback" not in printed and "Exception in callback" not in printed, printed[-3000:]
    return printed


@needs_root
def test_sigterm_and_restart_on_a_full_disk(tmp_path: Path, small_fs: Path):
    """`appliance run` (as systemd runs it) stopped with SIGTERM while the disk is full, started
    again on the still full disk: it serves QoS 0 with the gap counted, refuses QoS 1 (MQTT 5:
    0x97; 3.1.1: no ack), and recovers by itself once space returns; the 3.1.1 device's resend is
    then acknowledged and forwarded."""
    cloud = CloudBroker(tmp_path / "cloud").start()
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "appliance.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"state_dir: {small_fs / 'state'}\n"
        f"metrics:\n  listen: 127.0.0.1:{metrics_port}\n"
        f"upstream:\n  url: {cloud.url}\n  backoff_initial: 0.1s\n  backoff_max: 0.5s\n"
    )
    args = ["--config", str(config)]
    consumer = Subscriber(cloud.port, "plant/#").start()
    proc = start_appliance(args, port=port)
    try:
        pub = Client(port, version=5, client_id="before").connect()
        pub.publish("plant/before", b'{"before":1}', qos=1)
        pub.disconnect()
        filler = fill(small_fs)

        def healthy() -> bool:
            return metric(metrics(metrics_port), "mqtt_proxy_audit_healthy") == 1

        # Full while running: QoS 1 is refused; then SIGTERM (its last write fails too).
        pub = Client(port, version=5, client_id="while-full").connect()
        fill_log_with_qos0(pub, healthy)
        info = pub.publish("plant/while-full", b'{"while":1}', qos=1)
        assert pub.acks[info.mid].value == QUOTA_EXCEEDED
        pub.disconnect()
        stop_cleanly(proc)
        fill(small_fs)  # what stopping freed (a preallocated tail, a partial page) is taken too

        # Started again on the full disk: health is down from the start, QoS 0 flows to a local
        # subscriber with its lost records counted, QoS 1 is refused.
        proc = start_appliance(args, port=port)
        assert not healthy()
        local = Client(port, version=5, client_id="local").connect()
        local.subscribe("plant/zero/#", qos=0)
        v5 = Client(port, version=5, client_id="v5").connect()
        lost = metric(metrics(metrics_port), "mqtt_proxy_audit_lost_records_total")
        assert lost is not None
        qos0_flows(v5, local, "plant/zero")
        wait_until(lambda: metric(metrics(metrics_port), "mqtt_proxy_audit_lost_records_total") > lost,
                   message="the QoS 0 gap counted")
        info = v5.publish("plant/v5", b'{"v5":1}', qos=1)
        assert v5.acks[info.mid].value == QUOTA_EXCEEDED
        raw = RawClient(port)  # QoS 2 (paho ignores a PUBREC's reason code)
        raw.send(Connect(client_id="qos2", protocol_version=ProtocolVersion.MQTT_5))
        assert raw.receive().reason_code == 0
        raw.send(Publish("plant/v5", b'{"v5":2}', qos=2, packet_id=1))
        pubrec = raw.receive()
        assert isinstance(pubrec, Pubrec) and pubrec.reason_code == QUOTA_EXCEEDED
        raw.close()
        assert not healthy()

        # MQTT 3.1.1 has no negative PUBACK: no ack, the connection closes, the device resends
        # after reconnecting (paho keeps the message in flight and reconnects by itself).
        device = Client(port, version=4, client_id="v311", clean=False)
        device.paho.reconnect_delay_set(0.1, 0.5)
        device.connect()
        resent = device.publish("plant/v311", b'{"v311":1}', qos=1, wait=False)
        wait_until(device.disconnected.is_set, message="the 3.1.1 publisher disconnected without an ack")
        assert not resent.is_published() and resent.mid not in device.acks
        assert not healthy()

        # Space returns: healthy again by itself, the resend is acknowledged and forwarded.
        filler.unlink()
        wait_until(healthy, timeout=scaled(30), message="healthy once space returned")
        resent.wait_for_publish(scaled(30))
        assert resent.is_published()
        wait_until(lambda: {b'{"before":1}', b'{"v311":1}'} <= set(consumer.payloads()),
                   message="the acknowledged messages in the cloud")
        assert not {b'{"while":1}', b'{"v5":1}', b'{"v5":2}'} & set(consumer.payloads())
        for client in (device, v5, local):
            client.disconnect()
        printed = stop_cleanly(proc)
        assert "mosquitto reads it from memory" in printed

        # The log's first failure is its last write at SIGTERM (QoS 0 records held by a long sync
        # window, the disk filled meanwhile): its log_degraded event reaches the event loop after
        # the log closed.
        held = tmp_path / "held.yaml"
        held.write_text(config.read_text() + "audit:\n  sync_window: 60s\n")
        proc = start_appliance(["--config", str(held)], port=port)
        fill(small_fs)
        local = Client(port, version=5, client_id="local").connect()
        local.subscribe("plant/zero/#", qos=0)
        qos0_flows(local, local, "plant/zero", count=10)
        assert healthy()
        printed = stop_cleanly(proc)
        assert "message log degraded" in printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        consumer.stop()
        cloud.stop()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT], ids=errno.errorcode.get)
def test_the_broker_starts_when_the_state_dir_cannot_take_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    error: int):
    """Without root, the full disk (or quota) injected at the write: mosquitto's generated config and
    password file are kept in memory, the previous start's copies are removed, and it still lets in
    the appliance only."""
    def no_space(path: Path, text: str) -> None:
        raise OSError(error, os.strerror(error))

    files = tmp_path / "state" / "mosquitto"
    files.mkdir(parents=True)
    for stale in ("passwd", "mosquitto.conf"):  # a previous start's
        (files / stale).write_text("stale\n")
    monkeypatch.setattr(broker, "write_private", no_space)
    running = RunningAppliance(make_config(tmp_path / "state")).start()
    try:
        sub = Client(running.port, version=5).connect()
        sub.subscribe("t/#", qos=1)
        pub = Client(running.port, version=4).connect()
        pub.publish("t/x", b"1", qos=1)
        assert [m.payload for m in sub.expect(1)] == [b"1"]
        assert not (files / "passwd").exists() and not (files / "mosquitto.conf").exists()
        endpoint = running.app.broker.endpoint()
        raw = RawClient(endpoint.port)
        raw.send(Connect(client_id="bypass", protocol_version=ProtocolVersion.MQTT_5, username="appliance", password=b"guess"))
        assert raw.receive().reason_code != 0
        pub.disconnect()
        sub.disconnect()
    finally:
        running.stop()


def test_other_errors_writing_the_broker_files_stop_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only a lack of space is worked around: a state dir the appliance may not write (here EACCES,
    as for a mosquitto/ directory owned by root) is a broken install, not hidden behind a warning."""
    def denied(path: Path, text: str) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(broker, "write_private", denied)
    embedded = broker.EmbeddedBroker(BrokerConfig(), tmp_path / "state")
    with pytest.raises(PermissionError):
        asyncio.run(embedded.start())
    assert embedded.pid is None  # no mosquitto started


def test_a_file_kept_in_memory_is_not_inherited_by_other_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Its memfd is close-on-exec like every other descriptor (a helper process started by another
    thread meanwhile must not get it); pass_fds hands mosquitto its copy."""
    def no_space(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(broker, "write_private", no_space)
    in_memory: list[int] = []
    opened = broker._write_file(tmp_path / "passwd", "appliance:hash\n", in_memory)
    try:
        [fd] = in_memory
        assert opened == Path(f"/proc/self/fd/{fd}") and opened.read_text() == "appliance:hash\n"
        assert not os.get_inheritable(fd)
        assert os.stat(fd).st_mode & 0o777 == 0o600
    finally:
        for fd in in_memory:
            os.close(fd)


def test_events_while_the_audit_log_stops_are_recorded_and_after_it_logged(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture):
    """An event raised while the audit service stops its helpers (its log still open) is recorded;
    one that reaches the loop once the log has stopped (its own log_degraded when its last write
    fails on a full disk) is logged and passed to the callbacks, without raising LogClosed."""
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state)).start()
    app = running.app
    helpers = app.audit.helpers
    stop_helpers = helpers.stop

    async def stop_raising_an_event(timeout: float = 30.0) -> None:
        app.on_event(EventKind.BROKER_EXIT, {"while": "stopping"})
        await stop_helpers(timeout)

    monkeypatch.setattr(helpers, "stop", stop_raising_an_event)
    running.stop()
    with AuditQuery(state) as audit_log:
        recorded = [row[0] for row in audit_log.query("SELECT detail FROM events WHERE kind = 'broker_exit'").rows]
    assert len(recorded) == 1 and "stopping" in str(recorded[0]), recorded

    app.on_event(EventKind.BROKER_EXIT, {"while": "stopped"})  # no LogClosed
    assert ("broker_exit", {"while": "stopped"}) in running.events
    assert "broker_exit while the audit log is closed" in caplog.text
