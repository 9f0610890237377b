"""ConnectWise: a renamed company reaches the warehouse on the next incremental sync.

Renaming a company moves the company's own `_info/lastUpdated`, never its opportunities' (the change cursor),
so incremental reads also ask `/company/companies` for companies changed since the cursor and read their
opportunities again by `company/id in (...)`. Over HTTP against the simulator, no mocks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import requests

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.connectwise import COMPANY_CHUNK, ConnectWiseConnector
from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import live_client_names, sandbox_config

CREDS = dict(cw.SANDBOX_CREDENTIALS)
WARNING = "renamed companies reach the warehouse with the next full sync"


class CountingSession(requests.Session):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []  # (path under apis/3.0, query)

    def request(self, method, url, *args, **kwargs):
        path = url.split("?", 1)[0].split("/apis/3.0", 1)[-1]
        params = kwargs.get("params") or {}
        query = params.get("conditions", "") if isinstance(params, dict) else ""
        if not query and "?" in url:
            query = requests.utils.unquote(url.split("?", 1)[1])
        self.calls.append((path, query))
        return super().request(method, url, *args, **kwargs)


def connector(url: str, session: requests.Session | None = None, **kw) -> ConnectWiseConnector:
    conn = ConnectionConfig(
        name="sandbox-connectwise",
        crm="connectwise",
        base_url=url,
        credentials={k: "${CW_" + k.upper() + "}" for k in CREDS},
        page_size=kw.pop("page_size", 40),
        **kw,
    )
    return ConnectWiseConnector(conn, CREDS, sleep=lambda s: None, session=session)


def collect(conn: ConnectWiseConnector, since) -> dict:
    out = {}
    for open_set in (True, False):
        for page in conn.opportunities(open_set=open_set, since=since):
            assert 0 < len(page) <= conn.page_size
            for o in page:
                assert o.source_id not in out, "an opportunity came twice"
                assert (o.status == "open") == open_set
                out[o.source_id] = o
    return out


def rename(world, acc) -> None:
    """A user renames the company in CW: the company's lastUpdated moves, its opportunities' does not."""
    with world.lock:
        acc.name = acc.name + " (renamed)"
        acc.modified_at = world.clock.now()
        world.version += 1


def companies_with_live_opps(world, n: int) -> list:
    counts: dict[int, int] = {}
    for o in world.live():
        if o.account is not None:
            counts[o.account] = counts.get(o.account, 0) + 1
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return [world.accounts[a] for a in ranked[:n]]


@pytest.mark.parametrize("paging", ["navigable", "keyset"])
def test_incremental_read_picks_up_renamed_companies_each_opportunity_once(paging):
    sim = cw.build(seed=31, opportunities=300)
    world = sim.world
    with SandboxServer(sim) as srv:
        world.clock.advance(timedelta(minutes=5))
        since = world.clock.now()
        world.clock.advance(timedelta(minutes=5))
        renamed = companies_with_live_opps(world, 2)
        for acc in renamed:
            rename(world, acc)
        # one opportunity of a renamed company also changed itself: it must still come once
        of_renamed = {o.native_id for o in world.live() if o.account in {a.idx for a in renamed}}
        touched = sorted(of_renamed, key=int)[0]
        world.update(touched, amount=1234.5)
        changed = {o.native_id for o in world.live() if o.modified_at >= since}
        assert touched in changed and len(of_renamed) > 2

        session = CountingSession()
        conn = connector(srv.url, session=session, options={"paging": paging})
        before = srv.simulator.request_count
        got = collect(conn, since)
        assert set(got) == changed | of_renamed
        truth = cw.truth(sim)
        for sid in of_renamed:
            assert got[sid].client_name == truth[sid]["client_name"]
            assert got[sid].client_name.endswith(" (renamed)")
            assert got[sid].amount == truth[sid]["amount"]  # a re-read opportunity is complete, not partial
        # the companies are asked for once for both sets; their opportunities by company id, per set
        company_lists = [q for p, q in session.calls if p == "/company/companies"]
        assert len(company_lists) == 1 and "_info/lastUpdated>=[" in company_lists[0]
        by_company = [q for p, q in session.calls if p == "/sales/opportunities" and "company/id in (" in q]
        assert len(by_company) >= 2 and not any("_info/lastUpdated" in q for q in by_company)
        # every request counted, the extra ones included
        assert conn.stats.requests == len(session.calls) == srv.simulator.request_count - before

        # without a rename since the cursor: one company request per set pair, no re-read queries
        later = world.clock.now() + timedelta(seconds=1)
        world.clock.advance(timedelta(minutes=1))
        session2 = CountingSession()
        again = collect(connector(srv.url, session=session2, options={"paging": paging}), later)
        assert again == {}
        assert [p for p, _ in session2.calls if p == "/company/companies"] == ["/company/companies"]
        assert not [q for p, q in session2.calls if "company/id in (" in q]


def test_many_renamed_companies_are_read_in_chunks_of_ids():
    sim = cw.build(seed=32, opportunities=400)
    world = sim.world
    with SandboxServer(sim) as srv:
        since = world.clock.now()
        world.clock.advance(timedelta(minutes=1))
        for acc in world.accounts:
            rename(world, acc)
        assert len(world.accounts) > COMPANY_CHUNK
        session = CountingSession()
        conn = connector(srv.url, session=session, page_size=1000, options={"forecast": False})
        got = collect(conn, since)
        # every opportunity with a company (those without one have nothing to rename and did not change)
        assert set(got) == {o.native_id for o in world.live() if o.account is not None}
        assert all(o.client_name.endswith(" (renamed)") for o in got.values())
        chunks = -(-len(world.accounts) // COMPANY_CHUNK)
        by_company = [q for p, q in session.calls if "company/id in (" in q]
        assert len(by_company) == 2 * chunks  # one query per chunk and set (pages of 1000 suffice here)


def test_refused_company_read_warns_and_the_incremental_read_still_completes():
    sim = cw.build(seed=33, opportunities=120, variant="no_optional_rights")
    world = sim.world
    with SandboxServer(sim) as srv:
        since = world.clock.now()
        world.clock.advance(timedelta(minutes=1))
        rename(world, companies_with_live_opps(world, 1)[0])
        world.update(next(iter(world.live())).native_id, amount=99.0)
        changed = {o.native_id for o in world.live() if o.modified_at >= since}
        session = CountingSession()
        conn = connector(srv.url, session=session)
        got = collect(conn, since)
        assert set(got) == changed  # renames wait for the next full sync
        assert any(WARNING in w and "403" in w for w in conn.stats.warnings)
        # asked once (the refusal is remembered for the run), never retried per set
        assert [p for p, _ in session.calls if p == "/company/companies"] == ["/company/companies"]


def test_a_rename_after_a_full_sync_reaches_the_warehouse_incrementally(duckdb_url: str, tmp_path: Path):
    sim = cw.build(seed=34, opportunities=150)
    world = sim.world
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({"connectwise": srv}, duckdb_url, tmp_path)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        try:
            first = sync_connection(cfg, conn, engine, run_id="cw-full", mode="full")
            assert first.extract.status == "complete", first.extract.error
            world.clock.advance(timedelta(hours=1))
            acc = companies_with_live_opps(world, 1)[0]
            rename(world, acc)
            world.clock.advance(timedelta(minutes=10))
            of_renamed = {o.native_id for o in world.live() if o.account == acc.idx}
            inc = sync_connection(cfg, conn, engine, run_id="cw-inc", mode="incremental")
            assert inc.extract.status == "complete", inc.extract.error
            assert inc.extract.mode == "incremental"
            names = live_client_names(engine, conn.name)
            truth = cw.truth(sim)
            assert {sid: names[sid] for sid in truth} == {sid: t["client_name"] for sid, t in truth.items()}
            assert all(names[sid] == acc.name for sid in of_renamed)
            assert not (inc.extract.stats or {}).get("warnings")
        finally:
            engine.dispose()
