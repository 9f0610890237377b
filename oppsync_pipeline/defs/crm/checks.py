"""Checks per connection: blocking quality rules on the extract, run in the warehouse (a failure stops
reconcile), and after reconcile a count check and WARN-level attribution / stage checks."""

import dagster as dg

from oppsync_pipeline.defs.crm.assets import NO_RUN_RETRY, counted, extract_key, opportunities_key
from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.quality import refuse_extract, validate_extract
from oppsync_pipeline.lib.sync import utcnow
from oppsync_pipeline.lib.warehouse import store

UNMAPPED_WARN_SHARE = 0.2


def connection_checks(conn: ConnectionConfig) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(
        asset=extract_key(conn),
        name="extract_quality",
        blocking=True,
        description="Quality rules on the extracted sets, run in the warehouse: ids present and unique "
        "within a set, status known, created date not ahead of the CRM's clock, amount not "
        "negative.",
    )
    def extract_quality(context: dg.AssetCheckExecutionContext, oppsync: OppsyncResource) -> dg.AssetCheckResult:
        engine, run_id = oppsync.engine(), context.op_execution_context.run_id
        row = store.load_extract(engine, run_id)
        # "the future" on the CRM's clock (its Date header after the extract's reads), not ours: a CRM whose clock
        # is ahead (or a sandbox advanced by `--advance-hours` / `sandbox advance`) creates records after our now,
        # and one whose clock is behind cannot have created a record after its own now. Ours only when the CRM
        # sent no Date header.
        clock = (row or {}).get("crm_clock") or utcnow()
        try:
            result = validate_extract(engine, run_id, clock)
        except Exception:
            refuse_extract(engine, conn, run_id, "the extract's quality suite could not run")
            raise
        if not result.success:
            # A refusal is the data's verdict: re-running the same extract gets it again. Not a run retry.
            context.op_execution_context.instance.add_run_tags(context.op_execution_context.run_id, NO_RUN_RETRY)
            refuse_extract(
                engine,
                conn,
                run_id,
                "extract failed quality checks: "
                + "; ".join(
                    f"{f['expectation']}({f['column']}): {f['unexpected_count']} unexpected, e.g. ids "
                    f"{f['partial_unexpected_list'][:3]}"
                    for f in result.failures
                ),
            )
        return dg.AssetCheckResult(
            passed=result.success,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "rows_checked": result.rows,
                "failed_expectations": len(result.failures),
                "failures": dg.MetadataValue.json(result.failures),
                "expectations": dg.MetadataValue.json(result.expectations),
            },
        )

    @dg.asset_check(
        asset=opportunities_key(conn),
        name="counts_match_crm",
        description="After a full sync: every set delivered at least the records the CRM itself counts "
        "(its own count: SOQL COUNT(), search total, $count, /count, query/count), and the "
        "warehouse's open / closed counts equal what was read.",
    )
    def counts_match_crm(context: dg.AssetCheckExecutionContext, oppsync: OppsyncResource) -> dg.AssetCheckResult:
        engine = oppsync.engine()
        row = store.load_extract(engine, context.op_execution_context.run_id)
        counts = store.warehouse_counts(engine, conn.name)
        wh_open, wh_closed = counts.get("open", 0), counts.get("won", 0) + counts.get("lost", 0)
        if row is None or row["mode"] != "full":
            return dg.AssetCheckResult(
                passed=True,
                metadata={
                    "note": "incremental run: the CRM reported only changed rows; compared on the next full sync",
                    "warehouse_open": wh_open,
                    "warehouse_closed": wh_closed,
                },
            )
        read_open, read_closed = row["reported_open"] or 0, row["reported_closed"] or 0
        short = [
            f"{name}: {received} received of {crm_count} the CRM counts"
            for name, crm_count, received in (
                ("open set", row["crm_count_open"], row["received_open"]),
                ("not-open set", row["crm_count_closed"], row["received_closed"]),
            )
            if crm_count is not None and (received or 0) < crm_count
        ]
        return dg.AssetCheckResult(
            passed=not short and (read_open, read_closed) == (wh_open, wh_closed),
            metadata={
                "crm_count_open": counted(row["crm_count_open"]),
                "crm_count_closed": counted(row["crm_count_closed"]),
                "received_open": counted(row["received_open"]),
                "received_closed": counted(row["received_closed"]),
                "deletes_inferred": row["deletes_inferable"] is not False,
                "short_reads": "; ".join(short) or "none",
                "read_open": read_open,
                "read_closed": read_closed,
                "warehouse_open": wh_open,
                "warehouse_closed": wh_closed,
            },
        )

    @dg.asset_check(
        asset=opportunities_key(conn),
        name="quarantine",
        description="WARN when records failed validation and were set aside (oppsync.quarantine): they "
        "were neither synced nor treated as deleted. Beyond quarantine_max_share the run is "
        "blocked instead.",
    )
    def quarantine(context: dg.AssetCheckExecutionContext, oppsync: OppsyncResource) -> dg.AssetCheckResult:
        n, entries = store.quarantined(oppsync.engine(), context.op_execution_context.run_id)
        return dg.AssetCheckResult(
            passed=n == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "quarantined": n,
                "records": dg.MetadataValue.json(entries),
                "ids": ", ".join(sorted({str(e["source_id"]) for e in entries})) or "none",
            },
        )

    @dg.asset_check(
        asset=opportunities_key(conn),
        name="attribution_and_stages",
        description="WARN when many creators map to no internal user, or stages are not in the "
        "tenant's stage list (they would be miscounted).",
    )
    def attribution_and_stages(context: dg.AssetCheckExecutionContext, oppsync: OppsyncResource) -> dg.AssetCheckResult:
        gaps = store.attribution_gaps(oppsync.engine(), conn.name)
        share = gaps["unmapped_creators"] / gaps["total"] if gaps["total"] else 0.0
        return dg.AssetCheckResult(
            passed=share <= UNMAPPED_WARN_SHARE and not gaps["unknown_stages"],
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "unmapped_creator_share": round(share, 4),
                "unmapped_creators": gaps["unmapped_creators"],
                "opportunities": gaps["total"],
                "unknown_stages": dg.MetadataValue.json(gaps["unknown_stages"]),
            },
        )

    return [extract_quality, counts_match_crm, quarantine, attribution_and_stages]
