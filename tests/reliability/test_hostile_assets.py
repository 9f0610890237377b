"""Hostile answers through the real asset path (issue 22): the connection's Dagster sync job, materialized
against its simulator, with the CRM's clock three hours ahead of ours (as `oppsync run --advance-hours 3`
leaves it):

  1. a clean full sync; the CRM's clock moves on 3 hours with activity;
  2. a wrong-shape page mid-paging: the extract fails naming the CRM, the page and what was wrong, the warehouse
     is unchanged, the run is recorded as failed, the lease is released;
  3. two bad records on a page: quarantined (WARN check `quarantine` naming their ids), everything else synced,
     the blocking quality check passes although records were created "in the future" by our clock.

Every CRM under `make reliability`; Salesforce in the normal suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import text

from oppsync_pipeline.defs.resources import _engine
from oppsync_pipeline.sandbox.cluster import CRMS
from oppsync_pipeline.sandbox.server import FaultRule
from tests.dagster.conftest import every_creator_mapped, load_defs, start_servers, stop_servers, write_config
from tests.reliability.harness import FULL, OPPORTUNITY_PAGES, snapshot
from tests.reliability.report import reported, unclear
from tests.reliability.test_fault_matrix import bad_records

SELECTED = CRMS if FULL else ("salesforce",)
EXTRA = {"hubspot": {"options": {"search_requests_per_second": 0}}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("hostile_assets")
    names = {f"hostile-{crm}": crm for crm in SELECTED}
    servers = start_servers(names, opportunities=120)
    try:
        url = f"duckdb:///{tmp / 'warehouse.duckdb'}"
        extra = {name: {"page_size": 25, **EXTRA.get(crm, {})} for name, crm in names.items()}
        config = write_config(tmp / "oppsync.yaml", servers, url, extra=extra, users=every_creator_mapped(servers))
        with pytest.MonkeyPatch.context() as mp:
            yield load_defs(config, mp), servers, url
    finally:
        stop_servers(servers)


def run(defs: dg.Definitions, name: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    key = name.replace("-", "_")
    return defs.resolve_job_def(f"sync_{key}").execute_in_process(
        run_config={"ops": {f"oppsync__{key}__extract": {"config": {"mode": "full"}}}}, instance=instance,
        raise_on_error=False)


def last_run(url: str, name: str) -> tuple:
    with _engine(url).connect() as c:
        return tuple(c.execute(text("SELECT status, error, quarantined FROM oppsync.sync_runs WHERE connection = :c "
                                    "ORDER BY started_at DESC LIMIT 1"), {"c": name}).one())


@pytest.mark.parametrize("crm", SELECTED)
def test_hostile_answers_through_the_sync_job(crm: str, setup):
    defs, servers, url = setup
    name = f"hostile-{crm}"
    sim = servers[name].simulator
    instance = dg.DagsterInstance.ephemeral()
    engine = _engine(url)
    with reported("asset_path", crm) as row:
        assert run(defs, name, instance).success
        sim.world.advance(hours=3, rate=0.05)          # the CRM's clock is now 3 hours ahead of ours

        before = snapshot(engine, name)
        sim.faults.rules = [FaultRule("wrong_shape", path=OPPORTUNITY_PAGES[crm], after=2, count=1)]
        result = run(defs, name, instance)
        sim.faults.rules = []
        status, error, _ = last_run(url, name)
        row.unclear_errors = unclear(error, rf"{crm}: page \d+ of /\S*: unexpected page shape")
        assert not result.success and status == "failed", (status, error)
        assert not row.unclear_errors, error
        assert snapshot(engine, name).differences(before) == []
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM oppsync.sync_locks WHERE connection = :c"),
                             {"c": name}).scalar() == 0

        hook = bad_records(sim, crm)
        result = run(defs, name, instance)
        hook.remove()
        assert result.success
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert evaluations["extract_quality"].passed, evaluations["extract_quality"].metadata
        assert evaluations["counts_match_crm"].passed, evaluations["counts_match_crm"].metadata
        quarantine = evaluations["quarantine"]
        assert not quarantine.passed and quarantine.severity == dg.AssetCheckSeverity.WARN
        assert quarantine.metadata["quarantined"].value == 2
        with engine.connect() as c:
            rows = c.execute(text("SELECT source_id, field FROM oppsync.quarantine WHERE connection = :c "
                                  "ORDER BY field"), {"c": name}).fetchall()
        assert len({r[0] for r in rows}) == 2 and all(r[0] for r in rows)
        assert set(quarantine.metadata["ids"].value.split(", ")) == {r[0] for r in rows}
        assert last_run(url, name)[0] == "success" and last_run(url, name)[2] == 2
        after = snapshot(engine, name)
        assert not any(e[1] in ("deleted", "restored") for e in after.events), "a quarantined record was deleted"
