"""The dbt mart and the dashboard, the sensor that builds them after syncs, and dbt's tests every hour."""

import dagster as dg

from oppsync_pipeline.defs.mart.assets import AFTER_SYNC, FULL, MART_RUN_TAG, mart_definitions
from oppsync_pipeline.defs.mart.dashboard import outcomes_dashboard
from oppsync_pipeline.defs.resources import load_app_config

# dbt's tests on their own, hourly (a quarter hour after the :30 syncs): the builds that follow syncs run the
# models only (assets.dbt_command). Tests alone replace no table, but a build rebuilding a view drops the views
# on it for a moment: like every mart run they wait in the queue for the one running (tag oppsync/mart).
TESTS_CRON = "45 * * * *"


def mart_stage_definitions() -> dg.Definitions:
    _, cfg = load_app_config()
    mart_job = dg.define_asset_job(
        "build_mart",
        selection=dg.AssetSelection.groups("mart"),
        tags={MART_RUN_TAG: FULL},
        description="Build the outcomes mart (dbt build: every model and dbt's tests) and its dashboard.",
    )
    tests_job = dg.define_asset_job(
        "mart_tests",
        # the group's checks without its assets
        selection=dg.AssetSelection.groups("mart") - dg.AssetSelection.groups("mart").without_checks(),
        tags={MART_RUN_TAG: FULL},
        description="dbt's tests of the mart (its asset checks), without rebuilding any model.",
    )
    tests_hourly = dg.ScheduleDefinition(
        name="mart_tests_hourly",
        job=tests_job,
        cron_schedule=TESTS_CRON,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="dbt's tests every hour: the builds that follow syncs skip them (dbt run).",
    )
    follow = dg.AutomationConditionSensorDefinition(
        "mart_follows_syncs",
        target=dg.AssetSelection.groups("mart"),
        run_tags={MART_RUN_TAG: AFTER_SYNC},
        default_status=dg.DefaultSensorStatus.RUNNING,
        # evaluated every 5 s, the asset daemon's shortest loop (Dagster's default is 30 s): a webhook-triggered
        # sync reaches the mart within seconds, not half a minute later (README: Near-real-time syncs; make bench)
        minimum_interval_seconds=5,
        description="Builds the mart after any connection's sync (eager automation, dbt run without tests).",
    )
    return dg.Definitions.merge(
        mart_definitions(cfg),
        dg.Definitions(
            assets=[outcomes_dashboard], jobs=[mart_job, tests_job], schedules=[tests_hourly], sensors=[follow]
        ),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return mart_stage_definitions()
