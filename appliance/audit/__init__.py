"""The audit log: every verdict and every notable event, queryable with SQL.

Verdicts and events are records of the message log (appliance/msglog), the single durable record,
appended by the pipeline's sink (sink.py) before the publisher is acknowledged. A helper process
turns sealed log segments into Parquet files by day (seal.py); analysts query those files plus the
log's tail in a DuckDB of their own (query.py: `appliance audit sql`), never in the service. See
docs/audit.md.
"""
