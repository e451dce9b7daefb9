"""What `appliance check` verifies beyond the config's own validation: every file the config names
can be read and is what it should be (password file, ACL file, CAs, certificates and keys). Every
problem is reported, each with its setting and path, not only the first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from appliance.config import Config
from appliance.config.base import ListenerTLSConfig, TLSConfig
from appliance.security import AccessError, load_access
from appliance.security.tls import TLSFileError, client_ssl_context, server_ssl_context

_TLS_FILES = ("ca_file", "cert_file", "key_file")


def named_files(config: Config) -> Iterator[tuple[str, Path]]:
    """(setting, path) of every file the config names."""
    for key in ("password_file", "acl_file"):
        if (path := getattr(config.auth, key)) is not None:
            yield f"auth.{key}", path
    for where, tls in _tls_sections(config):
        for key in _TLS_FILES:
            if (path := getattr(tls, key)) is not None:
                yield f"{where}.{key}", path


def _tls_sections(config: Config) -> Iterator[tuple[str, TLSConfig | ListenerTLSConfig]]:
    for index, listener in enumerate(config.listeners):
        if listener.tls is not None:
            yield f"listeners[{index}].tls", listener.tls
    if config.broker.mode == "external" and config.broker.tls is not None:
        yield "broker.tls", config.broker.tls
    if config.upstream.url is not None and config.upstream.tls is not None:
        yield "upstream.tls", config.upstream.tls
    if config.console.tls is not None:  # the web console's (`appliance console`), checked here too
        yield "console.tls", config.console.tls


def problems(config: Config) -> list[str]:
    """Every file problem, as `setting: path: what is wrong`; empty when the config can run."""
    found = []
    unreadable = set()
    for key, path in named_files(config):
        try:
            path.open("rb").close()
        except OSError as exc:
            found.append(f"{key}: {path}: {exc.strerror}")
            unreadable.add(path)
    if not {config.auth.password_file, config.auth.acl_file} & unreadable:
        try:
            load_access(config.auth)
        except AccessError as exc:
            found.append(str(exc))
    for where, tls in _tls_sections(config):
        if any(getattr(tls, key) in unreadable for key in _TLS_FILES):
            continue
        try:
            server_ssl_context(tls) if isinstance(tls, ListenerTLSConfig) else client_ssl_context(tls)
        except TLSFileError as exc:
            found.append(f"{where}: {exc}")
    return found
