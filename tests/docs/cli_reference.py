"""docs/cli.md, generated from the `--help` of every `appliance` and `replay` command.

    python -m tests.docs.cli_reference > docs/cli.md

tests/docs/test_cli_docs.py fails when a command or option is missing from docs/cli.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import click

from appliance.cli import main as appliance
from replay.cli import cli as replay

WIDTH = 100
PROGRAMS: dict[str, click.Command] = {"appliance": appliance, "replay": replay}

INTRO = """\
# Command line reference

Generated from `--help` by `python -m tests.docs.cli_reference > docs/cli.md`; do not edit by hand
(`tests/docs/test_cli_docs.py` fails when a command or option is missing here). Every command also
takes `-h`/`--help`.
"""


def walk(command: click.Command, name: str, parent: click.Context | None = None) -> Iterator[tuple[str, click.Command, click.Context]]:
    """Every command and subcommand, depth first, in the order `--help` lists them."""
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    context = click.Context(command, info_name=name.rsplit(" ", 1)[-1], parent=parent, **settings)
    yield name, command, context
    if isinstance(command, click.Group):
        for sub in command.list_commands(context):
            subcommand = command.get_command(context, sub)
            if subcommand is not None and not subcommand.hidden:
                yield from walk(subcommand, f"{name} {sub}", context)


def commands() -> Iterator[tuple[str, click.Command, click.Context]]:
    for program, command in PROGRAMS.items():
        yield from walk(command, program)


def options(command: click.Command) -> list[str]:
    """Every option spelling of a command, e.g. ["--config", "--state-dir", "-o", "--output"]."""
    return [opt for param in command.params if isinstance(param, click.Option) and not param.hidden
            for opt in [*param.opts, *param.secondary_opts]]


def render() -> str:
    parts = [INTRO]
    for name, command, context in commands():
        level = "#" * min(name.count(" ") + 2, 4)
        parts.append(f"{level} `{name}`\n\n```\n{command.get_help(context).rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
