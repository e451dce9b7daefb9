"""`appliance audit ...` and `appliance quarantine ...`: the audit log and the quarantine. They read
the Parquet files and the message log themselves (DuckDB runs in this process, never in the
service); the running appliance is asked over its admin socket only for what it alone can do
(make recent records readable, seal the active segment, publish released messages)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from appliance import admin
from appliance.names import EventKind

if TYPE_CHECKING:
    from appliance.audit.results import Format

T = TypeVar("T")

FORMATS = click.Choice(["table", "csv", "json"])


def _state_dir(config_path: Path | None, state_dir: Path | None) -> Path:
    if state_dir is not None:
        return state_dir
    from appliance.config import ConfigError, load_config  # pydantic: only when a config is read

    try:
        return load_config(config_path).state_dir
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _target(func: Callable[..., T]) -> Callable[..., T]:
    func = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                        help="The appliance's state dir (default: the config's state_dir).")(func)
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                        envvar="APPLIANCE_CONFIG", help="Config file naming the state dir.")(func)
    return func


def _datetime(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"expected an ISO 8601 date or time, e.g. 2026-11-27 or 2026-11-27T12:00:00Z, got {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_id(value: str) -> int:
    """Ids are printed as strings in JSON (they exceed 2^53): accept both forms."""
    try:
        return int(str(value).strip().strip('"'))
    except ValueError:
        raise click.BadParameter(f"expected a message id (a number), got {value!r}") from None


def _sync(state_dir: Path) -> bool:
    """Ask a running appliance to make everything recorded so far readable; False when none runs."""
    try:
        admin.call(state_dir, "audit_sync", timeout=60.0)
    except admin.AdminUnavailable:
        return False
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from exc
    return True


def _open(state_dir: Path) -> Any:
    """The audit log as of now: Parquet files plus the message log's tail, in this process."""
    from appliance.audit.errors import AuditError
    from appliance.audit.query import AuditQuery

    if not (state_dir / "log").exists() and not (state_dir / "audit" / "parquet").exists():
        raise click.ClickException(f"no audit log under {state_dir}: has the appliance run with this state dir?")
    _sync(state_dir)
    try:
        return AuditQuery(state_dir)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc


def _reading(state_dir: Path, func: Callable[[Any], T]) -> T:
    from appliance.audit.errors import AuditError

    query = _open(state_dir)
    try:
        return func(query)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        query.close()


def _who() -> str:
    """The person behind a command, for the audit events of what it changed."""
    import getpass
    import os

    return os.environ.get("SUDO_USER") or getpass.getuser()


@contextmanager
def _exclusive_or_running(state_dir: Path) -> Iterator[bool]:
    """True while the appliance runs on `state_dir` (it answers on its admin socket: ask it to do
    what touches the log); False while this process holds the state dir's lock, so that no
    appliance starts and writes the log meanwhile. An appliance that holds the lock but does not
    answer yet (starting) is an error: try again."""
    from appliance.statedir import StateDirBusy, StateDirError, claim

    try:
        lock = claim(state_dir)
    except StateDirBusy as exc:
        try:
            admin.call(state_dir, "status", timeout=30.0)
        except admin.AdminUnavailable:
            raise click.ClickException(f"{exc}; it does not answer on its admin socket yet (starting?): try again") from None
        except admin.AdminError as error:
            raise click.ClickException(str(error)) from error
        yield True
        return
    except StateDirError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield False
    finally:
        lock.close()


def _record_event(state_dir: Path, kind: EventKind, detail: dict[str, Any]) -> None:
    """An event in the audit log: through the running appliance (the log's one writer), or, when
    none runs, by opening the log for this one record while holding the state dir's lock."""
    with _exclusive_or_running(state_dir) as running:
        if running:
            try:
                admin.call(state_dir, "audit_event", kind=kind, detail=detail)
            except admin.AdminError as exc:
                raise click.ClickException(str(exc)) from exc
            return
        _append_event(state_dir, kind, detail)


def _append_event(state_dir: Path, kind: EventKind, detail: dict[str, Any]) -> None:
    from appliance.audit.records import EVENT
    from appliance.audit.service import id_clock
    from appliance.audit.sink import event_record
    from appliance.msglog import MessageLog

    log_dir = state_dir / "log"
    message_log = MessageLog(log_dir)
    message_log.open()
    message_log.start(None)
    try:
        seq = message_log.append(EVENT.code, event_record(id_clock(state_dir), kind, detail))
        message_log.wait_durable(seq, timeout=30)
    finally:
        message_log.stop()


@click.group()
def audit() -> None:
    """Query and export the audit log (every verdict and event)."""


@audit.command("sql")
@click.argument("query")
@_target
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds before the query is interrupted.")
@click.option("--max-rows", type=int, default=None,
              help="Rows printed at most (default 100,000 for table and json, no limit for csv; 0: no limit). "
              "A cut result says so: a line under the table, \"truncated\": true in JSON.")
