"""What an operator does in the console, as `appliance quarantine release/purge` does it, and a
reload (the admin socket's `reload`, as SIGHUP does): through the running appliance (it re-judges
and publishes released messages and records that as one event, whatever part of the batch it got
through; it seals its active segment before a purge rewrites it, and writes the audit events). Each
action's event names the console user (`console_user`); `by` is the process that asked, from the
admin socket's peer credentials. A purge that could not rewrite every file is recorded all the same
(`failed`, `error`), and the page says what is left.

Blocking (admin socket, DuckDB, file rewrites): called in worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import admin
from appliance.audit.errors import AuditError
from appliance.audit.purge import PurgeIncomplete, event_detail, purge_quarantine
from appliance.console.store import Store
from appliance.names import EventKind

_RELEASE_KEYS = ("client_id", "username", "peer", "mqtt_version", "topic", "qos", "retain")


class ActionError(Exception):
    """The action could not be done; the message is for the user."""


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _record(state_dir: Path, kind: EventKind, detail: dict[str, Any]) -> None:
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
    # The appliance records the quarantine_released event itself (with this detail), whatever
    # part of the batch it got through: nothing it published goes unrecorded.
    try:
        answer = admin.call(state_dir, "quarantine_release", messages=messages,
                            detail={"console_user": user, "via": "console"})
    except admin.AdminUnavailable as exc:
        raise ActionError(f"{exc}: releasing publishes through the running appliance") from exc
    except admin.AdminError as exc:
        raise ActionError(str(exc)) from exc
    except OSError as exc:  # no answer in time: it may still be publishing
        raise ActionError(f"the appliance did not answer ({exc}): the quarantine_released event in the audit "
                          "log says what it released") from exc
    released = []
    for result in answer["results"]:
        if result.get("released"):
            released.append(int(result["id"]))
            outcome.done.append(f"{result['id']}: released (new verdict {result['new_id']})")
        elif "error" in result:
            outcome.problems.append(f"{result['id']}: not released: {result['error']}")
        else:
            outcome.problems.append(f"{result['id']}: still rejected: {'; '.join(result.get('reasons', []))}")
    for decision_id in answer.get("not_attempted", []):
        outcome.problems.append(f"{decision_id}: not tried (the release stopped at the failure above)")
    if answer.get("warning"):
        outcome.problems.append(f"warning: {answer['warning']}")
    if released:
        _drop_released(state_dir, released, user, outcome)
    return outcome


def _drop_released(state_dir: Path, released: list[int], user: str, outcome: Outcome) -> None:
    """Take the released messages out of the quarantine (purge their payloads). A failure here is
    recorded as a `quarantine_purged` event: those still held could be released (published) twice."""
    try:
        purge_quarantine(state_dir, released, seal=lambda: admin.call(state_dir, "audit_seal"))
    except PurgeIncomplete as exc:
        outcome.problems.append(f"released, but {len(exc.kept)} still held in the quarantine (releasing them again "
                                f"publishes them again): {exc}")
        _record_purge(state_dir, released, exc, user, outcome, after_release=True)
    except (admin.AdminUnavailable, admin.AdminError, AuditError) as exc:
        outcome.problems.append(f"released, but still held in the quarantine (releasing them again publishes them "
                                f"again): {exc}")


def _record_purge(state_dir: Path, ids: list[int], result: int | PurgeIncomplete, user: str, outcome: Outcome,
                  *, after_release: bool = False) -> None:
    detail = event_detail(ids, result) | {"console_user": user, "via": "console"}
    if after_release:
        detail["after_release"] = True
    try:
        _record(state_dir, EventKind.QUARANTINE_PURGED, detail)
    except (admin.AdminUnavailable, admin.AdminError, OSError) as exc:
        outcome.problems.append(f"the purge could not be recorded in the audit log: {exc}")


def _purge(state_dir: Path, store: Store, ids: list[int], user: str) -> Outcome:
    held = store.quarantined(ids)
    outcome = Outcome(problems=[f"{i}: no quarantined message with this id" for i in ids if i not in held])
    present = [i for i in ids if i in held]
    if not present:
        return outcome
    result: int | PurgeIncomplete
    try:
        result = purge_quarantine(state_dir, present, seal=lambda: admin.call(state_dir, "audit_seal"))
    except PurgeIncomplete as exc:
        result = exc
    except admin.AdminUnavailable as exc:
        raise ActionError(f"{exc}: the console purges while the appliance runs "
                          "(`appliance quarantine purge` works on a stopped one)") from exc
    except admin.AdminError as exc:  # the seal, before anything was rewritten
        raise ActionError(str(exc)) from exc
    _record_purge(state_dir, present, result, user, outcome)
    if isinstance(result, PurgeIncomplete):
        outcome.done.append(f"purged {len(result.purged)} message(s)")
        outcome.problems.append(f"not purged: {result.not_purged()}: {result}")
    else:
        outcome.done.append(f"purged {result} message(s)")
    return outcome
