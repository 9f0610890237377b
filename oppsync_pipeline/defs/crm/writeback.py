"""Revenue write-back in Dagster: the `writeback` job (seed 000's "Update CRM" button: launch it from the UI with
a connection, or `oppsync writeback`) and the `writeback_on_approval` sensor (seed 000's automatic update when a
project is submitted for approval). The work is lib/writeback's; this module only wires it."""

# no `from __future__ import annotations`: Dagster reads the op's config annotation at decoration time
import hashlib
from datetime import datetime, timedelta
from typing import Literal

import dagster as dg
from pydantic import Field as PydanticField
from sqlalchemy import text

from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.config import OppsyncConfig
from oppsync_pipeline.lib.writeback import contract
from oppsync_pipeline.lib.writeback.engine import WritebackResult, eligible, run_writeback

JOB_NAME = "writeback"
SENSOR_NAME = "writeback_on_approval"
# Rows whose approval changed up to this long before the sensor's cursor are looked at again: a loader that
# commits late (a dbt model rebuilt after a slow run) is not missed; run keys keep each change written once.
SENSOR_OVERLAP = timedelta(minutes=10)


class WritebackRunConfig(dg.Config):
    connection: str = PydanticField(description="the oppsync connection to write to (oppsync.yaml connections[].name)")
    opportunities: list[str] = PydanticField(
        default=[], description="only these opportunity ids (default: every eligible row of the connection)"
    )
    dry_run: bool = PydanticField(default=False, description="show the per-field diff, write nothing")
    force: bool = PydanticField(default=False, description="overwrite values changed in the CRM since our last write")
    trigger: Literal["manual", "automatic"] = PydanticField(
        default="manual", description="automatic: the sensor's runs, where the opt-outs apply"
    )


@dg.op(
    description="Write the connection's approved revenue rows (writeback.opportunity_revenue) to its CRM: "
    "read, diff, write only what differs, read back, audit in oppsync.writeback_log."
)
def write_revenue(context: dg.OpExecutionContext, config: WritebackRunConfig, oppsync: OppsyncResource) -> dg.Output:
    cfg = oppsync.app_config()
    result = run_writeback(
        cfg,
        oppsync.engine(),
        config.connection,
        opportunity_ids=config.opportunities or None,
        dry_run=config.dry_run,
        force=config.force,
        trigger=config.trigger,
        run_id=context.run_id,
    )
    metadata = result_metadata(result)
    if not result.ok:
        raise dg.Failure(description=failure_text(result), metadata=metadata, allow_retries=False)
    context.log.info(
        f"{config.connection}: {result.counts} ({result.fields_written} field(s) written, "
        f"{result.api_requests} API requests)"
    )
    return dg.Output(None, metadata=metadata)


def result_metadata(result: WritebackResult) -> dict:
    return {**result.metadata(), "diff": dg.MetadataValue.md(result.diff_table())}


def failure_text(result: WritebackResult) -> str:
    bad = [r for r in result.rows if r.error and str(r.status) not in ("skipped", "invalid")]
    lines = [f"{r.opportunity_id}: {r.status}: {r.error}" for r in bad[:10]]
    head = result.error or f"{len(bad)} row(s) not written"
    return head + ("\n" + "\n".join(lines) if lines else "")


@dg.job(
    name=JOB_NAME,
    description="Seed 000's 'Update CRM': write revenue from writeback.opportunity_revenue to one connection's CRM "
    "(config: connection, opportunities, dry_run, force).",
    tags={"oppsync/kind": "writeback"},
)
def writeback_job() -> None:
    write_revenue()


def writeback_sensor(cfg: OppsyncConfig) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        job=writeback_job,
        minimum_interval_seconds=cfg.writeback.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Seed 000's automatic update: rows of writeback.opportunity_revenue whose approval state "
        f"changed to one of {list(cfg.writeback.states)} are written to their CRM, one run per connection; "
        "connections with writeback.automatic: false and rows with skip_crm_update are skipped.",
    )
    def _sensor(context: dg.SensorEvaluationContext, oppsync: OppsyncResource) -> dg.SensorResult:
        app = oppsync.app_config()
        engine = oppsync.engine()
        cursor = datetime.fromisoformat(context.cursor) if context.cursor else None
        if cursor is None:
            # First tick: rows approved before the sensor existed are the manual button's (`oppsync writeback`).
            latest = _latest_change(engine, app.writeback.table)
            return dg.SensorResult(
                skip_reason=f"baseline set at {latest}: approvals from now on are written",
                cursor=(latest or datetime(1970, 1, 1)).isoformat(),
            )
        since = cursor - SENSOR_OVERLAP
        raw = contract.read_rows(engine, app.writeback.table, changed_after=since)  # filtered in the database
        valid, _problems = contract.validate(raw)  # invalid rows are audited by the run of their connection
        names = {c.name: c for c in app.connections}
        per_connection: dict[str, list[contract.RevenueRow]] = {}
        skipped: list[str] = []
        for row in valid:
            conn = names.get(row.connection)
            if conn is None:
                continue
            reason = (
                "writeback.enabled is false" if not conn.writeback.enabled else eligible(app, conn, row, "automatic")
            )
            if reason:
                skipped.append(f"{row.connection}/{row.opportunity_id}: {reason}")
                continue
            per_connection.setdefault(conn.name, []).append(row)
        newest = max((r["approval_changed_at"] for r in raw if r["approval_changed_at"] is not None), default=cursor)
        requests = [
            dg.RunRequest(
                run_key=_run_key(name, rows),
                run_config={
                    "ops": {
                        "write_revenue": {
                            "config": {
                                "connection": name,
                                "opportunities": sorted(r.opportunity_id for r in rows),
                                "trigger": "automatic",
                            }
                        }
                    }
                },
                tags={"oppsync/connection": name, "oppsync/trigger": "automatic"},
            )
            for name, rows in sorted(per_connection.items())
        ]
        for line in skipped[:20]:
            context.log.info(f"skipped {line}")
        return dg.SensorResult(
            run_requests=requests,
            cursor=max(newest, cursor).isoformat(),
            skip_reason=None if requests else f"no approval changes to write ({len(skipped)} skipped)",
        )

    return _sensor


def _run_key(connection: str, rows: list[contract.RevenueRow]) -> str:
    """One run per (connection, set of approval changes): the same change seen again is not written again."""
    changes = sorted(f"{r.opportunity_id}@{r.approval_changed_at.isoformat()}" for r in rows)
    return f"{connection}:" + hashlib.sha256("|".join(changes).encode()).hexdigest()[:16]


def _latest_change(engine, table: str) -> datetime | None:
    contract.check_columns(engine, table)
    from oppsync_pipeline.lib.warehouse.engine import transaction

    with transaction(engine) as c:
        return c.execute(text(f"SELECT max(approval_changed_at) FROM {table}")).scalar()
