"""What `appliance audit ...` and `appliance quarantine ...` need from the running appliance, as
admin-socket handlers (see appliance/admin.py). Reading the audit log needs no service: the CLI
reads the Parquet files and the log's tail itself (query.py). The service is asked only for what
only its process can do: make everything recorded so far readable (`sync`), seal the active
segment (before a purge rewrites it), re-judge and publish released messages, and record an event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.audit.errors import OperationRefused
from appliance.audit.service import AuditService
from appliance.broker import BrokerEndpoint
from appliance.mqtt import (
    NEED_DATA,
    Connect,
    Decoder,
    Disconnect,
    ProtocolVersion,
    Publish,
    Pubrel,
    encode_packet,
)
from appliance.names import EXTERNAL_EVENT_KINDS
from appliance.pipeline import ClientInfo, Message, Pipeline


class AuditOperations:
    def __init__(self, service: AuditService, pipeline: Pipeline, endpoint: Callable[[], BrokerEndpoint | None]):
        self._service = service
        self._pipeline = pipeline
        self._endpoint = endpoint

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
        kind = str(request["kind"])
        if kind not in EXTERNAL_EVENT_KINDS:
            raise OperationRefused(f"event kind {kind!r} cannot be recorded from outside")
        detail = dict(request.get("detail") or {})
        if request.get("_peer"):
            detail["by"] = request["_peer"]  # who asked, from the kernel (SO_PEERCRED), not from the request
        self._service.record_event(kind, detail)
        await self._service.sync()
        return {}

    async def quarantine_release(self, request: dict[str, Any]) -> dict[str, Any]:
        """Judge each message again with the schema set in force; publish the ones that pass. The
        CLI read them from the audit log: `messages` holds their rows (payload in hex)."""
        results = [await self._release(row) for row in request["messages"]]
        await self._service.sync()
        return {"results": results}

    async def _release(self, row: dict[str, Any]) -> dict[str, Any]:
        decision_id = int(row["id"])
        client = ClientInfo(row["client_id"], row.get("username"), row["peer"], ProtocolVersion(row["mqtt_version"]))
        message = Message(row["topic"], bytes.fromhex(row["payload"]), int(row["qos"]), bool(row["retain"]), client,
                          received_at=time.time(), released_from=decision_id)
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


async def publish_once(endpoint: BrokerEndpoint, message: Message, *, timeout: float = 10.0) -> None:
    """Publish one message straight to the broker (it has passed the pipeline already)."""
    v = ProtocolVersion.MQTT_3_1_1
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, ssl=endpoint.ssl, server_hostname=endpoint.server_hostname),
        timeout,
    )
    decoder = Decoder(version=v)

    async def receive() -> Any:
        while (packet := decoder.next_packet()) is NEED_DATA:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                raise OperationRefused("the broker closed the connection")
            decoder.receive_data(data)
        return packet

    try:
        writer.write(encode_packet(Connect(client_id=f"appliance-release-{time.monotonic_ns()}",
                                           username=endpoint.username, password=endpoint.password), v))
        connack = await receive()
        if connack.reason_code != 0:
            raise OperationRefused(f"the broker refused the connection (code {connack.reason_code})")
        qos = message.qos
        writer.write(encode_packet(Publish(message.topic, message.payload, qos=qos, retain=message.retain,
                                           packet_id=1 if qos else None), v))
        if qos == 2:
            await receive()  # PUBREC
            writer.write(encode_packet(Pubrel(1), v))
        if qos:
            await receive()  # PUBACK / PUBCOMP
        writer.write(encode_packet(Disconnect(), v))
        await writer.drain()
    finally:
        writer.close()


async def forget_session(endpoint: BrokerEndpoint, client_id: str, *, timeout: float = 10.0) -> None:
    """Discard the broker's session for `client_id` (its subscriptions and queued messages): connect
    with that id and a clean session, which replaces the old one, then disconnect."""
    v = ProtocolVersion.MQTT_3_1_1
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, ssl=endpoint.ssl, server_hostname=endpoint.server_hostname),
        timeout,
    )
    decoder = Decoder(version=v)
    try:
        writer.write(encode_packet(Connect(client_id=client_id, clean_start=True,
                                           username=endpoint.username, password=endpoint.password), v))
        while (packet := decoder.next_packet()) is NEED_DATA:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                return
            decoder.receive_data(data)
        writer.write(encode_packet(Disconnect(), v))
        await writer.drain()
    finally:
        writer.close()
