"""What `appliance audit ...` and `appliance quarantine ...` need from the running appliance, as
admin-socket handlers (see appliance/admin.py). Reading the audit log needs no service: the CLI
reads the Parquet files and the log's tail itself (query.py). The service is asked only for what
only its process can do: make everything recorded so far readable (`sync`), seal the active
segment (before a purge rewrites it), re-judge and publish released messages, and record an event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
import contextlib
from contextlib import asynccontextmanager
from typing import Any

from appliance.audit.errors import OperationRefused
from appliance.audit.service import AuditService
from appliance.broker import BrokerEndpoint
from appliance.mqtt import ProtocolError, ProtocolVersion, RemoteProtocolError
from appliance.mqtt.client import (
    Client,
    Connected,
    ConnectionRefused,
    Event,
    NeedData,
    Published,
    PublishReceived,
    reason_name,
)
from appliance.names import EXTERNAL_EVENT_KINDS, EventKind
from appliance.pipeline import ClientInfo, Message, Pipeline


class AuditOperations:
    def __init__(self, service: AuditService, pipeline: Pipeline, endpoint: Callable[[], BrokerEndpoint | None]):
        self._service = service
        self._pipeline = pipeline
        self._endpoint = endpoint
        self._releasing: set[int] = set()  # ids a `quarantine_release` is working on now

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
        return {
            "audit_sync": self.sync,
            "audit_seal": self.seal,
            "audit_event": self.event,
            "quarantine_release": self.quarantine_release,
        }

    async def sync(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            await self._service.sync(timeout=float(request.get("timeout", 30)))
        except TimeoutError as exc:
            raise OperationRefused("the message log has not written for 30 s; see the appliance's log") from exc
        return {"last_seq": self._service.log.last_seq}

    async def seal(self, request: dict[str, Any]) -> dict[str, Any]:
        sealed = await asyncio.to_thread(self._service.log.seal)
        return {"sealed": str(sealed.path) if sealed is not None else None}

    async def event(self, request: dict[str, Any]) -> dict[str, Any]:
        """An event another process wants in the audit log (e.g. who purged what)."""
        name = str(request["kind"])
        if name not in EXTERNAL_EVENT_KINDS:
            raise OperationRefused(f"event kind {name!r} cannot be recorded from outside")
        kind = EventKind(name)
        detail = dict(request.get("detail") or {})
        if request.get("_peer"):
            detail["by"] = request["_peer"]  # who asked, from the kernel (SO_PEERCRED), not from the request
        self._service.record_event(kind, detail)
        await self._service.sync()
        return {}

    async def quarantine_release(self, request: dict[str, Any]) -> dict[str, Any]:
        """Judge each message again with the schema set in force; publish the ones that pass. The
        CLI read them from the audit log: `messages` holds their rows (payload in hex).

        The request is checked whole before anything is published (a malformed row or `detail`
        is refused, nothing done); an id given twice is released once, and an id another request
        is releasing right now is refused. The first message the broker does not take (down,
        refusing, no answer) ends the batch: the rest are not tried. Whatever was done is recorded
        here, as one `quarantine_released` event (released, failed and untried ids, the error,
        `detail` from the asker and who asked), in the process that published: a released message
        is recorded even if the asker is gone, and also when the handler is cut short (the
        appliance stopping cancels it), before that goes on."""
        asked = _asked_detail(request.get("detail"))
        messages = _held_messages(request.get("messages"))
        busy = sorted(m.released_from for m in messages if m.released_from in self._releasing)
        if busy:
            raise OperationRefused(f"already being released by another request: {', '.join(map(str, busy))}")
        ids = [str(m.released_from) for m in messages]
        self._releasing.update(m.released_from for m in messages if m.released_from is not None)
        results: list[dict[str, Any]] = []
        error: str | None = None
        try:
            for message, decision_id in zip(messages, ids):
                try:
                    results.append(await self._release(message))
                except (OSError, TimeoutError, OperationRefused, ProtocolError) as exc:
                    error = f"{decision_id}: {_broker_failure(exc)}"
                    results.append({"id": decision_id, "released": False, "error": error})
                    break
        except BaseException as exc:  # cancelled (the appliance stopping) or a bug: record, then go on
            if len(results) < len(ids):
                decision_id = ids[len(results)]
                error = (f"{decision_id}: the release was cut short ({type(exc).__name__}{f': {exc}' if str(exc) else ''}):"
                         " it may or may not have reached the broker")
                results.append({"id": decision_id, "released": False, "error": error})
            raise
        finally:
            self._releasing.difference_update(m.released_from for m in messages if m.released_from is not None)
            untried = ids[len(results):]
            released = [r["id"] for r in results if r.get("released")]
            if released or error is not None:
                detail = dict(asked)
                detail["ids"] = released
                if error is not None:
                    detail.update(failed=[r["id"] for r in results if "error" in r], not_attempted=untried,
                                  error=error)
                if request.get("_peer"):
                    detail["by"] = request["_peer"]
                self._service.record_event(EventKind.QUARANTINE_RELEASED, detail)
        answer: dict[str, Any] = {"results": results, "not_attempted": untried, "error": error}
        try:
            await self._service.sync()
        except TimeoutError:
            # Not a failure of the release (what was published was published): a warning to show
            # whatever the results, that the event may not be on disk yet.
            answer["warning"] = ("the message log has not written for 30 s: the quarantine_released event may "
                                 "not be on disk yet; see the appliance's log")
        return answer

    async def _release(self, held: Message) -> dict[str, Any]:
        decision_id = held.released_from
        message = held._replace(received_at=time.time())
        verdict = self._pipeline.judge(message).verdict
        new_id = self._service.sink.last_id
        if not verdict.accepted:
            return {"id": str(decision_id), "released": False, "new_id": str(new_id),
                    "reasons": [reason.message for reason in verdict.reasons]}
        endpoint = self._endpoint()
        if endpoint is None:
            raise OperationRefused("the broker is not running; try again once it is")
        await publish_once(endpoint, message)
        return {"id": str(decision_id), "released": True, "new_id": str(new_id)}


def _asked_detail(detail: object) -> dict[str, Any]:
    """The asker's own words for the event (e.g. the console user), never the outcome or who asked."""
    if detail is None:
        return {}
    if not isinstance(detail, dict):
        raise OperationRefused(f"detail must be an object, not {type(detail).__name__}")
    return {str(k): v for k, v in detail.items() if k not in _RELEASE_OUTCOME}


