"""The dbt mart and the dashboard, plus the sensor that runs them after syncs."""

import dagster as dg

from oppsync_pipeline.defs.mart.assets import mart_definitions
from oppsync_pipeline.defs.mart.dashboard import outcomes_dashboard
from oppsync_pipeline.defs.resources import load_app_config


def mart_stage_definitions() -> dg.Definitions:
    _, cfg = load_app_config()
    mart_job = dg.define_asset_job(
        "build_mart",
        selection=dg.AssetSelection.groups("mart"),
        description="Build the outcomes mart (dbt build) and its dashboard.",
    )
    follow = dg.AutomationConditionSensorDefinition(
        "mart_follows_syncs",
        target=dg.AssetSelection.groups("mart"),
        default_status=dg.DefaultSensorStatus.RUNNING,
        # evaluated every 5 s, the asset daemon's shortest loop (Dagster's default is 30 s): a webhook-triggered
        # sync reaches the mart within seconds, not half a minute later (README: Near-real-time syncs; make bench)
        minimum_interval_seconds=5,
        description="Builds the mart after any connection's sync (eager automation), no second schedule.",
    )
    return dg.Definitions.merge(
        mart_definitions(cfg),
        dg.Definitions(assets=[outcomes_dashboard], jobs=[mart_job], sensors=[follow]),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return mart_stage_definitions()
