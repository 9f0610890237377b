"""Hostile answers through the real asset path (issue 22): the connection's Dagster sync job, materialized
against its simulator, with the CRM's clock three hours ahead of ours (as `oppsync run --advance-hours 3`
leaves it):

  1. a clean full sync; the CRM's clock moves on 3 hours with activity;
  2. a wrong-shape page mid-paging: the extract attempt fails naming the CRM, the page and what was wrong, is
     recorded as failed with nothing changed and the lease released; a bad page may not come again, so Dagster's
     retry policy runs the step again and that attempt completes the sync (the policy's wait, 30 s +/- 30 s of
     jitter, is computed and checked, but not slept: `no_retry_wait`);
  3. two bad records on a page: quarantined (WARN check `quarantine` naming their ids), everything else synced,
     the blocking quality check passes although records were created "in the future" by our clock.

Every CRM under `make reliability`; Salesforce in the normal suite."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
from sqlalchemy import text

from oppsync_pipeline.defs.resources import _engine
from oppsync_pipeline.sandbox.cluster import CRMS
from oppsync_pipeline.sandbox.server import FaultRule
from tests.dagster.conftest import every_creator_mapped, load_defs, start_servers, stop_servers, write_config
from tests.reliability.harness import FULL, OPPORTUNITY_PAGES, connection_extra, snapshot
from tests.reliability.report import reported, unclear
from tests.reliability.test_fault_matrix import bad_records

SELECTED = CRMS if FULL else ("salesforce",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("hostile_assets")
    names = {f"hostile-{crm}": crm for crm in SELECTED}
    servers = start_servers(names, opportunities=300)  # 2 bad records stay under the 1% threshold
    try:
        url = f"duckdb:///{tmp / 'warehouse.duckdb'}"
        extra = {name: connection_extra(crm, page_size=25) for name, crm in names.items()}
        config = write_config(tmp / "oppsync.yaml", servers, url, extra=extra, users=every_creator_mapped(servers))
        with pytest.MonkeyPatch.context() as mp:
            yield load_defs(config, mp), servers, url
    finally:
        stop_servers(servers)


def run(defs: dg.Definitions, name: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    key = name.replace("-", "_")
    return defs.resolve_job_def(f"sync_{key}").execute_in_process(
        run_config={"ops": {f"oppsync__{key}__extract": {"config": {"mode": "full"}}}},
        instance=instance,
        raise_on_error=False,
    )


def chain(error) -> list[str]:
    """The messages of a Dagster error and its causes (a retry request wraps the step's own error)."""
    out = []
    while error is not None:
        out.append(error.message.strip())
        error = error.cause
    return out


def last_run(url: str, name: str) -> tuple:  # (status, error, quarantined) of the latest sync run
    with _engine(url).connect() as c:
        return tuple(
            c.execute(
                text(
                    "SELECT status, error, quarantined FROM oppsync.sync_runs WHERE connection = :c "
                    "ORDER BY started_at DESC LIMIT 1"
                ),
                {"c": name},
            ).one()
        )


@pytest.fixture
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dg.RetryPolicy, int, float]]:
    """The asset's own RetryPolicy computes its wait as in production; the step is re-run at once instead of
    after it (0-60 s of the suite's wall time). Returns the (policy, attempt, wait it chose) of every retry."""
    chosen: list[tuple[dg.RetryPolicy, int, float]] = []
    real = dg.RetryPolicy.calculate_delay

    def calculate_delay(policy: dg.RetryPolicy, attempt_num: int) -> float:
        chosen.append((policy, attempt_num, real(policy, attempt_num)))
        return 0

    monkeypatch.setattr(dg.RetryPolicy, "calculate_delay", calculate_delay)
    return chosen


@pytest.mark.parametrize("crm", SELECTED)
def test_hostile_answers_through_the_sync_job(crm: str, setup, no_retry_wait):
    defs, servers, url = setup
    name = f"hostile-{crm}"
    sim = servers[name].simulator
    instance = dg.DagsterInstance.ephemeral()
    engine = _engine(url)
    with reported("asset_path", crm) as row:
        assert run(defs, name, instance).success
        sim.world.advance(hours=3, rate=0.05)  # the CRM's clock is now 3 hours ahead of ours

        known = set(snapshot(engine, name).current)
        sim.faults.rules = [FaultRule("wrong_shape", path=OPPORTUNITY_PAGES[crm], after=2, count=1)]
        result = run(defs, name, instance)
        fired = sum(r.fired for r in sim.faults.rules)
        sim.faults.rules = []
        with engine.connect() as c:
            runs = (
                c.execute(
                    text("SELECT status FROM oppsync.sync_runs WHERE connection = :c ORDER BY started_at"), {"c": name}
                )
                .scalars()
                .all()
            )
            locks = c.execute(
                text("SELECT count(*) FROM oppsync.sync_locks WHERE connection = :c"), {"c": name}
            ).scalar()
        # the failed attempt's row is replaced by the retry's (one row per Dagster run): its error is in the
        # run's event log, as the data engineer sees it in the UI
        retried = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
        errors = [" / ".join(chain(e.event_specific_data.error)) for e in retried]
        row.unclear_errors = sum(unclear(m, rf"{crm}: page \d+ of \S+: unexpected page shape") for m in errors)
        assert fired == 1 and len(retried) == 1, [e.event_type for e in result.all_events]
        # the extract's retry policy chose the wait (first retry: its delay, +/- the same in jitter); not slept here
        ((policy, attempt, wait),) = no_retry_wait
        assert attempt == 1 and policy.max_retries >= 1 and policy.delay > 0, policy
        assert 0 <= wait <= 2 * policy.delay, wait
        assert not row.unclear_errors, errors
        assert result.success and runs[-1] == "success" and locks == 0, runs
        deleted = {sid for sid, kind in snapshot(engine, name).events if kind == "deleted"}
        assert deleted == known - {str(o.native_id) for o in sim.world.live()}, "deletes other than the CRM's"

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
            rows = c.execute(
                text("SELECT source_id, field FROM oppsync.quarantine WHERE connection = :c ORDER BY field"),
                {"c": name},
            ).fetchall()
        assert len({r[0] for r in rows}) == 2 and all(r[0] for r in rows)
        assert set(quarantine.metadata["ids"].value.split(", ")) == {r[0] for r in rows}
        assert last_run(url, name)[0] == "success" and last_run(url, name)[2] == 2
        after = snapshot(engine, name)
        assert not ({r[0] for r in rows} & {sid for sid, kind in after.events if kind == "deleted"}), (
            "a quarantined record was deleted"
        )
