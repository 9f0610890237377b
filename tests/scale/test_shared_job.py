"""Above SHARED_SYNC_JOB_ABOVE connections the connections share one sync job (defs/crm/schedules.py): a run
still syncs one connection, with its checks, and the schedules name their connection's assets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from oppsync_pipeline.defs.crm.assets import extract_key, opportunities_key
from oppsync_pipeline.defs.crm.schedules import SHARED_SYNC_JOB, SHARED_SYNC_JOB_ABOVE
from oppsync_pipeline.lib.config import load_config
from oppsync_pipeline.sandbox.cluster import Tenants, tenant_urls, write_tenants_config

COUNT = SHARED_SYNC_JOB_ABOVE + 1


@pytest.fixture
def shared_defs(tmp_path: Path, duckdb_url: str, monkeypatch: pytest.MonkeyPatch):
    """Connection 0 a served Salesforce tenant; the others never called (ports nobody listens on)."""
    with Tenants(count=1, opportunities=30) as served:
        urls = served.urls() + tenant_urls(COUNT, 1)[1:]
        path = write_tenants_config(
            tmp_path / "oppsync.yaml",
            urls,
            duckdb_url,
            warehouse={"url": duckdb_url, "duckdb": {"max_connections": 60}},
        )
        monkeypatch.setenv("OPPSYNC_CONFIG", str(path))
        from oppsync_pipeline.locations import load_location

        yield load_config(path), load_location("syncs")


def test_one_shared_job_syncs_one_connection_with_its_checks(shared_defs) -> None:
    from oppsync_pipeline.cli import run_connection

    cfg, defs = shared_defs
    repo = defs.get_repository_def()
    assert {j.name for j in repo.get_all_jobs() if j.name.startswith("sync")} == {SHARED_SYNC_JOB}
    conn = cfg.connections[0]
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_connection(defs, instance, conn, "auto")
    assert result.success
    assert {m.asset_key for m in result.get_asset_materialization_events()} == {
        extract_key(conn),
        opportunities_key(conn),
    }
    checks = {e.asset_check_key.name for e in result.get_asset_check_evaluations()}
    assert {"extract_quality", "counts_match_crm"} <= checks
    # the blocking and error checks pass (attribution warns: the generated config links no users)
    assert all(e.passed for e in result.get_asset_check_evaluations() if e.severity == dg.AssetCheckSeverity.ERROR)


def test_schedules_select_their_connection_at_their_spread_minute(shared_defs) -> None:
    cfg, defs = shared_defs
    assert cfg.spread_minutes() == 30  # the default above 20 connections
    minutes = set()
    for conn in cfg.connections:
        schedule = defs.get_schedule_def(f"sync_{conn.name.replace('-', '_')}")
        minutes.add(int(schedule.cron_schedule.split()[0]))
        assert schedule.job_name == SHARED_SYNC_JOB
    assert len(minutes) > 10 and minutes <= set(range(30, 60))
    conn = cfg.connections[3]
    schedule = defs.get_schedule_def(f"sync_{conn.name.replace('-', '_')}")
    with dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 1, 10, 30, tzinfo=UTC)) as ctx:
        (request,) = schedule.evaluate_tick(ctx).run_requests
    assert request.asset_selection == [extract_key(conn), opportunities_key(conn)]
    assert request.tags["oppsync/connection"] == conn.name
