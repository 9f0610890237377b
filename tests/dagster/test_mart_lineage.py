"""The mart's lineage as the UI draws it (issue 20): each staging model depends on exactly the Dagster assets
that write the `oppsync.*` table it reads (the extract for the directory tables, the reconcile for the
opportunity tables, both for sync_runs), the graph has no external asset of its own (dbt's sources are not
assets), and across the deployment's two locations every asset the mart references is one the syncs define.
Also: which builds run dbt's tests (the automation's builds do not, build_mart does)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from oppsync_pipeline.defs.mart.assets import AFTER_SYNC, AGGREGATES, FULL, MART_RUN_TAG, dbt_command
from oppsync_pipeline.lib.dbt_env import DBT_PROJECT_DIR
from oppsync_pipeline.locations import load_location
from tests.dagster.conftest import load_defs, start_servers, stop_servers, write_config

CONNECTIONS = {"sandbox-salesforce": "sandbox_salesforce", "sandbox-hubspot": "sandbox_hubspot"}


def writers(*roles: str) -> set[dg.AssetKey]:
    asset = {"extract": "extract", "reconcile": "opportunities"}
    return {dg.AssetKey(["oppsync", part, asset[r]]) for part in CONNECTIONS.values() for r in roles}


# Written independently of defs/mart/lineage.py, from what each step writes (lib/sync.py, lib/reconcile).
EXPECTED = {
    "stg_oppsync__opportunities": writers("reconcile"),
    "stg_oppsync__opportunity_events": writers("reconcile"),
    "stg_oppsync__opportunity_history": writers("reconcile"),
    "stg_oppsync__sync_state": writers("reconcile"),
    "stg_oppsync__sync_runs": writers("extract", "reconcile"),
    "stg_oppsync__crm_users": writers("extract"),
    "stg_oppsync__crm_stages": writers("extract"),
    "stg_oppsync__users": writers("extract"),
    "stg_oppsync__user_links": writers("extract"),
    "stg_oppsync__connections": writers("extract"),
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("lineage")
    servers = start_servers({name: name.split("-")[1] for name in CONNECTIONS}, opportunities=10)
    try:
        yield write_config(tmp / "oppsync.yaml", servers, f"duckdb:///{tmp / 'warehouse.duckdb'}")
    finally:
        stop_servers(servers)


@pytest.fixture(scope="module")
def graph(config: Path):
    with pytest.MonkeyPatch.context() as mp:
        return load_defs(config, mp).resolve_asset_graph()


def test_each_staging_model_depends_on_the_assets_writing_its_table(graph):
    staging = {k.path[-1]: k for k in graph.get_all_asset_keys() if k.path[0] == "staging"}
    assert set(staging) >= set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert graph.get(staging[name]).parent_keys == expected, name
    # nothing past staging reads a sync's asset directly
    for k in graph.get_all_asset_keys():
        if k.path[0] in ("intermediate", "marts"):
            assert not {p for p in graph.get(k).parent_keys if p.path[0] == "oppsync"}, k


def test_no_external_assets_and_no_source_assets(graph):
    keys = graph.get_all_asset_keys()
    assert not [k for k in keys if not graph.get(k).is_materializable]
    sources = {t["name"] for t in yaml.safe_load(_sources_yml())["sources"][0]["tables"]}
    assert {"opportunities", "opportunity_events"} <= sources
    assert not [k for k in keys if k.path[0] == "oppsync" and len(k.path) == 2], "a dbt source became an asset"
    # the source tests are dbt's, run with `dbt build`; none is an asset check on a table-level key
    assert not [c for c in graph.asset_check_keys if c.asset_key.path[0] == "oppsync" and len(c.asset_key.path) == 2]


def test_across_locations_the_mart_references_only_assets_the_syncs_define(config: Path, monkeypatch):
    monkeypatch.setenv("OPPSYNC_CONFIG", str(config))
    syncs = load_location("syncs").resolve_asset_graph()
    mart = load_location("mart").resolve_asset_graph()
    referenced = {k for k in mart.get_all_asset_keys() if not mart.get(k).is_materializable}
    assert referenced == writers("extract", "reconcile")
    assert all(syncs.get(k).is_materializable for k in referenced)


def test_automated_builds_are_tagged_after_sync_and_dbt_tests_run_hourly(config: Path, monkeypatch):
    monkeypatch.setenv("OPPSYNC_CONFIG", str(config))
    defs = load_location("mart")
    graph = defs.resolve_asset_graph()
    assert defs.resolve_sensor_def("mart_follows_syncs").run_tags == {MART_RUN_TAG: AFTER_SYNC}
    assert defs.resolve_job_def("build_mart").tags[MART_RUN_TAG] == FULL
    hourly = defs.resolve_schedule_def("mart_tests_hourly")
    assert (hourly.job_name, hourly.cron_schedule) == ("mart_tests", "45 * * * *")
    tests = defs.resolve_job_def("mart_tests")
    assert tests.tags[MART_RUN_TAG] == FULL
    # every dbt test of the mart, the per-period aggregates' included, and no model rebuilt
    mart = dg.AssetSelection.groups("mart")
    assert {k.path[-1] for k in mart.resolve(graph)} >= AGGREGATES
    assert len(mart.resolve_checks(graph)) > 20
    assert [n.name for n in tests.nodes] == ["outcomes_mart"]


def test_dbt_command_follows_the_runs_tag():
    """`dbt run` for the automation's builds after syncs, `dbt build` for any other run (checks selected in both:
    Dagster adds an asset's checks to every run of it)."""
    seen: list[list[str]] = []

    @dg.multi_asset(
        specs=[dg.AssetSpec("model_a", skippable=True)],
        check_specs=[dg.AssetCheckSpec("not_null", asset="model_a")],
        can_subset=True,
    )
    def models(context):  # unannotated: this module postpones annotations, Dagster reads them at decoration
        seen.append(dbt_command(context))
        yield dg.MaterializeResult(asset_key="model_a")

    assert dg.materialize([models], tags={MART_RUN_TAG: AFTER_SYNC}).success
    assert dg.materialize([models], tags={MART_RUN_TAG: FULL}).success
    assert dg.materialize([models]).success  # a UI launch
    assert seen == [["run", "--no-write-json"], ["build"], ["build"]]


def _sources_yml() -> str:
    return (DBT_PROJECT_DIR / "models" / "staging" / "oppsync" / "_oppsync__sources.yml").read_text(encoding="utf-8")
