"""`appliance console`: read the config, refuse an unsafe bind, serve the web app with uvicorn."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import click

from appliance.logs import setup_logging

log = logging.getLogger(__name__)


@click.command("console")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="APPLIANCE_CONFIG",
              help="The appliance's config file (its state dir, password file, schemas and `console:` section).")
@click.option("--listen", metavar="HOST:PORT", help="Where to serve the console (overrides `console.listen`).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The appliance's state dir (overrides `state_dir`).")
@click.option("--verbose", "-v", is_flag=True, help="Log debug messages.")
def console_command(config_path: Path | None, listen: str | None, state_dir: Path | None, verbose: bool) -> None:
    """Serve the web console.

    Overview, live verdicts, quarantine review, SQL, clients and schema trials in a browser
    (docs/console.md)."""
    import uvicorn

    from appliance.config import ConfigError, load_config
    from appliance.console.auth import ConsoleSetupError, check_setup
    from appliance.console.web import Console, build
    from appliance.config.base import Address

    overrides: dict[str, object] = {}
    if listen is not None:
        try:
            overrides["console.listen"] = Address.parse(listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from exc
    if state_dir is not None:
        overrides["state_dir"] = state_dir.resolve()
    if verbose:
        overrides["log_level"] = "debug"
    try:
        config = load_config(config_path, overrides)
        login = check_setup(config, config.console)
    except (ConfigError, ConsoleSetupError) as exc:
        raise click.ClickException(str(exc)) from exc
    setup_logging(config.log_level, config.log_format)
    tls = config.console.tls
    # uvicorn's defaults when there is no TLS; passed by name so that mypy checks each type.
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    cert_reqs: int = ssl.CERT_NONE
    if tls is not None:
        from appliance.security.tls import TLSFileError, server_ssl_context

        try:
            server_ssl_context(tls)  # the same checks (and error messages) as the MQTT listeners'
        except (TLSFileError, OSError, ValueError) as exc:
            raise click.ClickException(f"console.tls: {exc}") from exc
        cert_file, key_file = str(tls.cert_file), str(tls.key_file)
        if tls.ca_file is not None:
            ca_file = str(tls.ca_file)
        if tls.require_client_certificate:
            cert_reqs = ssl.CERT_REQUIRED
    console = Console(config, login=login, secure=tls is not None)
    address = config.console.listen
    scheme = "https" if tls is not None else "http"
    if not login:
        log.warning("console: no users in console.operators/viewers: serving read-only without login on %s", address)
    log.info("console on %s://%s (state dir %s)", scheme, address, config.state_dir)
    server = uvicorn.Server(uvicorn.Config(
        build(console), host=address.host, port=address.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=3, proxy_headers=False, server_header=False,
        ssl_certfile=cert_file, ssl_keyfile=key_file, ssl_ca_certs=ca_file, ssl_cert_reqs=cert_reqs,
    ))
    server.run()
    if not server.started:
        raise click.ClickException(f"the console could not listen on {address} (see the log above)")
