"""`replay`: judge recorded traffic with another schema set and say what would break.

    replay --against schemas/v2                       # the appliance's recording (config / --state-dir)
    replay --from 'audit/**/*.parquet' --against schemas/v2 --format junit --output replay.xml
    replay diff schemas/v1 schemas/v2                 # the static compatibility report alone
    replay infer --topic 'sensor/+/temperature' --from capture.ndjson
    replay capture --broker mqtt://localhost:1883 --topic '#' --to capture.ndjson --count 1000

Exit codes: 0 compatible, 1 breaking changes (per --fail-on), 2 usage or input error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import click

from replay.errors import ReplayInputError

T = TypeVar("T")

FORMATS = click.Choice(["table", "json", "junit", "markdown"])


class InputError(click.ClickException):
    """A usage or input error: click exits 1 for a ClickException, replay exits 2."""

    exit_code = 2


def _datetime(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected an ISO 8601 date or time, e.g. 2026-11-27 or 2026-11-27T12:00:00Z, got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _recording_options(func: Callable[..., T]) -> Callable[..., T]:
    """Where the recorded traffic comes from and which of it to use (replay and infer)."""
    options = [
        click.option("--from", "sources", multiple=True, metavar="PATH",
                     help="A recording instead of the appliance's: NDJSON (.ndjson/.jsonl), Parquet files, a directory "
                          "or a quoted glob ('audit/**/*.parquet'), or an audit .duckdb file. Repeatable."),
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="The appliance's state dir (default: the config's state_dir). A running appliance is asked "
                          "for its recording; a stopped one's audit log is read directly."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="APPLIANCE_CONFIG", help="The appliance's config file (its state dir and schemas)."),
        click.option("--since", help="Only messages recorded at or after this time (ISO 8601, UTC unless a zone is given)."),
        click.option("--until", help="Only messages recorded before this time."),
        click.option("--topic", "topic_filter", help="Only topics matching this MQTT filter (+ and # allowed)."),
        click.option("--client", help="Only messages from this client id."),
        click.option("--limit", type=click.IntRange(min=1), help="Replay at most N messages (after sampling)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _jobs(asked: int | None, default: int, *sets: Any) -> int:
    """Worker processes; one for a set whose checks keep state between messages (Sparkplug B), so
    every message reaches the same judge in recorded order."""
    from replay.judge import stateful

    return 1 if any(stateful(s) for s in sets) else (asked or default)


def _filters(since: str | None, until: str | None, topic: str | None, client: str | None,
             limit: int | None, sample: int = 1) -> Any:
    from replay.rows import Filters

    try:
        return Filters(_datetime(since), _datetime(until), topic, client, limit, sample)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _config(config_path: Path | None) -> Any:
    from appliance.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise InputError(str(exc)) from None


def _open(sources: tuple[str, ...], state_dir: Path | None, config_path: Path | None, filters: Any) -> Any:
    from replay.sources import open_recording

    if sources and state_dir is not None:
        raise click.UsageError("--from replaces the appliance's recording: give --from or --state-dir, not both")
    if not sources and state_dir is None:
        state_dir = _config(config_path).state_dir
    try:
        return open_recording(sources, state_dir, filters)
    except ReplayInputError as exc:
        raise InputError(str(exc)) from None


def _load_set(directory: Path, what: str) -> Any:
    from appliance.governance import SchemaSetError, load_schema_set

    try:
        return load_schema_set(directory)
    except SchemaSetError as exc:
        raise InputError(f"{what} {directory} is not a usable schema set:\n{exc}") from None


class _Progress:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise (CI logs)."""

    def __init__(self, enabled: bool, total: int | None):
        self._bar: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 transient=True, console=_stderr_console())
            self._task = self._bar.add_task("replay", total=total)

    def __enter__(self) -> Self:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, count)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--against", "target_dir", type=click.Path(path_type=Path),
              help="The schema set to judge the recorded traffic with (a directory with manifest.yaml).")
