"""What can go wrong with the audit store, in words an operator can act on.

`AuditError` is the store failing (file locked, missing, from a newer version, a batch refused);
`QueryRefused` and `QueryTimeout` are an analyst's query being turned down or cut short. Any other
exception out of `appliance.audit` is a bug.
"""

from __future__ import annotations


class AuditError(Exception):
    """The audit store cannot do what was asked; the message says why and what to do."""


class QueryRefused(AuditError):
    """An analyst query was refused before it ran: it is not a single read-only SELECT over the
    audit tables, or DuckDB could not parse or bind it."""


class QueryTimeout(AuditError):
    """An analyst query ran longer than its time limit and was interrupted."""
