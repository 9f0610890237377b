"""The mart follows the syncs by eager automation, with no schedule of its own: after a connection's sync the
automation sensor's evaluation requests the per-opportunity mart (the per-period aggregates, marts.outcomes and
the dashboard, at the next five-minute tick) (once every connection has synced at least once:
eager automation does not build over a missing upstream, so a connection that never synced holds the first
build back, never later ones); the build_mart job (dbt build + dashboard) fills
marts.outcomes; evaluated again with nothing new, nothing is requested; a new sync requests it again.
The one test in this folder that runs dbt (~15-20 s)."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import text

from oppsync_pipeline.defs.resources import _engine
from tests.dagster.conftest import every_creator_mapped, load_defs, start_servers, stop_servers, write_config

OUTCOMES = dg.AssetKey(["marts", "outcomes"])
OPPORTUNITIES = dg.AssetKey(["marts", "opportunities"])
DASHBOARD = dg.AssetKey(["marts", "outcomes_dashboard"])


@pytest.mark.slow  # dbt build: ~15 s alone, over a minute on a loaded 2-core machine
def test_a_sync_makes_the_mart_due_and_build_mart_fills_it(
    tmp_path: Path, dagster_instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
):
    servers = start_servers({"sandbox-hubspot": "hubspot", "sandbox-salesforce": "salesforce"}, opportunities=60)
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    try:
        config = write_config(tmp_path / "oppsync.yaml", servers, url, users=every_creator_mapped(servers))
        defs = load_defs(config, monkeypatch)
        mart = dg.AssetSelection.groups("mart")
        sync = defs.resolve_job_def("sync_sandbox_hubspot")

        before = dg.evaluate_automation_conditions(defs=defs, instance=dagster_instance, asset_selection=mart)
        assert before.get_num_requested(OPPORTUNITIES) == 0  # its upstream has never been synced

        assert sync.execute_in_process(instance=dagster_instance).success
        waiting = dg.evaluate_automation_conditions(
            defs=defs, instance=dagster_instance, asset_selection=mart, cursor=before.cursor
        )
        assert waiting.get_num_requested(OPPORTUNITIES) == 0  # salesforce has never synced

        assert defs.resolve_job_def("sync_sandbox_salesforce").execute_in_process(instance=dagster_instance).success
        due = dg.evaluate_automation_conditions(
            defs=defs, instance=dagster_instance, asset_selection=mart, cursor=waiting.cursor
        )
        assert due.get_num_requested(OPPORTUNITIES) == 1
        assert due.get_num_requested(dg.AssetKey(["staging", "stg_oppsync__opportunities"])) == 1

        built = defs.resolve_job_def("build_mart").execute_in_process(instance=dagster_instance)
        assert built.success
        materialized = {e.asset_key: e.materialization.metadata for e in built.get_asset_materialization_events()}
        assert OUTCOMES in materialized and DASHBOARD in materialized
        with _engine(url).connect() as c:
            rows = c.execute(text("SELECT count(*) FROM marts.outcomes")).scalar()
        assert rows > 0 and materialized[OUTCOMES]["dagster/row_count"].value == rows
        assert "outcomes_per_week" in materialized[DASHBOARD]

        # the aggregates' five-minute cron is the wall clock's: the assertions from here to the end hold within one
        # tick's window (seen failing when 15:25:00 passed between `idle` and `again`), so begin a new window
        # when the next tick is near (~10 s of work follows: one sync of 60 opportunities, two evaluations)
        _wait_out_a_near_cron_tick(seconds=45)
        idle = dg.evaluate_automation_conditions(
            defs=defs, instance=dagster_instance, asset_selection=mart, cursor=due.cursor
        )
        assert idle.total_requested == 0

        servers["sandbox-hubspot"].simulator.world.advance(hours=1, rate=0.05)
        assert sync.execute_in_process(instance=dagster_instance).success
        again = dg.evaluate_automation_conditions(
            defs=defs, instance=dagster_instance, asset_selection=mart, cursor=idle.cursor
        )
        assert again.get_num_requested(OPPORTUNITIES) == 1  # one connection's sync is enough from now on
        # the per-period aggregates follow at the next five-minute tick, not on every sync
        assert again.get_num_requested(OUTCOMES) == 0
    finally:
        stop_servers(servers)


def _wait_out_a_near_cron_tick(seconds: float, every: int = 300) -> None:
    """Sleep past the next `*/5` tick of the wall clock when it comes within `seconds`."""
    left = every - time.time() % every
    if left < seconds:
        time.sleep(left + 1)
