"""A connection's sync job materialized against a simulator (DuckDB warehouse): the checks pass on a good
extract, a bad extract is stopped by the blocking quality check (SQL in the warehouse) before reconcile touches
the warehouse, and a spent API quota makes a skipped run that the next run makes up for.

One configuration, three connections (one per test, each with its own Salesforce simulator), loaded once:
the tests share the definitions and the warehouse file, never a connection."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import dagster as dg
import pytest
from sqlalchemy import text

from oppsync_pipeline.defs.resources import _engine
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.dagster.conftest import every_creator_mapped, load_defs, start_servers, stop_servers, write_config

CONNECTIONS = {
    "sf-good": "salesforce",
    "sf-bad": "salesforce",
    "sf-quota": "salesforce",
    "sf-scoped": "salesforce",
    "at-paused": "autotask",
}
SCOPED = {
    # A connection with a scope: tracked from a stage on, and (in the test) a filter that some deals leave.
    "sf-scoped": {"track_from_stage": "Needs Analysis"},
    # A run may send 30 of Autotask's 10,000 requests an hour: its full read takes several runs.
    "at-paused": {"page_size": 10, "quota": {"run_share": 0.003}},
}


@dataclass
class Setup:
    defs: dg.Definitions
    servers: dict[str, SandboxServer]
    warehouse_url: str

    def job(self, connection: str) -> dg.JobDefinition:
        return self.defs.resolve_job_def(f"sync_{connection.replace('-', '_')}")

    def world(self, connection: str):
        return self.servers[connection].simulator.world

    def rows(self, connection: str) -> dict[str, tuple]:
        with _engine(self.warehouse_url).connect() as c:
            result = c.execute(
                text(
                    "SELECT source_id, status, amount, created_at, modified_at, deleted_at "
                    "FROM oppsync.opportunities WHERE connection = :c"
                ),
                {"c": connection},
            )
            return {r[0]: tuple(r[1:]) for r in result}

    def sync_runs(self, connection: str) -> list[tuple]:
        with _engine(self.warehouse_url).connect() as c:
            return [
                tuple(r)
                for r in c.execute(
                    text(
                        "SELECT run_id, status, error FROM oppsync.sync_runs WHERE connection = :c ORDER BY started_at"
                    ),
                    {"c": connection},
                )
            ]

    def lock_holder(self, connection: str):
        with _engine(self.warehouse_url).connect() as c:
            return c.execute(
                text("SELECT run_id FROM oppsync.sync_locks WHERE connection = :c"), {"c": connection}
            ).scalar()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("checks")
    servers = start_servers(CONNECTIONS)
    try:
        url = f"duckdb:///{tmp / 'warehouse.duckdb'}"
        config = write_config(tmp / "oppsync.yaml", servers, url, extra=SCOPED, users=every_creator_mapped(servers))
        with pytest.MonkeyPatch.context() as mp:
            yield Setup(load_defs(config, mp), servers, url)
    finally:
        stop_servers(servers)


def key(connection: str, name: str) -> dg.AssetKey:
    return dg.AssetKey(["oppsync", connection.replace("-", "_"), name])


def materialized(result: dg.ExecuteInProcessResult) -> dict[dg.AssetKey, dict]:
    return {
        e.asset_key: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def started_steps(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START}


def run(setup: Setup, connection: str, instance: dg.DagsterInstance, mode: str = "auto") -> dg.ExecuteInProcessResult:
    op = f"oppsync__{connection.replace('-', '_')}__extract"
    return setup.job(connection).execute_in_process(
        run_config={"ops": {op: {"config": {"mode": mode}}}}, instance=instance, raise_on_error=False
    )


def test_a_good_sync_passes_every_check_and_reports_its_numbers(setup: Setup, dagster_instance):
    live = len(list(setup.world("sf-good").live()))
    result = run(setup, "sf-good", dagster_instance, mode="full")
    assert result.success

    meta = materialized(result)
    extract, opportunities = meta[key("sf-good", "extract")], meta[key("sf-good", "opportunities")]
    assert extract["mode"] == "full" and extract["since"] == "full read"
    assert extract["rows_fetched_open"] + extract["rows_fetched_not_open"] == live
    assert extract["api_requests"] > 0 and extract["quota_limit"] > 0  # Salesforce reports its allocation
    assert opportunities["rows_created"] == opportunities["rows_fetched"] == live
    assert opportunities["warehouse_open"] + opportunities["warehouse_won"] + opportunities["warehouse_lost"] == live

    evaluations = checks(result)
    assert {name: e.passed for name, e in evaluations.items()} == {
        "extract_quality": True,
        "counts_match_crm": True,
        "quarantine": True,
        "attribution_and_stages": True,
    }
    quality = evaluations["extract_quality"].metadata
    assert quality["rows_checked"].value == live and quality["failed_expectations"].value == 0
    counts = evaluations["counts_match_crm"].metadata
    assert counts["read_open"].value == counts["warehouse_open"].value == extract["rows_fetched_open"]
    # the CRM's own count (SOQL totalSize of the set's query) and what its pages delivered agree
    assert counts["crm_count_open"].value == counts["received_open"].value == extract["rows_fetched_open"]
    assert counts["deletes_inferred"].value is True
    assert [r[1] for r in setup.sync_runs("sf-good")] == ["success"]
    assert len(setup.rows("sf-good")) == live


def test_too_many_bad_records_block_the_run_and_reconcile_never_runs(setup: Setup, dagster_instance):
    """Bad records are quarantined one by one (tests/reliability/test_hostile_assets.py); beyond
    quarantine_max_share (1%; here 2 of 120) the extract itself fails, naming them, and nothing changes."""
    assert run(setup, "sf-bad", dagster_instance).success
    before = setup.rows("sf-bad")
    world = setup.world("sf-bad")
    negative, future = [o.native_id for o in list(world.live())[:2]]
    world.update(negative, amount=-5.0)
    world.update(future, created_at=world.clock.now() + timedelta(days=3))

    result = run(setup, "sf-bad", dagster_instance)

    assert not result.success
    assert materialized(result) == {}
    failed_steps = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE}
    assert failed_steps == {"oppsync__sf_bad__extract"}
    assert "oppsync__sf_bad__opportunities" not in started_steps(result)
    assert setup.rows("sf-bad") == before  # warehouse unchanged
    runs = setup.sync_runs("sf-bad")
    assert [r[1] for r in runs] == ["success", "failed"]
    # the error names the records and fields to look at in the CRM, and the key to change
    assert f"{negative}.amount: negative amount" in runs[-1][2] and f"{future}.created_at" in runs[-1][2]
    assert "quarantine_max_share" in runs[-1][2]
    assert setup.lock_holder("sf-bad") is None

    # the CRM's data is corrected: the next run applies it
    world.update(negative, amount=5.0)
    world.update(future, created_at=world.clock.now() - timedelta(days=1))
    again = run(setup, "sf-bad", dagster_instance)
    assert again.success
    assert setup.rows("sf-bad")[negative][1] == 5.0
    assert [r[1] for r in setup.sync_runs("sf-bad")] == ["success", "failed", "success"]


def test_a_bad_extract_fails_the_blocking_check_and_reconcile_never_runs(setup: Setup, dagster_instance):
    """What no single record shows: one id served twice in a set with the same modification time and different
    values. The blocking quality check refuses the extract before reconcile."""
    from tests.reliability.harness import PageHook

    assert run(setup, "sf-bad", dagster_instance).success
    before = setup.rows("sf-bad")

    def conflicting_copy(records: list, n: int, req) -> None:
        if records and "StageName" in records[0]:
            records.append({**records[0], "Name": records[0]["Name"] + " (other version)"})

    hook = PageHook(setup.servers["sf-bad"].simulator, "salesforce", rewrite=conflicting_copy).install()
    try:
        result = run(setup, "sf-bad", dagster_instance)
    finally:
        hook.remove()

    assert not result.success
    assert set(materialized(result)) == {key("sf-bad", "extract")}  # no opportunities materialization
    quality = checks(result)["extract_quality"]
    assert not quality.passed and quality.severity == dg.AssetCheckSeverity.ERROR
    failures = quality.metadata["failures"].value
    assert [f["expectation"] for f in failures] == ["expect_compound_columns_to_be_unique"]
    assert failures[0]["partial_unexpected_list"], failures  # names the records to look at
    failed_steps = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE}
    assert failed_steps == {"oppsync__sf_bad__extract_extract_quality"}
    assert "oppsync__sf_bad__opportunities" not in started_steps(result)
    assert setup.rows("sf-bad") == before  # warehouse unchanged
    # recorded as refused, lock released: the next run is not locked out by this one
    runs = setup.sync_runs("sf-bad")
    assert runs[-1][1] == "refused" and "quality" in runs[-1][2]
    assert setup.lock_holder("sf-bad") is None
    assert run(setup, "sf-bad", dagster_instance).success


def test_a_spent_quota_skips_the_run_and_the_next_run_completes_the_data(setup: Setup, dagster_instance):
    simulator = setup.servers["sf-quota"].simulator
    # the org's allocation is 95% used by other integrations: the run stops at the first usage header (90%)
    simulator.api_usage = int(simulator.daily_limit * 0.95)
    skipped = run(setup, "sf-quota", dagster_instance)

    assert skipped.success  # a skip is not a failure: no alert, the schedule tries again next hour
    assert materialized(skipped) == {}
    assert "oppsync__sf_quota__opportunities" not in started_steps(skipped)
    assert setup.rows("sf-quota") == {}
    runs = setup.sync_runs("sf-quota")
    assert [r[1] for r in runs] == ["skipped"] and "quota" in runs[0][2]
    assert setup.lock_holder("sf-quota") is None

    simulator.api_usage = 0  # a new day
    done = run(setup, "sf-quota", dagster_instance)
    assert done.success
    assert materialized(done)[key("sf-quota", "extract")]["mode"] == "full"  # the bookmark never moved
    assert set(setup.rows("sf-quota")) == {o.native_id for o in simulator.world.live()}
    assert [r[1] for r in setup.sync_runs("sf-quota")] == ["skipped", "success"]


def test_a_full_sync_that_outgrows_its_quota_share_pauses_and_the_next_runs_complete_it(setup: Setup, dagster_instance):
    world = setup.world("at-paused")
    results = []
    for _ in range(10):
        results.append(run(setup, "at-paused", dagster_instance))
        if materialized(results[-1]):
            break
        world.clock.advance(timedelta(hours=1))  # the threshold's hour rolls on
    *paused, done = results
    assert paused and all(r.success and materialized(r) == {} for r in paused)  # a pause is not a failure
    assert all("oppsync__at_paused__opportunities" not in started_steps(r) for r in paused)
    assert done.success
    meta = materialized(done)
    assert meta[key("at-paused", "extract")]["mode"] == "full"
    assert meta[key("at-paused", "opportunities")]["rows_created"] == len(list(world.live()))
    assert set(setup.rows("at-paused")) == {o.native_id for o in world.live()}
    runs = setup.sync_runs("at-paused")
    assert [r[1] for r in runs] == ["paused"] * len(paused) + ["success"]
    assert all("quota.run_share" in r[2] and "next run reads on" in r[2] for r in runs[:-1])
    assert setup.lock_holder("at-paused") is None


def test_the_counts_check_compares_what_is_in_scope(setup: Setup, dagster_instance):
    """A stage-triggered connection reads every deal but tracks only those at or past the stage (and keeps
    those that moved back): the CRM's count and the warehouse's are both of what is in scope."""
    world = setup.world("sf-scoped")
    result = run(setup, "sf-scoped", dagster_instance, mode="full")
    assert result.success
    evaluations = checks(result)
    assert evaluations["counts_match_crm"].passed, evaluations["counts_match_crm"].metadata
    tracked = setup.rows("sf-scoped")
    assert 0 < len(tracked) < len(list(world.live()))
    # one tracked deal moves back before the trigger stage: still tracked, still counted on both sides
    back = next(
        o for o in world.live() if o.native_id in tracked and world.status(o) == "open" and o.stage != "Prospecting"
    )
    world.update(back.native_id, stage="Prospecting")
    again = run(setup, "sf-scoped", dagster_instance, mode="full")
    assert again.success and checks(again)["counts_match_crm"].passed
    assert set(setup.rows("sf-scoped")) == set(tracked)
    meta = materialized(again)[key("sf-scoped", "extract")]
    assert meta["scope"] != "none" and meta["read_by_id"] == 0
