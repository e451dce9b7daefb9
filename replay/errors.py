"""The one error kind replay raises on purpose: the input (a source, a schema set, an option) cannot
be used. The CLI turns it into exit code 2 with its message; any other exception is a bug."""

from __future__ import annotations


class ReplayInputError(Exception):
    """A recording, schema set or option that cannot be used; the message is for the user."""