def audit_sql(query: str, config_path: Path | None, state_dir: Path | None, fmt: Format, timeout: float,
              max_rows: int | None) -> None:
    """Run a read-only SQL query (SELECT only) over decisions, events and quarantine.

    DuckDB runs in this process, over the Parquet files and the records not converted yet: a
    verdict is visible as soon as its record is written (within the sync window)."""
    from appliance.audit.results import format_result

    target = _state_dir(config_path, state_dir)
    if max_rows is None:
        max_rows = 0 if fmt == "csv" else 100_000
    limit = max_rows if max_rows > 0 else 1 << 62
    result = _reading(target, lambda store: store.query(query, timeout=timeout, max_rows=limit))
    click.echo(format_result(result, fmt), nl=False)
    if result.truncated and fmt == "csv":
        click.echo(f"note: the result was truncated at {max_rows} rows (--max-rows); 0 returns every row", err=True)


@audit.command("export")
@_target
@click.option("--since", help="First day or time to export (ISO 8601, UTC unless a zone is given).")
@click.option("--until", help="Export up to this day or time (exclusive).")
@click.option("--to", "to_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the Parquet files (hive-partitioned by day).")
def audit_export(config_path: Path | None, state_dir: Path | None, since: str | None, until: str | None, to_dir: Path) -> None:
    """Export decisions and events to Parquet, partitioned by day, for DuckDB, pandas or Spark."""
    from appliance.audit.archive import export_range

    target = _state_dir(config_path, state_dir)
    start, end = _datetime(since), _datetime(until)
    to_dir = to_dir.resolve()
    if not (target / "log").exists() and not (target / "audit" / "parquet").exists():
        raise click.ClickException(f"no audit log under {target}: has the appliance run with this state dir?")
    _sync(target)
    from appliance.audit.errors import AuditError

    try:
        report = export_range(target, to_dir, since=start, until=end)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(report))


@click.group()
def quarantine() -> None:
    """Rejected messages with their payloads and reasons."""


@quarantine.command("list")
@_target
@click.option("--topic", help="Only this topic (MQTT wildcards + and # allowed).")
@click.option("--since", help="Only messages since this day or time (ISO 8601).")
@click.option("--reason", help="Only messages whose reasons contain this text.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def quarantine_list(config_path: Path | None, state_dir: Path | None, topic: str | None, since: str | None,
                    reason: str | None, limit: int, fmt: Format) -> None:
    """List quarantined messages, newest first."""
    from appliance.audit.results import format_result

    target = _state_dir(config_path, state_dir)
    start = _datetime(since)
    result = _reading(target, lambda store: store.quarantine_list(topic=topic, since=start, reason=reason, limit=limit))
    click.echo(format_result(result, fmt, more="raise --limit"), nl=False)


@quarantine.command("show")
@click.argument("decision_id")
@_target
def quarantine_show(decision_id: str, config_path: Path | None, state_dir: Path | None) -> None:
    """Show one quarantined message: its reasons and its payload, pretty-printed."""
    target = _state_dir(config_path, state_dir)
    wanted = _parse_id(decision_id)
    row = _reading(target, lambda store: store.quarantine_get(wanted))
    if row is None:
        raise click.ClickException(f"no quarantined message with id {wanted}")
    click.echo(render_message({**row, "payload": bytes(row["payload"]).hex(), "payload_encoding": "hex"}))


def render_message(row: dict[str, Any]) -> str:
    payload = bytes.fromhex(row.pop("payload"))
    row.pop("payload_encoding", None)
    reasons = row.pop("reasons", None) or []
    lines = [f"{key}: {value}" for key, value in row.items()]
    lines.append("reasons:")
    for reason in reasons:
        where = f" at {reason['path']}" if reason.get("path") else ""
        lines.append(f"  - [{reason.get('check')}] {reason.get('message')}{where}")
    lines.append(f"payload ({len(payload)} bytes):")
    try:
        lines.append(json.dumps(json.loads(payload), indent=2, ensure_ascii=False))
    except (ValueError, UnicodeDecodeError):
        try:
            text = payload.decode("utf-8")
            lines.append(text if text.isprintable() or "\n" in text else payload.hex(" "))
        except UnicodeDecodeError:
            lines.append(payload.hex(" "))
    return "\n".join(lines)


def _held(target: Path, ids: list[int]) -> dict[int, dict[str, Any]]:
    def fetch(store: Any) -> dict[int, dict[str, Any]]:
        rows = {}
        for decision_id in ids:
            row = store.quarantine_get(decision_id)
            if row is not None:
                rows[decision_id] = row
        return rows

    return _reading(target, fetch)


