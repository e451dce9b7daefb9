"""`appliance audit ...` and `appliance quarantine ...`: the audit log and the quarantine, through
the running appliance (its admin socket), or straight from the files when it is stopped."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance import admin

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
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _running_or_offline(state_dir: Path, op: str, offline: Callable[[Any], T], *, writable: bool = False, **arguments: Any) -> dict[str, Any] | T:
    """Ask the running appliance; when none runs on `state_dir`, open the store ourselves."""
    try:
        return admin.call(state_dir, op, **arguments)
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from exc
    except admin.AdminUnavailable:
        pass
    from appliance.audit.errors import AuditError
    from appliance.audit.service import DUCKDB_FILE, JOURNAL_FILE, audit_dir
    from appliance.audit.store import AuditStore

    path = audit_dir(state_dir) / DUCKDB_FILE
    if not path.exists():
        raise click.ClickException(f"no audit log at {path}: has the appliance run with state dir {state_dir}?")
    if (audit_dir(state_dir) / JOURNAL_FILE).exists():
        _warn_unmoved(audit_dir(state_dir) / JOURNAL_FILE)
    try:
        store = AuditStore(path, read_only=not writable)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        return offline(store)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


def _warn_unmoved(journal: Path) -> None:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
            pending = conn.execute("SELECT (SELECT count(*) FROM decisions) + (SELECT count(*) FROM events)").fetchone()[0]
    except sqlite3.Error:
        return
    if pending:
        click.echo(f"note: {pending} records from an unclean shutdown are still in {journal}; "
                   "they move to the audit log when the appliance next starts", err=True)


@click.group()
def audit() -> None:
    """Query and export the audit log (every verdict and event)."""


@audit.command("sql")
@click.argument("query")
@_target
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds before the query is interrupted.")
def audit_sql(query: str, config_path: Path | None, state_dir: Path | None, fmt: str, timeout: float) -> None:
    """Run a read-only SQL query (SELECT only) over decisions, events and quarantine."""
    from appliance.audit.results import format_result

    target = _state_dir(config_path, state_dir)
    answer = _running_or_offline(target, "sql", lambda store: format_result(store.query(query, timeout=timeout), fmt),
                                 sql=query, format=fmt, timeout=timeout)
    click.echo(answer["output"] if isinstance(answer, dict) else answer)


@audit.command("export")
@_target
@click.option("--since", help="First day or time to export (ISO 8601, UTC unless a zone is given).")
@click.option("--until", help="Export up to this day or time (exclusive).")
@click.option("--to", "to_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the Parquet files (hive-partitioned by day).")
def audit_export(config_path: Path | None, state_dir: Path | None, since: str | None, until: str | None, to_dir: Path) -> None:
    """Export decisions and events to Parquet, partitioned by day, for DuckDB, pandas or Spark."""
    target = _state_dir(config_path, state_dir)
    start, end = _datetime(since), _datetime(until)
    to_dir = to_dir.resolve()
    answer = _running_or_offline(target, "export", lambda store: str(store.export_parquet(to_dir, since=start, until=end)),
                                 to=str(to_dir), since=start.isoformat() if start else None, until=end.isoformat() if end else None)
    click.echo(answer["report"] if isinstance(answer, dict) else answer)


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
                    reason: str | None, limit: int, fmt: str) -> None:
    """List quarantined messages, newest first."""
    from appliance.audit.results import format_result

    target = _state_dir(config_path, state_dir)
    start = _datetime(since)
    answer = _running_or_offline(
        target, "quarantine_list",
        lambda store: format_result(store.quarantine_list(topic=topic, since=start, reason=reason, limit=limit), fmt),
        topic=topic, since=start.isoformat() if start else None, reason=reason, limit=limit, format=fmt,
    )
    click.echo(answer["output"] if isinstance(answer, dict) else answer)


@quarantine.command("show")
@click.argument("decision_id", type=int)
@_target
def quarantine_show(decision_id: int, config_path: Path | None, state_dir: Path | None) -> None:
    """Show one quarantined message: its reasons and its payload, pretty-printed."""
    target = _state_dir(config_path, state_dir)

    def offline(store: Any) -> dict[str, Any]:
        row = store.quarantine_get(decision_id)
        if row is None:
            raise click.ClickException(f"no quarantined message with id {decision_id}")
        return {"message": {**row, "payload": bytes(row["payload"]).hex(), "payload_encoding": "hex"}}

    answer = _running_or_offline(target, "quarantine_show", offline, id=decision_id)
    click.echo(render_message(answer["message"]))


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


@quarantine.command("release")
@click.argument("decision_ids", type=int, nargs=-1, required=True)
@_target
def quarantine_release(decision_ids: tuple[int, ...], config_path: Path | None, state_dir: Path | None) -> None:
    """Judge messages again with the schema set in force; publish those that now pass."""
    target = _state_dir(config_path, state_dir)
    try:
        answer = admin.call(target, "quarantine_release", ids=list(decision_ids))
    except admin.AdminUnavailable as exc:
        raise click.ClickException(f"{exc}: releasing publishes through the running appliance") from exc
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from exc
    failed = False
    for result in answer["results"]:
        if result.get("released"):
            click.echo(f"{result['id']}: released (new verdict {result['new_id']})")
        else:
            failed = True
            why = result.get("error") or "; ".join(result.get("reasons", []))
            click.echo(f"{result['id']}: still rejected: {why}")
    if failed:
        raise SystemExit(1)


@quarantine.command("purge")
@click.argument("decision_ids", type=int, nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Purge every quarantined message.")
@_target
def quarantine_purge(decision_ids: tuple[int, ...], purge_all: bool, config_path: Path | None, state_dir: Path | None) -> None:
    """Drop quarantined payloads (the verdicts stay in the audit log)."""
    if not decision_ids and not purge_all:
        raise click.UsageError("name message ids, or --all")
    target = _state_dir(config_path, state_dir)
    ids = list(decision_ids) or None
    answer = _running_or_offline(target, "quarantine_purge", lambda store: {"purged": store.quarantine_purge(ids)},
                                 writable=True, ids=ids)
    click.echo(f"purged {answer['purged']} message(s)")
