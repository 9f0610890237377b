"""Per connection, two assets: the extracted sets (staged in the warehouse) and the reconciled
opportunities. Quality checks sit between them and block reconcile when they fail."""

from typing import Literal, NoReturn

import dagster as dg
from sqlalchemy.exc import DBAPIError

from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.config import ConfigError, ConnectionConfig
from oppsync_pipeline.lib.reconcile import DeleteGuardRefused
from oppsync_pipeline.lib.status import freshness_windows, next_run, shown_counts
from oppsync_pipeline.lib.sync import ExtractFailed, ExtractOutcome, outcome_from_row, run_extract, run_reconcile
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.errors import permanent_problem
from oppsync_pipeline.lib.warehouse.store import LockHeld

# Dagster's documented run tag (dagster 1.7.9+): a run failed by an asset or op is not re-executed by the
# instance's `run_retries`. Added to the run only when its failure is permanent, and read by Dagster when the
# run fails (from storage, so a tag added while the run executes counts): transient failures keep run retries.
NO_RUN_RETRY = {"dagster/retry_on_asset_or_op_failure": "false"}


def fail_permanently(context: dg.AssetExecutionContext, message: str) -> NoReturn:
    """Fail the step at once: no step retry (RetryPolicy) and no run retry. For errors that give the same
    answer in 30 seconds or an hour: a missing database or privilege, refused credentials, a refused
    query, a quality refusal, bad configuration."""
    context.instance.add_run_tags(context.run.run_id, NO_RUN_RETRY)
    raise dg.Failure(message, allow_retries=False) from None  # the original may hold what the message scrubbed


def warehouse_failure(context: dg.AssetExecutionContext, err: DBAPIError, url: str) -> None:
    """A warehouse error that no retry fixes ends the step with its fix; other ones return (and are re-raised)."""
    problem = permanent_problem(err, url)
    if problem is not None:
        fail_permanently(context, str(problem))


class SyncConfig(dg.Config):
    """`auto` is incremental once a bookmark exists; the nightly schedule and `--full` ask for `full`,
    which reads every id and so detects deletes in CRMs without a delete feed."""

    mode: Literal["auto", "full", "incremental"] = "auto"


def key_part(name: str) -> str:
    return name.replace("-", "_")


def extract_key(conn: ConnectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["oppsync", key_part(conn.name), "extract"])


def opportunities_key(conn: ConnectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["oppsync", key_part(conn.name), "opportunities"])


def connection_assets(conn: ConnectionConfig) -> list[dg.AssetsDefinition]:
    group = f"crm_{key_part(conn.name)}"
    # on the assets too: the run coordinator (locations/run_coordinator.py) copies it onto UI-launched runs
    tags = {"oppsync/connection": conn.name}

    @dg.asset(
        key=extract_key(conn),
        group_name=group,
        kinds={"python", conn.crm},
        tags={"crm": conn.crm, **tags},
        output_required=False,
        op_tags=tags,
        description=f"The open and the not-open opportunity sets of '{conn.name}' ({conn.crm}), read page by "
        "page into the warehouse's staging table. Skipped (not failed) when the API quota budget is spent; a full "
        "read that can be resumed pauses instead, and the connection's next run reads on.",
        retry_policy=dg.RetryPolicy(
            max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
        ),
    )
    def extract(context: dg.AssetExecutionContext, config: SyncConfig, oppsync: OppsyncResource):
        cfg = oppsync.app_config()
        try:
            out = run_extract(
                cfg,
                cfg.connection(conn.name),
                oppsync.engine(),
                run_id=context.run.run_id,
                mode=config.mode,
                # which page the sync is on, in the run log (the CLI shows the same events on the terminal)
                progress=lambda page: context.log.info(page.line()),
            )
        except (LockHeld, ConfigError) as err:
            # Retrying cannot help: another run holds the connection, or the configuration is wrong.
            fail_permanently(context, str(err))
        except ExtractFailed as err:
            if err.permanent:
                # A refused query, a missing permission, bad credentials: the same answer in 30 s. Transient
                # failures were already retried in the HTTP client; those left keep the retry policy.
                fail_permanently(context, f"{conn.name}: {err}")
            raise
        except DBAPIError as err:
            warehouse_failure(context, err, cfg.warehouse.url)
            raise
        if out.status == "skipped":
            context.log.warning(
                f"{conn.name}: skipped for quota: {out.error}. The bookmark did not move; "
                "the next run reads again from it."
            )
            return
        if out.status == "paused":
            context.log.warning(
                f"{conn.name}: {out.error}. {sum(out.counts.values()):,} records staged so far; the warehouse "
                "changes when the full read completes."
            )
            return
        yield dg.MaterializeResult(metadata=_extract_metadata(out))

    @dg.asset(
        key=opportunities_key(conn),
        deps=[extract],
        group_name=group,
        kinds={"sql", conn.crm},
        tags={"crm": conn.crm, **tags},
        op_tags=tags,
        description=f"Current opportunities of '{conn.name}' with their event log and history, reconciled in one "
        "transaction from the extract of the same run. Each materialization carries the sync's rows (created, "
        "updated, unchanged, deleted), API use and the next scheduled run. The connection's status (failed and "
        "quota-skipped runs included, which do not materialize): `oppsync status`, or `oppsync.sync_runs`.",
        # late by a quarter hour warns, however short the schedule (a warn window must stay below the fail one:
        # a 15-minute cron made them equal and the code location failed to load); two missed runs fail
        freshness_policy=dg.FreshnessPolicy.time_window(
            fail_window=freshness_windows(conn.schedule)[1], warn_window=freshness_windows(conn.schedule)[0]
        ),
    )
    def opportunities(context: dg.AssetExecutionContext, oppsync: OppsyncResource) -> dg.MaterializeResult:
        try:
            return _reconciled(context, oppsync)
        except DeleteGuardRefused as err:
            fail_permanently(context, f"{conn.name}: {err}")
        except DBAPIError as err:
            warehouse_failure(context, err, oppsync.app_config().warehouse.url)
            raise

    def _reconciled(context: dg.AssetExecutionContext, oppsync: OppsyncResource) -> dg.MaterializeResult:
        engine = oppsync.engine()
        # A re-execution from failure is a new run reusing the original's extract: look it up by lineage.
        run = context.run
        row = next(
            (
                r
                for r in (
                    store.load_extract(engine, rid)
                    for rid in dict.fromkeys(x for x in (run.run_id, run.parent_run_id, run.root_run_id) if x)
                )
                if r is not None
            ),
            None,
        )
        if row is None or row["status"] != "complete":
            fail_permanently(
                context,
                f"no completed extract for run {run.run_id} of '{conn.name}' "
                f"({'none found' if row is None else row['status']}); run the sync again",
            )
        out = outcome_from_row(row, status="complete")
        result = run_reconcile(oppsync.app_config().connection(conn.name), engine, out)
        counts = store.warehouse_counts(engine, conn.name)
        return dg.MaterializeResult(metadata=_reconcile_metadata(conn, out, result.as_dict(), counts))

    return [extract, opportunities]


