"""Errors shared by the schema kinds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SchemaError:
    """One reason a payload does not match its schema."""

    path: str  # JSON pointer into the payload ("/temperature"), "" for the payload as a whole
    message: str


class SchemaSetError(Exception):
    """A schema set that cannot be used; every problem found, each naming its file and line."""

    def __init__(self, directory: Path, problems: list[str]):
        self.directory = directory
        self.problems = problems
        super().__init__(f"schema set {directory} is broken:\n" + "\n".join(f"  {p}" for p in problems))
