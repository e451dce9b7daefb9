"""MQTT 5 topic aliases of one client's PUBLISHes (client → broker).

The pipeline judges the topic a message is really published to, so an alias is resolved here. The
broker learns an alias from the messages that reach it: when the message that set an alias was
rejected, the broker still maps the alias to its previous topic (or to none), so the next accepted
message using it must be relayed with the topic spelled out.
"""

from __future__ import annotations

from appliance.mqtt import ReasonCode, RemoteProtocolError


class TopicAliases:
    __slots__ = ("maximum", "_topics", "_stale")

    def __init__(self) -> None:
        self.maximum = 0  # the broker's Topic Alias Maximum, from its CONNACK
        self._topics: dict[int, str] = {}
        self._stale: set[int] = set()  # aliases whose topic the broker does not know

    def resolve(self, alias: int, topic: str) -> str:
        """The topic of a PUBLISH carrying `alias` and `topic` (empty: use the alias's topic)."""
        if alias == 0 or alias > self.maximum:
            raise RemoteProtocolError(f"topic alias {alias} out of range", ReasonCode.TOPIC_ALIAS_INVALID)
        if topic:
            self._topics[alias] = topic
            return topic
        known = self._topics.get(alias)
        if known is None:
            raise RemoteProtocolError(f"topic alias {alias} was never set", ReasonCode.PROTOCOL_ERROR)
        return known

    def rejected(self, alias: int, topic: str) -> None:
        """A PUBLISH with `alias` (and `topic`, if it set the alias) was rejected: the broker never
        learnt that setting."""
        if topic:
            self._stale.add(alias)

    def accepted(self, alias: int) -> bool:
        """A PUBLISH with `alias` is relayed: True when the broker does not know the alias's topic
        yet (the message must then carry it, if it does not already). The broker knows it after."""
        if alias in self._stale:
            self._stale.discard(alias)
            return True
        return False
