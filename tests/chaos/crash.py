"""Crash chaos: repeated `kill -9` of a real `appliance run` under QoS 1 load from several
publishers, with the uplink (a real cloud mosquitto) cut and restored at random, on one state dir.

What must hold at the end (after a clean restart that drains the outbox):
- every message acknowledged with a success code reached the cloud broker (duplicates allowed,
  counted) and has its verdict in the audit log;
- no message acknowledged with a reject code reached the cloud.

The suite runs a few rounds (tests/chaos/test_crash.py); longer runs:

    python -m tests.chaos.crash --rounds 50 --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from appliance.audit.query import AuditQuery
from tests.forward.harness import CloudBroker, Subscriber
from tests.helpers import wait_until
from tests.processes import free_port, start_appliance

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    accepted: set[bytes] = field(default_factory=set)  # acknowledged with a success code
    rejected: set[bytes] = field(default_factory=set)  # acknowledged with a reject code
    kills: int = 0
    uplink_cuts: int = 0
    duplicates: int = 0
    in_cloud: int = 0


def _payload(name: str, seq: int) -> tuple[bytes, bool]:
    """A unique reading; every fifth is out of range (rejected by schemas/v1)."""
    valid = seq % 5 != 0
    temperature = round(seq % 100_000 * 0.001, 3) if valid else 1000 + seq
    return (json.dumps({"device_id": name, "ts": "2026-11-27T12:00:00Z", "temperature": temperature},
                       separators=(",", ":")).encode(), valid)


class Publisher(threading.Thread):
    """Publishes QoS 1 readings through one connection until told to stop or the connection dies;
    records each ack's outcome (MQTT 5 reason codes tell accept from reject)."""

    def __init__(self, port: int, name: str, outcome: Outcome, lock: threading.Lock, start_seq: int):
        super().__init__(name=f"publisher-{name}", daemon=True)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        self.port, self.name_, self.outcome, self.lock, self.seq = port, name, outcome, lock, start_seq
        self.stop = threading.Event()

    def run(self) -> None:
        acks: dict[int, object] = {}
        self.client.on_publish = lambda c, u, mid, rc, p: acks.__setitem__(mid, rc)
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=10)
        except OSError:
            return
        self.client.loop_start()
        try:
            while not self.stop.is_set():
                payload, _ = _payload(self.name_, self.seq)
                self.seq += 1
                info = self.client.publish(f"sensor/{self.name_}/temperature", payload, qos=1)
                try:
                    info.wait_for_publish(2)
                except (RuntimeError, ValueError):
                    return
                if not info.is_published():
                    return  # the appliance died: this one was never acknowledged
                code = acks.get(info.mid)
                with self.lock:
                    if code is not None and not code.is_failure:
                        self.outcome.accepted.add(payload)
                    elif code is not None:
                        self.outcome.rejected.add(payload)
        finally:
            self.client.loop_stop()
            try:
                self.client.disconnect()
            except Exception:  # noqa: BLE001 - the socket is gone after a kill
                pass


def run(workdir: Path, *, rounds: int, seed: int, publishers: int = 3, round_s: tuple[float, float] = (0.5, 2.0),
        log: bool = False) -> Outcome:
    rng = random.Random(seed)
    cloud = CloudBroker(workdir / "cloud")
    port = free_port()
    config = workdir / "appliance.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nstate_dir: state\nschemas: {REPO / 'schemas' / 'v1'}\nlog_level: warning\n"
        f"metrics:\n  listen: 127.0.0.1:0\nupstream:\n  url: {cloud.url}\n  client_id: chaos-gw\n"
        "  topic_template: '{topic}'\n  backoff_initial: 0.1s\n  backoff_max: 0.5s\n"
        "audit:\n  segment_bytes: 64KiB\n"
    )
    outcome = Outcome()
    lock = threading.Lock()
    cloud.start()
    subscriber = Subscriber(cloud.port, "sensor/#", client_id="chaos-cloud", version=5).start()
    seqs = {f"p{n}": 0 for n in range(publishers)}
    try:
        for round_no in range(rounds):
            proc = start_appliance(["--config", str(config)], port=port, cwd=workdir)
            if rng.random() < 0.5:  # cut or restore the uplink at random
                if cloud.proc is not None:
                    cloud.stop()
                    outcome.uplink_cuts += 1
                else:
                    cloud.start()
            # A device name per round keeps every payload unique (seq restarts at 0).
            running = [Publisher(port, f"{name}r{round_no}", outcome, lock, 0) for name in seqs]
            for p in running:
                p.start()
            time.sleep(rng.uniform(*round_s))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            outcome.kills += 1
            for p in running:
                p.stop.set()
            for p in running:
                p.join(10)
            if log:
                print(f"round {round_no + 1}/{rounds}: {len(outcome.accepted)} accepted, "
                      f"{len(outcome.rejected)} rejected so far", file=sys.stderr)
        # The end: the uplink up, a clean start, and the outbox drains.
        if cloud.proc is None:
            cloud.start()
        proc = start_appliance(["--config", str(config)], port=port, cwd=workdir)
        try:
            wait_until(lambda: outcome.accepted <= set(subscriber.payloads()), timeout=180,
                       message=f"{len(outcome.accepted)} acknowledged messages in the cloud")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        received = Counter(subscriber.payloads())
        outcome.in_cloud = len(received)
        outcome.duplicates = sum(n - 1 for n in received.values())
        leaked = outcome.rejected & set(received)
        assert not leaked, f"{len(leaked)} messages acknowledged with a reject code reached the cloud"
        with AuditQuery(workdir / "state") as audit_log:
            recorded = {bytes(row[0]) for row in
                        audit_log.query("SELECT payload FROM decisions WHERE payload IS NOT NULL", max_rows=1 << 40).rows}
        missing = outcome.accepted - recorded
        assert not missing, f"{len(missing)} of {len(outcome.accepted)} acknowledged messages have no verdict"
        missing = outcome.rejected - recorded
        assert not missing, f"{len(missing)} rejected (and acknowledged) messages have no verdict"
    finally:
        subscriber.stop()
        cloud.stop()
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.crash", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--publishers", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        outcome = run(Path(tmp), rounds=args.rounds, seed=args.seed, publishers=args.publishers, log=True)
    print(f"ok: {outcome.kills} kills, {outcome.uplink_cuts} uplink cuts, {len(outcome.accepted)} accepted and "
          f"{len(outcome.rejected)} rejected acknowledgements; all accepted in the cloud ({outcome.duplicates} "
          "duplicates) and in the audit log; no rejected one in the cloud")
    return 0


if __name__ == "__main__":
    sys.exit(main())
