"""Secrets from systemd credentials: a config names a credential, the appliance reads the file
systemd put in $CREDENTIALS_DIRECTORY (or /etc/mqtt-appliance/credentials outside systemd)."""

from __future__ import annotations

import pytest

from appliance.config import ConfigError, load_config
from appliance.credentials import credential_path, read_credential

UPSTREAM = {"upstream.url": "mqtts://cloud.example:8883", "upstream.username": "gw"}


@pytest.fixture
def systemd_credentials(tmp_path, monkeypatch):
    directory = tmp_path / "credentials"
    directory.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


def test_password_from_the_credentials_directory(systemd_credentials):
    (systemd_credentials / "upstream-password").write_text("s3cret\n")
    config = load_config(None, {**UPSTREAM, "upstream.password_credential": "upstream-password"})
    assert config.upstream.password == "s3cret"


def test_the_packaged_units_directory_credential_names_are_found(systemd_credentials):
    # LoadCredential=appliance:/etc/mqtt-appliance/credentials names each file appliance_<file>.
    (systemd_credentials / "appliance_upstream-password").write_text("from-the-directory")
    assert read_credential("upstream-password") == "from-the-directory"


def test_tls_key_credential_becomes_the_key_file(systemd_credentials):
    key = systemd_credentials / "upstream-tls-key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    config = load_config(None, {**UPSTREAM, "upstream.tls": {"cert_file": "/etc/ssl/gw.pem", "key_credential": "upstream-tls-key"}})
    assert config.upstream.tls is not None and config.upstream.tls.key_file == key
    listener = {"listen": "127.0.0.1:8883", "tls": {"cert_file": "/etc/ssl/gw.pem", "key_credential": "upstream-tls-key"}}
    config = load_config(None, {"listeners": [listener]})
    assert config.listeners[0].tls is not None and config.listeners[0].tls.key_file == key


def test_outside_systemd_the_etc_directory_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("APPLIANCE_CREDENTIALS_DIR", str(tmp_path))
    (tmp_path / "upstream-password").write_text("on-disk")
    assert read_credential("upstream-password") == "on-disk"


def test_a_missing_credential_says_where_to_put_it(systemd_credentials):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {**UPSTREAM, "upstream.password_credential": "upstream-password"})
    message = str(caught.value)
    assert "credential 'upstream-password' not found" in message
    assert "/etc/mqtt-appliance/credentials/upstream-password" in message


def test_password_and_credential_together_are_refused(systemd_credentials):
    (systemd_credentials / "upstream-password").write_text("x")
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, {**UPSTREAM, "upstream.password": "y", "upstream.password_credential": "upstream-password"})


@pytest.mark.parametrize("name", ["../etc/shadow", "a/b", "", ".hidden"])
def test_a_credential_name_is_a_file_name(name, systemd_credentials):
    with pytest.raises(ValueError, match="credential name"):
        credential_path(name)


def test_an_empty_credential_is_refused(systemd_credentials):
    (systemd_credentials / "upstream-password").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_credential("upstream-password")
