"""ConnectWiseConnector against the ConnectWise simulator over HTTP (no HTTP mocks)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig, QuotaConfig, RecordFilter
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.connectwise import ConnectWiseConnector, render_condition
from oppsync_pipeline.lib.crm.http import CrmError, QuotaBudget, QuotaExhausted
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

CREDS = dict(cw.SANDBOX_CREDENTIALS)


def make_conn(url: str, **kw) -> ConnectionConfig:
    return ConnectionConfig(
        name="sandbox-connectwise",
        crm="connectwise",
        base_url=url,
        credentials={k: "${CW_" + k.upper() + "}" for k in CREDS},
        page_size=kw.pop("page_size", 60),
        **kw,
    )


def connector(url: str, creds: dict | None = None, **kw) -> ConnectWiseConnector:
    budget = kw.pop("budget", None)
    cls = connector_class("connectwise")
    return cls(make_conn(url, **kw), creds or CREDS, budget=budget, sleep=lambda s: None)


def collect(conn: ConnectWiseConnector, since=None) -> dict[str, object]:
    out = {}
    for open_set in (True, False):
        for page in conn.opportunities(open_set=open_set, since=since):
            assert len(page) <= conn.page_size
            for opp in page:
                assert opp.source_id not in out, "an opportunity came twice"
                out[opp.source_id] = opp
    return out


def expected(sim, o) -> dict:
    """The tenant's truth (the sandbox's own view, never the connector's) plus the fields it leaves out."""
    w = sim.world
    return dict(
        cw.truth(sim)[o.native_id],
        sales_executive=w.users[o.owner].name,
        probability=None if o.probability is None else float(int(round(o.probability / 10)) * 10),
        modified_at=o.modified_at,
    )


@pytest.fixture(scope="module")
def server():
    with SandboxServer(cw.build(seed=11, opportunities=500)) as srv:
        yield srv


def test_full_sync_equals_the_world_field_by_field(server):
    conn = connector(server.url)
    got = collect(conn)
    sim = server.simulator
    live = {o.native_id: o for o in sim.world.live()}
    assert set(got) == set(live)
    for sid, opp in got.items():
        want = expected(sim, live[sid])
        have = {k: getattr(opp, k) for k in want}
        assert have == want, sid
        assert opp.raw["id"] == int(sid) and opp.connection == "sandbox-connectwise" and opp.crm == "connectwise"
    # the discovered codebase is used, and every opportunity cost one forecast request
    assert conn._api_base.endswith("/v2025_1/apis/3.0")
    assert conn.stats.requests >= len(live)
    statuses = {o.status for o in got.values()}
    assert statuses == {"open", "won", "lost"}
    # "No Decision" is closed, neither won nor lost
    nd = [o for o in got.values() if o.crm_status == "No Decision"]
    assert nd and all(o.status == "lost" for o in nd)
    # stage is the sales stage's name, never the status; owners and creators are numeric member ids
    assert {o.stage for o in got.values()} == {name for _, name, _ in cw.SALES_STAGES}
    assert all(o.owner_crm_id.isdigit() and o.created_by_crm_id.isdigit() for o in got.values())
    # service_location is the site's address, with line 2 and line breaks in the canonical form
    assert any("Suite" in (o.service_location or "") for o in got.values())
    assert any(", Building B, " in (o.service_location or "") for o in got.values())
    assert not any("\n" in (o.service_location or "") for o in got.values())


def of_companies_changed(sim, since) -> set[str]:
    w = sim.world
    return {
        o.native_id for o in w.live() if o.account is not None and w.account_modified(w.accounts[o.account]) >= since
    }


