"""Command line: each command is one task a user has (`appliance --help`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from appliance.broker import BrokerError
from appliance.config import Address, ConfigError, load_config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mqtt-governance-appliance")
def main() -> None:
    """MQTT schema governance appliance: validate, quarantine, audit and forward MQTT traffic."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="APPLIANCE_CONFIG",
              help="Config file (YAML). Without it, built-in defaults.")
@click.option("--listen", metavar="HOST:PORT", help="LAN listener for MQTT clients (overrides `listen`).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for everything the appliance writes (overrides `state_dir`).")
@click.option("--verbose", "-v", is_flag=True, help="Log debug messages.")
def run(config_path: Path | None, listen: str | None, state_dir: Path | None, verbose: bool) -> None:
    """Run the appliance in the foreground until SIGINT or SIGTERM."""
    overrides: dict[str, object] = {}
    if listen is not None:
        try:
            overrides["listen"] = Address.parse(listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from exc
    if state_dir is not None:
        overrides["state_dir"] = state_dir.resolve()
    if verbose:
        overrides["log_level"] = "debug"
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    _setup_logging(config.log_level)
    from appliance.app import run as run_appliance

    try:
        run_appliance(config)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
