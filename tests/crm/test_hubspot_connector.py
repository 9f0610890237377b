"""The HubSpot connector against the HubSpot simulator over HTTP."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.http import AuthError, CrmError, QuotaBudget, QuotaExhausted
from oppsync_pipeline.lib.crm.hubspot import HubSpotConnector, render_filter
from oppsync_pipeline.sandbox import hubspot as sim
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

NO_LIMITS = sim.Limits(ten_secondly=0, search_per_second=0, daily=1_000_000)
PRIVATE = {"access_token": "${HS_TOKEN}"}
OAUTH = {k: "${HS_" + k.upper() + "}" for k in sim.SANDBOX_OAUTH_CREDENTIALS}


def make(url: str, creds=None, secrets=None, sleeps=None, **overrides) -> HubSpotConnector:
    values = dict(
        name="hs",
        crm="hubspot",
        base_url=url,
        credentials=creds or PRIVATE,
        page_size=50,
        options={"search_requests_per_second": 0},
    )
    values.update(overrides)
    conn = ConnectionConfig(**values)
    assert HubSpotConnector.validate_connection(conn) == []
    cls = connector_class("hubspot")
    sleep = (lambda s: sleeps.append(s)) if sleeps is not None else (lambda s: None)
    return cls(conn, secrets or dict(sim.SANDBOX_CREDENTIALS), sleep=sleep)


def sync(connector, since=None) -> dict[str, object]:
    out = {}
    for open_set in (True, False):
        for page in connector.opportunities(open_set=open_set, since=since):
            assert 0 < len(page) <= 200
            for opp in page:
                assert (opp.status == "open") == open_set
                assert opp.source_id not in out
                out[opp.source_id] = opp
    return out


@pytest.fixture()
def server():
    with SandboxServer(sim.build(seed=11, opportunities=1200, limits=NO_LIMITS)) as srv:
        yield srv


def test_full_sync_equals_the_world_field_by_field(server):
    world = server.simulator.world
    connector = make(server.url)
    got = sync(connector)
    live = {o.native_id: o for o in world.live()}
    assert set(got) == set(live)
    for sid, opp in got.items():
        w = live[sid]
        owner, creator = world.users[w.owner], world.users[w.creator]
        assert opp.crm == "hubspot" and opp.connection == "hs"
        assert opp.project_name == w.name
        stage = world.stages[w.stage]
        assert opp.stage == stage.label and opp.stage_id == w.stage and opp.crm_status == w.stage  # name, id, id
        assert opp.status == world.status(w)
        assert opp.amount == w.amount and opp.currency == w.currency
        assert opp.close_date == w.close_date  # the UTC date of the closedate date-time
        assert opp.probability == pytest.approx(w.probability)
        assert opp.created_at == w.created_at and opp.modified_at == w.modified_at
        assert opp.created_by_crm_id == creator.alt_id  # a user id, not an owner id
        assert opp.owner_crm_id == owner.native_id
        assert opp.sales_executive == owner.name
        if w.account is None:
            assert opp.client_name is None and opp.service_location is None
        else:
            acc = world.accounts[w.account]
            assert opp.client_name == acc.name  # the primary company, counted once
            street, street2 = sim.company_street(acc)
            parts = [*(street or "").split("\n"), street2, acc.city, acc.state, acc.postal_code, acc.country]
            assert opp.service_location == (", ".join(p for p in parts if p) or None)
            assert "\n" not in (opp.service_location or "")
        assert opp.raw["properties"]["hs_object_id"] == sid
    assert connector.stats.quota_limit == 1_000_000 and connector.stats.quota_used > 0
    # the tenant has second street lines and multi-line streets, and both reach the record
    assert any(", Suite " in (o.service_location or "") for o in got.values())
    assert any(", Building B, " in (o.service_location or "") for o in got.values())
    assert {o.stage for o in got.values()} >= {"Contract Sent", "Proposal"}  # labels of both pipelines
    assert connector.stats.warnings == []


def test_stages_follow_pipeline_metadata(server):
    stages = make(server.url).stages()
    assert stages["closedwon"].is_closed and stages["closedwon"].is_won
    assert stages["closedlost"].is_closed and not stages["closedlost"].is_won
    assert not stages["contractsent"].is_closed and stages["contractsent"].probability == 90
    assert stages["145236004"].category == "won" and stages["145236004"].pipeline == sim.CUSTOM_PIPELINE


def test_users_keep_archived_owners_and_the_owner_id_in_alt_ids(server):
    """Users by user id, the owner id in alt_ids; that they resolve every owner and creator: test_contract.py."""
    world = server.simulator.world
    users = list(make(server.url).users())
    by_user = {u.crm_user_id: u for u in users}
    assert any(not u.active for u in users)  # archived owners are still resolvable
    u = world.users[0]
    assert by_user[u.alt_id].alt_ids == (u.native_id,) and by_user[u.alt_id].email == u.email


def test_incremental_after_activity_returns_every_change_and_ties(server):
    world = server.simulator.world
    connector = make(server.url)
    sync(connector)
    run_start = world.clock.now()
    counts = world.advance(hours=3, rate=0.03)
    assert counts["created"] + counts["stage_moved"] > 0
    since = run_start - timedelta(minutes=10)
    expected = {o.native_id for o in world.live() if o.modified_at >= since}
    got = sync(make(server.url), since=since)
    # a renamed company does not bump its deals' hs_lastmodifieddate: its deals are read again by id
    renamed = {cid for cid, at in server.simulator._company_stamps().items() if at >= since}
    of_renamed = {o.native_id for o in world.live() for cid in server.simulator._companies_of(o) if cid in renamed}
    assert counts["account_renamed"] == 0 or of_renamed
    assert set(got) == expected | of_renamed
    assert all(got[i].client_name == world.accounts[world.opps[i].account].name for i in of_renamed)
    stamps = [o.modified_at for o in got.values()]
    burst = max(set(stamps), key=stamps.count)
    assert stamps.count(burst) > 5  # the burst: many deals share one timestamp
    at_burst = sync(make(server.url), since=burst)  # since is inclusive: the whole tie is there
    assert set(at_burst) - of_renamed == {o.native_id for o in world.live() if o.modified_at >= burst} - of_renamed
    assert sum(1 for o in at_burst.values() if o.modified_at == burst) == stamps.count(burst)
    deleted = [d for page in make(server.url).deleted(since) for d in page]
    want_deleted = {o.native_id for o in world.opps.values() if o.deleted_at is not None and o.deleted_at >= since}
    assert {d[0] for d in deleted} == want_deleted and want_deleted
    assert all(at >= since for _, at in deleted)
    everything = [d for page in make(server.url).deleted(None) for d in page]
    assert {d[0] for d in everything} == {o.native_id for o in world.opps.values() if o.deleted_at is not None}


def test_filters_are_pushed_down_and_values_are_not_executed(server):
    world = server.simulator.world
    filters = [
        RecordFilter(field="amount", op="more_than", value=100000),
        RecordFilter(field="pipeline", op="equal", value="default"),
        RecordFilter(field="deal_currency_code", op="in", value=["USD", "EUR"]),
    ]
    connector = make(server.url, filters=filters)
    got = sync(connector)
    want = {
        o.native_id
        for o in world.live()
        if o.amount is not None
        and o.amount > 100000
        and world.stages[o.stage].pipeline == "default"
        and o.currency in ("USD", "EUR")
    }
    assert set(got) == want and want
    assert render_filter(filters[0]) == {"propertyName": "amount", "operator": "GT", "value": "100000"}
    assert render_filter(filters[2]) == {
        "propertyName": "deal_currency_code",
        "operator": "IN",
        "values": ["USD", "EUR"],
    }
    assert render_filter(RecordFilter(field="createdate", op="at_least", value="2024-01-01")) == {
        "propertyName": "createdate",
        "operator": "GTE",
        "value": "1704067200000",
    }
    hostile = "Acme' OR 1=1 --\" }]}"
    assert sync(make(server.url, filters=[RecordFilter(field="dealname", op="equal", value=hostile)])) == {}
    target = next(iter(world.live()))
    world.update(target.native_id, name=hostile)
    got = sync(make(server.url, filters=[RecordFilter(field="dealname", op="equal", value=hostile)]))
    assert set(got) == {target.native_id}


def test_field_overrides_for_created_date_and_creator():
    with SandboxServer(sim.build(seed=11, opportunities=300, limits=NO_LIMITS, variant="custom_fields")) as srv:
        world = srv.simulator.world
        opp = next(o for o in world.live() if world.status(o) == "open")
        world.update(opp.native_id, original_create_date="2019-03-04T05:06:07.000Z", created_by_custom="777")
        connector = make(
            srv.url, fields={"created_at": "original_create_date", "created_by_crm_id": "created_by_custom"}
        )
        got = sync(connector)
        assert got[opp.native_id].created_at.isoformat() == "2019-03-04T05:06:07"
        assert got[opp.native_id].created_by_crm_id == "777"
        other = next(o for o in world.live() if o.native_id != opp.native_id)
        assert got[other.native_id].created_at == other.extra["original_create_date"]
        assert got[other.native_id].created_by_crm_id == other.extra["created_by_custom"]


def test_validate_connection_credentials():
    """Unknown fields and overrides: tests/crm/test_contract.py."""

    def problems(**kw):
        base = dict(name="hs", crm="hubspot", base_url="https://api.hubapi.com", credentials=PRIVATE)
        base.update(kw)
        return HubSpotConnector.validate_connection(ConnectionConfig(**base))

    assert problems() == [] and problems(credentials=OAUTH) == []
    assert problems(credentials={**OAUTH, "access_token": "${X}"}) == []
    assert any("credentials" in p for p in problems(credentials={"refresh_token": "${X}"}))
    assert any("credentials" in p for p in problems(credentials={"api_key": "${X}"}))


def test_oauth_token_refreshed_mid_paging():
    faults = FaultPlan(rules=[FaultRule("token_expiry", after=3, path=r"/search$")])
    with SandboxServer(sim.build(seed=5, opportunities=600, faults=faults, limits=NO_LIMITS)) as srv:
        connector = make(srv.url, creds=OAUTH, secrets=dict(sim.SANDBOX_OAUTH_CREDENTIALS))
        got = sync(connector)
        assert set(got) == {o.native_id for o in srv.simulator.world.live()}
        assert connector.stats.token_refreshes == 1
        # virtual time passes beyond the token's 30 minutes: the next run refreshes again and carries on
        srv.simulator.world.clock.advance(timedelta(hours=1))
        assert len(sync(connector)) == len(got)
        assert connector.stats.token_refreshes == 2
        bad = make(srv.url, creds=OAUTH, secrets={**sim.SANDBOX_OAUTH_CREDENTIALS, "refresh_token": "revoked"})
        with pytest.raises(AuthError) as err:
            bad.stages()
        assert "revoked" not in str(err.value) and sim.OAUTH_CLIENT_SECRET not in str(err.value)
        # a wrong private-app token: tests/crm/test_contract.py (every CRM)


def test_real_search_rate_limit_is_respected_and_retried():
    with SandboxServer(
        sim.build(seed=8, opportunities=300, limits=sim.Limits(ten_secondly=100, search_per_second=3, daily=100_000))
    ) as srv:
        connector = make(srv.url, page_size=100, options={"search_requests_per_second": 2.5})
        connector.client.sleep = time.sleep
        got = sync(connector)
        assert len(got) == 300 and connector.stats.rate_limited == 0


def test_default_search_pace_stays_under_the_documented_five_per_second():
    """The default pace (4.5 searches a second, evenly spaced, from every read thread together) against a portal
    enforcing HubSpot's documented 5 per second: a keyset-split read of a dozen search pages meets no 429."""
    with SandboxServer(sim.build(seed=8, opportunities=1_200, limits=sim.Limits())) as srv:  # the portal's defaults
        assert srv.simulator.limits.search_per_second == 5
        connector = make(srv.url, page_size=100, options={})
        assert connector.options.search_requests_per_second == 4.5
        connector.client.sleep = time.sleep
        searches = []
        is_search = srv.simulator._is_search
        srv.simulator._is_search = lambda req: is_search(req) and not searches.append(req.path)
        got = sync(connector)
        assert len(got) == 1_200 and connector.stats.rate_limited == 0
        assert len(searches) >= 12, "too few searches to test the pace"