@_recording_options
@click.option("--sample", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replay every Nth message (in recording order: reproducible).")
@click.option("--baseline", "baseline_dir", type=click.Path(path_type=Path),
              help="The set in force when the traffic was recorded: judges messages recorded without a verdict, and "
                   "is compared statically with --against (default for an appliance recording: the config's schemas).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True, help="Report format.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write the report to this file.")
@click.option("--fail-on", "fail_on", default="any", show_default=True,
              help="When breaking changes fail (exit 1): any, never, rate>X% (of the messages replayed) or count>N.")
@click.option("--jobs", type=click.IntRange(min=1), help="Processes that judge: N - 1 workers and this one (default: every core).")
@click.option("--stats", is_flag=True, help="Print messages per second to stderr.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.pass_context
def cli(ctx: click.Context, target_dir: Path | None, sources: tuple[str, ...], state_dir: Path | None,
        config_path: Path | None, since: str | None, until: str | None, topic_filter: str | None,
        client: str | None, limit: int | None, sample: int, baseline_dir: Path | None, fmt: str,
        output: Path | None, fail_on: str, jobs: int | None, stats: bool, progress: bool | None) -> None:
    """Replay recorded MQTT traffic against a schema set and report what would break.

    Every recorded message is judged by the appliance's own checks with the --against set and
    compared with the verdict it was recorded with. Exit codes: 0 compatible, 1 breaking changes
    (see --fail-on), 2 usage or input error.
    """
    if ctx.invoked_subcommand is not None:
        return
    if target_dir is None:
        raise click.UsageError("Missing option '--against' (the schema set to replay against)")
    from replay import engine
    from replay.judge import rate_rules
    from replay.render import headline, render
    from replay.report import FailOn, build_report
    from replay.static import static_section

    try:
        policy = FailOn.parse(fail_on)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    filters = _filters(since, until, topic_filter, client, limit, sample)
    target = _load_set(target_dir, "--against")
    if baseline_dir is None and not sources and config_path is not None:
        baseline_dir = _config(config_path).schemas
    baseline = _load_set(baseline_dir, "--baseline") if baseline_dir is not None else None
    source = _open(sources, state_dir, config_path, filters)
    show_progress = sys.stderr.isatty() if progress is None else progress
    try:
        total = source.count() if show_progress else None
        with _Progress(show_progress, total) as bar:
            jobs = _jobs(jobs, engine.default_jobs(), target, baseline)
            tally, run_stats = engine.run(source.work(engine.BATCH_SIZE, engine.pieces(jobs)), target=target.directory,
                                          baseline=baseline.directory if baseline else None,
                                          jobs=jobs, progress=bar.advance)
    except ReplayInputError as exc:
        raise InputError(str(exc)) from None
    finally:
        source.close()
    if tally.replayed == 0:
        matching = " matching the filters" if any(v not in (None, 1) for v in filters.describe().values()) else ""
        raise InputError(f"nothing to replay: {source.description} has no recorded messages{matching}")
    if tally.errors >= tally.replayed:
        raise InputError(f"nothing could be judged: all {tally.replayed} recorded messages lack a payload "
                         "(removed by payload retention, or recorded with audit.record_payloads: false)")

    notes = list(source.notes)
    disabled = rate_rules(target)
    if disabled:
        notes.append("per-client rate rules are not applied in replay (messages are replayed faster than real time): "
                     + "; ".join(disabled))
    if baseline is not None and tally.recorded_sets and baseline.version not in tally.recorded_sets:
        notes.append(f"the recording was judged by schema set {', '.join(tally.recorded_sets)}, "
                     f"not by the baseline {baseline.version} ({baseline.directory})")
    report = build_report(
        tally,
        source=source.description,
        filters=filters.describe(),
        target={"directory": str(target.directory), "version": target.version, "revision": target.revision},
        baseline={"directory": str(baseline.directory), "version": baseline.version} if baseline else None,
        fail_on=policy,
        notes=notes,
        stats=run_stats.to_dict(),
    )
    if baseline is not None:
        report["static"] = static_section(baseline, target, report["groups"])
    color = fmt == "table" and output is None and sys.stdout.isatty()
    text = render(report, fmt, color=color)
    if output is not None:
        output.write_text(text, encoding="utf-8")
        click.echo(f"{fmt} report written to {output}: {headline(report)}")
    else:
        click.echo(text, nl=False)
    if stats:
        click.echo(f"replayed {run_stats.messages:,} messages in {run_stats.seconds:.2f} s: "
                   f"{run_stats.per_second:,.0f} msg/s with {run_stats.workers} worker(s)", err=True)
    ctx.exit(report["exit_code"])


@cli.command()
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def diff(old: Path, new: Path, fmt: str) -> None:
    """Compare two schema sets statically (no traffic): exit 1 when NEW breaks OLD's publishers."""
    import json

    from replay.static import UNAVAILABLE, compare_sets, render_text

    old_set, new_set = _load_set(old, "OLD"), _load_set(new, "NEW")
    if compare_sets is None or render_text is None:
        raise InputError(str(UNAVAILABLE))
    try:
        report = compare_sets(old_set, new_set)
    except ValueError as exc:  # CompatConfigError: a bad `compatibility:` in a manifest
        raise InputError(str(exc)) from None
    click.echo(json.dumps(report.to_dict(), indent=2, default=str) if fmt == "json" else render_text(report))
    sys.exit(1 if report.breaking else 0)


@cli.command()
@click.option("--topic", "topic_filter", required=True, help="The topic filter to draft a schema for (+ and # allowed).")
@click.option("--from", "sources", multiple=True, metavar="PATH", help="A recording (as for replay --from).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="The appliance's state dir.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="APPLIANCE_CONFIG",
              help="The appliance's config file.")
@click.option("--since", help="Only messages recorded at or after this time.")
@click.option("--until", help="Only messages recorded before this time.")
@click.option("--client", help="Only messages from this client id.")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most N messages.")
@click.option("--accepted-only", is_flag=True, help="Only messages recorded as accepted.")
def infer(topic_filter: str, sources: tuple[str, ...], state_dir: Path | None, config_path: Path | None,
          since: str | None, until: str | None, client: str | None, limit: int | None, accepted_only: bool) -> None:
    """Draft a JSON Schema from the recorded JSON payloads of a topic filter."""
    import json

    from replay.infer import infer_schema

    filters = _filters(since, until, topic_filter, client, limit)
    source = _open(sources, state_dir, config_path, filters)
    try:
        schema = infer_schema(source.batches(5_000), title=f"Drafted from {source.description}, topic {topic_filter}",
                              accepted_only=accepted_only)
    except ReplayInputError as exc:
        raise InputError(str(exc)) from None
    finally:
        source.close()
    click.echo(json.dumps(schema, indent=2, ensure_ascii=False))


@cli.command()
@click.option("--broker", required=True, help="mqtt://[user:password@]host[:port] or mqtts://... (TLS).")
@click.option("--topic", "topics", multiple=True, default=("#",), show_default=True,
              help="Topic filter to subscribe to; repeatable.")
@click.option("--to", "to_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="NDJSON file to append the messages to ('-' for stdout).")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N messages.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option("--qos", type=click.IntRange(0, 2), default=1, show_default=True, help="Subscription QoS.")
@click.option("--client-id", default="", help="Client id to connect with (default: one chosen by the broker).")
def capture(broker: str, topics: tuple[str, ...], to_file: Path, count: int | None, duration: float | None,
            qos: int, client_id: str) -> None:
    """Record traffic from any MQTT broker to NDJSON, for `replay --from`."""
    from replay.capture import CaptureError, capture_to_file

    if count is None and duration is None:
        click.echo("capturing until interrupted (Ctrl-C); use --count or --duration to stop by itself", err=True)
    try:
        captured = capture_to_file(broker, topics, to_file, count=count, duration=duration, qos=qos, client_id=client_id)
    except CaptureError as exc:
        raise InputError(str(exc)) from None
    click.echo(f"captured {captured} messages to {to_file}", err=True)


def main() -> None:
    try:
        cli(prog_name="replay")
    except Exception as exc:  # noqa: BLE001 - exit 1 means "breaking" to CI: a crash must not look like one
        click.echo(f"replay: internal error: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
