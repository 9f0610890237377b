"""Row counts on the mart's materializations (defs/mart/assets.py with_row_counts): one transaction for all,
and a relation that cannot be counted costs only its own count, on a real DuckDB warehouse."""

from __future__ import annotations

import dagster as dg
from sqlalchemy import text

from oppsync_pipeline.defs.mart.assets import count_rows, with_row_counts
from oppsync_pipeline.lib.config import DuckDBSettings
from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction


def warehouse(tmp_path, broken: bool):
    engine = make_engine(f"duckdb:///{tmp_path / 'w.duckdb'}", DuckDBSettings())
    with transaction(engine) as c:
        c.execute(text("CREATE SCHEMA marts"))
        c.execute(text("CREATE TABLE marts.opportunities AS SELECT range AS id FROM range(7)"))
        c.execute(text("CREATE TABLE marts.accounts AS SELECT range AS id FROM range(3)"))
        c.execute(text("CREATE TABLE marts.gone AS SELECT 1 AS id"))
        c.execute(text("CREATE VIEW marts.over_gone AS SELECT * FROM marts.gone"))
        if broken:
            c.execute(text("DROP TABLE marts.gone"))  # the view now fails when read
    return engine


def test_counts_every_relation_in_one_go(tmp_path):
    engine = warehouse(tmp_path, broken=False)
    assert count_rows(engine, ["marts.accounts", "marts.opportunities", "marts.over_gone"]) == {
        "marts.accounts": 3,
        "marts.opportunities": 7,
        "marts.over_gone": 1,
    }


def test_a_relation_that_cannot_be_counted_leaves_the_others_theirs(tmp_path):
    engine = warehouse(tmp_path, broken=True)
    events = [
        dg.Output(None, "opps", metadata={"dagster/table_name": "warehouse.marts.opportunities"}),
        dg.Output(None, "broken"),
        dg.Output(None, "accounts"),
        dg.AssetCheckResult(passed=True, asset_key="x", check_name="c"),
    ]
    out = with_row_counts(events, engine, {"broken": "warehouse.marts.over_gone", "accounts": "marts.accounts"})
    assert out[0].metadata["dagster/row_count"].value == 7
    assert "dagster/row_count" not in out[1].metadata  # no count, never a failed run
    assert out[2].metadata["dagster/row_count"].value == 3
    assert out[3] is events[3]
