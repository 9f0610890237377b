"""Alert sensors (README: Alerts), only when oppsync.yaml has an `alerts:` block: per connection a run-failure
sensor, and one sensor over the connections' freshness. Each builds an Alert and lib/alerts.py delivers it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg

from oppsync_pipeline.defs.crm.assets import key_part, opportunities_key
from oppsync_pipeline.defs.crm.writeback import JOB_NAME as WRITEBACK_JOB
from oppsync_pipeline.defs.resources import OppsyncResource, load_app_config
from oppsync_pipeline.lib.alerts import Alert, asset_link, first_line, run_link, send
from oppsync_pipeline.lib.config import ConnectionConfig, OppsyncConfig

CONNECTION_TAG = "oppsync/connection"
# Dagster sets it on a failed run that run_retries will re-execute: the alert waits for the last attempt
WILL_RETRY_TAG = "dagster/will_retry"
# the freshness daemon evaluates every 30 s; a stale connection is news within a minute, not a race
FRESHNESS_INTERVAL_SECONDS = 60


def failure_sensor_name(conn: ConnectionConfig) -> str:
    return f"alert_{key_part(conn.name)}_failed"


def failure_message(context: dg.RunFailureSensorContext) -> str:
    """The first failed step's error (what went wrong), else the run's own failure message (a run that failed
    before any step ran: a launch or a configuration error)."""
    for event in context.get_step_failure_events():
        error = event.step_failure_data.error
        if error is not None:
            return first_line(error.message)
    return first_line(context.failure_event.message)


def connection_failure_sensor(conn: ConnectionConfig) -> dg.RunStatusSensorDefinition:
    # Every run of the connection's assets carries its tag (the sync job, schedules, the CLI and, through the run
    # coordinator, a UI "Materialize"), so runs are picked by tag rather than by job.
    @dg.run_failure_sensor(
        name=failure_sensor_name(conn),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Alerts (alerts: in oppsync.yaml) when a run of '{conn.name}' ({conn.crm}) fails: its sync, "
        "or its revenue write-back.",
    )
    def _failed(context: dg.RunFailureSensorContext, oppsync: OppsyncResource):
        run = context.dagster_run
        if run.tags.get(CONNECTION_TAG) != conn.name:
            return dg.SkipReason(f"run {run.run_id} is not one of '{conn.name}'")
        if run.tags.get(WILL_RETRY_TAG) == "true":
            return dg.SkipReason(f"run {run.run_id} will be retried; its retry alerts if it fails too")
        cfg = oppsync.app_config()
        alert = Alert(
            kind="run_failure",
            connection=conn.name,
            crm=conn.crm,
            summary=failure_message(context),
            run_id=run.run_id,
            link=run_link(cfg.alerts.dagster_url if cfg.alerts else None, run.run_id),
            activity="write-back" if run.job_name == WRITEBACK_JOB else "sync",
        )
        reached = send(cfg, alert)
        return dg.SkipReason(f"alerted {', '.join(reached) or 'no channel'} about run {run.run_id}")

    return _failed


def freshness_sensor(cfg: OppsyncConfig) -> dg.SensorDefinition:
    """One alert each time a connection's opportunities enter the FAIL state of their freshness policy (the
    freshness daemon's evaluation, the state the UI shows), not one per tick while they stay stale."""
    keys = {conn.name: opportunities_key(conn) for conn in cfg.connections}

    @dg.sensor(
        name="alert_stale_connections",
        minimum_interval_seconds=FRESHNESS_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts (alerts: in oppsync.yaml) when a connection's opportunities pass their freshness "
        "policy's fail window (no successful sync for two schedule intervals).",
    )
    def alert_stale_connections(context: dg.SensorEvaluationContext, oppsync: OppsyncResource):
        app = oppsync.app_config()
        alerted: dict[str, float] = json.loads(context.cursor or "{}")
        records = context.instance.get_freshness_state_records(list(keys.values()))
        sent = []
        for conn in app.connections:
            record = records.get(keys.get(conn.name) or opportunities_key(conn))
            if record is None or record.freshness_state != "FAIL":
                continue
            since = record.updated_at.timestamp()
            if alerted.get(conn.name, 0.0) >= since:
                continue  # already alerted for this stretch of staleness
            send(app, stale_alert(context.instance, app, conn, since))
            alerted[conn.name] = since
            context.update_cursor(json.dumps(alerted))  # per alert: a later channel failure does not repeat it
            sent.append(conn.name)
        return dg.SkipReason(f"alerted about {', '.join(sent)}" if sent else "no connection newly stale")

    return alert_stale_connections


def stale_alert(instance: dg.DagsterInstance, cfg: OppsyncConfig, conn: ConnectionConfig, since: float) -> Alert:
    key = opportunities_key(conn)
    last = instance.get_latest_materialization_event(key)
    last_sync = f"last successful sync {when(last.timestamp)}" if last else "never synced"
    return Alert(
        kind="freshness",
        connection=conn.name,
        crm=conn.crm,
        summary=f"{last_sync}; failing its freshness policy since {when(since)} (schedule '{conn.schedule}')",
        link=asset_link(cfg.alerts.dagster_url if cfg.alerts else None, list(key.path)),
    )


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def alert_definitions() -> dg.Definitions:
    _, cfg = load_app_config()
    alerts = cfg.alerts
    if alerts is None or not alerts.enabled or not cfg.connections:
        return dg.Definitions()
    sensors: list[dg.SensorDefinition] = []
    if "run_failure" in alerts.notify_on:
        sensors += [connection_failure_sensor(conn) for conn in cfg.connections]
    if "freshness" in alerts.notify_on:
        sensors.append(freshness_sensor(cfg))
    return dg.Definitions(sensors=sensors)


@dg.definitions
def defs() -> dg.Definitions:
    return alert_definitions()