@pytest.mark.parametrize("paging", ["navigable", "keyset"])
def test_incremental_after_activity_returns_every_change_including_ties(paging):
    sim = cw.build(seed=12, opportunities=600)
    with SandboxServer(sim) as srv:
        since = sim.world.clock.now()
        sim.world.advance(hours=3, rate=0.02)
        changed = {o.native_id for o in sim.world.live() if o.modified_at >= since}
        conn = connector(srv.url, page_size=7, options={"paging": paging})
        got = collect(conn, since=since)
        # plus the opportunities of companies renamed since (their own lastUpdated did not move)
        assert changed and set(got) == changed | of_companies_changed(sim, since)
        # bursts share one timestamp: check that some tie exists and all of it arrived
        stamps = [o.modified_at for o in got.values()]
        assert max(stamps.count(s) for s in set(stamps)) > 1
        for sid, opp in got.items():
            keys = ("status", "stage", "stage_id", "crm_status", "amount", "modified_at")
            assert {k: getattr(opp, k) for k in keys} == {
                k: v for k, v in expected(sim, sim.world.opps[sid]).items() if k in keys
            }
        # inclusive cursor: the records stamped exactly `since`-equal are kept
        edge = max(stamps)
        again = collect(connector(srv.url), since=edge)
        assert set(again) == {sid for sid, o in got.items() if o.modified_at >= edge} | of_companies_changed(sim, edge)


@pytest.mark.parametrize("paging,skipped", [("navigable", 1), ("keyset", 0)])
def test_a_record_leaving_the_set_between_pages(paging, skipped):
    """Offset paging re-evaluated per page skips one record when an earlier one leaves the set; keyset does not."""
    sim = cw.build(seed=17, opportunities=300)
    with SandboxServer(sim) as srv:
        before = {o.native_id for o in sim.world.live() if sim.world.status(o) == "open"}
        conn = connector(srv.url, page_size=20, options={"forecast": False, "paging": paging})
        pages = conn.opportunities(open_set=True, since=None)
        first = next(pages)
        sim.world.update(first[0].source_id, stage="2")  # won: leaves the open set
        seen = {o.source_id for o in first} | {o.source_id for page in pages for o in page}
        assert len(before - seen) == skipped


def test_full_sync_keyset_paging_equals_the_world(server):
    got = collect(connector(server.url, page_size=45, options={"paging": "keyset", "forecast": False}))
    assert set(got) == {o.native_id for o in server.simulator.world.live()}


def test_open_statuses_keep_the_crm_status_label(server):
    """Which records are open: tests/crm/test_contract.py. The record keeps the status label it has in CW."""
    got = collect(connector(server.url, open_statuses=["Open", "Quoted"], options={"forecast": False}))
    sim = server.simulator
    for opp in got.values():
        assert opp.crm_status == sim.world.stages[sim.world.opps[opp.source_id].stage].label
    assert any(o.crm_status == "Negotiation" for o in got.values())


def test_filters_are_pushed_down_and_escaped(server):
    sim = server.simulator
    acc = next(a for a in sim.world.accounts if '"' in a.name)
    f = RecordFilter(field="company/name", op="equal", value=acc.name)
    assert render_condition(f) == 'company/name = "' + acc.name.replace('"', '\\"') + '"'
    got = collect(connector(server.url, filters=[f]))
    assert set(got) == {o.native_id for o in sim.world.live() if o.account == acc.idx}
    # an injection attempt stays a string literal: nothing matches, nothing extra is returned
    evil = RecordFilter(field="name", op="equal", value='x" or id > 0 or name = "y\\')
    assert collect(connector(server.url, filters=[evil])) == {}
    # numbers and date-times are validated, never spliced raw
    with pytest.raises(CrmError):
        collect(connector(server.url, filters=[RecordFilter(field="company/id", op="equal", value="1 or 1=1")]))
    with pytest.raises(CrmError):
        collect(
            connector(
                server.url,
                filters=[RecordFilter(field="expectedCloseDate", op="more_than", value="2024-01-01] or id > [0")],
            )
        )
    # in, comparisons on dates, and a custom field (customFieldConditions + post-check)
    filters = [
        RecordFilter(field="status/name", op="in", value=["Open", "Won"]),
        RecordFilter(field="expectedCloseDate", op="at_least", value="2025-06-01"),
        RecordFilter(field="custom:Region", op="equal", value="West"),
    ]
    got = collect(connector(server.url, filters=filters))
    want = {
        o.native_id
        for o in sim.world.live()
        if sim.world.stages[o.stage].label in ("Open", "Won")
        and o.close_date is not None
        and o.close_date.isoformat() >= "2025-06-01"
        and cw.REGIONS[o.seq % 5] == "West"
    }
    assert want and set(got) == want


