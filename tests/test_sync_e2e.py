"""End to end, per CRM and per warehouse: a full sync, simulated hours of CRM activity synced
incrementally, then a full sync. The warehouse must hold exactly the CRM's opportunities.

The reference is the CRM itself: its live ids come from the simulator's world, and its values from a
fresh full read through the connector (whose mapping each CRM's connector test checks field by field
against the world)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

COMPARED = (
    "status",
    "stage",
    "amount",
    "created_at",
    "created_by_crm_id",
    "owner_crm_id",
    "project_name",
    "close_date",
)
# Small tenants keep this fast; ConnectWise costs one forecast request per opportunity.
SIZE = {"connectwise": 250}
FAST = {"hubspot": {"options": {"search_requests_per_second": 0}}}


def crm_state(cfg, conn) -> dict[str, dict]:
    connector = build_connector(cfg, conn)
    rows = {}
    for open_set in (True, False):
        for page in connector.opportunities(open_set=open_set, since=None):
            for o in page:
                rows[o.source_id] = {f: getattr(o, f) for f in COMPARED}
    return rows


def warehouse_state(engine, connection: str) -> dict[str, dict]:
    with engine.connect() as c:
        result = c.execute(
            text(
                f"SELECT source_id, {', '.join(COMPARED)} FROM oppsync.opportunities "
                "WHERE connection = :c AND deleted_at IS NULL"
            ),
            {"c": connection},
        )
        return {r.source_id: {f: getattr(r, f) for f in COMPARED} for r in result}


def normalise(rows: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for sid, row in rows.items():
        r = dict(row)
        r["amount"] = None if r["amount"] is None else round(float(r["amount"]), 2)
        r["created_at"] = (
            r["created_at"].replace(microsecond=r["created_at"].microsecond // 1000 * 1000) if r["created_at"] else None
        )
        out[sid] = r
    return out


@pytest.mark.parametrize("crm", CRMS)
def test_full_then_incremental_then_full_matches_crm(crm: str, warehouse_url: str, tmp_path: Path):
    sim = build_simulator(crm, seed=7, opportunities=SIZE.get(crm, 600))
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, warehouse_url, tmp_path, extra=FAST)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)

        first = sync_connection(cfg, conn, engine, run_id="r1")
        assert first.extract.mode == "full" and first.result is not None
        assert first.result.created == len(list(sim.world.live()))

        for i in range(3):  # three simulated hours of activity, each synced incrementally
            sim.world.advance(hours=1, rate=0.03)
            step = sync_connection(cfg, conn, engine, run_id=f"r{i + 2}")
            assert step.extract.mode == "incremental"
            assert step.result is not None

        # Every value change that moves the CRM's change cursor has arrived (deletes wait for a full sync
        # where the CRM has no delete feed; silent formula-like changes are not compared here).
        expected = normalise(crm_state(cfg, conn))
        got = normalise(warehouse_state(engine, conn.name))
        common = set(expected) & set(got)
        assert set(expected) <= set(got), f"missing after incremental: {sorted(set(expected) - set(got))[:5]}"
        mismatched = {sid: (got[sid], expected[sid]) for sid in common if got[sid] != expected[sid]}
        assert not mismatched, f"{len(mismatched)} rows differ, e.g. {next(iter(mismatched.items()))}"

        final = sync_connection(cfg, conn, engine, run_id="r9", mode="full")
        assert final.result is not None
        live_ids = {o.native_id for o in sim.world.live()}
        got = normalise(warehouse_state(engine, conn.name))
        assert set(got) == {str(i) for i in live_ids}
        assert got == normalise(crm_state(cfg, conn))

        # Idempotent: the same state synced again changes nothing and records no event.
        with engine.connect() as c:
            events_before = c.execute(text("SELECT count(*) FROM oppsync.opportunity_events")).scalar()
        again = sync_connection(cfg, conn, engine, run_id="r10", mode="full")
        assert again.result.created == again.result.updated == again.result.deleted == 0
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM oppsync.opportunity_events")).scalar() == events_before
            runs = c.execute(text("SELECT status, count(*) FROM oppsync.sync_runs GROUP BY status")).fetchall()
        assert dict(runs) == {"success": 6}


@pytest.mark.parametrize("crm", ["salesforce", "hubspot", "dynamics"])
def test_native_delete_feeds_remove_deletes_in_incremental_runs(crm: str, duckdb_url: str, tmp_path: Path):
    """CRMs with a delete feed (Salesforce delete log, HubSpot archived deals, Dataverse change tracking
    whose delta link is kept in sync_state between runs) delete without waiting for a full sync."""
    sim = build_simulator(crm, seed=11, opportunities=300)
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, duckdb_url, tmp_path, extra=FAST)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        sync_connection(cfg, conn, engine, run_id="r1")
        gone = [o.native_id for o in list(sim.world.live())[:3]]
        for native_id in gone:
            sim.world.delete(native_id)
        sim.world.clock.advance(__import__("datetime").timedelta(minutes=2))
        step = sync_connection(cfg, conn, engine, run_id="r2")  # a new connector instance, as in production
        assert step.extract.mode == "incremental"
        assert step.result.deleted == 3
        with engine.connect() as c:
            deleted = {
                r[0]
                for r in c.execute(text("SELECT source_id FROM oppsync.opportunities WHERE deleted_at IS NOT NULL"))
            }
        assert deleted == {str(i) for i in gone}


def test_a_refused_dataverse_delta_link_starts_a_new_baseline(duckdb_url: str, tmp_path: Path):
    """A stored delta token the CRM no longer accepts (expired, or the sandbox restarted) must not fail the
    run: the connector starts a new baseline and the next full sync catches deletes in the gap."""
    sim = build_simulator("dynamics", seed=5, opportunities=120)
    with SandboxServer(sim) as server:
        cfg = sandbox_config({"dynamics": server}, duckdb_url, tmp_path)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        sync_connection(cfg, conn, engine, run_id="r1")
        with engine.begin() as c:
            token = c.execute(text("SELECT resume_token FROM oppsync.sync_state")).scalar()
            assert token and "deltatoken" in token.lower()
            stale = token.split("deltatoken=")[0] + "deltatoken=0%2111%2F22%2F2000%2000%3A00%3A00"
            c.execute(text("UPDATE oppsync.sync_state SET resume_token = :t"), {"t": stale})
        step = sync_connection(cfg, conn, engine, run_id="r2")
        assert step.result is not None and step.extract.status == "complete"
        with engine.connect() as c:
            fresh = c.execute(text("SELECT resume_token FROM oppsync.sync_state")).scalar()
        # the year of the stale link, "/2000 " encoded (a fresh link made at 00:xx holds "%2000" for the hour)
        assert fresh != stale and "%2F2000%20" not in fresh


@pytest.mark.parametrize("crm", ["hubspot", "autotask"])
def test_an_upgrade_to_a_new_mapping_rebaselines_with_one_full_read_and_no_update_events(
    crm: str, warehouse_url: str, tmp_path: Path
):
    """A warehouse written by an older connector (stage ids in `stage`, say): the next scheduled (auto) sync
    reads everything once, rewrites the values and records no `updated` / `stage_changed` events for it;
    the one after is incremental again."""
    sim = build_simulator(crm, seed=13, opportunities=150)
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, warehouse_url, tmp_path, extra=FAST)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        sync_connection(cfg, conn, engine, run_id="r1")
        with engine.begin() as c:  # as the previous release left it: stage keys, no stage_id, no version
            # (its digests were taken over fewer fields, so none matches a digest of today's values)
            c.execute(
                text(
                    "UPDATE oppsync.opportunities SET stage = 'old:' || COALESCE(stage_id, ''), "
                    "stage_id = NULL, crm_status = NULL, row_hash = 'digest of release 0.2'"
                )
            )
            c.execute(text("UPDATE oppsync.sync_state SET mapping_version = NULL"))
        upgrade = sync_connection(cfg, conn, engine, run_id="r2")
        assert upgrade.extract.mode == "full"
        assert upgrade.result.updated == 0 and upgrade.result.created == 0
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM oppsync.opportunity_events WHERE run_id = 'r2'")).scalar() == 0
            assert c.execute(text("SELECT count(*) FROM oppsync.opportunities WHERE stage LIKE 'old:%'")).scalar() == 0
            assert (
                "re-baselined" in c.execute(text("SELECT warnings FROM oppsync.sync_runs WHERE run_id = 'r2'")).scalar()
            )
        sim.world.advance(hours=1, rate=0.05)
        after = sync_connection(cfg, conn, engine, run_id="r3")
        assert after.extract.mode == "incremental"
