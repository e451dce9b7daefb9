"""The audit log: every verdict and every notable event, queryable with SQL.

Verdicts are first written to a small SQLite journal (group-committed before the publisher is
acknowledged) and moved to DuckDB in batches by one writer thread; analysts query DuckDB through the
running appliance or through Parquet exports. See docs/audit.md.
"""