@quarantine.command("release")
@click.argument("decision_ids", nargs=-1, required=True)
@_target
def quarantine_release(decision_ids: tuple[str, ...], config_path: Path | None, state_dir: Path | None) -> None:
    """Judge messages again with the schema set in force; publish those that now pass (and drop
    them from the quarantine)."""
    from appliance.audit.purge import PurgeIncomplete, event_detail, purge_quarantine
    from appliance.audit.errors import AuditError

    target = _state_dir(config_path, state_dir)
    ids = [_parse_id(value) for value in decision_ids]
    held = _held(target, ids)
    failed = False
    messages = []
    for decision_id in ids:
        row = held.get(decision_id)
        if row is None:
            failed = True
            click.echo(f"{decision_id}: no quarantined message with this id")
            continue
        messages.append({key: row[key] for key in ("id", "client_id", "username", "peer", "mqtt_version", "topic", "qos", "retain")}
                        | {"payload": bytes(row["payload"]).hex(), "id": str(decision_id)})
    if messages:
        # The appliance records the quarantine_released event itself, whatever part it got through.
        try:
            answer = admin.call(target, "quarantine_release", messages=messages)
        except admin.AdminUnavailable as exc:
            raise click.ClickException(f"{exc}: releasing publishes through the running appliance") from exc
        except admin.AdminError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # no answer in time: it may still be publishing
            raise click.ClickException(f"the appliance did not answer ({exc}): the quarantine_released event in "
                                       "the audit log says what it released") from exc
        released = []
        for result in answer["results"]:
            if result.get("released"):
                released.append(int(result["id"]))
                click.echo(f"{result['id']}: released (new verdict {result['new_id']})")
            elif "error" in result:
                failed = True
                click.echo(f"{result['id']}: not released: {result['error']}", err=True)
            else:
                failed = True
                click.echo(f"{result['id']}: still rejected: {'; '.join(result.get('reasons', []))}")
        for decision_id in answer.get("not_attempted", []):
            failed = True
            click.echo(f"{decision_id}: not tried (the release stopped at the failure above)", err=True)
        if answer.get("warning"):
            click.echo(f"warning: {answer['warning']}", err=True)
        if released:
            try:
                purge_quarantine(target, released, seal=lambda: admin.call(target, "audit_seal"))
            except PurgeIncomplete as exc:
                _record_event(target, EventKind.QUARANTINE_PURGED,
                              event_detail(released, exc) | {"after_release": True, "by": {"user": _who()}})
                raise click.ClickException(f"released, but {len(exc.kept)} still held in the quarantine (releasing "
                                           f"them again publishes them again): {exc}") from exc
            except (admin.AdminError, AuditError) as exc:
                raise click.ClickException(f"released, but still held in the quarantine (releasing them again "
                                           f"publishes them again): {exc}") from exc
    if failed:
        raise SystemExit(1)


@quarantine.command("purge")
@click.argument("decision_ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Purge every quarantined message.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation with --all.")
@_target
def quarantine_purge(decision_ids: tuple[str, ...], purge_all: bool, yes: bool, config_path: Path | None,
                     state_dir: Path | None) -> None:
    """Remove quarantined payloads from disk (the verdicts stay in the audit log). Recorded as a
    `quarantine_purged` event with the user who did it, also when some could not be removed."""
    from appliance.audit.purge import PurgeIncomplete, event_detail, purge_quarantine

    if not decision_ids and not purge_all:
        raise click.UsageError("name message ids, or --all")
    target = _state_dir(config_path, state_dir)
    ids = [_parse_id(value) for value in decision_ids] or None
    missing: list[int] = []
    if ids is not None:
        held = _held(target, ids)
        missing = [i for i in ids if i not in held]
        ids = [i for i in ids if i in held]
    elif not yes:
        click.confirm("Purge every quarantined payload? This cannot be undone", abort=True, err=True)
    else:
        _sync(target)

    def seal() -> object:
        return admin.call(target, "audit_seal")

    count: int | PurgeIncomplete = 0
    # While purging, either the appliance runs (it seals its active segment first, and writes the
    # event), or nobody may start one: purging a stopped appliance's newest segment rewrites it.
    with _exclusive_or_running(target) as running:
        if ids is None or ids:
            try:
                count = purge_quarantine(target, ids, seal=seal if running else None)
            except PurgeIncomplete as exc:
                count = exc
        if count or ids is None:
            detail = event_detail(ids, count) | {"by": {"user": _who()}}
            if running:
                try:
                    admin.call(target, "audit_event", kind=EventKind.QUARANTINE_PURGED, detail=detail)
                except admin.AdminError as exc:
                    raise click.ClickException(str(exc)) from exc
            else:
                _append_event(target, EventKind.QUARANTINE_PURGED, detail)
    if isinstance(count, PurgeIncomplete):
        raise click.ClickException(f"not purged: {count.not_purged()}: {count}")
    click.echo(f"purged {count} message(s)")
    for decision_id in missing:
        click.echo(f"{decision_id}: no quarantined message with this id", err=True)
    if missing:
        raise SystemExit(1)