def _reconcile_metadata(conn: ConnectionConfig, out: ExtractOutcome, rows: dict, counts: dict) -> dict:
    """The sync as the connection's status shows it (lib/status.py: `oppsync status` uses the same names)."""
    stats = out.stats
    used, limit = stats.get("quota_used"), stats.get("quota_limit")
    return {
        **{f"rows_{k}": v for k, v in shown_counts(rows).items()},
        "mode": out.mode,
        "warehouse_open": counts.get("open", 0),
        "warehouse_won": counts.get("won", 0),
        "warehouse_lost": counts.get("lost", 0),
        "bookmark": str(out.new_cursor) if out.new_cursor else "none",
        "api_requests": stats.get("api_requests") if stats.get("api_requests") is not None else "not counted",
        "quota_remaining": limit - used if used is not None and limit is not None else "not reported",
        "schedule": f"{conn.schedule} ({conn.timezone})",
        "next_scheduled_run_utc": str(next_run(conn.schedule, conn.timezone, out.started_at)),
    }


def counted(value: object) -> object:
    """A count for run metadata: the number, or "not counted" where the CRM gave none."""
    return "not counted" if value is None else value


def _extract_metadata(out: ExtractOutcome) -> dict:
    stats = out.stats
    return {
        "mode": out.mode,
        "scope": out.scope_fingerprint or "none",
        "rows_fetched_open": out.counts.get("open", 0),
        "rows_fetched_not_open": out.counts.get("closed", 0),
        "deletes_from_feed": out.counts.get("deleted", 0),
        "since": str(out.since) if out.since else "full read",
        "api_requests": stats.get("api_requests", 0),
        "retries": stats.get("retries", 0),
        "rate_limited_responses": stats.get("rate_limited_responses", 0),
        "seconds_waited_on_rate_limits": stats.get("seconds_waited_on_rate_limits", 0.0),
        "seconds_paced_to_rate_limits": stats.get("seconds_paced_to_rate_limits", 0.0),
        "token_refreshes": stats.get("token_refreshes", 0),
        "token_requests": stats.get("token_requests", 0),
        # a full sync reads the ids it expected and did not see by id: out of scope (kept) or gone (deleted)
        "read_by_id": stats.get("read_by_id", 0),
        "found_by_id": stats.get("found_by_id", 0),
        "out_of_scope_by_id": stats.get("out_of_scope_by_id", 0),
        # completeness of a full read against the CRM's own counts; records set aside (oppsync.quarantine)
        "crm_count_open": counted(stats.get("crm_count_open")),
        "received_open": counted(stats.get("received_open")),
        "crm_count_closed": counted(stats.get("crm_count_closed")),
        "received_closed": counted(stats.get("received_closed")),
        "deletes_inferable": bool(stats.get("deletes_inferable", out.mode == "full"))
        if out.mode == "full"
        else "incremental run: no deletes inferred",
        "quarantined": stats.get("quarantined", 0),
        "warnings": "\n".join(stats.get("warnings") or []) or "none",
        "quota_used": stats.get("quota_used") if stats.get("quota_used") is not None else "not reported",
        "quota_limit": stats.get("quota_limit") if stats.get("quota_limit") is not None else "not reported",
        "seconds": round(out.seconds, 2),
    }
