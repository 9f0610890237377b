"""Hostile input (issue 8): injection attempts in configured filter values and awkward text in CRM data.

- Filter values: each connector pushes filters down into its CRM's query language (SOQL, HubSpot search
  JSON, OData $filter, ConnectWise conditions, Autotask filter JSON). For every payload, a record whose
  name is exactly the payload is created in the CRM; a filter `name equal <payload>` must return exactly
  that record: an injection that escaped its literal would widen (or break) the query.
- CRM data: names with quotes, semicolons, backslashes, unicode, newlines, NUL bytes, a bare `\\N` are
  synced into both warehouses and read back equal (NUL removed by design: record.clean_text).
- The warehouse layer formats no values into SQL: every f-string that reaches text() / execute() only
  interpolates the schema constant and column lists from schema.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.record import clean_text
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import connection_extra, page_field

INJECTIONS = [
    "x' OR Name != '",  # SOQL / OData single-quote break-out
    "x\\' OR Name != \\'",  # backslash-escaped quote break-out
    'x" or name != "',  # ConnectWise conditions break-out
    "x') or (name ne 'y",  # OData with parentheses
    '"}, {"op": "exist", "field": "id"}, {"x": "',  # Autotask filter JSON break-out
    "Robert'); DROP TABLE oppsync.opportunities; --",
    "%' OR Name LIKE '%",  # LIKE wildcards
    "Zoë & Søn; 日本語 🚀 \\ end",
]
AWKWARD_NAMES = [
    'O\'Brien "quoted"; semicolon; -- comment',
    "back\\slash and \\N inside",
    "\\N",
    "line one\nline two\ttabbed",
    "NUL\x00inside\x00twice",
    "Ünïcødé 日本語 🚀 ﷽",
    'comma, "csv" ,,',
    "'; DROP TABLE oppsync.opportunities; --",
]


def _ids(connector) -> set[str]:
    return {
        o.source_id
        for open_set in (True, False)
        for page in connector.opportunities(open_set=open_set, since=None)
        for o in page
    }


@pytest.mark.parametrize("crm", CRMS)
def test_injection_in_filter_values_matches_only_the_literal(crm: str, tmp_path: Path):
    sim = build_simulator(crm, seed=3, opportunities=60)
    open_stage = sim.world.stage_for(None, "open").key
    created = {p: sim.world.create(name=p, stage=open_stage).native_id for p in INJECTIONS}
    with SandboxServer(sim) as server:
        cfg = sandbox_config(
            {crm: server}, f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path, extra={crm: connection_extra(crm, lean=True)}
        )
        base, name_field = cfg.connections[0], page_field(crm, "project_name")
        outcomes = {}
        for payload, native_id in created.items():
            conn = base.model_copy(update={"filters": [RecordFilter(field=name_field, op="equal", value=payload)]})
            outcomes[payload] = _ids(build_connector(cfg, conn))
            assert outcomes[payload] == {str(native_id)}, (
                f"{crm}: filter {payload!r} returned {len(outcomes[payload])} ids, expected only {native_id}"
            )
        # and through 'in' (a list literal), all at once
        conn = base.model_copy(update={"filters": [RecordFilter(field=name_field, op="in", value=INJECTIONS)]})
        assert _ids(build_connector(cfg, conn)) == {str(i) for i in created.values()}


@pytest.mark.parametrize("crm", CRMS)
def test_awkward_crm_text_round_trips(crm: str, warehouse_url: str, tmp_path: Path):
    sim = build_simulator(crm, seed=4, opportunities=40)
    open_stage = sim.world.stage_for(None, "open").key
    created = {sim.world.create(name=n, stage=open_stage).native_id: n for n in AWKWARD_NAMES}
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, warehouse_url, tmp_path, extra={crm: connection_extra(crm, lean=True)})
        conn = cfg.connections[0]
        engine = make_engine(warehouse_url)
        ensure_schema(engine)
        summary = sync_connection(cfg, conn, engine, run_id="hostile", mode="full")
        assert summary.extract.status == "complete"
        with engine.connect() as c:
            rows = dict(
                c.execute(
                    text("SELECT source_id, project_name FROM oppsync.opportunities WHERE connection = :c"),
                    {"c": conn.name},
                ).fetchall()
            )
            hist = dict(
                c.execute(
                    text("SELECT source_id, project_name FROM oppsync.opportunity_history WHERE connection = :c"),
                    {"c": conn.name},
                ).fetchall()
            )
            tables = c.execute(
                text("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'oppsync'")
            ).scalar()
        engine.dispose()
    assert len(rows) == len(list(sim.world.live()))
    wrong = {n: rows.get(str(i)) for i, n in created.items() if rows.get(str(i)) != clean_text(n)}
    assert not wrong, f"{crm}: names changed on the way in: {wrong}"
    assert all(hist[str(i)] == clean_text(n) for i, n in created.items())
    assert tables >= 10, "a table disappeared"


# -- no values formatted into SQL --------------------------------------------------------------------------------

WAREHOUSE = Path(__file__).resolve().parents[2] / "oppsync_pipeline" / "lib" / "warehouse"
# What an f-string that reaches a SQL call may interpolate: the schema-name constant, table names from
# schema.py, column lists built from schema.py's constants, SQL fragments of those, and a temporary
# table name made from id(); `narrow` and `plain` are column lists from schema.py; `changed` is a CASE list over
# record.TRACKED_FIELDS; `values` is bulk_insert's column list with store.DUCKDB_ROW_HASH (an expression over
# record.TRACKED_FIELDS) in place of row_hash; DUCKDB_CATALOG and DUCKDB_ROW_GROUP_SIZE are engine.py constants. Anything else (a run id, a connection name, a filter value) must be a
# bound parameter.
ALLOWED = {
    "S",
    "SCHEMA",
    "_LATEST",
    "_KEPT",
    "cols",
    "scols",
    "rcols",
    "narrow",
    "plain",
    "values",
    "sets",
    "changed",
    "union",
    "locked",
    "t",
    "table",
    "column",
    "name",
    "DUCKDB_CATALOG",
    "DUCKDB_ROW_GROUP_SIZE",
    # engine's set_memory_limit (lean): an int computed from DuckDB's own memory_limit and a module constant
    # (DuckDB's SET takes no bound parameter)
    "max(1, int(lean_mib))",
    # engine's set_memory_limit (configured): the configured memory_limit, matched against config.MEMORY_LIMIT_PATTERN
    # when the engine is made
    "self._instance.memory_limit",
    # engine's set_single_thread: the configured thread count, an int from the configuration (DuckDBSettings) or
    # OPPSYNC_DUCKDB_THREADS (int() when the engine is made)
    "int(self._instance.threads)",
    # reconcile's and migration 5's fragments, built from module constants (field and kind names)
    "scope",
    "same_close",
    "fields(STAGE_FIELDS)",
    "fields(STATUS_FIELDS)",
    "fields(TRACKED_FIELDS)",
    "stage_moved",
    "status_moved",
    "updated",
    "type_",
    "e",
    "status_kinds",
    "', '.join(columns)",
    "', '.join(cols)",
    "', '.join((':' + c for c in cols))",
    # migration 12's DuckDB table rebuild: column definitions and names read from DuckDB's own catalog
    # (duckdb_columns) of an oppsync table, each name double-quoted; the compression from a module constant
    "ddl",
    "names",
    "UPDATED_TABLES_FILLFACTOR",  # migration 14: a module constant (a storage parameter is not bindable)
    "quoted",  # setup.py: CREATE DATABASE of the configured name, quoted by the dialect (identifiers are not bindable)
}
SQL_CALLS = {"text", "execute", "exec_driver_sql", "copy_expert"}


def _sql_fstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if fn in SQL_CALLS and node.args:
                for sub in ast.walk(node.args[0]):
                    if isinstance(sub, ast.JoinedStr):
                        yield node, sub


def test_warehouse_layer_binds_every_value():
    offenders, checked = [], 0
    lib = WAREHOUSE.parent  # the warehouse layer, the reconcile and staging that moved out of it
    for path in sorted([*WAREHOUSE.glob("*.py"), *(lib / "reconcile").glob("*.py"), lib / "staging.py"]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, fstring in _sql_fstrings(tree):
            for part in fstring.values:
                if isinstance(part, ast.FormattedValue):
                    checked += 1
                    expr = ast.unparse(part.value)
                    if expr not in ALLOWED:
                        offenders.append(f"{path.name}:{call.lineno}: interpolates {{{expr}}} into SQL")
    assert checked > 50, "the scan found almost no SQL: did the warehouse layer move?"
    assert not offenders, "values formatted into SQL (use bound parameters):\n" + "\n".join(offenders)


def test_the_scan_catches_an_interpolated_value():
    """The check above is only worth something if it flags the mistake it is there for."""
    bad = ast.parse("conn.execute(text(f\"DELETE FROM {S}.opportunities WHERE connection = '{connection}'\"))")
    found = [
        ast.unparse(p.value) for _, fs in _sql_fstrings(bad) for p in fs.values if isinstance(p, ast.FormattedValue)
    ]
    assert "connection" in found and "connection" not in ALLOWED
