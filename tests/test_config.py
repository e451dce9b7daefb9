"""The config file: one parser for every size and duration; errors that say where and what was meant."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from appliance.config import ConfigError, iter_settings, load_config
from appliance.config.base import parse_duration, parse_seconds, parse_size


def _load(tmp_path: Path, text: str):
    path = tmp_path / "appliance.yaml"
    path.write_text(text)
    return load_config(path)


def test_every_size_and_duration_takes_units(tmp_path):
    config = _load(tmp_path, """\
limits:
  max_packet_size: 1MB
  max_connect_size: 64KiB
  write_buffer_high: "256 KiB"
  connect_timeout: "5s"
broker:
  start_timeout: 1m
  restart_backoff_initial: 200ms
  restart_backoff_max: 10
audit:
  journal_max_bytes: 2GB
upstream:
  url: mqtt://cloud.example
  keepalive: 1m
  ack_timeout: 30s
  outbox: {max_bytes: 512MiB, max_messages: 1000, max_age: 7d}
""")
    assert (config.limits.max_packet_size, config.limits.max_connect_size, config.limits.write_buffer_high) == (
        1_000_000, 65_536, 262_144)
    assert config.limits.connect_timeout == 5.0
    assert (config.broker.start_timeout, config.broker.restart_backoff_initial, config.broker.restart_backoff_max) == (60.0, 0.2, 10.0)
    assert config.audit.journal_max_bytes == 2 * 1000**3
    assert config.upstream.keepalive == 60 and config.upstream.ack_timeout == timedelta(seconds=30)
    assert config.upstream.outbox.max_bytes == 512 * 1024**2 and config.upstream.outbox.max_age == timedelta(days=7)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), ("7d", 604800), ("250ms", 0.25),
                                               (12, 12), (1.5, 1.5), ("2", 2), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_seconds(text) == seconds and parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(("text", "size"), [("1MB", 10**6), ("2GB", 2 * 10**9), ("512KiB", 512 * 1024), (4096, 4096),
                                            ("4096", 4096), ("1 mib", 1024**2), ("1.5KB", 1500)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_every_size_and_duration_setting_uses_the_one_parser():
    """A new `..._bytes` or `..._timeout` setting that takes only a plain number fails here."""
    unit_words = ("size", "bytes", "timeout", "backoff", "interval", "max_age", "keepalive", "buffer")
    parsers = {parse_size, parse_duration, parse_seconds}
    missing = []
    for key, info in iter_settings():
        if not any(word in key.rsplit(".", 1)[-1] for word in unit_words):
            continue
        validators = {getattr(m, "func", None) for m in info.metadata}
        if not validators & parsers:
            missing.append(key)
    assert missing == []


def test_errors_name_the_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "listen: 127.0.0.1:1883\nlimits:\n  max_connections: 10\n  max_packet_size: lots\n")
    assert f"{tmp_path / 'appliance.yaml'}:4: limits.max_packet_size: expected a size like 2GB" in str(caught.value)


def test_typos_get_a_did_you_mean_with_the_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "schemass: schemas\nlimits:\n  max_pakcet_size: 1MB\n  frobnicate: 1\n")
    text = str(caught.value)
    config = tmp_path / "appliance.yaml"
    assert f"{config}:1: schemass: unknown setting; did you mean 'schemas'?" in text
    assert f"{config}:3: limits.max_pakcet_size: unknown setting; did you mean 'max_packet_size'?" in text
    assert f"{config}:4: limits.frobnicate: unknown setting\n" in text + "\n"
