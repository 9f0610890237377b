"""The production instance file (deploy/postgres/dagster.yaml) against a fresh Postgres database: a sync run
made with it is read back by a second, independent instance, and Dagster's tables are in that database.

The password comes from DAGSTER_PG_PASSWORD through `env:`; set to the empty string (trust auth, as here)
it is accepted. Unset, Dagster refuses to load the instance, which is the right failure for production."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from tests.dagster.conftest import REPO, every_creator_mapped, load_defs, start_servers, stop_servers, write_config

pytestmark = pytest.mark.postgres

EXTRACT = dg.AssetKey(["oppsync", "sandbox_salesforce", "extract"])
OPPORTUNITIES = dg.AssetKey(["oppsync", "sandbox_salesforce", "opportunities"])


@pytest.fixture
def postgres_home(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    url = make_url(pg_url)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_PG_HOST", url.host or "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_PORT", str(url.port or 5432))
    monkeypatch.setenv("DAGSTER_PG_USER", url.username or "postgres")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", url.password or "")
    monkeypatch.setenv("DAGSTER_PG_DB", url.database)
    return home


def test_runs_and_materializations_live_in_postgres(
    postgres_home: Path, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    servers = start_servers({"sandbox-salesforce": "salesforce"}, opportunities=60)
    try:
        config = write_config(
            tmp_path / "oppsync.yaml",
            servers,
            f"duckdb:///{tmp_path / 'warehouse.duckdb'}",
            users=every_creator_mapped(servers),
        )
        defs = load_defs(config, monkeypatch)
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
            result = defs.resolve_job_def("sync_sandbox_salesforce").execute_in_process(
                instance=instance, tags={"oppsync/trigger": "test"}
            )
            assert result.success
    finally:
        stop_servers(servers)

    # a new instance, from the same file: nothing shared with the one above but the database
    with dg.DagsterInstance.from_config(str(postgres_home)) as reader:
        latest = reader.get_latest_materialization_event(OPPORTUNITIES)
        assert latest is not None and latest.run_id == result.run_id
        assert latest.asset_materialization.metadata["rows_created"].value == 60 - _deleted(servers)
        assert reader.get_latest_materialization_event(EXTRACT).run_id == result.run_id
        run = reader.get_run_by_id(result.run_id)
        assert run.is_success and run.job_name == "sync_sandbox_salesforce"
        assert run.tags["oppsync/connection"] == "sandbox-salesforce" and run.tags["oppsync/trigger"] == "test"
        checks = reader.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(EXTRACT, "extract_quality")]
        )
        assert checks[dg.AssetCheckKey(EXTRACT, "extract_quality")].run_id == result.run_id

    engine = create_engine(pg_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"runs", "event_logs", "asset_keys", "jobs"} <= tables


def _deleted(servers) -> int:
    world = servers["sandbox-salesforce"].simulator.world
    return sum(1 for o in world.opps.values() if o.deleted_at is not None)
