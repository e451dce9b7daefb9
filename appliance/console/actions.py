"""What an operator does in the console, as `appliance quarantine release/purge` does it, and a
reload (the admin socket's `reload`, as SIGHUP does): through the running appliance (it re-judges and publishes released messages, seals its active segment
before a purge rewrites it, and writes the audit event). Each action's event names the console user
(`console_user`); `by` is the process that asked, from the admin socket's peer credentials.

Blocking (admin socket, DuckDB, file rewrites): called in worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import admin
from appliance.audit.purge import purge_quarantine
from appliance.console.store import Store
from appliance.names import EventKind

_RELEASE_KEYS = ("client_id", "username", "peer", "mqtt_version", "topic", "qos", "retain")


class ActionError(Exception):
    """The action could not be done; the message is for the user."""


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _record(state_dir: Path, kind: str, detail: dict[str, Any]) -> None:
    admin.call(state_dir, "audit_event", kind=kind, detail=detail)


def release(state_dir: Path, store: Store, ids: list[int], user: str) -> Outcome:
    try:
        return _release(state_dir, store, ids, user)
    finally:
        store.invalidate()


def purge(state_dir: Path, store: Store, ids: list[int], user: str) -> Outcome:
    try:
        return _purge(state_dir, store, ids, user)
    finally:
        store.invalidate()


def reload(state_dir: Path, user: str) -> Outcome:
    """Have the running appliance load its config and schema set again. Its `config_reload` event
    says how that went but not who asked: a `reload_requested` event names the console user."""
    try:
        reloaded = bool(admin.call(state_dir, "reload", timeout=120.0)["reloaded"])
    except admin.AdminUnavailable as exc:
        raise ActionError(f"{exc}: a reload asks the running appliance") from exc
    except (admin.AdminError, KeyError, TypeError) as exc:
        raise ActionError(f"reload: {exc}") from exc
    outcome = Outcome()
    if reloaded:
        outcome.done.append("reloaded: the config and schema set on disk are in force")
    else:
        outcome.problems.append("the reload failed; the running config and schema set stay in force "
                                "(the appliance's log and the config_reload event say why)")
    try:
        _record(state_dir, EventKind.RELOAD_REQUESTED, {"console_user": user, "via": "console", "reloaded": reloaded})
    except (admin.AdminUnavailable, admin.AdminError) as exc:  # e.g. no audit log: the reload still happened
        outcome.problems.append(f"the reload could not be recorded in the audit log: {exc}")
    return outcome


def _release(state_dir: Path, store: Store, ids: list[int], user: str) -> Outcome:
    held = store.quarantined(ids)
    outcome = Outcome()
    messages = []
    for decision_id in ids:
        row = held.get(decision_id)
        if row is None:
            outcome.problems.append(f"{decision_id}: no quarantined message with this id")
            continue
        messages.append({key: row[key] for key in _RELEASE_KEYS}
                        | {"payload": bytes(row["payload"]).hex(), "id": str(decision_id)})
    if not messages:
        return outcome
    try:
        answer = admin.call(state_dir, "quarantine_release", messages=messages)
        released = []
        for result in answer["results"]:
            if result.get("released"):
                released.append(int(result["id"]))
                outcome.done.append(f"{result['id']}: released (new verdict {result['new_id']})")
            else:
                outcome.problems.append(f"{result['id']}: still rejected: {'; '.join(result.get('reasons', []))}")
        if released:
            purge_quarantine(state_dir, released, seal=lambda: admin.call(state_dir, "audit_seal"))
            _record(state_dir, "quarantine_released",
                    {"ids": [str(i) for i in released], "console_user": user, "via": "console"})
    except admin.AdminUnavailable as exc:
        raise ActionError(f"{exc}: releasing publishes through the running appliance") from exc
    except admin.AdminError as exc:
        raise ActionError(str(exc)) from exc
    return outcome


def _purge(state_dir: Path, store: Store, ids: list[int], user: str) -> Outcome:
    held = store.quarantined(ids)
    outcome = Outcome(problems=[f"{i}: no quarantined message with this id" for i in ids if i not in held])
    present = [i for i in ids if i in held]
    if not present:
        return outcome
    try:
        count = purge_quarantine(state_dir, present, seal=lambda: admin.call(state_dir, "audit_seal"))
        _record(state_dir, "quarantine_purged",
                {"ids": [str(i) for i in present], "purged": count, "console_user": user, "via": "console"})
    except admin.AdminUnavailable as exc:
        raise ActionError(f"{exc}: the console purges while the appliance runs "
                          "(`appliance quarantine purge` works on a stopped one)") from exc
    except admin.AdminError as exc:
        raise ActionError(str(exc)) from exc
    outcome.done.append(f"purged {count} message(s)")
    return outcome
