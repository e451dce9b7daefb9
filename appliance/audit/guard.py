"""The read-only SQL guard: an analyst's query runs only if it is one SELECT that reads nothing but
the audit tables.

DuckDB parses the text (`extract_statements` for the statement type, `json_serialize_sql` for the
syntax tree), and the guard walks the tree with an allowlist: table references must name an audit
table or view, or a CTE in scope at that point; table functions must be in `TABLE_FUNCTIONS`;
scalar functions must not be in `DENIED_FUNCTIONS`; any table reference of a kind the guard does not
know is refused. Refusing by allowlist is what stops `FROM 'x.csv'` (a replacement scan looks like a
table name) and any file-reading table function added by a future DuckDB.

This is the first of two layers: AuditQuery also opens DuckDB with external access disabled and its
configuration locked, only the Parquet directory readable (see query.py), so a query that slipped
past the guard still cannot read other files or write any.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import duckdb

from appliance.audit.errors import QueryRefused
from appliance.audit.schema import QUERYABLE

# Table functions that compute rows from their arguments and touch nothing else.
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree"})

# Scalar functions with side effects or that run SQL given as text. DuckDB 2.0.1 has no scalar
# function that reads files or the environment (read_text/read_blob are table functions, getenv
# exists only in the CLI), so this list is short.
DENIED_FUNCTIONS = frozenset({
    "write_log", "json_execute_serialized_sql", "nextval", "currval", "setseed",
})

# Kinds of table reference (FROM items) in DuckDB's serialized tree. Any other kind is refused.
_TABLE_REFS = frozenset({
    "BASE_TABLE", "TABLE_FUNCTION", "SUBQUERY", "JOIN", "EXPRESSION_LIST", "EMPTY", "PIVOT",
    "SHOW_REF",
})

_ALLOWED_LIST = ", ".join(QUERYABLE)
_WRITE_TYPES = {"INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "MERGE_INTO", "VACUUM",
                "ANALYZE", "CREATE_FUNC", "VARIABLE_SET", "UPDATE_EXTENSIONS", "LOGICAL_PLAN"}
_REFUSED_TYPES = {
    "ATTACH": "ATTACH: other databases are not allowed",
    "DETACH": "DETACH is not allowed",
    "TRANSACTION": "BEGIN/COMMIT/ROLLBACK: transactions are not allowed (each query is one)",
    "COPY": "COPY: writing or reading files is not allowed (use `appliance audit export`)",
    "COPY_DATABASE": "COPY FROM DATABASE is not allowed",
    "EXPORT": "EXPORT DATABASE is not allowed (use `appliance audit export`)",
    "PRAGMA": "PRAGMA is not allowed",
    "SET": "SET/RESET: changing settings is not allowed",
    "LOAD": "INSTALL/LOAD: extensions are not allowed",
    "CALL": "CALL is not allowed",
    "EXPLAIN": "EXPLAIN is not allowed",
    "PREPARE": "PREPARE is not allowed",
    "EXECUTE": "EXECUTE is not allowed",
    "MULTI": "this statement is not allowed (only a single SELECT is)",
    "RELATION": "this statement is not allowed (only a single SELECT is)",
    "EXTENSION": "extension statements are not allowed",
}


def check_query(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """Returns the single SELECT statement's text to run, or raises `QueryRefused`."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryRefused(f"the query does not parse: {_first_line(error)}") from None
    if not statements:
        raise QueryRefused("the query is empty")
    if len(statements) > 1:
        raise QueryRefused(
            f"multiple statements are not allowed ({len(statements)} found): send one SELECT"
        )
    statement = statements[0]
    kind = statement.type.name
    if kind in _WRITE_TYPES:
        raise QueryRefused(f"{kind}: writes are not allowed: the audit log is read-only here")
    if kind != "SELECT":
        reason = _REFUSED_TYPES.get(kind, f"{kind} statements are not allowed (only SELECT is)")
        raise QueryRefused(reason)
    text = statement.query
    row = con.execute("SELECT json_serialize_sql(?)", [text]).fetchone()
    tree: dict[str, Any] = json.loads(row[0]) if row else {"error": True, "error_message": "no result"}
    if tree.get("error"):
        raise QueryRefused(f"the query cannot be checked: {tree.get('error_message')}")
    for node in tree.get("statements", []):
        _Walker().visit(node, frozenset())
    return text


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _name(value: Any) -> str:
    return str(value or "").lower()


