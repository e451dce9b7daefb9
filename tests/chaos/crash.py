"""Crash chaos: repeated `kill -9` of a real `appliance run` under QoS 1 load from several
publishers, with the uplink (a real cloud mosquitto) cut and restored at random, on one state dir.

What must hold at the end (after a clean restart that drains the outbox):
- every message acknowledged with a success code reached the cloud broker and has an `accept`
  verdict in the audit log; every one acknowledged with a reject code has a `reject` verdict and
  did not reach the cloud;
- the cloud received nothing else than those accepted messages and the ones still waiting for
  their acknowledgement when their round ended (sent just before a kill: stored and forwarded, but
  the publisher never heard back), each with an `accept` verdict;
- duplicates are allowed (at-least-once: a restarted forwarder sends again what the cloud
  acknowledged after its last saved cursor, docs/decisions/0004-message-log.md) and counted:
  every copy of a message the cloud received more than once is one of those messages, every copy
  carries its verdict's id as the `message-id` user property (what consumers deduplicate on), and
  the counts add up (copies received = distinct messages + duplicates).

The suite runs a few rounds (tests/chaos/test_crash.py, which reports the duplicates); longer runs
(docs/performance.md, "Long runs"; `make chaos`):

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
from paho.mqtt.reasoncodes import ReasonCode

from appliance.audit.query import AuditQuery
from tests.forward.harness import CloudBroker, Subscriber
from tests.helpers import wait_until
from tests.processes import free_port, start_appliance

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    accepted: set[bytes] = field(default_factory=set)  # acknowledged with a success code
    rejected: set[bytes] = field(default_factory=set)  # acknowledged with a reject code
    # Sent and never acknowledged: the appliance was killed first (or the ack took over 2 s)
    unacknowledged: set[bytes] = field(default_factory=set)
    kills: int = 0
    uplink_cuts: int = 0
    received: int = 0  # copies the cloud subscriber received, duplicates included
    in_cloud: int = 0  # distinct messages among them
    duplicates: int = 0  # received - in_cloud
    duplicated: int = 0  # messages received more than once
    most_copies: int = 0  # of one message

    def summary(self) -> str:
        return (f"{self.kills} kills, {self.uplink_cuts} uplink cuts, {len(self.accepted)} accepted and "
                f"{len(self.rejected)} rejected acknowledgements, {len(self.unacknowledged)} never acknowledged; "
                f"the cloud received {self.received} copies of {self.in_cloud} messages: {self.duplicates} "
                f"duplicates of {self.duplicated} messages (at most {self.most_copies} copies of one)")


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
        acks: dict[int, ReasonCode] = {}
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
                    published = False
                else:
                    published = info.is_published()
                code = acks.get(info.mid) if published else None
                with self.lock:
                    if code is None:  # the appliance died: stored and forwarded or not, never acknowledged
                        self.outcome.unacknowledged.add(payload)
                    elif not code.is_failure:
                        self.outcome.accepted.add(payload)
                    else:
                        self.outcome.rejected.add(payload)
                if code is None:
                    return
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
        copies = subscriber.payloads()
        received = Counter(copies)
        carried: dict[bytes, set[str | None]] = {}  # the message-id user property of each payload's copies
        for message in list(subscriber.messages):
            properties = dict(getattr(message.properties, "UserProperty", None) or [])
            carried.setdefault(bytes(message.payload), set()).add(properties.get("message-id"))
        outcome.received, outcome.in_cloud = len(copies), len(received)
        outcome.duplicates = sum(n - 1 for n in received.values())
        outcome.duplicated = sum(1 for n in received.values() if n > 1)
        outcome.most_copies = max(received.values(), default=0)
        assert outcome.received == outcome.in_cloud + outcome.duplicates
        with AuditQuery(workdir / "state") as audit_log:
            verdicts: dict[bytes, list[str]] = {}
            ids: dict[bytes, int] = {}
            for payload, verdict, id_ in audit_log.query(
                    "SELECT payload, verdict, id FROM decisions WHERE payload IS NOT NULL", max_rows=1 << 40).rows:
                verdicts.setdefault(bytes(payload), []).append(verdict)
                ids[bytes(payload)] = id_
        check(outcome, set(received), verdicts)
        check_message_ids(carried, ids, outcome.summary())
    finally:
        subscriber.stop()
        cloud.stop()
    return outcome


def check(outcome: Outcome, in_cloud: set[bytes], verdicts: dict[bytes, list[str]]) -> None:
    """The end state against what the publishers were told; `verdicts`: each recorded payload's
    verdicts in the audit log (a payload is unique to one publish: exactly one verdict each)."""
    state = outcome.summary()
    leaked = outcome.rejected & in_cloud
    assert not leaked, f"{len(leaked)} messages acknowledged with a reject code reached the cloud ({state})"
    lost = outcome.accepted - in_cloud
    assert not lost, f"{len(lost)} messages acknowledged with a success code are not in the cloud ({state})"
    unexplained = in_cloud - outcome.accepted - outcome.unacknowledged
    assert not unexplained, (f"{len(unexplained)} messages in the cloud were neither acknowledged as accepted "
                             f"nor waiting for an acknowledgement at a kill ({state})")
    for what, payloads, verdict in (("acknowledged with a success code", outcome.accepted, "accept"),
                                    ("in the cloud", in_cloud, "accept"),
                                    ("acknowledged with a reject code", outcome.rejected, "reject")):
        wrong = [p for p in payloads if verdicts.get(p) != [verdict]]
        assert not wrong, (f"{len(wrong)} of {len(payloads)} messages {what} do not have exactly one "
                           f"'{verdict}' verdict in the audit log, e.g. {wrong[0]!r}: {verdicts.get(wrong[0])} ({state})")


def check_message_ids(carried: dict[bytes, set[str | None]], ids: dict[bytes, int], state: str = "") -> None:
    """Consumers deduplicate on the `message-id` user property (docs/forwarding.md): every copy of
    a message, duplicates included, must carry its verdict's id in the audit log."""
    wrong = {p: found for p, found in carried.items() if found != {str(ids.get(p))}}
    assert not wrong, (f"the copies of {len(wrong)} of {len(carried)} messages in the cloud do not all carry their "
                       f"verdict's id as message-id, e.g. {next(iter(wrong.values()))} ({state})")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.crash", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--publishers", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        outcome = run(Path(tmp), rounds=args.rounds, seed=args.seed, publishers=args.publishers, log=True)
    print(f"ok: {outcome.summary()}; every accepted one in the cloud and in the audit log, nothing else "
          "in the cloud but messages in flight at a kill, no rejected one; every copy with its verdict's message-id")
    return 0


if __name__ == "__main__":
    sys.exit(main())
