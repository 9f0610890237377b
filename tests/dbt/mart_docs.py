"""The marts as a BI tool sees them: every column of every mart described, and the descriptions where tools look.

The reference is the built relation, not the YAML: each column a mart really has (DuckDB's catalog, Postgres's
pg_attribute) must have a non-empty description in dbt's manifest, equal to the column's comment in the
warehouse (persist_docs) and, on DuckDB, in `dbt docs generate`'s catalog (what `make docs` shows). A column
or a mart model added without a description fails, whoever adds it.

Run on the warehouse test_mart.py has just built (one dbt build per backend for both: a build costs ~30 s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mart_world import Dbt

MARTS_PATH = "models/marts/"
MARTS = {"opportunities", "opportunity_events", "outcomes"}
# Marts whose columns beyond the documented fixed ones come from the configuration (oppsync.yaml
# `extra_fields:` -> the `extra_fields` dbt var): only those configured names are accepted undescribed.
CONFIGURED_COLUMNS_VAR = {"opportunity_fields": "extra_fields"}

POSTGRES_COMMENTS = """
    select c.relname, a.attname, col_description(c.oid, a.attnum), obj_description(c.oid, 'pg_class')
    from pg_class as c
    join pg_namespace as n on n.oid = c.relnamespace
    join pg_attribute as a on a.attrelid = c.oid
    where n.nspname = 'marts' and c.relkind in ('r', 'v', 'm', 'p') and a.attnum > 0 and not a.attisdropped
"""
# tables and views alike: a mart another change materializes as a view is checked too
DUCKDB_COMMENTS = """
    select c.table_name, c.column_name, c.comment, coalesce(t.comment, v.comment)
    from duckdb_columns() as c
    left join duckdb_tables() as t on t.schema_name = c.schema_name and t.table_name = c.table_name
    left join duckdb_views() as v on v.schema_name = c.schema_name and v.view_name = c.table_name
    where c.schema_name = 'marts'
"""


def mart_models(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every model under models/marts, by name: the three marts today, and any added later."""
    return {
        n["name"]: n
        for n in manifest["nodes"].values()
        if n["resource_type"] == "model" and n["original_file_path"].startswith(MARTS_PATH)
    }


def described(text: str | None) -> str:
    return (text or "").strip()


def read_target(dbt: Dbt, name: str) -> dict[str, Any]:
    return json.loads((Path(dbt.env["DBT_TARGET_PATH"]) / name).read_text(encoding="utf-8"))


def configured_columns(vars: dict[str, Any] | None) -> dict[str, set[str]]:
    """mart -> the column names the build's dbt vars configured for it (CONFIGURED_COLUMNS_VAR)."""
    return {m: {c.lower() for c in (vars or {}).get(var, {})} for m, var in CONFIGURED_COLUMNS_VAR.items()}


def undocumented_and_wrong(
    models: dict[str, dict], rows: list[tuple], configured: dict[str, set[str]] | None = None
) -> tuple[list[str], list[str]]:
    """`rows`: (table, column, column comment, table comment) of every column the warehouse's marts schema
    has. Returns the columns without a YAML description, and the tables / columns whose comment is not it.
    `configured`: per mart, the columns its configuration adds (configured_columns), accepted without one;
    any other column of that mart still needs its description."""
    configured = configured or {}
    undocumented, wrong = [], []
    built = {r[0] for r in rows}
    undocumented += [f"{m} (model not built)" for m in MARTS | set(models) if m not in built]
    seen = set()
    for table, column, comment, table_comment in rows:
        node = models.get(table)
        if node is None:
            undocumented.append(f"{table} (a table in marts without a model under {MARTS_PATH})")
            continue
        if table not in seen:
            seen.add(table)
            if not described(node["description"]):
                undocumented.append(f"{table} (the model itself)")
            elif described(table_comment) != described(node["description"]):
                wrong.append(f"{table}: table comment {table_comment!r}")
        description = described({c.lower(): v for c, v in node["columns"].items()}.get(column, {}).get("description"))
        if not description and column.lower() in configured.get(table, set()):
            continue  # named and typed by the configuration, described there (the model's description says so)
        if not description:
            undocumented.append(f"{table}.{column}")
        elif described(comment) != description:
            wrong.append(f"{table}.{column}: comment {comment!r}")
    return undocumented, wrong


def check_mart_docs(dbt: Dbt, vars: dict[str, Any] | None = None) -> None:
    """After a dbt run (with `vars`): every column of the built marts described, and its comment in the
    warehouse; the columns the vars configure (configured_columns) excepted."""
    models = mart_models(read_target(dbt, "manifest.json"))
    rows = [tuple(r) for r in dbt.query(POSTGRES_COMMENTS if dbt.target == "postgres" else DUCKDB_COMMENTS)]
    undocumented, wrong = undocumented_and_wrong(models, rows, configured_columns(vars))
    assert not undocumented, (
        f"marts without a description in dbt/models/marts/_marts__models.yml (BI tools show them blank): {undocumented}"
    )
    assert not wrong, f"warehouse comments differ from the YAML descriptions (persist_docs): {wrong}"


def check_docs_catalog(dbt: Dbt, vars: dict[str, Any] | None = None) -> None:
    """`dbt docs generate` (make docs) shows each mart's and column's description as the relation's comment.
    Catalog only (--no-compile) with partial parsing: the run just before parsed the same project."""
    docs = Dbt(dbt.target, {**dbt.env, "DBT_PARTIAL_PARSE": "true"}, dbt.url)
    docs("docs", "generate", "--no-compile", "--select", f"path:{MARTS_PATH}", vars=vars)
    models = mart_models(read_target(dbt, "manifest.json"))
    catalog = read_target(dbt, "catalog.json")["nodes"]
    configured = configured_columns(vars)
    for name, node in models.items():
        entry = catalog[node["unique_id"]]
        assert described(entry["metadata"]["comment"]) == described(node["description"]), name
        shown = {
            c.lower(): described(v["comment"])
            for c, v in entry["columns"].items()
            if c.lower() not in configured.get(name, set())
        }
        assert shown == {c.lower(): described(v["description"]) for c, v in node["columns"].items()}, name
        assert all(shown.values()), f"{name}: columns without a description in dbt docs"
