"""The read side of access control and the subscription quota, for one client.

A SUBSCRIBE is filtered by the ACL (`AclCheck.can_subscribe`) and by `max_subscriptions`: denied
filters are cut out and the rest relayed; the broker's SUBACK then gets the proxy's failure codes
merged back in, in the order of the client's filters. A SUBSCRIBE denied whole is answered by the
proxy (the session queues that SUBACK behind earlier acks). Granted filters are remembered: they
count against the quota (until UNSUBSCRIBE, or the broker refusing them) and are re-checked when
the access rules change (`denied`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from appliance.names import EventKind, Metric
from appliance.mqtt import ProtocolVersion, ReasonCode, Suback, Subscribe, Unsubscribe, decode_packet, encode_packet
from appliance.pipeline import ClientInfo
from appliance.proxy.commands import Notes

if TYPE_CHECKING:
    from appliance.security import AclCheck

# MQTT 3.1.1 has one failure code in a SUBACK.
V3_SUBACK_FAILURE = 0x80


class Subscriptions:
    __slots__ = ("active", "_access", "_limit", "_granted", "_merges", "_notes")

    def __init__(self, access: AclCheck | None, max_subscriptions: int, notes: Notes) -> None:
        # Whether SUBSCRIBE and UNSUBSCRIBE need looking at; otherwise they are relayed untouched.
        self.active = access is not None or max_subscriptions > 0
        self._access = access
        self._limit = max_subscriptions
        self._granted: set[str] = set()
        # Per SUBSCRIBE packet id, in order (a client may wrongly reuse an id before its SUBACK came
        # back): the proxy's failure code per filter (None: the broker's) or None when all filters
        # were relayed, and the filters relayed.
        self._merges: dict[int, deque[tuple[list[int | None] | None, tuple[str, ...]]]] = {}
        self._notes = notes

    @property
    def awaiting_suback(self) -> bool:
        return bool(self._merges)

    def subscribe(self, first_byte: int, body: bytes, client: ClientInfo, version: ProtocolVersion) -> bool | bytes | Suback:
        """Filter one SUBSCRIBE: True to relay it as it is, bytes to relay instead (denied filters
        cut out), or the SUBACK the proxy answers with when every filter was denied."""
        subscribe = decode_packet(first_byte, body, version)
        assert isinstance(subscribe, Subscribe)
        v5 = version is ProtocolVersion.MQTT_5
        access, limit, granted, notes = self._access, self._limit, self._granted, self._notes
        codes: list[int | None] = []
        for subscription in subscribe.subscriptions:
            topic_filter = subscription.topic_filter
            if access is not None and not access.can_subscribe(client.username, client.client_id, topic_filter):
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else V3_SUBACK_FAILURE)
                notes.count(Metric.ACL_DENIED, "subscribe")
                notes.record(EventKind.ACL_DENIED, {"client_id": client.client_id, "username": client.username,
                                            "peer": client.peer, "action": "subscribe", "topic_filter": topic_filter})
            elif limit and topic_filter not in granted and len(granted) >= limit:
                codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else V3_SUBACK_FAILURE)
                notes.limit_exceeded("subscriptions", f"more than {limit} subscriptions")
            else:
                codes.append(None)
                granted.add(topic_filter)
        relayed = tuple(s.topic_filter for s, code in zip(subscribe.subscriptions, codes, strict=True) if code is None)
        if all(code is None for code in codes):
            # Remembered so that a filter the broker refuses stops counting against the limit.
            self._merges.setdefault(subscribe.packet_id, deque()).append((None, relayed))
            return True
        if all(code is not None for code in codes):
            return Suback(subscribe.packet_id, tuple(code for code in codes if code is not None))
        self._merges.setdefault(subscribe.packet_id, deque()).append((codes, relayed))
        kept = tuple(s for s, code in zip(subscribe.subscriptions, codes, strict=True) if code is None)
        return encode_packet(replace(subscribe, subscriptions=kept), version)

    def unsubscribe(self, first_byte: int, body: bytes, version: ProtocolVersion) -> None:
        unsubscribe = decode_packet(first_byte, body, version)
        assert isinstance(unsubscribe, Unsubscribe)
        self._granted.difference_update(unsubscribe.topic_filters)

    def suback(self, first_byte: int, body: bytes, version: ProtocolVersion) -> bytes | None:
        """The broker's SUBACK: the SUBACK to send the client instead (the proxy's refusals put back
        in their places), or None to relay it as it is."""
        packet_id = int.from_bytes(body[:2], "big")
        pending = self._merges.get(packet_id)
        codes, relayed = pending.popleft() if pending else (None, ())
        if pending is not None and not pending:
            del self._merges[packet_id]
        if not relayed and codes is None:
            return None
        suback = decode_packet(first_byte, body, version)
        assert isinstance(suback, Suback)
        # Filters the broker refused are not subscriptions: they neither count nor get re-checked.
        for topic_filter, code in zip(relayed, suback.reason_codes, strict=False):
            if code >= 0x80:
                self._granted.discard(topic_filter)
        if codes is None:
            return None
        broker_codes = iter(suback.reason_codes)
        merged = tuple(code if code is not None else next(broker_codes, ReasonCode.UNSPECIFIED_ERROR) for code in codes)
        return encode_packet(replace(suback, reason_codes=merged), version)

    def denied(self, client: ClientInfo) -> list[str]:
        """Granted filters that the access rules in force now refuse."""
        access = self._access
        if access is None:
            return []
        return sorted(f for f in self._granted if not access.can_subscribe(client.username, client.client_id, f))
