"""sqlfluff's jinja templater has no dbt `adapter`; this stands in for `adapter.dispatch` (library_path in
dbt/.sqlfluff). It picks the macro dbt would pick on the lint dialect, duckdb__<name>, else default__<name>,
so the linter sees the SQL a DuckDB build runs. Not used by dbt (not in model-paths or macro-paths)."""

from jinja2 import pass_context


@pass_context
def dispatch(context, macro_name, macro_namespace=None):
    for prefix in ("duckdb__", "default__"):
        if f"{prefix}{macro_name}" in context:
            return context[f"{prefix}{macro_name}"]
    raise KeyError(f"no duckdb__ or default__ implementation of macro {macro_name}")
