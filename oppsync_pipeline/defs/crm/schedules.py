"""One hourly schedule per connection (seed 000: at half past the hour, by default) and one nightly full
sync per connection, for deletes in CRMs without a delete feed. Each run syncs that connection only.

With many connections, `schedules.spread_minutes` moves each connection's cron minute by an offset hashed from
its name (lib/scale.py), so the hour's runs reach the queue over a window instead of in one second.

Above SHARED_SYNC_JOB_ABOVE connections, the connections share one job, `sync_connections`, and each run selects
its connection's two assets (and so their checks): a job per connection made the code location's snapshot grow
with the square of the connections (each job resolves its subset of the whole asset graph: 15 CPU-seconds of the
21 a 500-connection location took to load, measured before this change; `make bench` (scale) measures it now). Assets, checks, freshness, schedule names and the
`oppsync/connection` run tag stay per connection, so the UI's per-asset history and the run queue's
one-run-per-connection limit are unchanged."""

from __future__ import annotations

import dagster as dg

from oppsync_pipeline.defs.crm.assets import extract_key, key_part, opportunities_key
from oppsync_pipeline.lib.config import ConnectionConfig, OppsyncConfig
from oppsync_pipeline.lib.scale import staggered_cron

SHARED_SYNC_JOB_ABOVE = 50
SHARED_SYNC_JOB = "sync_connections"


def shared_sync_job(cfg: OppsyncConfig) -> bool:
    return len(cfg.connections) > SHARED_SYNC_JOB_ABOVE


def sync_target(cfg: OppsyncConfig, conn: ConnectionConfig) -> dict:
    """What a RunRequest (or execute_in_process) needs to sync `conn`: its job, and in the shared job its assets."""
    if shared_sync_job(cfg):
        return {"job_name": SHARED_SYNC_JOB, "asset_selection": [extract_key(conn), opportunities_key(conn)]}
    return {"job_name": sync_job_name(conn)}


def sync_jobs(cfg: OppsyncConfig) -> dict[str, dg.UnresolvedAssetJobDefinition]:
    """Connection name -> the job its runs use: its own, or (above SHARED_SYNC_JOB_ABOVE) the shared one."""
    if not shared_sync_job(cfg):
        return {conn.name: sync_job(conn) for conn in cfg.connections}
    shared = dg.define_asset_job(
        SHARED_SYNC_JOB,
        selection=dg.AssetSelection.assets(
            *(k for c in cfg.connections for k in (extract_key(c), opportunities_key(c)))
        ),
        description=f"Sync one connection of {len(cfg.connections)}: each run selects its connection's extract and "
        "opportunities (the schedules and the webhook sensor do), never the whole job.",
    )
    return dict.fromkeys((c.name for c in cfg.connections), shared)


def sync_job_name(conn: ConnectionConfig) -> str:
    return f"sync_{key_part(conn.name)}"


def sync_job(conn: ConnectionConfig) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        sync_job_name(conn),
        selection=dg.AssetSelection.assets(extract_key(conn), opportunities_key(conn)),
        description=f"Sync '{conn.name}' ({conn.crm}): extract, quality checks, reconcile.",
        # the run-queue limit in dagster.yaml keys on this tag: one run per connection at a time
        tags={"oppsync/connection": conn.name, "crm": conn.crm},
    )


def connection_schedules(
    conn: ConnectionConfig, job: dg.UnresolvedAssetJobDefinition, spread_minutes: int = 0, shared: bool = False
) -> list[dg.ScheduleDefinition]:
    # in the shared job, the run names its connection's assets; the per-connection job's tags go on the run
    selection = {"asset_selection": [extract_key(conn), opportunities_key(conn)]} if shared else {}
    hourly = staggered_cron(conn.schedule, conn.name, spread_minutes)
    nightly = staggered_cron(conn.full_sync_schedule, conn.name, spread_minutes)

    def make(name: str, cron: str, mode: str, description: str) -> dg.ScheduleDefinition:
        @dg.schedule(
            name=name,
            cron_schedule=cron,
            execution_timezone=conn.timezone,
            job=job,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=description,
        )
        def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
            return dg.RunRequest(
                run_key=f"{name}:{context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else ''}",
                run_config=extract_run_config(conn, mode),
                tags={"oppsync/connection": conn.name, "oppsync/mode": mode, "crm": conn.crm},
                **selection,
            )

        return _schedule

    return [
        make(
            f"sync_{key_part(conn.name)}",
            hourly,
            "auto",
            f"Hourly sync of '{conn.name}' ({hourly}, {conn.timezone})."
            + (f" Configured {conn.schedule}, moved by schedules.spread_minutes." if hourly != conn.schedule else ""),
        ),
        make(
            f"full_sync_{key_part(conn.name)}",
            nightly,
            "full",
            f"Nightly full sync of '{conn.name}': reads every id, detects deletes.",
        ),
    ]


def extract_run_config(conn: ConnectionConfig, mode: str) -> dict:
    """Run config selecting the sync mode for the connection's extract asset."""
    return {"ops": {f"oppsync__{key_part(conn.name)}__extract": {"config": {"mode": mode}}}}


def quiet(run_config: dict, level: str = "WARNING") -> dict:
    """The same run config with Dagster's console logger at `level` (the CLI prints its own summary)."""
    return {**run_config, "loggers": {"console": {"config": {"log_level": level}}}}
