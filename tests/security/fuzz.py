"""Fuzzing the codec and whole proxy sessions with random and mutated packet streams.

    python -m tests.security.fuzz --cases 1000000            # long run (random mutations)
    python -m tests.security.fuzz --seconds 300              # long run, by time
    python -m tests.security.fuzz --atheris -atheris_runs=N  # coverage-guided, when atheris is installed

A case is a client→broker byte stream: valid packets (CONNECT first, most of the time), then
mutations (bit flips, truncations, inserted and duplicated bytes, giant length fields), cut into
random chunks. `run_session` drives a `Session` with it while a model broker answers what it was
sent, and checks the invariants: no exception escapes (the session handles every protocol error
itself), pending buffers stay below the packet size limit, every byte sent to the client decodes as
MQTT, and every packet the session builds or inspects for the broker decodes too (other packets
are relayed frame by frame, as designed). A failing case is written to fixtures/fuzz/ and
`tests/security/test_fuzz.py` replays that corpus in the normal suite.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path

from appliance.mqtt import (
    NEED_DATA, Connack, Connect, Decoder, Disconnect, PacketType, Pingreq, Pingresp, Properties, PropertyId,
    ProtocolVersion, Puback, Pubcomp, Publish, Pubrec, Pubrel, RemoteProtocolError, Suback, Subscribe, Subscription,
    Unsuback, Unsubscribe, Will, decode_packet, encode_packet, read_fixed_header,
)
from appliance.pipeline import Message, Pipeline, Reason, Verdict
from appliance.proxy.commands import Command, OpenBroker, SendToBroker, SendToClient
from appliance.proxy.session import Session, SessionLimits
from appliance.security import AclCheck, Authenticator, PasswordFile
from appliance.security.acl import parse_acl

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "fuzz"
LIMITS = SessionLimits(max_packet_size=4096, max_connect_size=1024, max_inflight=5, max_subscriptions=3,
                       message_rate=50, message_burst=5)
V3, V5 = ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5
_INSPECTED = {int(PacketType.CONNECT), int(PacketType.PUBLISH), int(PacketType.SUBSCRIBE), int(PacketType.UNSUBSCRIBE)}

_PASSWORDS = PasswordFile()
_PASSWORDS.set("alice", "pw")
_ACL = AclCheck(parse_acl("topic readwrite t/#\nuser alice\ntopic readwrite #\npattern write dev/%c/#\n"))


class _RejectBad:
    name = "bad"

    def check(self, message: Message) -> Verdict | None:
        if message.payload[:3] == b"bad":
            action = "disconnect" if message.payload[3:4] == b"!" else "reject"
            return Verdict.reject(Reason("bad", "bad payload " * 30), action=action)  # type: ignore[arg-type]
        return None


def _decode_all(data: bytes, version: ProtocolVersion) -> list[object]:
    decoder = Decoder(version=version)
    decoder.receive_data(data)
    packets = []
    while (packet := decoder.next_packet()) is not NEED_DATA:
        packets.append(packet)
    if decoder.buffered:
        raise AssertionError(f"{decoder.buffered} trailing bytes in the session's output")
    return packets


class _Broker:
    """Answers what the session forwards, as mosquitto would (enough for acks and SUBACK merging)."""

    def __init__(self) -> None:
        self.buffer = b""

    def answer(self, data: bytes, version: ProtocolVersion) -> bytes:
        self.buffer += data
        out = []
        pos, size = 0, len(self.buffer)
        while pos < size:
            header = read_fixed_header(self.buffer, pos, size)
            if header is None or header[2] > size:
                break
            first, body, end = header
            kind = first >> 4
            try:
                packet = decode_packet(first, self.buffer[body:end], version)
            except RemoteProtocolError:
                if kind in _INSPECTED and kind != int(PacketType.UNSUBSCRIBE):
                    raise AssertionError(f"the session sent the broker a malformed packet of type {kind}") from None
                packet = None  # relayed frame by frame: the broker would refuse it
            pos = end
            if isinstance(packet, Connect):
                out.append(Connack(properties=Properties(((PropertyId.TOPIC_ALIAS_MAXIMUM, 5),)) if version is V5 else Properties.EMPTY))
            elif isinstance(packet, Publish) and packet.qos == 1:
                out.append(Puback(packet.packet_id))  # type: ignore[arg-type]
            elif isinstance(packet, Publish) and packet.qos == 2:
                out.append(Pubrec(packet.packet_id))  # type: ignore[arg-type]
            elif isinstance(packet, Pubrel):
                out.append(Pubcomp(packet.packet_id))
            elif isinstance(packet, Subscribe):
                out.append(Suback(packet.packet_id, tuple(s.qos for s in packet.subscriptions)))
            elif isinstance(packet, Unsubscribe):
                out.append(Unsuback(packet.packet_id, (0,) * len(packet.topic_filters)) if version is V5 else Unsuback(packet.packet_id))
            elif isinstance(packet, Pingreq):
                out.append(Pingresp())
        self.buffer = self.buffer[pos:]
        return b"".join(encode_packet(p, version) for p in out)


def run_session(chunks: list[bytes], broker_noise: bytes = b"") -> Session:
    """Drive one session with client chunks; raise AssertionError when an invariant breaks."""
    now = [0.0]
    session = Session(peer="192.0.2.1:1", pipeline=Pipeline([_ACL, _RejectBad()]), limits=LIMITS,
                      authenticator=Authenticator(_PASSWORDS, allow_anonymous=True), access=_ACL,
                      clock=lambda: now[0])
    broker = _Broker()
    to_client = bytearray()
    to_broker: list[bytes] = []

    def run(commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, SendToClient):
                to_client.extend(command.data)
            elif isinstance(command, SendToBroker):
                to_broker.append(command.data)
            elif isinstance(command, OpenBroker):
                run(session.broker_connected())

    for i, chunk in enumerate(chunks):
        now[0] += 0.01
        run(session.client_data(chunk))
        _check_buffers(session)
        for _ in range(3):  # let the broker answer, and the answers release held acks
            if to_broker and session.version is not None:
                data = b"".join(to_broker)
                to_broker.clear()
                answer = broker.answer(data, session.version)
                if i == len(chunks) // 2 and broker_noise:
                    answer += broker_noise
                if answer:
                    run(session.broker_data(answer))
                    _check_buffers(session)
        to_broker.clear()
    if not broker_noise:
        _decode_all(bytes(to_client), session.version or V3)
    return session


def _check_buffers(session: Session) -> None:
    bound = max(LIMITS.max_packet_size, LIMITS.max_connect_size)
    from_client, from_broker = session.buffered
    assert from_client <= bound, from_client
    assert from_broker <= 1 << 20


# -- case generation -----------------------------------------------------------------------------

def _valid_packets(rng: random.Random) -> list[bytes]:
    version = rng.choice([V3, V5])
    v5 = version is V5
    props = Properties(((PropertyId.TOPIC_ALIAS, rng.randint(1, 6)),)) if v5 and rng.random() < 0.3 else Properties.EMPTY
    will = Will(rng.choice(["t/w", "x/w", "dev/c/w"]), b"bye", qos=rng.randint(0, 2)) if rng.random() < 0.2 else None
    user = rng.choice([None] * 6 + [("alice", b"pw")] * 3 + [("alice", b"no"), ("bob", b"x")])
    connect = Connect(client_id=rng.choice(["c", "", "dev", "#"]), protocol_version=version, will=will,
                      username=user[0] if user else None, password=user[1] if user else None)
    packets = [connect] if rng.random() < 0.95 else []
    pid = 1
    for _ in range(rng.randint(0, 30)):
        roll = rng.random()
        qos = rng.randint(0, 2)
        if roll < 0.55:
            topic = rng.choice(["t/a", "x/b", "dev/c/1", "", "t/" + "z" * rng.randint(0, 50)])
            payload = rng.choice([b"{}", b"{}", b"{}", b"bad", b"", rng.randbytes(rng.randint(0, 200))] + [b"bad!"] * (rng.random() < 0.1))
            p = props if topic == "" or rng.random() < 0.2 else Properties.EMPTY
            if topic == "" and not p:
                topic = "t/a"
            packets.append(Publish(topic, payload, qos=qos, packet_id=pid if qos else None, properties=p))
        elif roll < 0.7:
            filters = tuple(Subscription(rng.choice(["t/#", "#", "x/+", "t/a", "$share/g/t/a", "+/+"]), qos=qos)
                            for _ in range(rng.randint(1, 4)))
            packets.append(Subscribe(pid, filters))
        elif roll < 0.75:
            packets.append(Unsubscribe(pid, ("t/#", "x/+")))
        elif roll < 0.85:
            packets.append(rng.choice([Puback(pid), Pubrec(pid), Pubrel(pid), Pubcomp(pid)]))
        elif roll < 0.95:
            packets.append(Pingreq())
        else:
            packets.append(Disconnect())
        pid = pid % 65535 + 1
    return [encode_packet(p, version) for p in packets]


def _mutate(rng: random.Random, data: bytearray) -> None:
    for _ in range(rng.choice([0, 0, 1, 1, 2, 5])):
        if not data:
            data += rng.randbytes(8)
        op = rng.random()
        i = rng.randrange(len(data))
        if op < 0.35:
            data[i] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            data[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op < 0.65:
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op < 0.75:
            del data[i:i + rng.randint(1, 16)]
        elif op < 0.85:
            data[i:i] = rng.choice([b"\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x01", b"\x00\x00", b"\xed\xa0\x80"])
        else:
            j = rng.randrange(len(data))
            data[i:i] = data[j:j + rng.randint(1, 64)]


def make_case(rng: random.Random) -> list[bytes]:
    data = bytearray(b"".join(_valid_packets(rng)))
    if rng.random() < 0.05:
        data = bytearray(rng.randbytes(rng.randint(0, 300)))
    _mutate(rng, data)
    chunks = []
    pos = 0
    while pos < len(data):
        step = 1 if rng.random() < 0.05 else rng.randint(1, max(1, len(data)))
        chunks.append(bytes(data[pos:pos + step]))
        pos += step
    return chunks


def save_case(chunks: list[bytes], note: str) -> Path:
    data = b"".join(chunks)
    path = CORPUS / f"session-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    (path.with_suffix(".txt")).write_text(note + "\n")
    return path


def fuzz(cases: int, seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    started = time.monotonic()
    failures = done = 0
    reasons: dict[str, int] = {}
    while done < cases and time.monotonic() - started < seconds:
        chunks = make_case(rng)
        try:
            session = run_session(chunks)
        except Exception as exc:  # noqa: BLE001 - a fuzzer records every failure, then goes on
            failures += 1
            path = save_case(chunks, f"{type(exc).__name__}: {exc}")
            print(f"FAIL case {done}: {type(exc).__name__}: {exc} -> {path}", file=sys.stderr)
        else:
            key = (session.close_reason or session.state.value).split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        done += 1
        if done % 50_000 == 0:
            print(f"{done} cases, {failures} failures, {done / (time.monotonic() - started):.0f}/s", file=sys.stderr)
    elapsed = time.monotonic() - started
    print(f"{done} cases in {elapsed:.0f}s ({done / elapsed:.0f}/s), seed {seed}, {failures} failures")
    for key, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {count:>9}  {key}")
    return 1 if failures else 0


def _atheris(argv: list[str]) -> int:
    import atheris  # type: ignore[import-not-found]

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        split = fdp.ConsumeIntInRange(1, 64)
        raw = fdp.ConsumeBytes(len(data))
        run_session([raw[i:i + split] for i in range(0, len(raw), split)] or [b""])

    seeds = [b"".join(_valid_packets(random.Random(i))) for i in range(20)]
    import tempfile

    corpus_dir = Path(tempfile.mkdtemp(prefix="fuzz-atheris-"))  # libFuzzer adds to it: keep it out of fixtures/
    for i, seed in enumerate(seeds):
        (corpus_dir / f"seed-{i}").write_bytes(b"\x10" + seed)
    print(f"atheris corpus in {corpus_dir}", file=sys.stderr)
    atheris.instrument_all()  # coverage feedback for everything already imported (appliance.*)
    atheris.Setup([sys.argv[0], *argv, str(corpus_dir)], one)
    atheris.Fuzz()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=float("inf"))
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--atheris", action="store_true", help="coverage-guided with atheris; other args go to libFuzzer")
    args, rest = parser.parse_known_args()
    if args.atheris:
        return _atheris(rest)
    return fuzz(args.cases, args.seconds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