# Query node types a read-only SELECT may contain.
_QUERY_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}


class _Walker:
    """Walks a serialized statement; `scope` is the set of CTE names visible at each point."""

    def visit(self, node: Any, scope: frozenset[str]) -> None:
        if isinstance(node, list):
            for item in node:
                self.visit(item, scope)
            return
        if not isinstance(node, dict):
            return
        cte_map = node.get("cte_map")
        entries = cte_map.get("map") if isinstance(cte_map, dict) else None
        if isinstance(entries, list):
            scope = self._ctes(entries, scope)
        node_type = node.get("type")
        if isinstance(node_type, str) and node_type.endswith("_NODE") and node_type not in _QUERY_NODES:
            # e.g. DELETE/UPDATE/INSERT ... RETURNING inside a WITH: the statement says SELECT.
            raise QueryRefused(f"{node_type.removesuffix('_QUERY_NODE').removesuffix('_NODE')}: writes are not allowed: "
                               "the audit log is read-only here")
        if "sample" in node and "query_location" in node and "class" not in node:
            self._table_ref(node, scope)
        function_name = node.get("function_name")
        if isinstance(function_name, str) and _name(function_name) in DENIED_FUNCTIONS:
            raise QueryRefused(f"{function_name}: this function is not allowed")
        for key, value in node.items():
            if key != "cte_map":
                self.visit(value, scope)

    def _ctes(self, entries: Iterable[dict[str, Any]], scope: frozenset[str]) -> frozenset[str]:
        # A CTE sees the ones before it; itself only when it is recursive (otherwise DuckDB resolves
        # its own name to a real table of that name: `WITH duckdb_tables AS (FROM duckdb_tables)`).
        # The query body sees all of them.
        for entry in entries:
            name = _name(entry.get("key"))
            value = entry.get("value") or {}
            query_node = value.get("query_node")
            recursive = isinstance(query_node, dict) and query_node.get("type") == "RECURSIVE_CTE_NODE"
            self.visit(query_node, scope | {name} if recursive else scope)
            self.visit({k: v for k, v in value.items() if k != "query_node"}, scope)
            scope = scope | {name}
        return scope

    def _table_ref(self, node: dict[str, Any], scope: frozenset[str]) -> None:
        kind = node.get("type")
        if kind not in _TABLE_REFS:
            raise QueryRefused(f"{kind}: this kind of table reference is not allowed")
        if kind == "BASE_TABLE":
            self._base_table(node, scope)
        elif kind == "TABLE_FUNCTION":
            function = node.get("function") or {}
            name = _name(function.get("function_name"))
            qualified = function.get("schema") or function.get("catalog")
            if name not in TABLE_FUNCTIONS or qualified:
                raise QueryRefused(_table_function_refusal(name))
        elif kind == "SHOW_REF" and not node.get("query"):
            raise QueryRefused(
                f"SHOW: catalog queries are not allowed; the tables are {_ALLOWED_LIST} "
                "(DESCRIBE decisions works; see docs/audit.md)"
            )

    def _base_table(self, node: dict[str, Any], scope: frozenset[str]) -> None:
        name = _name(node.get("table_name"))
        catalog, schema = _name(node.get("catalog_name")), _name(node.get("schema_name"))
        if catalog or schema not in ("", "main"):
            raise QueryRefused(
                f"{'.'.join(p for p in (catalog, schema, name) if p)}: only the audit tables "
                f"({_ALLOWED_LIST}) can be read"
            )
        if name in QUERYABLE or (not schema and name in scope):
            return
        if "." in name or "/" in name or "*" in name or "\\" in name:
            raise QueryRefused(f"'{name}': reading files is not allowed")
        raise QueryRefused(f"{name}: unknown table; only {_ALLOWED_LIST} can be read")


def _table_function_refusal(name: str) -> str:
    allowed = ", ".join(sorted(TABLE_FUNCTIONS))
    if name.startswith(("read_", "parquet_", "sniff_", "glob")) or name in {"query", "query_table"}:
        why = "reading files is not allowed" if name not in {"query", "query_table"} else (
            "running SQL from text is not allowed")
    else:
        why = "catalog and system functions are not allowed"
    return f"{name}: {why} (allowed table functions: {allowed})"
