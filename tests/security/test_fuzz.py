"""The short fuzz run inside the normal suite, and the replay of the saved corpus (fixtures/fuzz/).
The long run: `python -m tests.security.fuzz --cases 1000000` (see tests/security/fuzz.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.mqtt import NEED_DATA, Decoder, ProtocolVersion, RemoteProtocolError, encode_packet
from tests.security.fuzz import CORPUS, make_case, run_session

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("version", [ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5, None])
@FAST
@given(data=st.binary(max_size=600))
def test_codec_accepts_or_refuses_any_bytes(version, data):
    decoder = Decoder(version=version, max_packet_size=4096)
    decoder.receive_data(data)
    try:
        while (packet := decoder.next_packet()) is not NEED_DATA:
            # Whatever decodes re-encodes to something that decodes to the same packet.
            again = Decoder(version=decoder.version or ProtocolVersion.MQTT_5)
            again.receive_data(encode_packet(packet, decoder.version or ProtocolVersion.MQTT_5))
            assert again.next_packet() == packet
    except RemoteProtocolError:
        pass


@FAST
@given(seed=st.integers(0, 2**32), noise=st.binary(max_size=64))
def test_session_survives_mutated_streams(seed, noise):
    run_session(make_case(random.Random(seed)))
    run_session(make_case(random.Random(seed)), broker_noise=noise)


@FAST
@given(chunks=st.lists(st.binary(max_size=200), max_size=8))
def test_session_survives_random_bytes(chunks):
    run_session([b"\x10" + chunks[0] if chunks else b"", *chunks[1:]])


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.stem)
def test_corpus_replays(case):
    data = case.read_bytes()
    run_session([data])
    run_session([data[i:i + 1] for i in range(len(data))])  # one byte at a time
    run_session([data[i:i + 7] for i in range(0, len(data), 7)])
