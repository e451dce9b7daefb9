"""Built-in rules that need no expression language: payload size and per-client message rate."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(text: str) -> tuple[float, float]:
    """'10/s', '600/min', '5/hour' → (messages, per seconds)."""
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"max_rate must look like 10/s, 600/min or 5/hour, got {text!r}")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError("max_rate must be positive")
    return count, float(_UNIT_SECONDS[match.group(2)])


@dataclass(frozen=True, slots=True)
class MaxPayloadSize:
    name: str
    limit: int

    def exceeded(self, payload: bytes) -> str | None:
        if len(payload) > self.limit:
            return f"rule {self.name!r}: payload is {len(payload)} bytes, more than {self.limit}"
        return None


@dataclass(slots=True)
class RateLimit:
    """A token bucket per client id: `count` messages per `per` seconds, bursts up to `count`."""

    name: str
    count: float
    per: float
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    MAX_CLIENTS = 100_000

    def exceeded(self, client_id: str, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(client_id, (self.count, now))
        tokens = min(self.count, tokens + (now - last) * self.count / self.per)
        if tokens < 1.0:
            self._buckets[client_id] = (tokens, now)
            return f"rule {self.name!r}: more than {self.count:g} messages per {self.per:g} s from client {client_id!r}"
        if len(self._buckets) >= self.MAX_CLIENTS and client_id not in self._buckets:
            # Bounded memory under a client-id storm: forget only buckets that are full again anyway
            # (idle for a whole period), so active clients keep their state.
            idle = now - self.per
            self._buckets = {cid: state for cid, state in self._buckets.items() if state[1] > idle}
        self._buckets[client_id] = (tokens - 1.0, now)
        return None
