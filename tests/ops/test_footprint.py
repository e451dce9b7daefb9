"""What the commands load: `appliance run` only what the service runs, `appliance --help` nothing
heavy (docs/performance.md, memory). Checked in real processes, from the interpreter's own record of
every import (`-X importtime`)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from tests.helpers import wait_until
from tests.processes import can_connect, free_port

ROOT = Path(__file__).resolve().parents[2]
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)$", re.MULTILINE)
# Used by simulate, replay and capture, or to compile .proto files in a subprocess; never by the service.
NOT_IN_THE_SERVICE = {"paho", "rich", "grpc_tools", "grpc", "matplotlib"}
SCHEMA_ENGINES = {"jsonschema_rs", "cel_expr_python", "google", "duckdb"}


def imported(stderr: str) -> set[str]:
    """Top-level packages a process imported, from its -X importtime lines."""
    return {name.split(".")[0] for _, name in IMPORT_LINE.findall(stderr)}


def test_help_imports_no_schema_engine_nor_config_models():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "appliance", "--help"], capture_output=True,
                            text=True, check=True, timeout=60)
    assert "Commands:" in result.stdout
    modules = imported(result.stderr)
    assert "appliance" in modules  # the record is there at all
    assert not modules & (SCHEMA_ENGINES | NOT_IN_THE_SERVICE | {"pydantic"}), modules


def test_lazy_commands_help_matches_their_own():
    from appliance.cli import main

    names = main.list_commands(click.Context(main))
    limit = click.HelpFormatter().width - 6 - max(map(len, names))
    for name, (_, _, short_help) in main.LAZY.items():
        command = main.get_command(click.Context(main), name)
        assert command is not None
        assert command.get_short_help_str(limit) == short_help, f"update _LazyGroup.LAZY[{name!r}]"


def test_run_loads_only_what_the_service_runs(tmp_path):
    port = free_port()
    config = tmp_path / "appliance.yaml"
    # The demo set has a .proto schema: compiling it must leave no protoc behind.
    config.write_text(f"listen: 127.0.0.1:{port}\nstate_dir: state\nschemas: {ROOT / 'schemas' / 'v1'}\n"
                      "metrics:\n  listen: 127.0.0.1:0\nreload_on_change: false\n")
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "appliance", "run", "--config", str(config)],
                                stdout=log, stderr=log, text=True)
        try:
            def listening() -> bool:
                assert proc.poll() is None, "appliance exited"
                return can_connect(port)

            wait_until(listening, timeout=60, message="appliance listening")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        log.seek(0)
        modules = imported(log.read())
    assert {"jsonschema_rs", "cel_expr_python", "google", "uvloop"} <= modules  # what it runs
    assert "duckdb" not in modules  # DuckDB runs in helper processes and readers only (issue #13)
    assert not modules & NOT_IN_THE_SERVICE, modules & NOT_IN_THE_SERVICE
