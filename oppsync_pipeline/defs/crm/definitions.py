"""Built from oppsync.yaml at load time: per connection, its assets, checks, job and schedules; the revenue
write-back job and its sensor."""

import dagster as dg

from oppsync_pipeline.defs.crm.assets import connection_assets
from oppsync_pipeline.defs.crm.checks import connection_checks
from oppsync_pipeline.defs.crm.schedules import connection_schedules, sync_job
from oppsync_pipeline.defs.crm.webhooks import webhook_sensor
from oppsync_pipeline.defs.crm.writeback import writeback_job, writeback_sensor
from oppsync_pipeline.defs.resources import load_app_config


def crm_definitions() -> dg.Definitions:
    _, cfg = load_app_config()
    assets, checks, jobs, schedules = [], [], [], []
    spread = cfg.spread_minutes()
    for conn in cfg.connections:
        assets += connection_assets(conn)
        checks += connection_checks(conn)
        job = sync_job(conn)
        jobs.append(job)
        schedules += connection_schedules(conn, job, spread)
    on_webhooks = webhook_sensor(cfg, jobs)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[*jobs, writeback_job],
        schedules=schedules,
        sensors=[writeback_sensor(cfg), *([on_webhooks] if on_webhooks else [])],
    )


@dg.definitions
def defs() -> dg.Definitions:
    return crm_definitions()
