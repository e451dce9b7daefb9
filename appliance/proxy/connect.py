"""What the proxy decides at CONNECT, apart from the session's state: who may connect, and the
CONNECT the broker sees.

- Authentication: the listener's `Authenticator` decides (a TLS identity stands in for the username
  when the listener says so); a refusal is answered with the CONNACK code for it.
- The will is a message like any other: the pipeline judges it now, and a rejected will refuses the
  connection.
- Broker credentials: the broker sees the appliance's own account instead of the client's, read at
  each CONNECT (the broker may have restarted with a new generated password). The broker then sees
  every client as one account, so a client id alone would let bob resume alice's persistent session
  (her subscriptions and queued messages): each identity gets its own client-id namespace there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from appliance.mqtt import Connect, ConnectReturnCode, ProtocolVersion, ReasonCode, encode_packet
from appliance.pipeline import ACCEPT, ClientInfo, Message, Pipeline, Verdict
from appliance.security.passwords import AuthResult


@dataclass(frozen=True, slots=True)
class BrokerCredentials:
    """Credentials the proxy presents to the broker instead of the client's own."""

    username: str
    password: bytes | None


CredentialSource = BrokerCredentials | Callable[[], BrokerCredentials | None] | None


def broker_client_id(username: str, client_id: str) -> str:
    """The client id the broker sees for `client_id` of `username`: unique per identity."""
    return f"u{len(username)}:{username}:{client_id}"


def refusal_code(result: AuthResult, version: ProtocolVersion) -> int:
    """The CONNACK code for a failed authentication."""
    bad = result is AuthResult.BAD_CREDENTIALS
    if version is ProtocolVersion.MQTT_5:
        return ReasonCode.BAD_USER_NAME_OR_PASSWORD if bad else ReasonCode.NOT_AUTHORIZED
    return ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD if bad else ConnectReturnCode.NOT_AUTHORIZED


def judge_will(pipeline: Pipeline, connect: Connect, client: ClientInfo) -> Verdict:
    """The pipeline's verdict on the will a CONNECT carries (accepted when there is none)."""
    will = connect.will
    if will is None:
        return ACCEPT
    message = Message(will.topic, will.payload, will.qos, will.retain, client, will.properties, is_will=True)
    return pipeline.judge(message).verdict


def connect_for_broker(connect: Connect, raw: bytes, username: str | None,
                       credentials: CredentialSource) -> tuple[bytes, str]:
    """The CONNECT packet the broker gets for `connect` (received as `raw`) of the client known as
    `username`, and the client id the broker sees. `raw` itself when nothing changes."""
    current = credentials() if callable(credentials) else credentials
    if current is None:
        return raw, connect.client_id
    client_id = connect.client_id
    if client_id and username is not None:
        client_id = broker_client_id(username, client_id)
    connect = replace(connect, username=current.username, password=current.password, client_id=client_id)
    return encode_packet(connect, connect.protocol_version), client_id

