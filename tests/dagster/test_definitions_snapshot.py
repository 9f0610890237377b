"""A snapshot of the definitions' shape (as dagster-open-platform keeps one): every asset key with its group,
kinds, upstream keys and automation, every check with its blocking flag, every job with what it selects,
every schedule and sensor. A change to the wiring shows up as a diff of one checked-in file.

Regenerate after an intended change (one command, then review and commit the diff):

    make snapshot     # = pytest tests/dagster/test_definitions_snapshot.py --snapshot-update

The definitions come from an oppsync.yaml of one connection per CRM on the defaults, with simulators on free
ports; nothing port- or path-dependent is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from oppsync_pipeline.sandbox.cluster import CRMS
from tests.dagster.conftest import load_defs, start_servers, stop_servers, write_config

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


@pytest.fixture(scope="module")
def defs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dg.Definitions]:
    tmp = tmp_path_factory.mktemp("snapshot")
    servers = start_servers({f"sandbox-{crm}": crm for crm in CRMS}, opportunities=10)
    try:
        config = write_config(tmp / "oppsync.yaml", servers, f"duckdb:///{tmp / 'warehouse.duckdb'}")
        with pytest.MonkeyPatch.context() as mp:
            yield load_defs(config, mp)
    finally:
        stop_servers(servers)


def _key(key: dg.AssetKey) -> str:
    return key.to_user_string()


def _check(key: dg.AssetCheckKey) -> str:
    return f"{_key(key.asset_key)}:{key.name}"


def _automation(condition: dg.AutomationCondition | None) -> str | None:
    if condition is None:
        return None
    return "eager" if condition == dg.AutomationCondition.eager() else condition.get_label() or type(condition).__name__


def definitions_shape(defs: dg.Definitions) -> dict[str, Any]:
    """The wiring as plain, sorted data: keys, deps, groups, kinds, checks, jobs, schedules, sensors."""
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=_key):
        node = graph.get(key)
        assets[_key(key)] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "deps": sorted(_key(k) for k in node.parent_keys),
            "automation": _automation(node.automation_condition),
            "retries": (
                node.assets_def.op.retry_policy.max_retries
                if node.is_executable and node.assets_def.op.retry_policy
                else None
            ),
        }
    checks = {
        _check(k): {"blocking": graph.get_check_spec(k).blocking} for k in sorted(graph.asset_check_keys, key=_check)
    }
    jobs = {}
    for job in sorted(defs.resolve_all_job_defs(), key=lambda j: j.name):
        if job.name.startswith("__"):  # Dagster's implicit asset job
            continue
        jobs[job.name] = {
            "assets": sorted(_key(k) for k in job.asset_layer.selected_asset_keys),
            "checks": sorted(_check(k) for k in job.asset_layer.asset_graph.asset_check_keys),
            "tags": {k: v for k, v in sorted(job.tags.items()) if k.startswith("oppsync/")},
        }
    schedules = {
        s.name: {
            "cron": s.cron_schedule,
            "timezone": s.execution_timezone,
            "job": s.job_name,
            "default_status": s.default_status.value,
        }
        for s in sorted(defs.schedules or [], key=lambda s: s.name)
    }
    sensors = {
        s.name: {"default_status": s.default_status.value, "jobs": sorted(j.name for j in s.jobs) if s.has_jobs else []}
        for s in sorted(defs.sensors or [], key=lambda s: s.name)
    }
    return {"assets": assets, "checks": checks, "jobs": jobs, "schedules": schedules, "sensors": sensors}


def render(shape: dict[str, Any]) -> str:
    """JSON with one line per asset, check, job, schedule and sensor: a change reads as a one-line diff."""
    sections = []
    for section, entries in shape.items():
        lines = [f"    {json.dumps(name)}: {json.dumps(entry)}" for name, entry in entries.items()]
        sections.append(f"  {json.dumps(section)}: {{\n" + ",\n".join(lines) + "\n  }")
    return "{\n" + ",\n".join(sections) + "\n}\n"


def test_the_definitions_match_their_snapshot(defs: dg.Definitions, request: pytest.FixtureRequest):
    shape = definitions_shape(defs)
    text = render(shape)
    if request.config.getoption("--snapshot-update"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text, encoding="utf-8")
        pytest.skip(
            f"snapshot written: {SNAPSHOT.relative_to(Path.cwd()) if SNAPSHOT.is_relative_to(Path.cwd()) else SNAPSHOT}"
        )
    assert SNAPSHOT.exists(), "no snapshot yet: run `make snapshot` and commit tests/dagster/snapshots/definitions.json"
    assert shape == json.loads(SNAPSHOT.read_text(encoding="utf-8")), (
        "the definitions changed: if intended, run `make snapshot` and commit the diff"
    )
