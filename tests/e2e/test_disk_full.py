"""A full disk under QoS 1 load with the uplink down, on a real small filesystem (a tmpfs mounted for
the test; needs root). Nothing acknowledged with a success code is lost: while the message log
cannot write, publishes are refused (MQTT 5: 0x97 Quota exceeded) instead of acknowledged, and the
appliance recovers by itself when space returns."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit.query import AuditQuery
from tests.conftest import make_config
from tests.forward.harness import CloudBroker, Subscriber
from tests.helpers import Client, RunningAppliance, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a size-limited tmpfs: needs root")

QUOTA_EXCEEDED = 0x97


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


def test_full_disk_refuses_instead_of_losing_and_recovers(tmp_path: Path, small_fs: Path):
    cloud = CloudBroker(tmp_path / "cloud")  # not started: the uplink is down
    state = small_fs / "state"
    config = make_config(state, **{
        "upstream.url": cloud.url, "upstream.backoff_initial": "0.1s", "upstream.backoff_max": "0.5s",
        "audit.segment_bytes": "256KiB",
    })
    running = RunningAppliance(config).start()
    accepted: list[bytes] = []
    refused: list[bytes] = []
    try:
        pub = Client(running.port, version=5, client_id="filler").connect()
        sent = 0
        # ~1 KB payloads until the 3 MB filesystem is full and some are refused (bounded).
        while len(refused) < 20 and sent < 20_000:
            # 10 in flight, as a pipelining device keeps them (the log syncs at once for it).
            batch = [(f'{{"n":{sent + i},"pad":"{"x" * 1000}"}}'.encode()) for i in range(10)]
            infos = [pub.publish(f"plant/fill/{sent + i}", payload, qos=1, wait=False) for i, payload in enumerate(batch)]
            for payload, info in zip(batch, infos, strict=True):
                info.wait_for_publish(30)
                code = pub.acks[info.mid]
                (refused if code.is_failure else accepted).append(payload)
                if code.is_failure:
                    assert code.value == QUOTA_EXCEEDED, code
            sent += len(batch)
        assert refused, f"the disk never filled after {sent} messages"
        assert not running.app.audit.healthy
        assert any(kind == "log_degraded" for kind, _ in running.events)

        # Space returns: the log writes again by itself, and publishes are acknowledged again.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        wait_until(lambda: running.app.audit.healthy, timeout=30, message="the log writes again")
        for n in range(5):
            payload = f'{{"after":{n}}}'.encode()
            info = pub.publish(f"plant/after/{n}", payload, qos=1)
            assert not pub.acks[info.mid].is_failure
            accepted.append(payload)
        pub.disconnect()

        # The uplink comes back: every acknowledged message reaches the cloud, no refused one does.
        cloud.start()
        subscriber = Subscriber(cloud.port, "plant/#").start()
        try:
            wanted = set(accepted)
            wait_until(lambda: wanted <= set(subscriber.payloads()), timeout=120,
                       message=f"{len(wanted)} acknowledged messages in the cloud")
            assert not set(refused) & set(subscriber.payloads())
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