def test_created_at_from_a_custom_field(server):
    sim = server.simulator
    o = next(iter(sim.world.live()))
    sim.world.update(o.native_id, bump=False, **{"Original Created": "2019-05-04T03:02:01Z"})
    conn = connector(
        server.url,
        fields={"created_at": "custom:Original Created"},
        filters=[RecordFilter(field="id", op="equal", value=int(o.native_id))],
    )
    got = collect(conn)
    assert str(got[o.native_id].created_at) == "2019-05-04 03:02:01"


def test_users_are_members_by_numeric_id_with_the_identifier_in_alt_ids(server):
    """Members by numeric id (owner_crm_id / created_by_crm_id); the identifier (what crm_ids held before
    mapping version 2, and what _info/enteredBy holds) stays in alt_ids. That they resolve every owner and
    creator: tests/crm/test_contract.py."""
    users = {u.crm_user_id: u for u in connector(server.url).users()}
    for u in server.simulator.world.users:
        mine = users[u.alt_id]
        assert mine.crm_user_id == str(cw.MEMBER_ID_BASE + u.idx) and mine.alt_ids == (u.native_id,)
    got = collect(connector(server.url, options={"forecast": False}))
    assert all(o.amount is None for o in got.values())


def test_forecast_off_costs_one_request_per_page(server):
    conn = connector(server.url, page_size=100, options={"forecast": False, "codebase": "v4_6_release/"})
    got = collect(conn)
    pages = sum(
        -(-n // 100)
        for n in (
            sum(1 for o in got.values() if o.status == "open"),
            sum(1 for o in got.values() if o.status != "open"),
        )
    )
    sites = {(o.raw["company"]["id"], o.raw["site"]["id"]) for o in got.values() if o.raw.get("company")}
    # discovery: statuses, stages, members (one page), probabilities, one custom-field sample; no companyinfo
    # call; then one read per distinct company site (cached for the run), one count per set (a full read asks
    # CW how many records the set holds) and the pages
    assert conn.stats.requests == 5 + len(sites) + 2 + pages
    assert conn.stats.token_requests == 0  # Basic auth: there is no token call


def test_allowance_throttle_is_waited_out():
    sim = cw.build(seed=15, opportunities=200, requests_per_minute=4)
    with SandboxServer(sim) as srv:
        waits = []

        def sleep(seconds):  # the virtual clock moves instead of the test waiting
            waits.append(seconds)
            sim.world.clock.advance(timedelta(seconds=seconds))

        # a minute's allowance of 4 requests makes this read wait ~1,000 s in all: more than a run's default
        # budget of waits (quota.max_wait_seconds, 120 s), so this connection allows an hour
        conn = ConnectWiseConnector(
            make_conn(srv.url, page_size=25, options={"forecast": False}, quota=QuotaConfig(max_wait_seconds=3600)),
            CREDS,
            sleep=sleep,
        )
        got = collect(conn)
        assert set(got) == {o.native_id for o in sim.world.live()} and waits and conn.stats.rate_limited >= 1


def test_quota_budget_and_long_throttle_stop_the_run():
    sim = cw.build(
        seed=16, opportunities=200, faults=FaultPlan(rules=[FaultRule("rate_limit", after=2, count=1, seconds=3600)])
    )
    with SandboxServer(sim) as srv:
        conn = connector(srv.url, page_size=25)
        with pytest.raises(QuotaExhausted):
            collect(conn)
        assert conn.stats.retries == 0
        conn = connector(srv.url, page_size=25, budget=QuotaBudget(max_requests=5))
        with pytest.raises(QuotaExhausted):
            collect(conn)
        assert conn.stats.requests == 5


def test_no_delete_feed_and_hard_deletes_vanish(server):
    conn = connector(server.url, options={"forecast": False})
    assert list(conn.deleted(None)) == []
    victim = next(iter(server.simulator.world.live()))
    server.simulator.world.delete(victim.native_id)
    assert victim.native_id not in collect(conn)


def test_next_links_stay_on_the_api_host():
    from oppsync_pipeline.lib.crm.connectwise import _same_origin

    api = "http://127.0.0.1:1/v4_6_release/apis/3.0/sales/opportunities"
    assert (
        _same_origin("https://elsewhere.example/v4_6_release/apis/3.0/sales/opportunities?pageSize=5&page=2", api)
        == "http://127.0.0.1:1/v4_6_release/apis/3.0/sales/opportunities?pageSize=5&page=2"
    )
    assert _same_origin(None, api) is None
