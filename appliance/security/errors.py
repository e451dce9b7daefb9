"""What the security package raises: `AccessError` for any file that decides who may connect and
what they may do (password file, ACL file, TLS certificates and keys) when it cannot be used. The
message names the file and, where known, the line."""

from __future__ import annotations


class AccessError(Exception):
    """The password file, ACL file or a TLS file cannot be used."""
