"""The engine's rules, the same for every CRM (checked here on the Salesforce simulator): which rows a trigger
writes, bad rows audited and never written, the lease shared with syncs, and configuration errors."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import ConfigError
from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.warehouse.lease import LockHeld, acquire_lock
from oppsync_pipeline.lib.writeback.engine import run_writeback
from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows
from oppsync_pipeline.sandbox.cluster import build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

NOW = datetime(2026, 12, 1, 10, 0)


@pytest.fixture
def synced(duckdb_url: str, tmp_path: Path):
    """A synced Salesforce tenant and four of its open opportunities; `configure(**keys)` re-reads the config
    with connection keys added (writeback: ...)."""
    sim = build_simulator("salesforce", seed=3, opportunities=30)
    with SandboxServer(sim) as server:

        def configure(**conn_keys):
            return sandbox_config({"salesforce": server}, duckdb_url, tmp_path, extra={"salesforce": conn_keys})

        cfg = configure()
        engine = make_engine(duckdb_url)
        ensure_schema(engine)
        sync_connection(cfg, cfg.connections[0], engine, run_id="sync-1")
        ids = sorted(o.native_id for o in sim.world.live() if sim.world.status(o) == "open")[:4]
        yield configure, engine, ids, sim


def amounts(sim, ids):
    return {i: sim.world.opps[i].amount for i in ids}


def test_approval_states_and_opt_outs(synced):
    configure, engine, (a, b, c, d), sim = synced
    cfg = configure()
    name = cfg.connections[0].name
    upsert_rows(
        engine,
        [
            revenue_row(name, a, NOW, approval_state="approved"),
            revenue_row(name, b, NOW, approval_state="submitted"),
            revenue_row(name, c, NOW, approval_state="draft"),
            revenue_row(name, d, NOW, approval_state="approved", skip_crm_update=True),
        ],
    )
    before = amounts(sim, [c])
    auto = run_writeback(cfg, engine, name, trigger="automatic", run_id="auto-1", now=NOW)
    status = {r.opportunity_id: str(r.status) for r in auto.rows}
    assert status == {a: "written", b: "written", c: "skipped", d: "skipped"}
    reasons = {r.opportunity_id: r.error for r in auto.rows}
    assert "draft" in reasons[c] and "skip_crm_update" in reasons[d]
    assert amounts(sim, [c]) == before, "a draft is never written"

    manual = run_writeback(cfg, engine, name, run_id="manual-1", now=NOW)  # the button ignores the row opt-out
    assert {r.opportunity_id: str(r.status) for r in manual.rows}[d] == "written"

    upsert_rows(engine, [revenue_row(name, a, NOW, total_contract_revenue=1.0)])
    opted_out = configure(writeback={"automatic": False})
    skipped = run_writeback(opted_out, engine, name, trigger="automatic", run_id="auto-2", now=NOW)
    assert {str(r.status) for r in skipped.rows} == {"skipped"}
    assert all("writeback.automatic is false" in r.error for r in skipped.rows if r.opportunity_id == a)
    assert sim.world.opps[a].amount != 1.0

    with pytest.raises(ConfigError, match=r"writeback.enabled is false"):
        run_writeback(configure(writeback={"enabled": False}), engine, name, now=NOW)


def test_bad_rows_are_audited_and_never_written(synced):
    configure, engine, (a, b, *_), sim = synced
    cfg = configure()
    name = cfg.connections[0].name
    upsert_rows(
        engine,
        [
            revenue_row(name, a, NOW, total_contract_revenue=-5.0),
            revenue_row(name, b, NOW, payment_frequency="weekly"),
            revenue_row(name, "006Hs00000000zzAAA", NOW),
            revenue_row(name, sorted(sim.world.opps)[-1], NOW),
        ],
    )
    before = amounts(sim, [a, b])
    result = run_writeback(cfg, engine, name, run_id="wb-1", now=NOW)
    assert sorted(str(r.status) for r in result.rows) == ["invalid", "invalid", "invalid", "written"]
    assert amounts(sim, [a, b]) == before
    with engine.connect() as conn:
        audited = conn.execute(
            text("SELECT opportunity_id, error FROM oppsync.writeback_log WHERE status = 'invalid' ORDER BY 1")
        ).fetchall()
    assert sorted(e.split(":")[0] for _, e in audited) == [
        "opportunity_id",
        "payment_frequency",
        "total_contract_revenue",
    ]
    assert any("negative amount" in e for _, e in audited) and any("weekly" in e for _, e in audited)


def test_writes_share_the_lease_with_syncs_and_dry_runs_need_none(synced):
    configure, engine, (a, *_), sim = synced
    cfg = configure()
    name = cfg.connections[0].name
    upsert_rows(engine, [revenue_row(name, a, NOW)])
    acquire_lock(engine, name, "a-sync-run", datetime.now(), timedelta(hours=1))
    with pytest.raises(LockHeld, match="a-sync-run"):
        run_writeback(cfg, engine, name, run_id="wb-1", now=datetime.now())
    dry = run_writeback(cfg, engine, name, dry_run=True, run_id="wb-2", now=datetime.now())
    assert [str(r.status) for r in dry.rows] == ["planned"]


def test_an_opportunity_without_a_row_is_named(synced):
    configure, engine, (a, *_), _ = synced
    cfg = configure()
    with pytest.raises(ConfigError, match=r"no row for \['nope'\]"):
        run_writeback(cfg, engine, cfg.connections[0].name, opportunity_ids=["nope"], now=NOW)