def test_daily_quota_spent_is_not_retried():
    with SandboxServer(sim.build(seed=9, opportunities=100, limits=sim.Limits(0, 0, daily=1000))) as srv:
        srv.simulator.daily_used = 1000
        connector = make(srv.url)
        with pytest.raises(QuotaExhausted) as err:
            connector.stages()
        assert connector.stats.retries == 0 and err.value.code == "DAILY"


def test_quota_usage_headers_stop_the_run_early():
    with SandboxServer(sim.build(seed=9, opportunities=300, limits=sim.Limits(0, 0, daily=1000))) as srv:
        srv.simulator.daily_used = 890  # a full sync of 300 deals makes 16 requests (issue 21: 1,000 deals a lookup)
        connector = make(srv.url)
        with pytest.raises(QuotaExhausted) as err:
            sync(connector)
        assert connector.stats.quota_limit == 1000 and connector.stats.quota_used >= 900
        assert "quota" in str(err.value)
        budgeted = make(srv.url)
        budgeted.client.budget = QuotaBudget(max_requests=3)
        with pytest.raises(QuotaExhausted):
            sync(budgeted)


def _squeeze(world, n_open: int, at_ms: int | None, span_ms: int = 2000) -> None:
    """Make every deal open and modified inside one short window (or all at one millisecond)."""
    base = world.clock.now() - timedelta(minutes=5)
    for i, opp in enumerate(world.opps.values()):
        opp.stage = "appointmentscheduled" if i < n_open else "closedlost"
        opp.modified_at = base + timedelta(milliseconds=at_ms if at_ms is not None else i % span_ms)
    world.version += 1


