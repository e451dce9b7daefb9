"""What `appliance audit ...` and `appliance quarantine ...` ask the running appliance to do,
as admin-socket handlers (see appliance/admin.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance import exchange
from appliance.admin import AdminError, Handler
from appliance.audit.errors import AuditError
from appliance.audit.results import format_result
from appliance.audit.service import AuditService
from appliance.broker import BrokerEndpoint
from appliance.mqtt import (
    NEED_DATA, Connect, Decoder, Disconnect, ProtocolVersion, Publish, Pubrel, encode_packet,
)
from appliance.pipeline import ClientInfo, Message, Pipeline


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


DEFAULT_MAX_ROWS = 100_000
LIST_MORE = "raise --limit"


def max_rows(value: Any) -> int:
    """`--max-rows`: a positive number of rows, or 0 for all of them."""
    rows = DEFAULT_MAX_ROWS if value is None else int(value)
    return rows if rows > 0 else 2**62


def purge(store: Any, ids: list[int] | None) -> dict[str, Any]:
    """Purge the named quarantined messages (None: all); names the ids that are not in the quarantine."""
    unknown = [i for i in ids if store.quarantine_get(i) is None] if ids is not None else []
    wanted = [i for i in ids if i not in unknown] if ids is not None else None
    count = store.quarantine_purge(wanted) if wanted is None or wanted else 0
    return {"purged": count, "unknown": [str(i) for i in unknown]}


def purge_event(answer: dict[str, Any], ids: list[int] | None, peer: Any) -> dict[str, Any]:
    """The `quarantine_purged` audit event: what was purged, and by whom (the admin socket's peer)."""
    return {"ids": [str(i) for i in ids if str(i) not in answer["unknown"]] if ids is not None else "all",
            "purged": answer["purged"], "by": peer or {"user": _user()}}


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class AuditOperations:
    def __init__(self, service: AuditService, pipeline: Pipeline, endpoint: Callable[[], BrokerEndpoint | None],
                 *, state_dir: Path):
        self._state_dir = state_dir
        self._service = service
        self._store = service.store
        self._pipeline = pipeline
        self._endpoint = endpoint

    def handlers(self) -> dict[str, Handler]:
        return {
            "sql": self.sql,
            "export": self.export,
            "quarantine_list": self.quarantine_list,
            "quarantine_show": self.quarantine_show,
            "quarantine_release": self.quarantine_release,
            "quarantine_purge": self.quarantine_purge,
        }

    async def _run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except AuditError as exc:
            raise AdminError(str(exc)) from exc

    async def sql(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._service.sync()
        result = await self._run(self._store.query, str(request["sql"]), timeout=float(request.get("timeout", 30)),
                                 max_rows=max_rows(request.get("max_rows")))
        return {"output": format_result(result, request.get("format", "table")), "truncated": result.truncated}

    async def export(self, request: dict[str, Any]) -> dict[str, Any]:
        """Into `to`, or with `exchange`, into a new directory under the state dir that is handed back
        (the caller may not see our /tmp or be able to let us write where it wants: exchange.py)."""
        await self._service.sync()
        to = exchange.new_directory(self._state_dir) if request.get("exchange") else Path(request["to"])
        report = await self._run(
            self._store.export_parquet, to, since=_time(request.get("since")), until=_time(request.get("until"))
        )
        return {"report": str(report), "directory": str(to), "decisions": report.decisions, "events": report.events,
                "days": [day.isoformat() for day in report.days]}

    async def quarantine_list(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._service.sync()
        result = await self._run(
            self._store.quarantine_list,
            topic=request.get("topic"), since=_time(request.get("since")), reason=request.get("reason"),
            limit=int(request.get("limit", 100)),
        )
        return {"output": format_result(result, request.get("format", "table"), more=LIST_MORE), "truncated": result.truncated}

    async def quarantine_show(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._service.sync()
        row = await self._run(self._store.quarantine_get, int(request["id"]))
        if row is None:
            raise AdminError(f"no quarantined message with id {request['id']}")
        row = dict(row)
        if isinstance(row.get("payload"), bytes | bytearray):
            row["payload"] = bytes(row["payload"]).hex()
            row["payload_encoding"] = "hex"
        return {"message": row}

    async def quarantine_purge(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._service.sync()
        ids = [int(i) for i in request["ids"]] if request.get("ids") else None
        answer: dict[str, Any] = await self._run(purge, self._store, ids)
        self._service.record_event("quarantine_purged", purge_event(answer, ids, request.get("_peer")))
        return answer

    async def quarantine_release(self, request: dict[str, Any]) -> dict[str, Any]:
        """Judge each message again with the schema set in force; publish the ones that pass."""
        await self._service.sync()
        results = []
        for raw_id in request["ids"]:
            results.append(await self._release(int(raw_id)))
        return {"results": results}

    async def _release(self, decision_id: int) -> dict[str, Any]:
        """A dict with `released`; or `error` when there is no such quarantined message."""
        row = await self._run(self._store.quarantine_get, decision_id)
        if row is None:
            return {"id": decision_id, "released": False, "error": "no quarantined message with this id"}
        client = ClientInfo(row["client_id"], row.get("username"), row["peer"], ProtocolVersion(row["mqtt_version"]))
        message = Message(row["topic"], bytes(row["payload"]), row["qos"], row["retain"], client,
                          received_at=time.time(), released_from=decision_id)
        verdict = self._pipeline.judge(message)
        new_id = self._service.sink.last_id
        if not verdict.accepted:
            return {"id": decision_id, "released": False, "new_id": new_id,
                    "reasons": [reason.message for reason in verdict.reasons]}
        endpoint = self._endpoint()
        if endpoint is None:
            raise AdminError("the broker is not running; try again once it is")
        await publish_once(endpoint, message)
        await self._run(self._store.quarantine_purge, [decision_id])
        return {"id": decision_id, "released": True, "new_id": new_id}


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
                raise AdminError("the broker closed the connection")
            decoder.receive_data(data)
        return packet

    try:
        writer.write(encode_packet(Connect(client_id=f"appliance-release-{time.monotonic_ns()}",
                                           username=endpoint.username, password=endpoint.password), v))
        connack = await receive()
        if connack.reason_code != 0:
            raise AdminError(f"the broker refused the connection (code {connack.reason_code})")
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
