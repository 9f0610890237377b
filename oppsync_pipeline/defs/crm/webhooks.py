"""Webhook-triggered syncs: the `syncs_on_webhooks` sensor turns the receiver's inbox (lib/webhooks) into runs
of each connection's sync job, within seconds of the CRM's notification. The work is lib's; this wires it."""

# no `from __future__ import annotations`: Dagster reads the sensor's resource annotation at decoration time
from datetime import UTC, datetime

import dagster as dg

from oppsync_pipeline.defs.crm.schedules import extract_run_config, sync_target
from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.config import OppsyncConfig
from oppsync_pipeline.lib.webhooks import inbox

SENSOR_NAME = "syncs_on_webhooks"
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def webhook_sensor(cfg: OppsyncConfig, jobs: list) -> dg.SensorDefinition | None:
    """None when no connection has webhooks enabled (nothing to show in the UI)."""
    names = [c.name for c in cfg.connections if c.webhooks.enabled]
    if not names:
        return None

    @dg.sensor(
        name=SENSOR_NAME,
        jobs=jobs,
        minimum_interval_seconds=cfg.webhooks.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Syncs a connection when its CRM notified a change (oppsync webhooks serve): one run per "
        "connection at a time, notifications arriving during a run coalesced into the next one. Connections: "
        + ", ".join(names),
    )
    def _sensor(context: dg.SensorEvaluationContext, oppsync: OppsyncResource) -> dg.SensorResult:
        app = oppsync.app_config()
        engine = inbox.engine_for(app)
        by_name = {c.name: c for c in app.connections}
        requests, busy = [], []
        for name, rows in inbox.pending(engine).items():
            conn = by_name.get(name)
            if conn is None:
                continue
            if _active_run(context.instance, name):
                busy.append(name)  # its notifications wait for the next tick after that run: one more sync
                continue
            run_key = f"webhook:{name}:{rows[-1]['event_key']}:{len(rows)}"
            inbox.claim(engine, [r["event_key"] for r in rows], run_key, datetime.now(UTC).replace(tzinfo=None))
            requests.append(
                dg.RunRequest(
                    **sync_target(app, conn),
                    run_key=run_key,
                    run_config=extract_run_config(conn, "auto"),
                    tags={
                        "oppsync/connection": name,
                        "oppsync/mode": "auto",
                        "oppsync/trigger": "webhook",
                        "oppsync/notifications": str(len(rows)),
                    },
                )
            )
        skip = None if requests else ("waiting for running syncs: " + ", ".join(busy) if busy else "no notifications")
        return dg.SensorResult(run_requests=requests, skip_reason=skip)

    return _sensor


def _active_run(instance: dg.DagsterInstance, connection: str) -> bool:
    runs = instance.get_run_records(
        filters=dg.RunsFilter(tags={"oppsync/connection": connection}, statuses=ACTIVE), limit=1
    )
    return bool(runs)
