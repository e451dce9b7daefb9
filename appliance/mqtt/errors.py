"""The two ways a conversation goes wrong, both a ``ProtocolError`` (catch that for either).

``RemoteProtocolError``: the peer sent bytes that break MQTT. ``reason_code``
is the reason code to answer with (CONNACK / DISCONNECT) before closing.

``LocalProtocolError``: our own caller built or encoded something MQTT does not
allow. It is a ``ValueError`` because it is a programming error, not traffic.

Any other exception escaping the codec is a bug in the codec.
"""

from __future__ import annotations

from .reason_codes import ReasonCode

__all__ = ["ProtocolError", "RemoteProtocolError", "LocalProtocolError"]


class ProtocolError(Exception):
    """MQTT was broken: by the peer (``RemoteProtocolError``) or by our own caller (``LocalProtocolError``)."""


class RemoteProtocolError(ProtocolError):
    def __init__(self, msg: str, reason_code: ReasonCode = ReasonCode.MALFORMED_PACKET) -> None:
        super().__init__(msg)
        self.msg = msg
        self.reason_code = reason_code

    def __repr__(self) -> str:
        return f"RemoteProtocolError({self.msg!r}, {self.reason_code.name})"


class LocalProtocolError(ProtocolError, ValueError):
    pass
