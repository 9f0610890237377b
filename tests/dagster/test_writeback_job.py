"""Write-back in Dagster: the approval sensor requests one run per connection for rows whose approval changed,
skips a connection with `writeback.automatic: false`, and never asks twice for the same change (run keys); the
`writeback` job writes the row, records its diff as metadata and fails, without retries, when a row is not written."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from oppsync_pipeline.defs.resources import OppsyncResource, app_config
from oppsync_pipeline.lib.crm.registry import CRMS, REGISTRY
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.writeback.contract import validate
from oppsync_pipeline.lib.writeback.engine import writer_for
from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows
from oppsync_pipeline.lib.writeback.writer import same
from oppsync_pipeline.locations import load_location
from tests.dagster.conftest import start_servers, stop_servers, write_config


@pytest.fixture(params=CRMS)
def two_connections(
    request: pytest.FixtureRequest, warehouse_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Two connections to two tenants of the same CRM (per CRM, on both warehouses), the second opted out of the
    automatic update."""
    crm = request.param
    servers = start_servers({"crm-auto": crm, "crm-optout": crm}, opportunities=30)
    # not lean: ConnectWise's amounts are its forecast lines, which its writer writes
    spec = REGISTRY[crm]
    extra = {
        name: {"options": {**spec.test_options, **spec.sandbox_connection_options(server.url)}}
        for name, server in servers.items()
    }
    extra["crm-optout"]["writeback"] = {"automatic": False}
    try:
        config = write_config(tmp_path / "oppsync.yaml", servers, warehouse_url, extra=extra)
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
    """An open opportunity with a customer (Dataverse needs one for the quote it writes)."""
    world = server.simulator.world
    return sorted(o.native_id for o in world.live() if world.status(o) == "open" and o.account is not None)[0]


def crm_values(cfg, name: str, opp: str) -> dict:
    """The CRM's values of the writer's fields, read through its API."""
    return writer_for(build_connector(cfg, cfg.connection(name))).read_current(opp).values


def holds(cfg, name: str, opp: str, row: dict) -> bool:
    """Whether the CRM holds every value the row asks for."""
    writer = writer_for(build_connector(cfg, cfg.connection(name)))
    now = writer.read_current(opp).values
    return all(f in now and same(now[f], v) for f, v in writer.desired(validate([row])[0][0]).items())


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
    auto_row = revenue_row("crm-auto", auto_id, approved_at, total_contract_revenue=43_210.0)
    optout_row = revenue_row("crm-optout", optout_id, approved_at, total_contract_revenue=43_210.0)
    optout_before = crm_values(cfg, "crm-optout", optout_id)
    upsert_rows(engine, [auto_row, optout_row])
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
    assert holds(cfg, "crm-auto", auto_id, auto_row), "the approved row was written"
    assert crm_values(cfg, "crm-optout", optout_id) == optout_before, "the opted-out connection was written"
    output = next(e for e in run.all_events if e.event_type_value == "STEP_OUTPUT")
    metadata = output.event_specific_data.metadata
    assert metadata["rows_written"].value == 1 and metadata["fields_written"].value >= 1
    assert auto_id in metadata["diff"].value

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

    writer = writer_for(build_connector(cfg, cfg.connection("crm-auto")))
    row = validate([revenue_row("crm-auto", opp, datetime.now())])[0][0]
    writer.write(opp, writer.desired(row), writer.read_current(opp))  # lines exist: the next write is a PATCH
    upsert_rows(engine, [revenue_row("crm-auto", opp, datetime.now(), total_contract_revenue=1_234.0, ps_revenue=1.0)])
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
