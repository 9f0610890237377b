"""The outcomes mart: dbt models over the oppsync tables. They follow the syncs on their own
(eager automation: any connection's reconcile materializing makes the mart stale) rather than on a
second hand-written schedule."""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets
from sqlalchemy import text

from oppsync_pipeline.defs.crm.assets import extract_key
from oppsync_pipeline.defs.mart.dbt_cli import OppsyncDbtCliResource
from oppsync_pipeline.defs.mart.lineage import writer_keys
from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.config import ConnectionConfig, OppsyncConfig
from oppsync_pipeline.lib.dbt_env import (
    DBT_PROJECT_DIR,
    dbt_environment,
    dbt_executable,
    dbt_project_files,
    dbt_target,
    dbt_vars,
)
from oppsync_pipeline.lib.dbt_target import keep_partial_parse, prune_run_folders
from oppsync_pipeline.lib.warehouse.engine import transaction


class OppsyncTranslator(DagsterDbtTranslator):
    """A model reading `oppsync.*` tables depends on the Dagster assets that write those tables (lineage.py), in
    place of dbt's source nodes: no source asset of our own shows up in the graph."""

    def __init__(self, connections: list[ConnectionConfig]):
        super().__init__()
        self.connections = connections
        # A sync's extract writes the users and stages a few seconds before its reconcile writes the opportunities,
        # in the same run: building on the extract too would start a build that misses the opportunities, then a
        # second one. The views over those tables read them live, so only the reconcile's update calls for a
        # build (and every sync that changed anything ends with one); the hourly full build covers a run that
        # failed between the two.
        self.automation = mart_automation([extract_key(c) for c in connections])
        self.downstream_automation = mart_automation(reads_syncs=False)

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None) -> dg.AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        node = manifest["nodes"].get(unique_id) or {}
        if node.get("resource_type") != "model":
            return spec
        sources = [d for d in node.get("depends_on", {}).get("nodes", []) if d.startswith("source.")]
        if sources:
            source_keys = {self.get_asset_key(manifest["sources"][s]) for s in sources}
            deps = [d for d in spec.deps if d.asset_key not in source_keys]
            writers = dict.fromkeys(
                k for s in sources for k in writer_keys(manifest["sources"][s]["name"], self.connections)
            )
            spec = spec.replace_attributes(deps=[*deps, *(dg.AssetDep(k) for k in writers)])
        condition = self.automation if sources else self.downstream_automation
        condition = AGGREGATE_AUTOMATION if node.get("name") in AGGREGATES else condition
        return spec.replace_attributes(group_name="mart", automation_condition=condition)


