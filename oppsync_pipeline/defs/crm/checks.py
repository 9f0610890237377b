"""Checks per connection: blocking quality rules on the extract, run in the warehouse (a failure stops
reconcile), and after reconcile a count check and WARN-level attribution / stage checks."""


import dagster as dg

from oppsync_pipeline.defs.crm.assets import extract_key, opportunities_key
from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.quality import validate_extract
from oppsync_pipeline.lib.sync import close_extract, outcome_from_row, utcnow
from oppsync_pipeline.lib.warehouse import store

UNMAPPED_WARN_SHARE = 0.2


def connection_checks(conn: ConnectionConfig) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(asset=extract_key(conn), name="extract_quality", blocking=True,
                    description="Quality rules on the extracted sets, run in the warehouse: ids present and unique "
                                "within a set, status known, created date not in the future, amount not negative.")
    def extract_quality(context: dg.AssetCheckExecutionContext, oppsync: OppsyncResource) -> dg.AssetCheckResult:
        engine, run_id = oppsync.engine(), context.op_execution_context.run_id
        try:
            result = validate_extract(engine, run_id, utcnow())
        except Exception:
            refuse_extract(engine, conn, run_id, "the extract's quality suite could not run")
            raise
        if not result.success:
            refuse_extract(engine, conn, run_id, "extract failed quality checks: " + "; ".join(
                f"{f['expectation']}({f['column']}): {f['unexpected_count']} unexpected, e.g. ids "
                f"{f['partial_unexpected_list'][:3]}" for f in result.failures))
        return dg.AssetCheckResult(
            passed=result.success, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"rows_checked": result.rows, "failed_expectations": len(result.failures),
                      "failures": dg.MetadataValue.json(result.failures),
                      "expectations": dg.MetadataValue.json(result.expectations)})

    @dg.asset_check(asset=opportunities_key(conn), name="counts_match_crm",
                    description="After a full sync the warehouse's open / closed counts equal what the CRM returned.")
    def counts_match_crm(context: dg.AssetCheckExecutionContext, oppsync: OppsyncResource) -> dg.AssetCheckResult:
        engine = oppsync.engine()
        row = store.load_extract(engine, context.op_execution_context.run_id)
        counts = store.warehouse_counts(engine, conn.name)
        wh_open, wh_closed = counts.get("open", 0), counts.get("won", 0) + counts.get("lost", 0)
        if row is None or row["mode"] != "full":
            return dg.AssetCheckResult(passed=True, metadata={
                "note": "incremental run: the CRM reported only changed rows; compared on the next full sync",
                "warehouse_open": wh_open, "warehouse_closed": wh_closed})
        crm_open, crm_closed = row["reported_open"] or 0, row["reported_closed"] or 0
        return dg.AssetCheckResult(
            passed=(crm_open, crm_closed) == (wh_open, wh_closed),
            metadata={"crm_open": crm_open, "crm_closed": crm_closed, "warehouse_open": wh_open,
                      "warehouse_closed": wh_closed})

    @dg.asset_check(asset=opportunities_key(conn), name="attribution_and_stages",
                    description="WARN when many creators map to no internal user, or stages are not in the "
                                "tenant's stage list (they would be miscounted).")
    def attribution_and_stages(context: dg.AssetCheckExecutionContext, oppsync: OppsyncResource) -> dg.AssetCheckResult:
        gaps = store.attribution_gaps(oppsync.engine(), conn.name)
        share = gaps["unmapped_creators"] / gaps["total"] if gaps["total"] else 0.0
        return dg.AssetCheckResult(
            passed=share <= UNMAPPED_WARN_SHARE and not gaps["unknown_stages"],
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"unmapped_creator_share": round(share, 4), "unmapped_creators": gaps["unmapped_creators"],
                      "opportunities": gaps["total"], "unknown_stages": dg.MetadataValue.json(gaps["unknown_stages"])})

    return [extract_quality, counts_match_crm, attribution_and_stages]


def refuse_extract(engine, conn: ConnectionConfig, run_id: str, reason: str) -> None:
    """A blocking check that fails stops reconcile, which is what would have recorded the run and released the
    connection's lock. Do both here: the run shows as refused in sync_runs, the staged rows are dropped, and
    the next run (an hour later, or the same process a second later) is not locked out by this one."""
    row = store.load_extract(engine, run_id)
    if row is None:
        return
    out = outcome_from_row(row, status="refused")
    out.error = reason
    close_extract(engine, out)
