"""Command line: each command is one task a user has (`appliance --help`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.cli_audit import audit, quarantine
from appliance.logs import FORMATS, LogFormat, setup_logging

if TYPE_CHECKING:
    from appliance.config.base import Address

# The config models (pydantic), the schema engines (jsonschema-rs, cel-expr-python, protobuf), the
# broker supervisor and the service itself are imported by the commands that use them:
# `appliance --help` starts in about half the time and loads none of them.


class _LazyGroup(click.Group):
    """Subcommands whose modules import what `appliance run` does not need (paho-mqtt for
    `simulate`, the benchmark harness) are imported when used: the running service stays smaller
    (docs/performance.md, memory). Their one-line help is written here, so that `appliance --help`
    imports neither (a test checks it matches the command's own)."""

    LAZY = {
        "bench": ("bench", "bench", "Measure throughput, latency, CPU, memory and disk writes:..."),
        "console": ("appliance.console.server", "console_command", "Serve the web console."),
        "simulate": ("appliance.simulate", "simulate_command", "Publish demo sensor traffic (for schemas/v1, or an example..."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "bench":
            return _bench_command()
        if cmd_name in self.LAZY:
            import importlib

            module, attribute, _ = self.LAZY[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in self.LAZY:
                rows.append((name, self.LAZY[name][2]))
            elif (command := super().get_command(ctx, name)) is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _bench_command() -> click.Command:
    """`appliance bench` is the harness in the source tree's top-level bench/ package, which the
    installed package does not ship (as h11 keeps its benchmarks outside the package): found next
    to a checkout's appliance/, else a command that says how to get it."""
    import importlib

    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "bench" / "__init__.py").is_file():
        if str(checkout) not in sys.path:
            sys.path.insert(0, str(checkout))
        command: click.Command = importlib.import_module("bench").bench
        return command

    @click.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def missing() -> None:
        """Measure throughput, latency, CPU, memory and disk writes: needs a source checkout."""
        raise click.ClickException(
            "the benchmark harness is not part of the installed package: it lives in bench/ of the "
            "source tree. From a checkout: `make setup` then `make bench` (or .venv/bin/appliance bench "
            "--help); see docs/performance.md."
        )

    return missing


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mqtt-governance-appliance")
def main() -> None:
    """MQTT schema governance appliance: validate, quarantine, audit and forward MQTT traffic."""


def _address(text: str, option: str) -> Address:
    from appliance.config.base import Address

    try:
        return Address.parse(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="APPLIANCE_CONFIG",
              help="Config file (YAML). Without it, built-in defaults.")
@click.option("--listen", metavar="HOST:PORT", help="LAN listener for MQTT clients (overrides `listen`).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for everything the appliance writes (overrides `state_dir`).")
@click.option("--schemas", type=click.Path(file_okay=False, path_type=Path),
              help="Schema set directory to enforce (overrides `schemas`).")
@click.option("--dry-run", is_flag=True, default=None,
              help="Record every verdict but deliver every message (overrides `dry_run`).")
@click.option("--upstream", metavar="URL", help="Forward accepted messages to this cloud broker, mqtt[s]://host:port (overrides `upstream.url`).")
@click.option("--metrics-listen", metavar="HOST:PORT", help="Where to serve /metrics, /healthz, /readyz (overrides `metrics.listen`).")
@click.option("--verbose", "-v", is_flag=True, help="Log debug messages.")
@click.option("--log-format", type=click.Choice(FORMATS), envvar="APPLIANCE_LOG_FORMAT",
              help="Log lines as text (default) or JSON objects, one per line (overrides `log_format`).")
def run(config_path: Path | None, listen: str | None, state_dir: Path | None, schemas: Path | None,
        dry_run: bool | None, upstream: str | None, metrics_listen: str | None, verbose: bool, log_format: LogFormat | None) -> None:
    """Run the appliance in the foreground until SIGINT or SIGTERM; SIGHUP reloads."""
    overrides: dict[str, object] = {}
    if upstream is not None:
        overrides["upstream.url"] = upstream
    if metrics_listen is not None:
        overrides["metrics.listen"] = _address(metrics_listen, "--metrics-listen")
    if schemas is not None:
        overrides["schemas"] = schemas.resolve()
    if dry_run:
        overrides["dry_run"] = True
    if listen is not None:
        overrides["listen"] = _address(listen, "--listen")
    if state_dir is not None:
        overrides["state_dir"] = state_dir.resolve()
    if verbose:
        overrides["log_level"] = "debug"
    if log_format is not None:
        overrides["log_format"] = log_format
    from appliance.config import ConfigError, load_config

    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    setup_logging(config.log_level, config.log_format)
    from appliance.app import StartupError
    from appliance.app import run as run_appliance
    from appliance.audit.errors import AuditError
    from appliance.broker import BrokerError
    from appliance.governance import SchemaSetError
    from appliance.security import AccessError
    from appliance.statedir import StateDirError

    try:
        run_appliance(config, config_path=config_path, overrides=overrides)
    except (StartupError, BrokerError, SchemaSetError, AccessError, StateDirError, AuditError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="APPLIANCE_CONFIG",
              help="Config file to check, with the schema set it names.")
@click.option("--schemas", type=click.Path(file_okay=False, path_type=Path),
              help="Schema set directory to check (overrides the config's `schemas`).")
def check(config_path: Path | None, schemas: Path | None) -> None:
    """Check a config, the files it names and its schema set offline; exit 1 listing every problem (for CI)."""
    if config_path is None and schemas is None:
        raise click.UsageError("give --config FILE, --schemas DIR, or both")
    from appliance.config import ConfigError, load_config

    try:
        config = load_config(config_path, {"schemas": schemas.resolve()} if schemas else None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if config_path is not None:
        from appliance.preflight import problems

        if found := problems(config):
            raise click.ClickException(f"config {config_path} cannot run:\n" + "\n".join(f"  {p}" for p in found))
        click.echo(f"config {config_path}: ok")
    if config.schemas is None:
        click.echo("no schema set configured: every message would be accepted")
        return
    from appliance.governance import SchemaSetError, load_schema_set
    from appliance.governance.schemaset import describe_schema_set

    try:
        schema_set = load_schema_set(config.schemas)
        if config_path is not None:  # dead letters to the cloud need the config's upstream
            from appliance.deadletter.republisher import check_destinations

            check_destinations(schema_set, forwarding=config.upstream.url is not None)
    except SchemaSetError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(describe_schema_set(schema_set))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="APPLIANCE_CONFIG",
              help="Config file naming the state dir.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="The appliance's state dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(config_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Show whether the running appliance is ready, and its key figures (exit 1 when not ready)."""
    from appliance import admin
    from appliance.config import ConfigError, load_config

    if state_dir is None:
        try:
            state_dir = load_config(config_path).state_dir
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    try:
        report = admin.call(state_dir, "status", timeout=10)["status"]
    except (admin.AdminUnavailable, admin.AdminError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(render_status(report))
    if not report["ready"]:
        raise SystemExit(1)


def render_status(report: dict[str, Any], prefix: str = "") -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{prefix}{key}:")
            lines.append(render_status(value, prefix + "  "))
        else:
            lines.append(f"{prefix}{key}: {value}")
    return "\n".join(lines)


@main.command()
@click.argument("password_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("user", required=False)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--delete", "delete_user", metavar="USER", help="Remove USER from the file.")
def passwd(password_file: Path, user: str | None, password_stdin: bool, delete_user: str | None) -> None:
    """Add or change USER's password in PASSWORD_FILE (created when missing), or --delete USER.

    The file is mosquitto_passwd-compatible ($7$ PBKDF2-SHA512, 101 iterations) and written with
    mode 0600. The running appliance picks changes up on reload (SIGHUP, or at once when watched).
    """
    from appliance.security import PasswordFile, PasswordFileError

    if (user is None) == (delete_user is None):
        raise click.UsageError("give USER to set a password, or --delete USER")
    try:
        passwords = PasswordFile.load(password_file, missing_ok=delete_user is None)
        if delete_user is not None:
            if not passwords.delete(delete_user):
                raise click.ClickException(f"{password_file}: no user {delete_user!r}")
            passwords.save()
            click.echo(f"deleted {delete_user!r} from {password_file}", err=True)
            return
        assert user is not None
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt(f"password for {user}", hide_input=True, confirmation_prompt=True)
        if not password:
            raise click.ClickException("empty password")
        passwords.set(user, password)
        passwords.save()
    except PasswordFileError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"set the password of {user!r} in {password_file}", err=True)


main.add_command(audit)
main.add_command(quarantine)
