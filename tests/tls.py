"""Throwaway certificates for TLS tests, made with the openssl command line."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path, *, server_name: str = "localhost", ca_name: str = "Test CA") -> Certificates:
    """A CA, a server certificate for `server_name` (and 127.0.0.1), and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca_name}",
         "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)
    (directory / "san.ext").write_text(f"subjectAltName=DNS:{server_name},IP:127.0.0.1\n")
    for name, subject, ext in (("server", server_name, ["-extfile", "san.ext"]), ("client", "sensor-1", [])):
        _run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={subject}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
        _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", *ext, cwd=directory)
    return Certificates(
        directory / "ca.pem", directory / "server.pem", directory / "server.key",
        directory / "client.pem", directory / "client.key",
    )