def test_more_than_ten_thousand_deals_in_one_window_are_synced_completely():
    with SandboxServer(sim.build(seed=12, opportunities=10_600, limits=NO_LIMITS)) as srv:
        world = srv.simulator.world
        _squeeze(world, n_open=10_500, at_ms=None)
        connector = make(srv.url, page_size=200)
        since = world.clock.now() - timedelta(hours=1)
        got = sync(connector, since=since)
        assert set(got) == {o.native_id for o in world.live()}
        assert sum(1 for o in got.values() if o.status == "open") == 10_500


def test_more_than_ten_thousand_deals_on_one_timestamp_are_synced_completely():
    with SandboxServer(sim.build(seed=13, opportunities=10_300, limits=NO_LIMITS)) as srv:
        world = srv.simulator.world
        _squeeze(world, n_open=10_300, at_ms=7)
        connector = make(srv.url, page_size=200)
        got = sync(connector)
        assert set(got) == {o.native_id for o in world.live()} and len(got) == 10_300
        assert len({o.modified_at for o in got.values()}) == 1


def test_calls_are_paced_to_the_rolling_limit_the_portal_reports():
    """Non-search calls keep within the portal's rolling limit, learned from its X-HubSpot-RateLimit-Max /
    -Interval-Milliseconds headers: no 429 where the same read unpaced meets the limit again and again (five
    read threads' batch reads burst past it; a 100,000-deal sync spent its retry budget on such 429s)."""
    limits = sim.Limits(ten_secondly=12, search_per_second=0, daily=1_000_000, interval_seconds=1.0)
    with SandboxServer(sim.build(seed=12, opportunities=2500, limits=limits)) as srv:
        unpaced = make(srv.url, page_size=200, options={"search_requests_per_second": 0, "requests_per_10_seconds": 0})
        try:  # the limit is real: unpaced, the read meets 429s (its retries sleep nothing here, so they often
            sync(unpaced)  # run out; on a slow machine the window may pass first and a retry get through)
        except CrmError as err:
            assert "HTTP 429" in str(err)
        assert unpaced.stats.rate_limited > 0
        time.sleep(limits.interval_seconds)  # the portal's window forgets those calls (its apps share it)

        paced = make(srv.url, page_size=200, options={"search_requests_per_second": 0})
        paced.client.sleep = time.sleep
        assert len(sync(paced)) == 2500
        assert paced.stats.rate_limited == 0 and paced.stats.retries == 0
        assert paced._requests.limit == 10 and paced._requests.seconds == 1.0  # 90% of what the portal reports
        assert paced.stats.seconds_paced > 0
