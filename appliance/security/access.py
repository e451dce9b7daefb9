"""The password file and ACL rules the `auth:` section names, loaded together (at start and at every
reload)."""

from __future__ import annotations

from appliance.config import AuthConfig
from appliance.security.acl import AclCheck, load_acl_file
from appliance.security.passwords import PasswordFile


def load_access(auth: AuthConfig) -> tuple[PasswordFile | None, AclCheck]:
    """The password file and ACL rules the config names (AccessError when unusable)."""
    passwords = PasswordFile.load(auth.password_file) if auth.password_file is not None else None
    rules = load_acl_file(auth.acl_file) if auth.acl_file is not None else None
    return passwords, AclCheck(rules)
