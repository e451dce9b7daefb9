"""What can go wrong with the audit store, in words an operator can act on.

`AuditError` is the store failing (file locked, missing, from a newer version, a batch refused);
`QueryRefused` and `QueryTimeout` are an analyst's query being turned down or cut short;
`OperationRefused` is a request to the running appliance (operations.py) it cannot carry out, which
the admin socket reports to the asking process. Any other exception out of `appliance.audit` is a bug.
"""

from __future__ import annotations


class AuditError(Exception):
    """The audit store cannot do what was asked; the message says why and what to do."""


class QueryRefused(AuditError):
    """An analyst query was refused before it ran: it is not a single read-only SELECT over the
    audit tables, or DuckDB could not parse or bind it."""


class QueryTimeout(AuditError):
    """An analyst query ran longer than its time limit and was interrupted."""


class OperationRefused(AuditError):
    """An admin-socket request (sync, record an event, release from quarantine) that cannot be done
    now; the message is for the user."""
