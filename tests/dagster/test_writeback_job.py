"""Write-back in Dagster: the approval sensor requests one run per connection for rows whose approval changed,
skips a connection with `writeback.automatic: false`, and never asks twice for the same change (run keys); the
`writeback` job writes the row, records its diff as metadata and fails, without retries, when a row is not written."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from oppsync_pipeline.defs.resources import OppsyncResource, app_config
from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows
from oppsync_pipeline.locations import load_location
from tests.dagster.conftest import start_servers, stop_servers, write_config


@pytest.fixture
def two_connections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    servers = start_servers({"crm-auto": "salesforce", "crm-optout": "salesforce"}, opportunities=30)
    try:
        config = write_config(
            tmp_path / "oppsync.yaml",
            servers,
            f"duckdb:///{tmp_path / 'warehouse.duckdb'}",
            extra={"crm-optout": {"writeback": {"automatic": False}}},
        )
        monkeypatch.setenv("OPPSYNC_CONFIG", str(config))
        cfg = app_config(config)
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        for conn in cfg.connections:
            sync_connection(cfg, conn, engine, run_id=f"sync-{conn.name}")
        yield config, cfg, engine, servers
    finally:
        stop_servers(servers)


def first_open(server) -> str:
    world = server.simulator.world
    return sorted(o.native_id for o in world.live() if world.status(o) == "open")[0]


def tick(sensor, instance, config: Path, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"oppsync": OppsyncResource(config_path=str(config))}
    )
    return sensor(context)


def test_the_sensor_writes_an_approved_row_once_and_skips_the_opted_out(two_connections, dagster_instance):
    config, cfg, engine, servers = two_connections
    defs = load_location("syncs")
    sensor = defs.get_sensor_def("writeback_on_approval")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING

    baseline = tick(sensor, dagster_instance, config, None)
    assert not baseline.run_requests and baseline.cursor

    approved_at = datetime.now().replace(microsecond=0) + timedelta(seconds=1)
    auto_id, optout_id = first_open(servers["crm-auto"]), first_open(servers["crm-optout"])
    upsert_rows(
        engine,
        [
            revenue_row("crm-auto", auto_id, approved_at, total_contract_revenue=43_210.0),
            revenue_row("crm-optout", optout_id, approved_at, total_contract_revenue=43_210.0),
        ],
    )
    second = tick(sensor, dagster_instance, config, baseline.cursor)
    (request,) = second.run_requests
    assert request.tags["oppsync/connection"] == "crm-auto"
    assert request.run_config["ops"]["write_revenue"]["config"] == {
        "connection": "crm-auto",
        "opportunities": [auto_id],
        "trigger": "automatic",
    }

    job = defs.resolve_job_def("writeback")
    run = job.execute_in_process(
        run_config=request.run_config, instance=dagster_instance, tags=request.tags, raise_on_error=False
    )
    assert run.success
    assert servers["crm-auto"].simulator.world.opps[auto_id].amount == pytest.approx(43_210.0)
    assert servers["crm-optout"].simulator.world.opps[optout_id].amount != pytest.approx(43_210.0)
    output = next(e for e in run.all_events if e.event_type_value == "STEP_OUTPUT")
    metadata = output.event_specific_data.metadata
    assert metadata["rows_written"].value == 1 and metadata["fields_written"].value == 1
    assert "43,210.00" in metadata["diff"].value

    # The same change seen again (the overlap window) asks for the run it already asked for: the daemon skips a
    # run key it launched, and the run would write nothing anyway.
    third = tick(sensor, dagster_instance, config, second.cursor)
    assert [r.run_key for r in third.run_requests] in ([], [request.run_key])
    again = job.execute_in_process(run_config=request.run_config, instance=dagster_instance, raise_on_error=False)
    metadata = next(e for e in again.all_events if e.event_type_value == "STEP_OUTPUT").event_specific_data.metadata
    assert metadata["rows_unchanged"].value == 1 and metadata["fields_written"].value == 0


def test_a_row_that_is_not_written_fails_the_run_without_retries(two_connections, dagster_instance):
    config, cfg, engine, servers = two_connections
    opp = first_open(servers["crm-auto"])
    upsert_rows(engine, [revenue_row("crm-auto", opp, datetime.now())])
    from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule

    servers["crm-auto"].simulator.faults = FaultPlan([FaultRule("bad_request", method="PATCH", count=0)])
    job = load_location("syncs").resolve_job_def("writeback")
    run = job.execute_in_process(
        run_config={"ops": {"write_revenue": {"config": {"connection": "crm-auto"}}}},
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not run.success
    failure = next(e for e in run.all_events if e.is_step_failure).step_failure_data
    assert "1 row(s) not written" in failure.user_failure_data.description
    assert failure.user_failure_data.metadata["rows_failed"].value == 1
