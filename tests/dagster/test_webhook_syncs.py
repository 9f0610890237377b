"""Issue 18's acceptance, per CRM with webhooks: the simulator's signed notification of a change reaches the mart
through the receiver, the `syncs_on_webhooks` sensor, the connection's sync job and the mart build; a forged
notification is refused and starts nothing; a notification the CRM never delivers is caught by the next scheduled
sync (the safety net). On DuckDB here; tests/topology runs the same path on Postgres through the daemon."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import requests
from sqlalchemy import func, select, text

from oppsync_pipeline.defs.crm.schedules import extract_run_config, sync_job_name
from oppsync_pipeline.defs.crm.webhooks import SENSOR_NAME
from oppsync_pipeline.defs.mart.assets import AFTER_SYNC, MART_RUN_TAG
from oppsync_pipeline.defs.resources import OppsyncResource, app_config
from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.lib.sync import build_connector
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.lib.webhooks import inbox
from oppsync_pipeline.lib.webhooks.app import receivers_for
from oppsync_pipeline.sandbox.cluster import crm_module
from oppsync_pipeline.sandbox.kit.webhooks import DeliveryFaults
from tests.dagster.conftest import every_creator_mapped, load_defs, start_servers, stop_servers, write_config
from tests.webhooks.harness import serving_receiver

WEBHOOK_CRMS = [crm for crm, s in REGISTRY.items() if s.webhooks]


def webhook_settings(crm: str, name: str, sim, monkeypatch: pytest.MonkeyPatch) -> dict:
    """`webhooks:` for a sandbox connection: the simulator's webhook secrets through the environment, as a user
    would set them, and the options its tenant needs (e.g. Salesforce's organization id)."""
    mod = crm_module(crm)
    refs = {}
    for key, value in getattr(mod, "SANDBOX_WEBHOOK_SECRETS", {}).items():
        var = f"OPPSYNC_TEST_{name.upper().replace('-', '_')}_WEBHOOK_{key.upper()}"
        monkeypatch.setenv(var, value)
        refs[key] = "${" + var + "}"
    options = dict(getattr(mod, "SANDBOX_WEBHOOK_OPTIONS", {}))
    return {"enabled": True, "secrets": refs, "options": options}


def run_job(defs, name: str, instance, run_config=None, tags=None):
    result = defs.resolve_job_def(name).execute_in_process(
        run_config=run_config or {}, instance=instance, tags=tags or {}, raise_on_error=False
    )
    assert result.success, f"{name} failed"
    return result


def mart_name(engine, connection: str, source_id: str) -> str | None:
    with engine.connect() as c:
        return c.execute(
            text("SELECT project_name FROM marts.opportunities WHERE connection = :c AND source_id = :s"),
            {"c": connection, "s": source_id},
        ).scalar()


def warehouse_name(engine, connection: str, source_id: str) -> str | None:
    with engine.connect() as c:
        return c.execute(
            text("SELECT project_name FROM oppsync.opportunities WHERE connection = :c AND source_id = :s"),
            {"c": connection, "s": source_id},
        ).scalar()


def stored(cfg) -> int:
    with inbox.engine_for(cfg).connect() as c:
        return c.execute(select(func.count()).select_from(inbox.webhook_inbox)).scalar()


@pytest.mark.parametrize("crm", WEBHOOK_CRMS)
def test_a_notification_reaches_the_mart_and_a_lost_one_the_next_schedule(
    crm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dagster_instance
):
    warehouse_url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    name = f"hooks-{crm}"
    servers = start_servers({name: crm}, seed=9, opportunities=40)
    sim = servers[name].simulator
    try:
        spec = REGISTRY[crm]
        options = {**spec.test_options, **spec.sandbox_connection_options(servers[name].url)}
        config = write_config(
            tmp_path / "oppsync.yaml",
            servers,
            warehouse_url,
            extra={name: {"options": options, "webhooks": webhook_settings(crm, name, sim, monkeypatch)}},
            users=every_creator_mapped(servers),
        )
        defs = load_defs(config, monkeypatch)
        cfg = app_config(config)
        conn = cfg.connection(name)
        engine = make_engine(cfg.warehouse.url)
        job = sync_job_name(conn)
        run_job(defs, job, dagster_instance, extract_run_config(conn, "full"))
        sensor = defs.get_sensor_def(SENSOR_NAME)
        context = lambda: dg.build_sensor_context(  # noqa: E731
            instance=dagster_instance, resources={"oppsync": OppsyncResource(config_path=str(config))}
        )
        world = sim.world
        first, second = sorted(o.native_id for o in world.live() if world.status(o) == "open")[:2]

        with serving_receiver(cfg) as url:
            endpoint = f"{url}/webhooks/{name}"
            for line in receivers_for(cfg)[name].register(build_connector(cfg, conn), endpoint):
                print(line)
            if sim.webhooks.url is None:  # no subscription API (Salesforce): the manual setup points it here
                sim.webhooks.url = endpoint

            # a change in the CRM: notified, verified, stored, synced, in the mart
            world.update(first, name="Changed, notified")
            assert sim.webhooks.idle(), "the simulator did not deliver"
            assert stored(cfg) >= 1, f"nothing stored; deliveries: {sim.webhooks.sent}"
            (request,) = sensor(context()).run_requests
            assert request.tags["oppsync/trigger"] == "webhook" and request.job_name == job
            run_job(defs, job, dagster_instance, request.run_config, request.tags)
            # the build the automation runs after a sync (dbt run; dbt's tests run in mart_tests and full builds)
            run_job(defs, "build_mart", dagster_instance, tags={MART_RUN_TAG: AFTER_SYNC})
            assert mart_name(engine, name, first) == "Changed, notified"

            # forged: refused, nothing stored, nothing started
            before = stored(cfg)
            forged = requests.post(endpoint, data=b'{"forged": true}', headers={"Content-Type": "application/json"})
            assert forged.status_code in (400, 401)
            assert stored(cfg) == before
            assert not sensor(context()).run_requests

            # lost on the way: nothing reaches oppsync until the hourly schedule's sync
            sim.webhooks.faults = DeliveryFaults(drop=1.0)
            sim.webhooks.start_faults()
            world.update(second, name="Changed, never notified")
            assert sim.webhooks.idle()
            assert stored(cfg) == before and not sensor(context()).run_requests
            assert warehouse_name(engine, name, second) != "Changed, never notified"
            run_job(defs, job, dagster_instance, extract_run_config(conn, "auto"), {"oppsync/connection": name})
            assert warehouse_name(engine, name, second) == "Changed, never notified"  # (the mart follows as above)
    finally:
        stop_servers(servers)
