"""A full sync that outgrows its share of the CRM's quota goes on in the next run (lib/resume.py): Autotask's
10,000 requests an hour per database, of which a run spends `quota.run_share`. Over HTTP against the Autotask
simulator (its hourly threshold counted on its clock), into both warehouses, no mocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.sync import ExtractFailed, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import OPPORTUNITY_PAGES
from tests.variants.test_variant_matrix import differences, truth_rows, warehouse_rows

# 600 opportunities in pages of 25 need ~80 requests (pages, their company and contact lookups, counts); a run
# may send 30 (0.3% of the 10,000 an hour), its metadata reads (zone, threshold, fields, currencies,
# resources) included: the full sync takes several runs.
TENANT = {"opportunities": 600}
OPTIONS = {"page_size": 25, "quota": {"run_share": 0.003}}


def extracts(engine, connection: str) -> list[tuple[str, str]]:
    with engine.connect() as c:
        return [
            tuple(r)
            for r in c.execute(
                text("SELECT extract_id, status FROM oppsync.extracts WHERE connection = :c ORDER BY finished_at"),
                {"c": connection},
            )
        ]


def staged(engine, extract_id: str) -> int:
    with engine.connect() as c:
        return c.execute(
            text("SELECT count(*) FROM oppsync.stage_opportunities WHERE extract_id = :x"), {"x": extract_id}
        ).scalar()


def resume_after(engine, extract_id: str) -> str | None:
    with engine.connect() as c:
        state = c.execute(
            text("SELECT resume_state FROM oppsync.extracts WHERE extract_id = :x"), {"x": extract_id}
        ).scalar()
    return json.loads(state)["after"]


def test_a_full_sync_larger_than_a_runs_quota_share_completes_over_several_runs(warehouse_url: str, tmp_path: Path):
    sim = at.build(seed=23, **TENANT)
    world = sim.world
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"autotask": srv}, warehouse_url, tmp_path, extra={"autotask": OPTIONS})
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        try:
            runs, requests, deleted, positions = [], 0, None, []
            for n in range(1, 12):
                out = sync_connection(cfg, conn, engine, run_id=f"run-{n}").extract
                runs.append(out.status)
                requests += out.stats.api_requests or 0
                if out.status != "paused":
                    break
                assert out.mode == "full" and "quota.run_share" in out.error and "paused" in out.error
                positions.append(resume_after(engine, out.extract_id))
                assert staged(engine, out.extract_id) == out.counts["open"] + out.counts["closed"] > 0
                assert warehouse_rows(engine, conn.name) == {}, "nothing reaches the warehouse before the end"
                # an hour passes (the threshold's window rolls on); the tenant changes meanwhile: a record
                # already staged is closed, another deleted, one is created, one edited
                world.clock.advance(timedelta(hours=1))
                live = sorted(world.live(), key=lambda o: int(o.native_id))
                if n == 1:
                    first_open = next(o for o in live if world.status(o) == "open")
                    world.update(first_open.native_id, stage=world.stage_for(None, "won").key)
                    deleted = world.delete(live[1].native_id).native_id
                    world.create()
                    world.update(live[2].native_id, amount=123456.0)
            assert runs[-1] == "complete" and len(runs) >= 3 and set(runs[:-1]) == {"paused"}, runs
            # paused within id ranges read side by side (their pages interleaved): the read went on from each
            # range's own last id (a single id would have skipped what the ranges below it had left)
            assert any(p and p.startswith("ranges:") and p.count("[") > 2 for p in positions), positions
            # the warehouse is the tenant as it is now (records closed, edited, created while the read paused),
            # but for the record deleted after it was staged: a full read infers deletes from what it did not
            # read, and the next full sync does (as for a record deleted during any one run's read)
            rows = warehouse_rows(engine, conn.name)
            assert deleted in rows
            problems = differences(truth_rows(sim), {k: v for k, v in rows.items() if k != deleted})
            assert not problems, "\n".join(problems[:20])
            statuses = [s for _, s in extracts(engine, conn.name)]
            assert statuses == ["resumed"] * (len(runs) - 1) + ["reconciled"], statuses
            # the runs together sent what one full read sends, plus per run its metadata reads (6) and what it had
            # read ahead when it paused (the next page, the lookups of the pages in flight): no staged page was
            # read twice (the unbounded sync below reads the same tenant, changed the same way)
            whole = sandbox_config({"autotask": srv}, warehouse_url, tmp_path, extra={"autotask": {"page_size": 25}})
            single = sync_connection(whole, whole.connections[0], engine, run_id="single", mode="full").extract
            assert single.status == "complete"
            assert not differences(truth_rows(sim), warehouse_rows(engine, conn.name))
            assert requests <= (single.stats.api_requests or 0) + 16 * len(runs), (requests, single.stats.api_requests)
        finally:
            engine.dispose()


@contextmanager
def paused_once(seed: int, url: str, tmp_path: Path) -> Iterator[tuple]:
    """A tenant whose first full sync paused, an hour ago: (simulator server, config, engine, first extract)."""
    sim = at.build(seed=seed, **TENANT)
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"autotask": srv}, url, tmp_path, extra={"autotask": OPTIONS})
        engine = make_engine(cfg.warehouse.url)
        try:
            first = sync_connection(cfg, cfg.connections[0], engine, run_id="first").extract
            assert first.status == "paused"
            sim.world.clock.advance(timedelta(hours=1))
            yield srv, cfg, engine, first
        finally:
            engine.dispose()


def test_a_paused_full_sync_starts_over_when_the_scope_changed(duckdb_url: str, tmp_path: Path):
    with paused_once(24, duckdb_url, tmp_path) as (srv, cfg, engine, first):
        scoped = {**OPTIONS, "filters": [{"field": "amount", "op": "at_least", "value": 0}]}
        narrowed = sandbox_config({"autotask": srv}, duckdb_url, tmp_path, extra={"autotask": scoped})
        second = sync_connection(cfg, narrowed.connections[0], engine, run_id="second").extract
        assert second.status == "paused"
        assert dict(extracts(engine, first.connection))["first"] == "superseded"
        assert staged(engine, "first") == 0
        assert staged(engine, "second") == second.counts["open"] + second.counts["closed"]


@pytest.mark.parametrize("mode", ["incremental", "auto"])
def test_any_run_of_the_connection_reads_a_paused_full_sync_on(mode: str, duckdb_url: str, tmp_path: Path):
    """A new extract would discard what the paused one staged: the next run reads it on, whatever it asked."""
    with paused_once(25, duckdb_url, tmp_path) as (_, cfg, engine, first):
        second = sync_connection(cfg, cfg.connections[0], engine, run_id="second", mode=mode).extract
        assert second.mode == "full" and second.status in ("paused", "complete")
        assert dict(extracts(engine, first.connection))["first"] == "resumed"
        assert second.counts["open"] + second.counts["closed"] > first.counts["open"] + first.counts["closed"]


def test_a_full_read_failed_by_the_crm_keeps_what_it_staged_and_the_next_run_reads_on(duckdb_url: str, tmp_path: Path):
    """A page the CRM answers with the wrong shape fails the run (nothing reaches the warehouse); the pages
    staged before it stay, and the next run (or the step's retry) reads on from the last id staged."""
    sim = at.build(seed=26, **TENANT)
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"autotask": srv}, duckdb_url, tmp_path, extra={"autotask": {"page_size": 25}})
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        try:
            sim.faults = FaultPlan([FaultRule("wrong_shape", after=8, count=1, path=OPPORTUNITY_PAGES["autotask"])])
            with pytest.raises(ExtractFailed, match="next run reads on"):
                sync_connection(cfg, conn, engine, run_id="first")
            assert warehouse_rows(engine, conn.name) == {}
            assert dict(extracts(engine, conn.name))["first"] == "paused"
            kept = staged(engine, "first")
            assert kept > 0
            sim.faults = FaultPlan([])
            second = sync_connection(cfg, conn, engine, run_id="second")
            assert second.extract.status == "complete" and second.extract.mode == "full"
            assert not differences(truth_rows(sim), warehouse_rows(engine, conn.name))
            assert second.result.fetched == len(truth_rows(sim))
            # the second run read only what the first had not staged (its pages, and their lookups)
            whole = sync_connection(cfg, conn, engine, run_id="whole", mode="full").extract
            assert second.extract.stats.api_requests < whole.stats.api_requests
        finally:
            engine.dispose()
