"""Does Debian's mosquitto service want a port the appliance listens on?

    python3 mosquitto_collision.py [APPLIANCE_CONFIG [MOSQUITTO_CONF]]

Exit 0 and print why when they collide, 1 when they do not, 2 when the appliance's config cannot
be read (saying so). The package's postinst stops and disables Debian's mosquitto.service on 0 only.
Ports are compared, not addresses: mosquitto on 0.0.0.0:1883 and the appliance on 127.0.0.1:1883
cannot both bind.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

MOSQUITTO_DEFAULT_PORT = 1883  # mosquitto 2 without any listener: a loopback listener on 1883


def mosquitto_ports(conf: Path) -> set[int]:
    """Ports Debian's mosquitto listens on with this mosquitto.conf."""
    return _configured_ports(conf, set()) or {MOSQUITTO_DEFAULT_PORT}


def _configured_ports(conf: Path, seen: set[Path]) -> set[int]:
    """Ports of `listener` and `port` lines, following include_dir."""
    if conf in seen or not conf.is_file():
        return set()
    seen.add(conf)
    ports: set[int] = set()
    for raw in conf.read_text(errors="replace").splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] in ("listener", "port") and words[1].isdigit():
            ports.add(int(words[1]))
        elif len(words) >= 2 and words[0] == "include_dir":
            for included in sorted(glob.glob(os.path.join(words[1], "*.conf"))):
                ports |= _configured_ports(Path(included), seen)
    return ports


def appliance_ports(config: Path) -> set[int]:
    from appliance.config import load_config

    return {listener.listen.port for listener in load_config(config).all_listeners()}


def main(argv: list[str]) -> int:
    config = Path(argv[1] if len(argv) > 1 else "/etc/mqtt-appliance/appliance.yaml")
    conf = Path(argv[2] if len(argv) > 2 else "/etc/mosquitto/mosquitto.conf")
    try:
        ours = appliance_ports(config)
    except Exception as exc:  # noqa: BLE001 - any unreadable config: leave mosquitto alone, say why
        print(f"cannot read {config} ({exc}); Debian's mosquitto service left as it is", file=sys.stderr)
        return 2
    shared = sorted(ours & mosquitto_ports(conf))
    if shared:
        print(f"Debian's mosquitto ({conf}) and the appliance ({config}) both listen on port "
              f"{', '.join(map(str, shared))}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
