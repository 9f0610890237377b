"""Built from oppsync.yaml at load time: per connection, its assets, checks, job and schedules; the revenue
write-back job and its sensor."""

import dagster as dg

from oppsync_pipeline.defs.crm.assets import connection_assets
from oppsync_pipeline.defs.crm.checks import connection_checks
from oppsync_pipeline.defs.crm.schedules import connection_schedules, shared_sync_job, sync_jobs
from oppsync_pipeline.defs.crm.webhooks import webhook_sensor
from oppsync_pipeline.defs.crm.writeback import writeback_job, writeback_sensor
from oppsync_pipeline.defs.resources import load_app_config


def crm_definitions() -> dg.Definitions:
    _, cfg = load_app_config()
    assets, checks, schedules = [], [], []
    spread, shared, job_of = cfg.spread_minutes(), shared_sync_job(cfg), sync_jobs(cfg)
    for conn in cfg.connections:
        assets += connection_assets(conn)
        checks += connection_checks(conn)
        schedules += connection_schedules(conn, job_of[conn.name], spread, shared)
    jobs = list({id(j): j for j in job_of.values()}.values())
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
