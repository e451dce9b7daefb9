"""TLS for LAN listeners: the server's SSL context, and who a client certificate says the client is."""

from __future__ import annotations

import ssl
from typing import Any

from appliance.settings import ListenerTLSConfig


def server_ssl_context(tls: ListenerTLSConfig) -> ssl.SSLContext:
    """TLS 1.2 or newer; with `require_client_certificate`, mutual TLS against `ca_file`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
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