def _held_messages(rows: object) -> list[Message]:
    """The rows to release as messages (`released_from` their id), each id once, in order; raises
    OperationRefused naming the first malformed row."""
    if not isinstance(rows, list):
        raise OperationRefused("messages must be a list of quarantined messages")
    messages: dict[int, Message] = {}
    for n, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise TypeError(f"not an object but {type(row).__name__}")
            decision_id = int(row["id"])
            qos = int(row["qos"])
            if qos not in (0, 1, 2):
                raise ValueError(f"qos {qos}")
            username = row.get("username")
            client = ClientInfo(str(row["client_id"]), None if username is None else str(username), str(row["peer"]),
                                ProtocolVersion(int(row["mqtt_version"])))
            payload = bytes.fromhex(str(row["payload"]))
            if not isinstance(row["topic"], str) or not isinstance(row["retain"], bool):
                raise TypeError("topic must be a string and retain a boolean")
            messages.setdefault(decision_id, Message(row["topic"], payload, qos, row["retain"], client,
                                                     released_from=decision_id))
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise OperationRefused(f"message {n} of the request is malformed ({what}): nothing was released") from None
    return list(messages.values())


_RELEASE_OUTCOME = frozenset({"ids", "failed", "not_attempted", "error", "by"})


def _broker_failure(exc: BaseException) -> str:
    if isinstance(exc, OperationRefused):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "the broker did not answer in time (the message may or may not have reached it)"
    if isinstance(exc, ProtocolError):  # e.g. over the broker's maximum packet size: never sent
        return f"the message could not be sent to the broker ({exc})"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"the connection to the broker failed ({reason}): not confirmed by the broker"


async def publish_once(endpoint: BrokerEndpoint, message: Message, *, timeout: float = 10.0) -> None:
    """Publish one message straight to the broker (it has passed the pipeline already) and wait for
    its acknowledgement (QoS 1: PUBACK; QoS 2: PUBREC, PUBREL, PUBCOMP)."""
    client = Client(f"appliance-release-{time.monotonic_ns()}", username=endpoint.username,
                    password=endpoint.password)
    async with _connection(endpoint, client, timeout) as (reader, writer):
        packet_id, data = client.publish(message.topic, message.payload, message.qos, message.retain)
        writer.write(data)
        while packet_id:
            event = await _next_event(client, reader, timeout)
            if isinstance(event, PublishReceived):
                writer.write(client.release(packet_id))
            elif isinstance(event, Published):
                if event.refused:
                    raise OperationRefused(f"the broker refused the message: {reason_name(event.reason_code)}")
                break
            else:
                raise OperationRefused(f"the broker answered the PUBLISH with {type(event).__name__}")
        # Published: from here on nothing may fail or wait (no drain: a connection lost now, or a
        # cancellation, must not make a delivered message look failed; releasing it again would
        # publish it twice). The DISCONNECT goes out as the connection closes.
        with contextlib.suppress(OSError):
            writer.write(client.disconnect())


async def forget_session(endpoint: BrokerEndpoint, client_id: str, *, timeout: float = 10.0) -> None:
    """Discard the broker's session for `client_id` (its subscriptions and queued messages): connect
    with that id and a clean session, which replaces the old one, then disconnect. Raises OSError
    (or TimeoutError) when the broker could not be asked."""
    client = Client(client_id, clean_start=True, username=endpoint.username, password=endpoint.password)
    try:
        async with _connection(endpoint, client, timeout) as (_, writer):
            writer.write(client.disconnect())
            await writer.drain()
    except _Closed:
        return  # the broker closed the connection: whatever it did, the old session is gone
    except OperationRefused as exc:  # refused, or a protocol error
        raise ConnectionError(str(exc)) from None


class _Closed(OperationRefused):
    """The broker closed the connection."""


@asynccontextmanager
async def _connection(endpoint: BrokerEndpoint, client: Client, timeout: float
                      ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to the local broker on which `client` is connected (CONNACK accepted)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, ssl=endpoint.ssl, server_hostname=endpoint.server_hostname),
        timeout,
    )
    try:
        writer.write(client.connect())
        event = await _next_event(client, reader, timeout)
        if isinstance(event, ConnectionRefused):
            raise OperationRefused(f"the broker refused the connection: {event.reason} (code {event.reason_code})")
        if not isinstance(event, Connected):
            raise OperationRefused(f"the broker answered CONNECT with {type(event).__name__}")
        yield reader, writer
    except RemoteProtocolError as exc:
        raise OperationRefused(f"protocol error from the broker: {exc}") from None
    finally:
        writer.close()


async def _next_event(client: Client, reader: asyncio.StreamReader, timeout: float) -> Event:
    while isinstance(event := client.next_event(), NeedData):
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            raise _Closed("the broker closed the connection")
        client.receive_data(data)
    return event
