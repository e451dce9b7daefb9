"""The upstream: section, and its documentation."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from appliance.config import TLSConfig
from appliance.forward import OutboxBounds, UpstreamConfig

DOC = Path(__file__).parents[2] / "docs" / "forwarding.md"


def test_defaults_mean_forwarding_off_with_documented_bounds():
    config = UpstreamConfig()
    assert not config.enabled
    assert config.qos == 1 and config.window == 100 and config.ack_timeout == timedelta(seconds=30)
    assert config.outbox == OutboxBounds(max_bytes=512 * 1000**2, max_messages=1_000_000, max_age=timedelta(days=7), policy="drop_oldest")


def test_urls_ports_durations_and_sizes():
    config = UpstreamConfig.model_validate({
        "url": "mqtts://abc-ats.iot.eu-west-1.amazonaws.com", "ack_timeout": "2m", "gateway_id": "gw7",
        "outbox": {"max_bytes": "64MiB", "max_age": "12h", "policy": "reject_new"},
    })
    assert (config.host, config.port, config.uses_tls) == ("abc-ats.iot.eu-west-1.amazonaws.com", 8883, True)
    assert config.ack_timeout == timedelta(minutes=2) and config.outbox.max_bytes == 64 * 1024**2
    assert config.effective_client_id == "appliance-gw7"
    assert UpstreamConfig(url="mqtt://cloud").port == 1883
    assert UpstreamConfig(url="mqtt://cloud").websocket_url is None


def test_websocket_urls():
    wss = UpstreamConfig(url="wss://abc-ats.iot.eu-west-1.amazonaws.com/mqtt", tls=TLSConfig(ca_file=Path("ca.pem")))
    assert (wss.host, wss.port, wss.uses_tls) == ("abc-ats.iot.eu-west-1.amazonaws.com", 443, True)
    assert wss.websocket_url == "wss://abc-ats.iot.eu-west-1.amazonaws.com/mqtt"
    ws = UpstreamConfig(url="ws://cloud:8080/mqtt?x=1")
    assert (ws.host, ws.port, ws.uses_tls, ws.websocket_url) == ("cloud", 8080, False, "ws://cloud:8080/mqtt?x=1")
    assert UpstreamConfig(url="ws://cloud/mqtt").port == 80


@pytest.mark.parametrize(("values", "message"), [
    ({"url": "http://cloud:80"}, "mqtt://host"),
    ({"url": "mqtt://cloud", "tls": {"ca_file": "ca.pem"}}, "needs an mqtts:// or wss:// url"),
    ({"url": "ws://cloud/mqtt", "tls": {"ca_file": "ca.pem"}}, "needs an mqtts:// or wss:// url"),
    ({"url": "wss://cloud/mqtt#x"}, "fragment"),
    ({"password": "x"}, "needs upstream.username"),
    ({"topic_template": "gw/{gateway}/{topic}"}, "unknown field"),
    ({"topic_template": "gw/{topic"}, "topic_template"),
    ({"ack_timeout": 0}, "positive duration"),
    ({"qos": 2}, "qos"),
    ({"outbox": {"policy": "drop_newest"}}, "policy"),
    ({"windwo": 5}, "windwo"),
])
def test_invalid_values_are_refused_with_a_clear_message(values: dict, message: str):
    with pytest.raises(ValidationError, match=re.escape(message)):
        UpstreamConfig.model_validate(values)


def _keys(model: type[BaseModel], prefix: str) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        assert field.description, f"{prefix}{name} has no description"
        if name in ("outbox", "tls"):
            keys += _keys(OutboxBounds if name == "outbox" else TLSConfig, f"{prefix}{name}.")
    return keys


def test_every_key_is_documented():
    text = DOC.read_text()
    missing = [key for key in _keys(UpstreamConfig, "upstream.") if f"`{key}`" not in text]
    assert missing == []


def test_every_status_field_and_event_is_documented():
    from dataclasses import fields

    from appliance.forward import ForwarderStatus

    text = DOC.read_text()
    assert [f.name for f in fields(ForwarderStatus) if f"`{f.name}`" not in text] == []
    for kind in ("uplink_up", "uplink_down", "outbox_dropped", "outbox_error"):
        assert f"`{kind}`" in text


