"""The deployment's two code locations (workspace.yaml): together they hold exactly what the one-location
project holds, the syncs' location never imports dbt, and the mart's models depend on the syncs' assets
across locations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from oppsync_pipeline.locations import STAGES, load_location
from tests.dagster.conftest import REPO, load_defs, start_servers, stop_servers, write_config


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("locations")
    servers = start_servers({"sandbox-salesforce": "salesforce", "sandbox-hubspot": "hubspot"}, opportunities=10)
    try:
        yield write_config(tmp / "oppsync.yaml", servers, f"duckdb:///{tmp / 'warehouse.duckdb'}")
    finally:
        stop_servers(servers)


def inventory(defs: dg.Definitions) -> dict[str, set[str]]:
    graph = defs.resolve_asset_graph()
    return {
        "assets": {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable},
        "checks": {str(k) for k in graph.asset_check_keys},
        "jobs": {j.name for j in defs.jobs or []},
        "schedules": {s.name for s in defs.schedules or []},
        "sensors": {s.name for s in defs.sensors or []},
    }


def test_the_two_locations_hold_the_whole_project(config: Path, monkeypatch: pytest.MonkeyPatch):
    whole = inventory(load_defs(config, monkeypatch))
    syncs, mart = inventory(load_location("syncs")), inventory(load_location("mart"))
    for kind in whole:
        assert syncs[kind] | mart[kind] == whole[kind], kind
        assert not syncs[kind] & mart[kind], f"{kind} defined in both locations: {syncs[kind] & mart[kind]}"
    assert "oppsync/sandbox_salesforce/extract" in syncs["assets"] and "marts/outcomes" in mart["assets"]


def test_mart_models_depend_on_the_syncs_across_locations(config: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPPSYNC_CONFIG", str(config))
    graph = load_location("mart").resolve_asset_graph()
    upstream = {
        k.to_user_string() for k in graph.get(dg.AssetKey(["staging", "stg_oppsync__opportunities"])).parent_keys
    }
    assert {"oppsync/sandbox_salesforce/opportunities", "oppsync/sandbox_hubspot/opportunities"} <= upstream
    # the syncs' assets are only referenced here, never materialized by this location
    assert not graph.get(dg.AssetKey(["oppsync", "sandbox_salesforce", "opportunities"])).is_materializable


def test_the_syncs_location_never_imports_dbt(config: Path):
    probe = (
        "import json, sys; import oppsync_pipeline.locations.syncs as m; "
        "from oppsync_pipeline.locations import load_location; d = load_location('syncs'); "
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in ('dbt', 'dagster_dbt', 'agate'))))"
    )
    env = {**os.environ, "OPPSYNC_CONFIG": str(config)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_mart_location_loads_without_the_dashboards_libraries(config: Path):
    """Each build after a sync loads the mart's location in a new run worker: pandas and Altair (~1 CPU-s) wait
    until the dashboard asset runs (defs/mart/dashboard.py)."""
    probe = (
        "import json, sys; from oppsync_pipeline.locations import load_location; d = load_location('mart'); "
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in ('pandas', 'altair', 'vl_convert'))))"
    )
    env = {**os.environ, "OPPSYNC_CONFIG": str(config)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_workspace_lists_every_location():
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text(encoding="utf-8"))
    modules = {entry["python_module"]["module_name"] for entry in workspace["load_from"]}
    assert modules == {f"oppsync_pipeline.locations.{name}" for name in STAGES}
