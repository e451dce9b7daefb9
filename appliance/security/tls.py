"""TLS contexts built from the config's files (errors name the file), and who a client certificate
says the client is."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from appliance.config.base import ListenerTLSConfig, TLSConfig
from appliance.security.errors import AccessError


class TLSFileError(AccessError, ValueError):
    """A CA, certificate or key file that is missing, unreadable or not what it should be."""

    def __init__(self, path: Path | str, error: Exception):
        reason = error.strerror if isinstance(error, OSError) and error.strerror and not isinstance(error, ssl.SSLError) \
            else str(error)
        super().__init__(f"{path}: {reason}")


def _load_ca(context: ssl.SSLContext, ca_file: Path | None) -> None:
    if ca_file is None:
        return
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSFileError(ca_file, exc) from exc


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    for path in (cert_file, key_file):
        if path is not None:
            try:
                path.open("rb").close()
            except OSError as exc:
                raise TLSFileError(path, exc) from exc
    try:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise TLSFileError(f"{cert_file}" + (f" / {key_file}" if key_file else ""), exc) from exc


def server_ssl_context(tls: ListenerTLSConfig) -> ssl.SSLContext:
    """TLS 1.2 or newer; with `require_client_certificate`, mutual TLS against `ca_file`."""
    if tls.ca_file is None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    else:  # only this CA signs client certificates: not the system's CAs too
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # what create_default_context(cafile=) builds
        _load_ca(context, tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls.cert_file, tls.key_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """Towards a broker: its CA (the system's when unset), and a client certificate for mutual TLS."""
    if tls.ca_file is None:
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # what create_default_context(cafile=) builds
        _load_ca(context, tls.ca_file)
    context.check_hostname = tls.verify_hostname
    if tls.cert_file:
        _load_chain(context, tls.cert_file, tls.key_file)
    return context


def certificate_identity(peercert: dict[str, Any] | None, source: str) -> str | None:
    """The certificate's common name (`cn`) or first subjectAltName (`san`), or None."""
    if not peercert or source == "none":
        return None
    if source == "cn":
        for rdn in peercert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None
    for _kind, value in peercert.get("subjectAltName", ()):
        return str(value)
    return None
