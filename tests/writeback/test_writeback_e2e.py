"""Revenue write-back, end to end, per CRM and per warehouse (issue 17's acceptance):

  dry run shows the diff and writes nothing; a write sets exactly the mapped fields (read back through the
  API); a second run writes nothing; an injected 500 is retried; a 400 on one row fails that row only; a
  permanent 403 stops the run naming the permission; an edit made in the CRM after our write is a conflict
  unless forced; the next sync sees the write as an ordinary `updated` event.

The sandbox is the CRM: values are read back through each CRM's own API (the writer's read), and the
per-CRM writer tests check the raw records field by field.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.writeback.engine import run_writeback, writer_for
from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows
from oppsync_pipeline.sandbox.cluster import build_simulator
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config

WRITERS = list(REGISTRY)
NOW = datetime(2026, 12, 1, 10, 0)


def _setup(crm: str, warehouse_url: str, tmp_path: Path, server: SandboxServer, **extra):
    spec = REGISTRY[crm]
    options = {**spec.test_options}  # not lean: ConnectWise amounts come from the forecast the writer writes
    cfg = sandbox_config(
        {crm: server}, warehouse_url, tmp_path, extra={crm: {"options": options, **extra}} if options or extra else None
    )
    conn = cfg.connections[0]
    engine = make_engine(cfg.warehouse.url)
    ensure_schema(engine)
    sync_connection(cfg, conn, engine, run_id="sync-1")
    with engine.connect() as c:
        ids = [
            r[0]
            for r in c.execute(
                text(
                    "SELECT source_id FROM oppsync.opportunities WHERE connection = :c AND deleted_at IS NULL "
                    "AND status = 'open' ORDER BY source_id LIMIT 3"
                ),
                {"c": conn.name},
            )
        ]
    return cfg, conn, engine, ids


def _log(engine, run_id: str) -> list[tuple]:
    with engine.connect() as c:
        return c.execute(
            text("SELECT opportunity_id, field, status FROM oppsync.writeback_log WHERE run_id = :r ORDER BY 1, 2"),
            {"r": run_id},
        ).fetchall()


def _crm_values(cfg, conn, opp_id: str) -> dict:
    return writer_for(build_connector(cfg, conn)).read_current(opp_id).values


@pytest.mark.parametrize("crm", WRITERS)
def test_writeback_round_trip(crm: str, warehouse_url: str, tmp_path: Path):
    sim = build_simulator(crm, seed=5, opportunities=40)
    with SandboxServer(sim) as server:
        cfg, conn, engine, ids = _setup(crm, warehouse_url, tmp_path, server)
        target, other = ids[0], ids[1]
        upsert_rows(engine, [revenue_row(conn.name, target, NOW), revenue_row(conn.name, other, NOW)])
        before = _crm_values(cfg, conn, target)

        dry = run_writeback(cfg, engine, conn.name, dry_run=True, run_id="wb-dry", now=NOW)
        assert dry.counts.get("planned") == 2, dry.rows
        assert dry.rows[0].changes, "a dry run shows the per-field diff"
        assert _crm_values(cfg, conn, target) == before, "a dry run writes nothing"
        assert {s for _, _, s in _log(engine, "wb-dry")} == {"planned"}

        wrote = run_writeback(cfg, engine, conn.name, run_id="wb-1", now=NOW)
        assert wrote.ok and wrote.counts == {"written": 2}, wrote.rows
        writer = writer_for(build_connector(cfg, conn))
        from oppsync_pipeline.lib.writeback.contract import validate

        row = validate([revenue_row(conn.name, target, NOW)])[0][0]
        desired = writer.desired(row)
        after = writer.read_current(target).values
        for field, value in desired.items():
            assert field in after, f"{field} not readable after the write"
            from oppsync_pipeline.lib.writeback.writer import same

            assert same(after[field], value), (field, after[field], value)
        written_fields = {f for o, f, s in _log(engine, "wb-1") if o == target and s == "written"}
        assert written_fields == {f for f in desired if f not in before or not same(before[f], desired[f])}

        again = run_writeback(cfg, engine, conn.name, run_id="wb-2", now=NOW)
        assert again.counts == {"unchanged": 2} and again.fields_written == 0
        assert {(f, s) for _, f, s in _log(engine, "wb-2")} == {(None, "unchanged")}

        # the next sync sees the write as an ordinary update (Dynamics: a quote line is not the opportunity's
        # estimatedvalue, so the opportunity itself does not change)
        sim.world.clock.advance(__import__("datetime").timedelta(minutes=1))
        step = sync_connection(cfg, conn, engine, run_id="sync-2", mode="full")
        if crm != "dynamics":
            with engine.connect() as c:
                events = c.execute(
                    text(
                        "SELECT event_type FROM oppsync.opportunity_events WHERE run_id = 'sync-2' AND source_id = :s"
                    ),
                    {"s": target},
                ).fetchall()
                amount = c.execute(
                    text("SELECT amount FROM oppsync.opportunities WHERE connection = :c AND source_id = :s"),
                    {"c": conn.name, "s": target},
                ).scalar()
            assert ("updated",) in events, (events, step.result)
            assert amount is not None


@pytest.mark.parametrize("crm", WRITERS)
def test_writeback_failures_and_conflicts(crm: str, warehouse_url: str, tmp_path: Path):
    sim = build_simulator(crm, seed=6, opportunities=40)
    with SandboxServer(sim) as server:
        cfg, conn, engine, ids = _setup(crm, warehouse_url, tmp_path, server)
        a, b, c_ = ids
        upsert_rows(engine, [revenue_row(conn.name, i, NOW) for i in (a, b, c_)])
        assert run_writeback(cfg, engine, conn.name, run_id="wb-1", now=NOW).ok

        # new numbers for all three; the CRM answers the first PATCH with a 500: retried, then written
        upsert_rows(
            engine,
            [revenue_row(conn.name, i, NOW, total_contract_revenue=77_777.0, ps_revenue=7_000.0) for i in (a, b, c_)],
        )
        sim.faults = FaultPlan([FaultRule("server_error", method="PATCH", count=1)])
        retried = run_writeback(cfg, engine, conn.name, run_id="wb-2", now=NOW, sleep=lambda s: None)
        assert retried.ok and retried.counts == {"written": 3}, retried.rows

        # a 400 on one row's write: that row fails, the others are written
        upsert_rows(
            engine,
            [revenue_row(conn.name, i, NOW, total_contract_revenue=88_888.0, ps_revenue=8_000.0) for i in (a, b, c_)],
        )
        sim.faults = FaultPlan([FaultRule("bad_request", method="PATCH", count=1)])
        one_bad = run_writeback(cfg, engine, conn.name, run_id="wb-3", now=NOW)
        assert sorted(str(r.status) for r in one_bad.rows) == ["failed", "written", "written"], one_bad.rows
        assert not one_bad.ok

        # a permanent 403 on writes: the run stops and names the permission; nothing else is touched
        upsert_rows(
            engine,
            [revenue_row(conn.name, i, NOW, total_contract_revenue=99_999.0, ps_revenue=9_000.0) for i in (a, b, c_)],
        )
        sim.faults = FaultPlan([FaultRule("forbidden", method="PATCH|POST|PUT", path=WRITE_PATHS_ANY, count=0)])
        refused = run_writeback(cfg, engine, conn.name, run_id="wb-4", now=NOW)
        assert refused.error and "grant" in refused.error, refused.error
        assert {str(r.status) for r in refused.rows} <= {"failed", "not_attempted"}
        sim.faults = FaultPlan()

        # someone edits the CRM after our write: a conflict, not overwritten unless forced
        writer = writer_for(build_connector(cfg, conn))
        wrote = run_writeback(cfg, engine, conn.name, opportunity_ids=[a], run_id="wb-5", now=NOW)
        assert wrote.counts == {"written": 1}, wrote.rows
        field = next(iter(writer.desired(_row(conn.name, a))))
        writer.write(a, {field: 12_345.0}, writer.read_current(a))  # another user's edit, through the API
        upsert_rows(engine, [revenue_row(conn.name, a, NOW, total_contract_revenue=55_555.0, ps_revenue=5_500.0)])
        conflict = run_writeback(cfg, engine, conn.name, opportunity_ids=[a], run_id="wb-6", now=NOW)
        assert conflict.counts == {"conflict": 1} and "--force" in conflict.rows[0].error
        assert _crm_values(cfg, conn, a)[field] == pytest.approx(12_345.0)
        forced = run_writeback(cfg, engine, conn.name, opportunity_ids=[a], force=True, run_id="wb-7", now=NOW)
        assert forced.counts == {"written": 1}


def _row(connection: str, opp: str):
    from oppsync_pipeline.lib.writeback.contract import validate

    return validate([revenue_row(connection, opp, NOW, total_contract_revenue=55_555.0, ps_revenue=5_500.0)])[0][0]


# every write of the five CRMs (creates included: Dynamics quotes, ConnectWise forecast items)
WRITE_PATHS_ANY = (
    r"(?i)/sobjects/Opportunity/|/objects/(?:deals|0-3)/[^/]+$|/quotes|/quotedetails|/forecast|/opportunities$"
)
