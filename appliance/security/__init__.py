"""Who may connect, and what they may publish and subscribe to.

- `passwords`: mosquitto_passwd-compatible password files (`$7$` PBKDF2-SHA512 and the older `$6$`)
  and `Authenticator`, which the proxy's sans-IO `Session` asks about every CONNECT.
- `acl`: mosquitto-style ACL files (`user`, `topic`, `pattern` with `%c`/`%u`), `AclCheck` (the
  pipeline check that rejects PUBLISHes and wills with 0x87 Not authorized) and the read side the
  session uses to filter SUBSCRIBE packets.
- `tls`: server-side SSL contexts for TLS listeners and the identity a client certificate gives.
- `access`: `load_access`, both files the `auth:` section names; `errors`: `AccessError`, the base of
  every error raised here (`PasswordFileError`, `AclError`, `TLSFileError`).

Nothing here does socket I/O.
"""

from appliance.security.access import load_access
from appliance.security.acl import AccessRules, AclCheck, AclError, load_acl_file
from appliance.security.errors import AccessError
from appliance.security.passwords import Authenticator, AuthResult, PasswordFile, PasswordFileError, hash_password

__all__ = [
    "AccessError", "AccessRules", "AclCheck", "AclError", "AuthResult", "Authenticator", "PasswordFile",
    "PasswordFileError", "hash_password", "load_access", "load_acl_file",
]
