"""Issue 18's acceptance, per CRM with webhooks: the simulator's signed notification of a change reaches the mart
through the receiver, the `syncs_on_webhooks` sensor, the connection's sync job and the mart build; a forged
notification is refused and starts nothing; a notification the CRM never delivers is caught by the next scheduled
sync (the safety net). On DuckDB here; tests/topology runs the same path on Postgres through the daemon.

One `setup` per module: a simulator per CRM, one oppsync.yaml with all of them, the definitions loaded once and one
Dagster instance (loading the definitions costs seconds); each test drives its own connection."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class Setup:
    defs: dg.Definitions
    config: Path
    servers: dict
    instance: dg.DagsterInstance


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Every webhook CRM's simulator, one oppsync.yaml (a DuckDB warehouse) and its definitions, one instance."""
    tmp = tmp_path_factory.mktemp("webhook_syncs")
    names = {f"hooks-{crm}": crm for crm in WEBHOOK_CRMS}
    servers = start_servers(names, seed=9, opportunities=40)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            extra = {}
            for name, crm in names.items():
                spec = REGISTRY[crm]
                options = {**spec.test_options, **spec.sandbox_connection_options(servers[name].url)}
                sim = servers[name].simulator
                extra[name] = {"options": options, "webhooks": webhook_settings(crm, name, sim, monkeypatch)}
            config = write_config(
                tmp / "oppsync.yaml",
                servers,
                f"duckdb:///{tmp / 'warehouse.duckdb'}",
                extra=extra,
                users=every_creator_mapped(servers),
            )
            defs = load_defs(config, monkeypatch)
            home = tmp / "dagster_home"
            home.mkdir()
            with dg.instance_for_test(temp_dir=str(home)) as instance:
                yield Setup(defs, config, servers, instance)
    finally:
        stop_servers(servers)


@pytest.mark.parametrize("crm", WEBHOOK_CRMS)
def test_a_notification_reaches_the_mart_and_a_lost_one_the_next_schedule(crm: str, setup: Setup):
    defs, config, dagster_instance = setup.defs, setup.config, setup.instance
    name = f"hooks-{crm}"
    sim = setup.servers[name].simulator
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
