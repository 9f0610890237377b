"""The definitions `dagster dev` loads, built from an oppsync.yaml with two connections: one on its own cron
in a non-UTC timezone, one on the defaults. Nothing here runs a sync; it checks the wiring."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from tests.dagster.conftest import load_defs, start_servers, stop_servers, write_config

BERLIN = ZoneInfo("Europe/Berlin")
# salesforce: every 20 minutes in Berlin; hubspot: the defaults ("30 * * * *", UTC, nightly full at 02:00)
OWN_SCHEDULE = {
    "sandbox-salesforce": {"schedule": "*/20 * * * *", "timezone": "Europe/Berlin", "full_sync_schedule": "15 3 * * *"}
}
CONNECTIONS = {
    "sandbox-salesforce": ("sandbox_salesforce", "*/20 * * * *", "Europe/Berlin", "15 3 * * *"),
    "sandbox-hubspot": ("sandbox_hubspot", "30 * * * *", "UTC", "0 2 * * *"),
}


@pytest.fixture(scope="module")
def defs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dg.Definitions]:
    tmp = tmp_path_factory.mktemp("defs")
    servers = start_servers({"sandbox-salesforce": "salesforce", "sandbox-hubspot": "hubspot"}, opportunities=10)
    try:
        config = write_config(
            tmp / "oppsync.yaml", servers, f"duckdb:///{tmp / 'warehouse.duckdb'}", extra=OWN_SCHEDULE
        )
        with pytest.MonkeyPatch.context() as mp:
            yield load_defs(config, mp)
    finally:
        stop_servers(servers)


def key(*parts: str) -> dg.AssetKey:
    return dg.AssetKey(list(parts))


def test_definitions_load_and_validate(defs: dg.Definitions):
    dg.Definitions.validate_loadable(defs)
    keys = defs.resolve_asset_graph().get_all_asset_keys()
    for part, *_ in CONNECTIONS.values():
        assert key("oppsync", part, "extract") in keys
        assert key("oppsync", part, "opportunities") in keys
    assert key("marts", "outcomes") in keys and key("marts", "outcomes_dashboard") in keys
    assert {j.name for j in defs.resolve_all_job_defs()} >= {
        "sync_sandbox_salesforce",
        "sync_sandbox_hubspot",
        "build_mart",
    }
    assert defs.resolve_sensor_def("mart_follows_syncs").default_status == dg.DefaultSensorStatus.RUNNING


@pytest.mark.parametrize("connection", sorted(CONNECTIONS))
def test_one_hourly_and_one_nightly_schedule_per_connection(defs: dg.Definitions, connection: str):
    part, cron, tz, full_cron = CONNECTIONS[connection]
    hourly = defs.resolve_schedule_def(f"sync_{part}")
    assert (hourly.cron_schedule, hourly.execution_timezone, hourly.job_name) == (cron, tz, f"sync_{part}")
    assert hourly.default_status == dg.DefaultScheduleStatus.RUNNING
    nightly = defs.resolve_schedule_def(f"full_sync_{part}")
    assert (nightly.cron_schedule, nightly.execution_timezone, nightly.job_name) == (full_cron, tz, f"sync_{part}")
    assert {s.name for s in defs.schedules} == {
        f"{kind}{p}" for p, *_ in CONNECTIONS.values() for kind in ("sync_", "full_sync_")
    } | {"mart_tests_hourly"}  # dbt's tests of the mart, hourly (defs/mart/definitions.py)


@pytest.mark.parametrize(
    "schedule_name, mode", [("sync_sandbox_salesforce", "auto"), ("full_sync_sandbox_salesforce", "full")]
)
def test_a_tick_requests_a_run_of_the_connections_job_with_its_mode(
    defs: dg.Definitions, schedule_name: str, mode: str
):
    schedule = defs.resolve_schedule_def(schedule_name)
    # 02:20 Berlin on the night clocks go forward: the tick time keeps its zone in the run key
    tick = datetime(2026, 3, 29, 3, 20, tzinfo=BERLIN)
    data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick))
    assert len(data.run_requests) == 1
    request = data.run_requests[0]
    assert request.run_config == {"ops": {"oppsync__sandbox_salesforce__extract": {"config": {"mode": mode}}}}
    assert request.tags["oppsync/connection"] == "sandbox-salesforce"
    assert request.tags["oppsync/mode"] == mode
    assert request.run_key == f"{schedule_name}:2026-03-29T03:20:00+02:00"
    # the run config is one the job accepts
    job = defs.resolve_job_def(schedule.job_name)
    validated = dg.validate_run_config(job, request.run_config)
    assert validated["ops"]["oppsync__sandbox_salesforce__extract"]["config"] == {"mode": mode}


def test_the_sync_job_selects_only_its_connections_assets_and_checks(defs: dg.Definitions):
    job = defs.resolve_job_def("sync_sandbox_salesforce")
    assert job.asset_layer.selected_asset_keys == {
        key("oppsync", "sandbox_salesforce", "extract"),
        key("oppsync", "sandbox_salesforce", "opportunities"),
    }
    checks = {(c.asset_key, c.name) for c in job.asset_layer.asset_graph.asset_check_keys}
    assert checks == {
        (key("oppsync", "sandbox_salesforce", "extract"), "extract_quality"),
        (key("oppsync", "sandbox_salesforce", "opportunities"), "counts_match_crm"),
        (key("oppsync", "sandbox_salesforce", "opportunities"), "quarantine"),
        (key("oppsync", "sandbox_salesforce", "opportunities"), "attribution_and_stages"),
    }
    assert job.tags["oppsync/connection"] == "sandbox-salesforce"


def test_the_extract_check_blocks_and_the_extract_retries(defs: dg.Definitions):
    graph = defs.resolve_asset_graph()
    extract = graph.get(key("oppsync", "sandbox_salesforce", "extract")).assets_def
    assert graph.get_check_spec(dg.AssetCheckKey(extract.key, "extract_quality")).blocking
    counts = dg.AssetCheckKey(key("oppsync", "sandbox_salesforce", "opportunities"), "counts_match_crm")
    assert not graph.get_check_spec(counts).blocking
    assert extract.op.retry_policy is not None and extract.op.retry_policy.max_retries == 2


@pytest.mark.parametrize("connection", sorted(CONNECTIONS))
def test_freshness_policy_is_twice_the_schedule_interval(defs: dg.Definitions, connection: str):
    part, cron, *_ = CONNECTIONS[connection]
    interval = timedelta(minutes=20) if cron.startswith("*/20") else timedelta(hours=1)
    policy = defs.resolve_asset_graph().get(key("oppsync", part, "opportunities")).freshness_policy
    assert isinstance(policy, dg.FreshnessPolicy)
    assert policy.fail_window.to_timedelta() == 2 * interval


def test_the_mart_follows_every_connection_by_eager_automation(defs: dg.Definitions):
    from oppsync_pipeline.defs.mart.assets import AGGREGATE_AUTOMATION, AGGREGATES, MART_AUTOMATION

    graph = defs.resolve_asset_graph()
    mart = [k for k in graph.get_all_asset_keys() if graph.get(k).group_name == "mart"]
    assert key("marts", "outcomes") in mart and key("marts", "outcomes_dashboard") in mart
    aggregates = {k for k in mart if k.path[-1] in AGGREGATES or k.path[-1] == "outcomes_dashboard"}
    assert {k.path[-1] for k in aggregates} == {*AGGREGATES, "outcomes_dashboard"}
    for k in mart:
        # per-opportunity models as soon as a sync lands; per-period aggregates every five minutes at most
        expected = AGGREGATE_AUTOMATION if k in aggregates else MART_AUTOMATION
        # the same condition, with the extracts' updates ignored (assets.OppsyncTranslator)
        assert graph.get(k).automation_condition.get_label() == expected.get_label(), k
    every_connection = {key("oppsync", part, "opportunities") for part, *_ in CONNECTIONS.values()}
    # the models reading the oppsync tables depend on every connection directly, so any one sync
    # makes them (and everything downstream) stale
    readers = [k for k in mart if graph.get(k).parent_keys & every_connection]
    assert readers, "no mart model depends on the oppsync assets"
    for k in readers:
        assert every_connection <= graph.get(k).parent_keys, k
    assert every_connection <= graph.get_ancestor_asset_keys(key("marts", "outcomes"))
    # the mart is not part of any sync job: a sync never waits for dbt
    assert not any(
        graph.get(k).group_name == "mart"
        for k in defs.resolve_job_def("sync_sandbox_hubspot").asset_layer.selected_asset_keys
    )
