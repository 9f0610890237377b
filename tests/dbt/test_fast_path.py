"""The automated build after a sync (`dbt run` of the per-opportunity models, no tests: defs/mart/assets.py
dbt_command) leaves the mart exactly as a full `dbt build` leaves it, on DuckDB and on Postgres.

The change between the builds is one a sync makes through the pipeline code: a CRM user linked to an internal
user after the fact, which re-credits past opportunities and events (attribution is computed at read time, so
any row can change: why marts.opportunities stays a full table rebuild, not an incremental model)."""

from __future__ import annotations

import pytest
from mart_world import Dbt, World, link_erin

from oppsync_pipeline.defs.mart.assets import AGGREGATES

MARTS = ("marts.opportunities", "marts.opportunity_events")


def snapshot(dbt: Dbt) -> dict[str, list[tuple]]:
    return {t: sorted(tuple(str(v) for v in r) for r in dbt.query(f"select * from {t}")) for t in MARTS}


def check_fast_path(dbt: Dbt) -> None:
    dbt("run")  # the relations exist (a deployment's earlier builds)
    before = snapshot(dbt)
    link_erin(dbt.url)
    dbt("run", "--exclude", *sorted(AGGREGATES))  # what mart_follows_syncs' run executes after the sync
    fast = snapshot(dbt)
    assert fast != before, "the change did not reach the mart"
    dbt("build")
    assert fast == snapshot(dbt)


@pytest.mark.slow
def test_fast_path_equals_full_build_duckdb(duckdb_dbt: tuple[Dbt, World]) -> None:
    check_fast_path(duckdb_dbt[0])


@pytest.mark.slow
@pytest.mark.postgres
def test_fast_path_equals_full_build_postgres(postgres_dbt: tuple[Dbt, World]) -> None:
    check_fast_path(postgres_dbt[0])
