"""AutotaskConnector against the Autotask simulator over HTTP (no HTTP mocks)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig, QuotaConfig, RecordFilter
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.autotask import AutotaskConnector, render_filter
from oppsync_pipeline.lib.crm.http import CrmError, QuotaExhausted
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

CREDS = dict(at.SANDBOX_CREDENTIALS)


def make_conn(url: str, **kw) -> ConnectionConfig:
    return ConnectionConfig(
        name="at-test", crm="autotask", base_url=url, credentials={k: "${AT_" + k.upper() + "}" for k in CREDS}, **kw
    )


def connector(url: str, creds=None, **kw) -> AutotaskConnector:
    cls = connector_class("autotask")
    return cls(make_conn(url, **kw), dict(creds or CREDS), sleep=lambda s: None)


def fetch(c: AutotaskConnector, since=None, sets=(True, False)):
    out = {}
    for open_set in sets:
        for page in c.opportunities(open_set=open_set, since=since):
            assert len(page) <= c.page_size
            for o in page:
                assert o.source_id not in out
                out[o.source_id] = o
    return out


def expected(sim: at.AutotaskSimulator, o) -> dict:
    w = sim.world
    acc = w.accounts[o.account] if o.account is not None else None
    cid = sim.contact_for(o)
    contact = sim.contacts[cid - at.CONTACT_BASE] if cid else None
    executive = f"{contact['firstName']} {contact['lastName']}" if contact else w.users[o.owner].name
    location = None
    if acc is not None:
        country = at.COUNTRIES[acc.country][2] if acc.country in at.COUNTRIES else None
        line1, line2 = at.street_lines(acc)
        parts = [*(line1 or "").split("\n"), line2, acc.city, acc.state, acc.postal_code, country]
        location = ", ".join(x for x in parts if x) or None
    stage = w.sales_stages[o.sales_stage]
    return dict(
        project_name=o.name,
        client_name=acc.name if acc else None,
        service_location=location,
        sales_executive=executive,
        owner_crm_id=w.users[o.owner].native_id,
        stage=stage.label,
        stage_id=stage.key,
        crm_status=w.stages[o.stage].label,
        status=w.status(o),
        amount=o.amount if o.amount is not None else 0.0,
        close_date=o.close_date,
        probability=float(int(round(o.probability or 0))),
        created_at=o.created_at.replace(microsecond=o.created_at.microsecond // 1000 * 1000),
        created_by_crm_id=w.users[o.creator].native_id,
        modified_at=o.modified_at.replace(microsecond=o.modified_at.microsecond // 1000 * 1000),
    )


@pytest.fixture(scope="module")
def served():
    sim = at.build(seed=11, opportunities=1300)
    with SandboxServer(sim) as srv:
        yield sim, srv


def test_full_sync_equals_world_field_by_field(served):
    sim, srv = served
    c = connector(srv.url)  # default page size 500: the open set has more than 500 rows
    got = fetch(c)
    live = {o.native_id: o for o in sim.world.live()}
    assert set(got) == set(live)
    for sid, o in live.items():
        rec = got[sid]
        exp = expected(sim, o)
        assert {k: getattr(rec, k) for k in exp} == exp, sid
        assert rec.raw["id"] == int(sid) and rec.crm == "autotask" and rec.connection == "at-test"
    opens = [o for o in got.values() if o.status == "open"]
    assert len(opens) > 500 and {o.crm_status for o in opens} == {"Not Ready To Buy", "Active", "On Hold"}
    assert {o.status for o in got.values() if o.raw["status"] in (3, 4)} == {"won"}
    assert {o.stage for o in got.values() if o.raw["status"] in (3, 4)} == {"Closed Won"}
    # every address line is read: second lines, and streets typed over two lines become ", "
    assert any("Suite " in (o.service_location or "") for o in got.values())
    assert any("Gebäude B" in (o.service_location or "") for o in got.values())
    assert not any("\n" in (o.service_location or "") for o in got.values())
    # fallback to the owner's name is exercised (records without a contact)
    assert any(o.raw["contactID"] is None for o in got.values())
    # one zone lookup, one threshold poll, one picklist read, then queries; companies fetched in batches
    assert c.stats.requests < 40 and c.stats.quota_limit == 10_000 and c.stats.quota_used is not None


def test_stages_from_the_stage_picklist_statuses_from_the_status_picklist(served):
    sim, srv = served
    c = connector(srv.url)
    assert {k: s.label for k, s in c.stages().items()} == {
        "1": "Prospect",
        "2": "Qualified",
        "3": "Proposal",
        "4": "Negotiation",
        "5": "Verbal",
        "6": "Closed Won",
        "7": "Closed Lost",
    }
    assert {k: (s.label, s.category) for k, s in c.statuses().items()} == {
        "0": ("Not Ready To Buy", "open"),
        "1": ("Active", "open"),
        "2": ("Lost", "lost"),
        "3": ("Closed", "won"),
        "4": ("Implemented", "won"),
        "5": ("On Hold", "open"),
    }
    assert c.stage_name("6") == "Closed Won" and c.stage_name("99") == "99"
    assert c.stats.warnings == []


def test_incremental_returns_every_change_with_ties():
    sim = at.build(seed=12, opportunities=600)
    with SandboxServer(sim) as srv:
        since = sim.world.clock.now()
        names = [a.name for a in sim.world.accounts]
        counts = sim.world.advance(hours=3, rate=0.02)
        renamed = {a.idx for a in sim.world.accounts if a.name != names[a.idx]}
        assert renamed and counts["created"]
        changed = {o.native_id for o in sim.world.live() if o.modified_at >= since}
        # a renamed company does not touch its opportunities' lastActivity: they are re-read by company
        by_company = {o.native_id for o in sim.world.live() if o.account in renamed} - changed
        assert by_company
        changed |= by_company
        burst = [o.modified_at for o in sim.world.live() if o.modified_at >= since]
        assert len(burst) > len(set(burst))  # several records share one timestamp
        c = connector(srv.url, page_size=7)  # many pages
        got = fetch(c, since=since)
        assert set(got) == changed
        # the tie boundary: since == an exact shared timestamp is inclusive
        tie = max(set(burst), key=burst.count)
        got_tie = fetch(connector(srv.url, page_size=50), since=tie)
        assert {o.native_id for o in sim.world.live() if o.modified_at >= tie} | by_company == set(got_tie)
        # deletions are not reported (no delete feed) and drop out of the full set
        victim = next(iter(changed))
        sim.world.delete(victim)
        assert list(c.deleted(since)) == []
        assert victim not in fetch(connector(srv.url))


def test_filters_pushed_down_and_injection_safe(served):
    sim, srv = served
    live = list(sim.world.live())
    c = connector(
        srv.url,
        filters=[
            RecordFilter(field="amount", op="at_least", value=100000),
            RecordFilter(field="ownerResourceID", op="in", value=[int(u.native_id) for u in sim.world.users[:10]]),
        ],
    )
    got = fetch(c)
    want = {o.native_id for o in live if (o.amount or 0) >= 100000 and o.owner < 10}
    assert set(got) == want and want
    # few requests: the filter ran in Autotask, not after fetching everything
    assert c.stats.requests < 20
    region = 'O\'Hare "Central"'
    c = connector(srv.url, filters=[RecordFilter(field="udf:Region", op="equal", value=region)])
    got = fetch(c)
    assert set(got) == {o.native_id for o in live if sim._udf(o, "Region") == region} and got
    for hostile in ("x' or '1'='1", 'x" }, {"op": "gt", "field": "id", "value": 0', 'x\\"]'):
        c = connector(srv.url, filters=[RecordFilter(field="title", op="equal", value=hostile)])
        assert fetch(c) == {}
    assert render_filter(RecordFilter(field="udf:Region", op="not_equal", value="a'b")) == {
        "op": "noteq",
        "field": "Region",
        "value": "a'b",
        "udf": True,
    }


def test_created_fields_from_user_defined_fields(served):
    sim, srv = served
    c = connector(
        srv.url, fields={"created_at": "udf:Original Create Date", "created_by_crm_id": "udf:Original Creator"}
    )
    got = fetch(c, sets=(True,))
    legacy = [o for o in got.values() if o.raw["userDefinedFields"][1]["value"]]
    assert legacy and len(legacy) < len(got)
    for o in legacy:
        w = sim.world.get(o.source_id)
        assert o.created_at == (w.created_at - timedelta(days=30)).replace(
            microsecond=w.created_at.microsecond // 1000 * 1000
        )
        assert o.created_by_crm_id == str(at.USER_BASE + w.seq % 25)


def test_zone_move_mid_paging_is_rediscovered():
    sim = at.build(seed=13, opportunities=700, faults=FaultPlan([FaultRule("token_expiry", after=3, path="/query")]))
    with SandboxServer(sim) as srv:
        c = connector(srv.url, page_size=50)
        got = fetch(c)
        assert set(got) == {o.native_id for o in sim.world.live()}
        assert c.stats.token_refreshes == 1 and sim.zone == 2
        assert "/z2/" in c.client.base_url


def test_an_unknown_api_user_fails_the_zone_lookup():
    # a wrong secret: tests/crm/test_contract.py (every CRM)
    sim = at.build(seed=14, opportunities=20)
    with SandboxServer(sim) as srv:
        c = connector(srv.url, creds=dict(CREDS, username="nobody@example.com"))
        with pytest.raises(CrmError, match="zone lookup"):
            c.stages()
        assert c.stats.retries == 0


def test_threshold_429_waits_for_the_rolling_hour():
    sim = at.build(seed=16, opportunities=300, threshold=500, latency_scale=0)
    with SandboxServer(sim) as srv:
        slept = []

        def sleep(seconds):
            slept.append(seconds)
            sim.world.clock.advance(timedelta(seconds=seconds + 3600))

        c = AutotaskConnector(make_conn(srv.url, page_size=100), dict(CREDS), sleep=sleep)
        c.stages()
        # another integration on the same database spends the rest of the hour
        now = sim.world.clock.now()
        sim._window.extend([now] * (500 - len(sim._window)))
        got = fetch(c)
        assert set(got) == {o.native_id for o in sim.world.live()}
        # the set's count and its first page go side by side: both may meet the spent hour, each waits it out once
        assert slept in ([60.0], [60.0, 60.0]) and c.stats.rate_limited == len(slept)


def test_quota_near_threshold_stops_the_run():
    sim = at.build(seed=17, opportunities=100, threshold=1000)
    with SandboxServer(sim) as srv:
        now = sim.world.clock.now()
        sim._window.extend([now] * 950)
        c = connector(srv.url, quota=QuotaConfig(run_share=0.5, stop_at_usage=0.9))
        with pytest.raises(QuotaExhausted):
            fetch(c)
        assert c.stats.quota_used == 950 and c.stats.quota_limit == 1000
        # a budget share of the hourly threshold also bounds one run
        sim._window.clear()
        c = connector(srv.url, page_size=5, quota=QuotaConfig(run_share=0.01, stop_at_usage=0.9))
        with pytest.raises(QuotaExhausted):
            fetch(c)
        assert c.stats.requests <= 11
