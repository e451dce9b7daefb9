"""What the proxy decides at CONNECT: refusal codes, the will, what the broker sees."""

from __future__ import annotations

import pytest

from appliance.mqtt import Connect, ConnectReturnCode, ProtocolVersion, ReasonCode, Will, encode_packet
from appliance.pipeline import ClientInfo, CountingSink, Pipeline
from appliance.proxy.connect import BrokerCredentials, broker_client_id, connect_for_broker, judge_will, refusal_code
from appliance.security.passwords import AuthResult
from tests.proxy.test_session import RejectBad
from tests.proxy.units import decode

V3 = ProtocolVersion.MQTT_3_1_1
V5 = ProtocolVersion.MQTT_5


@pytest.mark.parametrize(("result", "version", "code"), [
    (AuthResult.BAD_CREDENTIALS, V5, ReasonCode.BAD_USER_NAME_OR_PASSWORD),
    (AuthResult.NOT_AUTHORIZED, V5, ReasonCode.NOT_AUTHORIZED),
    (AuthResult.BAD_CREDENTIALS, V3, ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD),
    (AuthResult.NOT_AUTHORIZED, V3, ConnectReturnCode.NOT_AUTHORIZED),
])
def test_refusal_codes(result, version, code):
    assert refusal_code(result, version) == code


def test_the_will_is_judged_as_a_message():
    sink = CountingSink()
    pipeline = Pipeline([RejectBad()], [sink])
    client = ClientInfo("dev", None, "p", V5)
    assert judge_will(pipeline, Connect(client_id="dev"), client).accepted  # no will: nothing judged
    assert sink.counts == {}
    bad = Connect(client_id="dev", protocol_version=V5, will=Will("status/dev", b"bad"))
    assert not judge_will(pipeline, bad, client).accepted
    message, _ = sink.recent[-1]
    assert message.is_will and message.topic == "status/dev"


def test_without_broker_credentials_the_connect_is_relayed_as_it_is():
    connect = Connect(client_id="dev", protocol_version=V5, username="alice", password=b"pw")
    raw = encode_packet(connect, V5)
    assert connect_for_broker(connect, raw, "alice", None) == (raw, "dev")
    assert connect_for_broker(connect, raw, "alice", lambda: None)[0] is raw  # the broker has no account


@pytest.mark.parametrize("version", [V3, V5])
def test_broker_credentials_and_client_id_namespace(version):
    connect = Connect(client_id="dev-1", protocol_version=version, clean_start=False, username="bob", password=b"pw")
    raw, client_id = connect_for_broker(connect, encode_packet(connect, version), "bob", BrokerCredentials("appliance", b"s"))
    seen = decode(raw, version)
    assert (seen.username, seen.password, seen.client_id, seen.clean_start) == ("appliance", b"s", "u3:bob:dev-1", False)
    assert client_id == broker_client_id("bob", "dev-1") == "u3:bob:dev-1"


def test_an_empty_or_anonymous_client_id_is_not_namespaced():
    creds = BrokerCredentials("appliance", None)
    for connect, username in ((Connect(client_id="", protocol_version=V5, username="bob"), "bob"),
                              (Connect(client_id="dev", protocol_version=V5), None)):
        raw, client_id = connect_for_broker(connect, encode_packet(connect, V5), username, creds)
        assert client_id == connect.client_id and decode(raw, V5).username == "appliance"
