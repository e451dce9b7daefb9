"""The audit log's SQL surface as analysts see it: the tables and views they may query.

The tables' columns and types are declared once, in records.py (`REASON_TYPE` is the type of
`decisions.reasons`); the views over them are written by seal.py (`view_statements`).
"""

from __future__ import annotations

from appliance.audit.records import REASON_TYPE

__all__ = ["QUERYABLE", "REASON_TYPE"]

# Tables and views an analyst may read (see guard.py); everything else is refused.
QUERYABLE = ("decisions", "events", "quarantine", "accepted", "rejected")
