"""The Dagster dashboard asset, materialized: a PNG chart in its markdown metadata, and the latest week's totals
over every user (the old table summed the 20 busiest)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import dagster as dg
import yaml
from sqlalchemy import text

from oppsync_pipeline.defs.mart.dashboard import outcomes_dashboard
from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction
from tests.dashboard.test_queries import fill_marts

LATEST = date(2026, 6, 8)


def test_the_asset_charts_every_week_and_totals_every_user(tmp_path: Path):
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    fill_marts(url)
    engine = make_engine(url)
    try:
        with transaction(engine) as conn:  # a latest week with 25 busy users: more than the table lists
            conn.execute(
                text(
                    "INSERT INTO marts.outcomes (period_grain, period_start, connection, user_id, user_name, "
                    "opportunities_created, opportunities_won, opportunities_lost) VALUES "
                    "('week', :p, 'sf', :u, :n, 4, 1, 2)"
                ),
                [{"p": LATEST, "u": f"rep{i}", "n": f"Rep {i}"} for i in range(25)],
            )
    finally:
        engine.dispose()
    config = tmp_path / "oppsync.yaml"
    config.write_text(yaml.safe_dump({"warehouse": {"url": url}}), encoding="utf-8")

    result = dg.materialize([outcomes_dashboard], resources={"oppsync": OppsyncResource(config_path=str(config))})

    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["outcomes_per_week"].value.startswith("![created, won and lost per week](data:image/png;base64,")
    assert metadata["opportunities_created_latest_week"].value == 100
    assert metadata["opportunities_won_latest_week"].value == 25
    assert metadata["opportunities_lost_latest_week"].value == 50
    latest = metadata["latest_week"].value
    assert "Week of 2026-06-08: **100** created" in latest and "(all 25 users)" in latest
    assert latest.count("| Rep ") == 20 and "5 more users not listed" in latest
    assert metadata["latest_week_is_partial"].value is False  # the data is as of 2026-05-01
