"""Secrets as systemd credentials instead of values in the YAML.

A config names a credential (`upstream.password_credential: upstream-password`,
`tls.key_credential: upstream-tls-key`); this module finds its file:

1. `$CREDENTIALS_DIRECTORY/NAME` or `$CREDENTIALS_DIRECTORY/appliance_NAME`, when systemd started the
   appliance with `LoadCredential=`. The packaged unit loads the whole directory
   /etc/mqtt-appliance/credentials (`LoadCredential=appliance:/etc/mqtt-appliance/credentials`),
   which systemd names `appliance_<file name>`; a unit of one's own may load single ones by name.
2. Otherwise (`sudo appliance check`, a run in the foreground) `/etc/mqtt-appliance/credentials/NAME`
   itself, or the directory `APPLIANCE_CREDENTIALS_DIR` names.

systemd copies credentials to a non-swappable, per-service directory readable by the service user
only, so the files in /etc can stay root's (mode 0600): the service account never reads them there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CREDENTIALS_DIR = Path("/etc/mqtt-appliance/credentials")
# The ID of the packaged unit's LoadCredential= of the whole directory: systemd prefixes each file's
# name with it.
UNIT_PREFIX = "appliance_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,254}$")


def credential_path(name: str) -> Path:
    """The file holding credential `name`; ValueError saying where it was looked for."""
    if not _NAME.match(name):
        raise ValueError(f"credential name {name!r}: use letters, digits, '-', '_', '.' (a file name, no '/')")
    looked: list[Path] = []
    systemd = os.environ.get("CREDENTIALS_DIRECTORY")
    if systemd:
        candidates = [Path(systemd) / name, Path(systemd) / f"{UNIT_PREFIX}{name}"]
    else:
        candidates = [Path(os.environ.get("APPLIANCE_CREDENTIALS_DIR") or CREDENTIALS_DIR) / name]
    for path in candidates:
        if path.is_file():
            return path
        looked.append(path)
    hint = f"put it in {CREDENTIALS_DIR / name} (owned by root, mode 0600) and restart the service"
    raise ValueError(f"credential {name!r} not found (looked for {', '.join(map(str, looked))}): {hint}")


def read_credential(name: str) -> str:
    """A textual credential (a password): the file's text without one trailing newline."""
    path = credential_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"credential {name!r}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"credential {name!r}: {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ValueError(f"credential {name!r}: {path} is empty")
    return text