# Dagster's eager condition with two changes, both found by make bench (freshness):
# - no wait for upstream runs in progress: a connection's reconcile commits in one transaction, so the mart may
#   build while another connection syncs; waiting for no sync to be in progress starved it when webhooks keep
#   syncs running;
# - a sync that lands while the mart builds is never lost. Eager forgets a dependency's update as soon as the
#   asset is next materialized, so a build that started before a sync and finished after it swallowed that
#   sync (20 of 20 changes never reached the mart). An update seen while a build is queued or running, or on
#   the tick that sees it finish, is kept until the next request; an update seen between builds is handled by
#   the next build, as eager does (so a build by hand with nothing new since leaves nothing due).
# It still waits for every connection's first sync (the warehouse tables exist from then on).
def mart_automation(ignored: Sequence[dg.AssetKey] = (), reads_syncs: bool = True) -> dg.AutomationCondition:
    """`ignored`: dependencies whose updates alone do not call for a build (the extracts, see OppsyncTranslator).
    `reads_syncs`: the model reads the syncs' tables (staging); only there is an update kept across a build. The
    models below follow their staging models on the same tick (their parents will be requested); keeping updates
    there too re-requested them after every build_mart (tests/dagster/test_mart_follows_syncs.py)."""
    updated = dg.AutomationCondition.any_deps_updated()
    if ignored:
        updated = updated.ignore(dg.AssetSelection.assets(*ignored))
    # a model that was never built is built once any dependency updated, the ignored ones included: on a fresh
    # deployment the views over the directory tables exist only from then on (and everything below waits for them)
    first_build = dg.AutomationCondition.missing() & dg.AutomationCondition.any_deps_updated()
    due = (dg.AutomationCondition.newly_missing() | updated | first_build).since_last_handled()
    # not cleared by the request on the same tick as the update either: that build may read the table too early
    requested = (dg.AutomationCondition.newly_requested() & ~updated) | dg.AutomationCondition.initial_evaluation()
    # "during": queued or running, or finished since the last tick (an update seen on the tick that also sees the
    # build's materialization may have come after dbt read the table: the eager reset dropped it, make bench)
    building = dg.AutomationCondition.in_progress() | dg.AutomationCondition.newly_updated()
    during_build = (updated & building).since(requested.with_label("requested"))
    return (
        dg.AutomationCondition.in_latest_time_window()
        & ((due | during_build.with_label("updated during a build")) if reads_syncs else due)
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("eager, keeping updates made during a build")


MART_AUTOMATION = mart_automation()


# The per-period aggregates (marts.outcomes and what only it reads) are rebuilt at most every five minutes:
# analysts read them by day, week and month; rebuilding them on every webhook-triggered sync tripled the build
# and kept marts.opportunities a minute behind the CRM (make bench, freshness). `build_mart` builds everything.
# marts.user_outcomes (the per-user rollup of outcomes) and marts.pipeline_snapshots (open pipeline per period end,
# from the whole history) are per-period aggregates too.
AGGREGATES = frozenset(
    {"int_outcome_activities", "int_period_spine", "outcomes", "user_outcomes", "pipeline_snapshots"}
)
AGGREGATE_AUTOMATION = dg.AutomationCondition.on_cron("*/5 * * * *")


def with_row_counts(events: list, engine, tables: Mapping[str, str] | None = None) -> list:
    """Add `dagster/row_count` to each model's materialization (the mart's row counts in the UI).

    `tables`: output name -> `dagster/table_name` from the asset specs; dbt's Output events do not carry the
    table name themselves (dagster-dbt 0.29 puts it on the spec only)."""
    names = {}
    for i, event in enumerate(events):
        table = (getattr(event, "metadata", None) or {}).get("dagster/table_name")
        table = getattr(table, "value", table) or (tables or {}).get(getattr(event, "output_name", None))
        if isinstance(event, dg.Output) and table is not None:
            names[i] = ".".join(str(table).split(".")[-2:])
    counts = count_rows(engine, sorted(set(names.values())))
    return [
        event.with_metadata({**event.metadata, "dagster/row_count": counts[names[i]]})
        if names.get(i) in counts
        else event
        for i, event in enumerate(events)
    ]


def count_rows(engine, relations: list[str]) -> dict[str, int]:
    """count(*) of each relation, in one transaction (a DuckDB connection attaches the warehouse file, ~30 ms, so
    one per count cost about a second per build after a sync). DuckDB has no savepoints: when one count fails (a
    view over a missing table), the transaction is lost, and the counts are taken one transaction each so the
    others still get theirs; the failed one gets none, never a failed run."""
    try:
        with transaction(engine) as conn:
            return {name: int(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar()) for name in relations}
    except Exception:  # noqa: BLE001 - see the docstring: count one by one
        pass
    out = {}
    for name in relations:
        try:
            with transaction(engine) as conn:
                out[name] = int(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar())
        except Exception:  # noqa: BLE001 - a view over a missing table etc.: no count, never a failed run
            continue
    return out


# Which build a run of the mart is (its tag value): `dbt run` or `dbt build` (dbt_command).
MART_RUN_TAG = "oppsync/mart"
AFTER_SYNC = "after-sync"  # the automated builds that follow syncs (mart_follows_syncs)
FULL = "full"  # build_mart: by hand, `oppsync run`


def dbt_command(context: dg.AssetExecutionContext) -> list[str]:
    """`dbt run` for the automated build after a sync (tagged AFTER_SYNC), `dbt build` for every other run.

    dbt's tests (59 data tests, 11 unit tests) took ~10 s of the ~25 s build a webhook's change waited for on
    its way to the mart (make bench, freshness). They run on their own every hour (mart_tests: dbt's tests
    only, which replace no table and so never collide with a build) and in every full build: build_mart,
    `oppsync run`, a UI launch. Not decided on the run's selected checks: Dagster puts an
    asset's checks in every run of that asset, the automation's included; a check dbt did not run is reported
    as not executed in that run, never as passed.

    The build after a sync also skips dbt's JSON artifacts (`--no-write-json`: manifest.json twice and
    run_results.json, ~1 s of each build): nothing reads them (dagster-dbt maps dbt's log lines with the
    manifest it loaded; dbt writes the partial-parse file regardless), and such builds run many times an hour.
    A full build keeps them for whoever inspects dbt/target."""
    if context.run.tags.get(MART_RUN_TAG) == AFTER_SYNC:
        return ["run", "--no-write-json"]
    return ["build"]


def _manifest_stale(manifest: Path) -> bool:
    if not manifest.exists():
        return True
    built = manifest.stat().st_mtime
    return any(p.stat().st_mtime > built for p in dbt_project_files())


def mart_definitions(cfg: OppsyncConfig) -> dg.Definitions:
    project = DbtProject(project_dir=DBT_PROJECT_DIR, target=dbt_target(cfg), profiles_dir=DBT_PROJECT_DIR)
    with dbt_environment(cfg):
        # `dagster dev` re-parses on every load (dagster-dbt's idiom); elsewhere the manifest is a build
        # artefact, parsed here only when it is missing or older than the project (a model edited since).
        project.prepare_if_dev()
        if _manifest_stale(project.manifest_path):
            project.preparer.prepare(project)
    translator = OppsyncTranslator(list(cfg.connections))
    build_vars = json.dumps(dbt_vars(cfg))

    @dbt_assets(
        manifest=project.manifest_path, project=project, dagster_dbt_translator=translator, name="outcomes_mart"
    )
    def outcomes_mart(context: dg.AssetExecutionContext, dbt: DbtCliResource, oppsync: OppsyncResource):
        # Row counts are read after dbt exits: dagster-dbt's fetch_row_counts opens an in-process DuckDB
        # handle while dbt still holds the file, which DuckDB refuses.
        with dbt_environment(oppsync.app_config()):
            invocation = dbt.cli([*dbt_command(context), "--vars", build_vars], context=context)
            events = list(invocation.stream())
        # the next build parses only what changed (lib/dbt_target); dagster-dbt's folder per invocation (~6 MB
        # each, forever) pruned to the newest few
        keep_partial_parse(invocation.target_path, DBT_PROJECT_DIR / "target")
        prune_run_folders(DBT_PROJECT_DIR / "target")
        specs = context.assets_def.specs_by_key
        tables = {
            context.assets_def.get_output_name_for_asset_key(key): specs[key].metadata.get("dagster/table_name")
            for key in context.selected_asset_keys
        }
        yield from with_row_counts(events, oppsync.engine(), tables)

    return dg.Definitions(
        assets=[outcomes_mart],
        resources={
            "dbt": OppsyncDbtCliResource(
                project_dir=project,
                target=dbt_target(cfg),
                dbt_executable=dbt_executable(),
                profiles_dir=str(DBT_PROJECT_DIR),
            )
        },
    )
