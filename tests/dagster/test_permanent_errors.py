"""A permanent error (a refused query, a missing permission, an object the tenant does not have) reaches the
user at once: the extract fails with a message naming what to check, and Dagster's retry policy (30 s, then
60 s) is skipped. A transient error that outlives the client's own retries still gets it.

"In seconds" is a figure of `make bench` (benchmarks/fail_fast.py, target < 10 s), not a timed assertion here: a
loaded machine made it flaky, and the behaviour behind it is asserted without a clock (no Dagster retry here; no
client retry in each CRM's tenant tests)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from oppsync_pipeline.sandbox.cluster import CRMS
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule
from tests.dagster.conftest import load_defs, start_servers, stop_servers, write_config

# The opportunity reads of each CRM (required: a refusal there fails the run).
OPPORTUNITY_PATH = {
    "salesforce": r"/query",
    "hubspot": r"/crm/v3/objects/deals",
    "dynamics": r"/opportunities",
    "connectwise": r"/sales/opportunities$",
    "autotask": r"/Opportunities/query",
}


def _step_events(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.dagster_event.event_type_value for e in instance.all_logs(run_id) if e.is_dagster_event]


@pytest.mark.parametrize("crm", CRMS)
@pytest.mark.parametrize("fault", ["forbidden", "bad_request"])
def test_a_permanent_error_fails_the_run_in_seconds_without_dagster_retries(
    crm: str, fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dagster_instance: dg.DagsterInstance
):
    name = f"sandbox-{crm}"
    servers = start_servers({name: crm}, opportunities=30)
    sim = servers[name].simulator
    sim.faults = FaultPlan(rules=[FaultRule(fault, count=0, path=OPPORTUNITY_PATH[crm])])
    try:
        config = write_config(tmp_path / "oppsync.yaml", servers, f"duckdb:///{tmp_path / 'w.duckdb'}")
        defs = load_defs(config, monkeypatch)
        job = defs.resolve_job_def(f"sync_{name.replace('-', '_')}")
        result = job.execute_in_process(instance=dagster_instance, raise_on_error=False)
    finally:
        stop_servers(servers)
    assert not result.success
    events = _step_events(dagster_instance, result.run_id)
    assert "STEP_UP_FOR_RETRY" not in events and "STEP_RESTARTED" not in events, events
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error.message)
    status = {"forbidden": "403", "bad_request": "400"}[fault]
    assert status in message and ("check" in message.lower() or "grant" in message.lower()), message
