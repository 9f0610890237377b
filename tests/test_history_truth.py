"""History truth, per CRM, end to end against the sandbox (real HTTP, real warehouse, the real sync):

  - a first full sync dates each historic close by the CRM's own close time, not by the record's last edit;
  - adding a filter makes the opportunities that no longer match `left_scope` (never `deleted`), removing it
    brings them back with `entered_scope`;
  - a stage-triggered connection tracks what reached the stage and keeps it when it moves back;
  - one CRM edit that closes a deal and renames it writes exactly one event row per kind, sharing a change_id;
  - (both warehouses) marts.outcomes places every historic win and loss in the month it closed.

The expectations come from the simulator's world (when each deal closed, which stage it stands at), never
from the connector under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.dbt_env import DBT_PROJECT_DIR, dbt_env, dbt_target
from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

SIZE = {"connectwise": 100}
FAST = {"hubspot": {"options": {"search_requests_per_second": 0}}}
# The CRM field of the opportunity's owner (a server-side filter on it excludes one owner's deals).
OWNER_FIELD = {
    "salesforce": "OwnerId",
    "hubspot": "hubspot_owner_id",
    "dynamics": "_ownerid_value",
    "connectwise": "primarySalesRep/id",
    "autotask": "ownerResourceID",
}
# The CRM's own close-time fields of a default tenant (what closed_at_source may name).
CLOSE_FIELDS = {
    "salesforce": {"LastStageChangeDate"},
    "hubspot": {"hs_closed_won_date", "hs_closed_lost_date"},
    "dynamics": {"actualclosedate"},
    "connectwise": {"closedDate"},
    "autotask": {"closedDate", "lostDate"},
}
# Dataverse keeps actualclosedate as a date: the close is that day at 00:00.
DATE_ONLY = {"dynamics"}


def expected_close(crm: str, closed_at: datetime) -> datetime:
    return datetime.combine(closed_at.date(), datetime.min.time()) if crm in DATE_ONLY else closed_at


def config(crm: str, server, url: str, tmp_path: Path, **connection):
    extra = {crm: {**FAST.get(crm, {}), **connection}}
    return sandbox_config({crm: server}, url, tmp_path, extra=extra)


def rows(engine, sql: str, **params) -> list:
    with engine.connect() as c:
        return c.execute(text(sql), params).fetchall()


def run_events(engine, run_id: str) -> list:
    return rows(
        engine,
        "SELECT source_id, event_type, occurred_at, changed_fields, change_id "
        "FROM oppsync.opportunity_events WHERE run_id = :r ORDER BY source_id, event_type",
        r=run_id,
    )


@pytest.fixture(params=CRMS)
def tenant(request, tmp_path):
    crm = request.param
    sim = build_simulator(crm, seed=11, opportunities=SIZE.get(crm, 150))
    with SandboxServer(sim) as server:
        yield crm, sim, server


def test_historic_closes_are_dated_by_the_crm_and_a_new_close_is_one_event_per_kind(tenant, duckdb_url, tmp_path):
    """A first full sync dates each historic close by the CRM's close time; then one CRM edit that closes a deal
    and renames it writes exactly one event row per kind, sharing a change_id."""
    crm, sim, server = tenant
    cfg = config(crm, server, duckdb_url, tmp_path)
    engine = make_engine(cfg.warehouse.url)
    ensure_schema(engine)
    sync_connection(cfg, cfg.connections[0], engine, run_id="r1")

    got = {
        r.source_id: r
        for r in rows(
            engine,
            "SELECT source_id, closed_at, closed_at_source, modified_at "
            "FROM oppsync.opportunities WHERE status <> 'open'",
        )
    }
    closed = [o for o in sim.world.live() if sim.world.status(o) != "open"]
    assert closed and len(got) == len(closed)
    wrong, moved_months = [], 0
    for o in closed:
        row = got[o.native_id]
        if row.closed_at != expected_close(crm, o.closed_at) or row.closed_at_source not in CLOSE_FIELDS[crm]:
            wrong.append((o.native_id, row.closed_at, row.closed_at_source, o.closed_at))
        moved_months += (row.closed_at.year, row.closed_at.month) != (row.modified_at.year, row.modified_at.month)
    assert not wrong, wrong[:5]
    # the point of it: most of these closes happened in another month than their last edit
    assert moved_months > len(closed) / 2
    events = rows(
        engine,
        "SELECT e.source_id, e.occurred_at, o.closed_at FROM oppsync.opportunity_events e "
        "JOIN oppsync.opportunities o ON o.source_id = e.source_id AND o.connection = e.connection "
        "WHERE e.event_type IN ('closed_won', 'closed_lost')",
    )
    assert len(events) == len(closed) and all(e.occurred_at == e.closed_at for e in events)

    world = sim.world
    opp = next(o for o in world.live() if world.status(o) == "open")
    won = world.stage_for(world.stages[opp.stage].pipeline, "won")
    world.clock.advance(timedelta(minutes=5))
    world.update(opp.native_id, stage=won.key, name=opp.name + " (signed)")
    world.clock.advance(timedelta(minutes=5))
    out = sync_connection(cfg, cfg.connections[0], engine, run_id="r2")
    events = [e for e in run_events(engine, "r2") if e.source_id == opp.native_id]
    assert [e.event_type for e in events] == ["closed_won", "updated"]
    closed, updated = events
    # the rename (and the probability the stage brought along), none of the fields the close owns
    fields = set(updated.changed_fields.split(","))
    assert "project_name" in fields and not fields & {"status", "stage", "stage_id", "crm_status", "crm_closed_at"}
    assert "status" in closed.changed_fields and "project_name" not in closed.changed_fields
    assert closed.change_id == updated.change_id == f"r2:{opp.native_id}"
    assert closed.occurred_at == expected_close(crm, world.get(opp.native_id).closed_at)
    assert (out.result.closed, out.result.updated, out.result.stage_changed) == (1, 1, 0)


def test_a_filter_added_then_removed_moves_opportunities_out_of_scope_and_back_never_deleting(
    tenant, duckdb_url, tmp_path
):
    crm, sim, server = tenant
    cfg = config(crm, server, duckdb_url, tmp_path)
    engine = make_engine(cfg.warehouse.url)
    ensure_schema(engine)
    sync_connection(cfg, cfg.connections[0], engine, run_id="r1")
    owners = Counter(r.owner_crm_id for r in rows(engine, "SELECT owner_crm_id FROM oppsync.opportunities"))
    owner, n = next((o, k) for o, k in owners.most_common() if o is not None)
    excluded = {
        r.source_id
        for r in rows(engine, "SELECT source_id FROM oppsync.opportunities WHERE owner_crm_id = :o", o=owner)
    }
    assert n == len(excluded) > 0

    filtered = config(
        crm, server, duckdb_url, tmp_path, filters=[{"field": OWNER_FIELD[crm], "op": "not_equal", "value": owner}]
    )
    out = sync_connection(filtered, filtered.connections[0], engine, run_id="r2")  # auto: the scope changed
    assert out.extract.mode == "full" and out.result.deleted == 0
    assert out.extract.stats["out_of_scope_by_id"] == len(excluded)
    events = run_events(engine, "r2")
    assert {e.event_type for e in events} == {"left_scope"}
    assert {e.source_id for e in events} == excluded
    assert out.result.left_scope == len(excluded)
    state = {
        r.source_id: (r.in_scope, r.deleted_at)
        for r in rows(engine, "SELECT source_id, in_scope, deleted_at FROM oppsync.opportunities")
    }
    assert all(state[s] == (False, None) for s in excluded)
    assert all(in_scope and deleted is None for s, (in_scope, deleted) in state.items() if s not in excluded)
    warning = rows(engine, "SELECT warnings FROM oppsync.sync_runs WHERE run_id = 'r2'")[0][0]
    assert "scope changed" in warning and OWNER_FIELD[crm] in warning

    again = sync_connection(filtered, filtered.connections[0], engine, run_id="r3", mode="full")
    assert run_events(engine, "r3") == [] and again.result.deleted == 0  # out of scope stays out, quietly

    back = sync_connection(cfg, cfg.connections[0], engine, run_id="r4")
    assert back.extract.mode == "full"
    events = run_events(engine, "r4")
    assert {e.event_type for e in events} == {"entered_scope"} and {e.source_id for e in events} == excluded
    assert rows(engine, "SELECT count(*) FROM oppsync.opportunity_events WHERE event_type = 'deleted'")[0][0] == 0


def _stage_attr(world) -> str:
    return "sales_stage" if world.sales_stages else "stage"


def _stage_of(world, opp):
    return world.sales_stage_of(opp)


def _open_stages(world, pipeline: str | None) -> list:
    stages = (world.sales_stages or world.stages).values()
    return sorted(
        (s for s in stages if not s.is_closed and (pipeline is None or s.pipeline == pipeline)), key=lambda s: s.order
    )


def test_a_stage_triggered_connection_tracks_what_reached_the_stage_and_keeps_it(tenant, duckdb_url, tmp_path):
    crm, sim, server = tenant
    world = sim.world
    pipeline = _stage_of(world, next(iter(world.live()))).pipeline if not world.sales_stages else None
    opens = _open_stages(world, pipeline)
    trigger = opens[1]

    def reached(o) -> bool:
        s = _stage_of(world, o)
        same = [
            t
            for t in (world.sales_stages or world.stages).values()
            if t.label == trigger.label and t.pipeline == s.pipeline
        ]
        return bool(same) and s.order >= same[0].order

    cfg = config(crm, server, duckdb_url, tmp_path, track_from_stage=trigger.label)
    engine = make_engine(cfg.warehouse.url)
    ensure_schema(engine)
    sync_connection(cfg, cfg.connections[0], engine, run_id="r1")
    tracked = {r.source_id for r in rows(engine, "SELECT source_id FROM oppsync.opportunities")}
    expected = {o.native_id for o in world.live() if reached(o)}
    assert tracked == expected and 0 < len(tracked) < len(list(world.live()))

    attr = _stage_attr(world)
    in_pipeline = [o for o in world.live() if pipeline is None or _stage_of(world, o).pipeline == pipeline]
    back = next(o for o in in_pipeline if o.native_id in tracked and world.status(o) == "open")
    newly = next(o for o in in_pipeline if o.native_id not in tracked and world.status(o) == "open")
    world.clock.advance(timedelta(minutes=5))
    world.update(back.native_id, **{attr: opens[0].key})  # moved back before the trigger stage
    world.update(newly.native_id, **{attr: trigger.key})  # reaches it now
    world.clock.advance(timedelta(minutes=5))
    out = sync_connection(cfg, cfg.connections[0], engine, run_id="r2")
    assert out.extract.mode == "incremental"
    events = {(e.source_id, e.event_type): e for e in run_events(engine, "r2")}
    assert (back.native_id, "stage_changed") in events  # still tracked, its move recorded
    created = events[(newly.native_id, "created")]
    stored = rows(
        engine, "SELECT created_at, stage FROM oppsync.opportunities WHERE source_id = :s", s=newly.native_id
    )[0]
    assert created.occurred_at == stored.created_at < out.extract.started_at - timedelta(minutes=5)
    assert (
        rows(engine, "SELECT stage FROM oppsync.opportunities WHERE source_id = :s", s=back.native_id)[0][0]
        == opens[0].label
    )
    full = sync_connection(cfg, cfg.connections[0], engine, run_id="r3", mode="full")
    assert full.result.deleted == 0 and full.result.left_scope == 0  # the full read keeps it too


def test_a_by_id_answer_of_the_wrong_shape_fails_the_run_and_deletes_nothing(duckdb_url, tmp_path):
    """The by-id read decides what is deleted: a HubSpot batch read that answers valid JSON without its
    `results` list must fail the sync, not make every asked deal look gone."""
    from oppsync_pipeline.lib.sync import ExtractFailed
    from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule

    faults = FaultPlan([FaultRule("wrong_shape", count=0, path="objects/deals/batch/read")])
    sim = build_simulator("hubspot", seed=11, opportunities=150, faults=faults)
    with SandboxServer(sim) as server:
        cfg = config("hubspot", server, duckdb_url, tmp_path)
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        sync_connection(cfg, cfg.connections[0], engine, run_id="r1")
        owner = rows(engine, "SELECT owner_crm_id FROM oppsync.opportunities WHERE owner_crm_id IS NOT NULL")[0][0]
        filtered = config(
            "hubspot",
            server,
            duckdb_url,
            tmp_path,
            filters=[{"field": OWNER_FIELD["hubspot"], "op": "not_equal", "value": owner}],
        )
        with pytest.raises(ExtractFailed, match="without a `results` list"):
            sync_connection(filtered, filtered.connections[0], engine, run_id="r2")
    assert rows(engine, "SELECT count(*) FROM oppsync.opportunity_events WHERE run_id = 'r2'")[0][0] == 0
    assert (
        rows(engine, "SELECT count(*) FROM oppsync.opportunities WHERE deleted_at IS NOT NULL OR in_scope IS FALSE")[0][
            0
        ]
        == 0
    )


# --- the backfill rule, through the mart, on both warehouses ------------------------------------------------


def test_the_outcomes_mart_places_each_historic_win_and_loss_in_its_close_month(warehouse_url, tmp_path):
    sims = {crm: build_simulator(crm, seed=5, opportunities=SIZE.get(crm, 120)) for crm in CRMS}
    servers = {crm: SandboxServer(sim) for crm, sim in sims.items()}
    for s in servers.values():
        s.start()
    try:
        cfg = sandbox_config(servers, warehouse_url, tmp_path, extra=FAST)
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        for conn in cfg.connections:
            sync_connection(cfg, conn, engine, run_id=f"first-{conn.name}")
    finally:
        for s in servers.values():
            s.stop()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DBT_", "OPPSYNC_"))},
        **dbt_env(cfg),
        "DBT_TARGET_PATH": str(tmp_path / "dbt_target"),
        "DBT_LOG_PATH": str(tmp_path / "dbt_logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    dbt = Path(sys.executable).parent / "dbt"
    # the models only (their data and unit tests run in tests/dbt)
    proc = subprocess.run(
        [
            str(dbt),
            "run",
            "--select",
            "+outcomes",
            "--project-dir",
            str(DBT_PROJECT_DIR),
            "--profiles-dir",
            str(DBT_PROJECT_DIR),
            "--target",
            dbt_target(cfg),
        ],
        cwd=DBT_PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]

    expected: Counter = Counter()
    for crm, sim in sims.items():
        for o in sim.world.live():
            status = sim.world.status(o)
            if status != "open":
                close = expected_close(crm, o.closed_at)
                expected[(f"sandbox-{crm}", status, close.date().replace(day=1))] += 1
    got: Counter = Counter()
    for r in rows(
        engine,
        "SELECT connection, period_start, sum(opportunities_won) AS won, "
        "sum(opportunities_lost) AS lost FROM marts.outcomes WHERE period_grain = 'month' "
        "GROUP BY connection, period_start",
    ):
        for status, n in (("won", r.won), ("lost", r.lost)):
            if n:
                got[(r.connection, status, r.period_start)] += int(n)
    assert got == expected
    # two years of history: the closes spread over many months
    assert len({k[2] for k in expected}) > 12
