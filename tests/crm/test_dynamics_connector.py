"""DynamicsConnector against the Dataverse simulator over real HTTP (no HTTP mocks)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oppsync_pipeline.lib.config import ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.dynamics import DynamicsConnector, render_filter
from oppsync_pipeline.lib.crm.http import QuotaBudget, QuotaExhausted
from oppsync_pipeline.sandbox import dynamics as sandbox
from oppsync_pipeline.sandbox.cluster import Sandbox
from oppsync_pipeline.sandbox.server import SandboxServer

N = 600


@pytest.fixture
def server():
    sim = sandbox.build(seed=7, opportunities=N)
    with SandboxServer(sim) as srv:
        yield srv


def make(srv, credentials=None, **overrides) -> DynamicsConnector:
    conn = ConnectionConfig(
        **{
            "name": "dyn",
            "crm": "dynamics",
            "base_url": srv.url,
            "page_size": 50,
            "credentials": dict.fromkeys(sandbox.SANDBOX_CREDENTIALS, "${X}"),
            "options": {"authority_url": srv.url, **overrides.pop("options", {})},
            **overrides,
        }
    )
    cls = connector_class("dynamics")
    assert cls is DynamicsConnector
    return cls(conn, credentials or dict(sandbox.SANDBOX_CREDENTIALS), sleep=lambda s: None)


def fetch(conn, open_set, since=None):
    return [o for page in conn.opportunities(open_set=open_set, since=since) for o in page]


def test_full_sync_matches_world_field_by_field(server):
    conn = make(server)
    assert not DynamicsConnector.validate_connection(conn.conn)
    world = server.simulator.world
    open_, closed = fetch(conn, True), fetch(conn, False)
    got = {o.source_id: o for o in open_ + closed}
    assert len(got) == len(open_) + len(closed)
    live = {o.native_id: o for o in world.live()}
    assert set(got) == set(live)
    assert all(o.status == "open" for o in open_) and all(o.status != "open" for o in closed)
    for sid, o in live.items():
        g = got[sid]
        assert g.status == world.status(o)
        # stage = the business process stage (Pipeline Phase), stage_id = its id, crm_status = status reason label
        assert g.stage == world.sales_stage_of(o).label and g.stage_id == world.sales_stage_of(o).key
        assert g.stage_id != g.stage
        assert g.crm_status == world.stages[o.stage].label
        assert g.amount == o.amount
        assert g.currency == o.currency
        assert g.close_date == o.close_date
        assert g.probability == (None if o.probability is None else round(o.probability))
        assert g.created_at == o.created_at
        assert g.modified_at == o.modified_at
        assert g.created_by_crm_id == world.users[o.creator].native_id
        assert g.owner_crm_id == world.users[o.owner].native_id
        assert g.sales_executive == world.users[o.owner].name
        assert g.project_name == o.name
        acc = world.accounts[o.account] if o.account is not None else None
        assert g.client_name == (acc.name if acc else None)
        if acc is None or acc.street is None:
            assert g.service_location is None
        else:
            line1, line2, line3 = sandbox.address_lines(acc)
            lines = [p.strip() for p in line1.split("\r\n")] + [p for p in (line2, line3) if p]
            expect = ", ".join([*lines, *(p for p in (acc.city, acc.state, acc.postal_code, acc.country) if p)])
            assert g.service_location == expect and "\n" not in g.service_location
        assert g.raw["stepname"] and "salesstage" in g.raw
    # every address line was read: some accounts have a line 2, a line 3, a line break inside line 1
    located = [g.service_location for g in got.values() if g.service_location]
    assert any("Suite " in x for x in located) and any("Building B" in x for x in located)
    assert any("c/o Reception" in x for x in located)
    statuses = conn.statuses()
    assert statuses["3"].is_won and statuses["4"].is_closed and not statuses["100000000"].is_closed
    assert statuses["100000001"].label == "No Decision" and statuses["100000001"].category == "lost"
    stages = conn.stages()
    assert [s.label for s in stages.values()] == ["1-Qualify", "2-Develop", "3-Propose", "4-Close"]
    assert set(stages) == {s.key for s in world.sales_stages.values()}
    assert {o.crm_status for o in got.values()} >= {"In Progress", "Awaiting PO", "Won", "No Decision"}
    assert conn.stats.warnings == []
    assert any(
        o.owner_crm_id and o.raw.get("_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname") == "team"
        for o in got.values()
    )
    # many pages were needed
    assert conn.stats.requests > N // 50


def test_incremental_returns_every_change_including_ties(server):
    conn = make(server)
    world = server.simulator.world
    since = world.clock.now()
    names = {a.idx: a.name for a in world.accounts}
    world.advance(hours=3, rate=0.05)
    changed = {o.native_id for o in world.live() if o.modified_at >= since}
    # a renamed account leaves its opportunities' modifiedon as it was: they are asked for through the account
    renamed = {a.idx for a in world.accounts if a.name != names[a.idx]}
    via_account = {o.native_id for o in world.live() if o.account in renamed}
    assert len(changed) > 20 and renamed and via_account - changed
    got = fetch(conn, True, since) + fetch(conn, False, since)
    ids = [o.source_id for o in got]
    assert len(ids) == len(set(ids))
    assert set(ids) == changed | via_account
    assert all(world.accounts[world.opps[i].account].name.endswith("(renamed)") for i in via_account - changed)
    # ties: several records share one modifiedon and all came back
    stamps = [o.modified_at for o in got if o.source_id in changed]
    assert max(stamps.count(s) for s in stamps) > 1
    assert all(o.modified_at >= since for o in got if o.source_id not in via_account)
    # ordered by (modifiedon, id) within each set
    open_only = fetch(conn, True, since)
    assert [(o.modified_at, o.source_id) for o in open_only] == sorted((o.modified_at, o.source_id) for o in open_only)


def test_open_statuses_by_stage_name_and_stage_categories(server):
    """Which records are open for status reason labels or values (statuscode): tests/crm/test_contract.py."""
    world = server.simulator.world
    conn = make(server, open_statuses=["In Progress", "100000000"])
    assert {o.crm_status for o in fetch(conn, True)} == {"In Progress", "Awaiting PO"}
    assert "On Hold" in {o.crm_status for o in fetch(conn, False)}  # On Hold is not open for this connection
    # stage names (the business process stage) too, by the same rule as the record's status
    conn = make(server, open_statuses=["2-Develop", "On Hold"])
    open_, closed = fetch(conn, True), fetch(conn, False)
    assert open_ and all(o.stage == "2-Develop" or o.crm_status == "On Hold" for o in open_)
    assert all(o.status == "open" for o in open_) and all(o.status != "open" for o in closed)
    assert not any(o.stage == "2-Develop" or o.crm_status == "On Hold" for o in closed)
    assert len(open_) + len(closed) == sum(1 for _ in world.live())
    # stage_categories (by stage name) win over the CRM's flags: an open deal in 3-Propose counts as won
    conn = make(server, stage_categories={"3-Propose": "won"})
    got = fetch(conn, True)
    assert {o.status for o in got if o.stage == "3-Propose"} == {"won"}
    assert {o.status for o in got if o.stage != "3-Propose"} == {"open"}


def test_filters_pushed_down_and_escaped(server):
    world = server.simulator.world
    some = next(o for o in world.live() if o.amount)
    # a quote-laden value must be a literal, not OData syntax
    evil = "x' or name ne 'x"
    conn = make(server, filters=[{"field": "name", "op": "equal", "value": evil}])
    assert fetch(conn, True) + fetch(conn, False) == []
    assert render_filter(RecordFilter(field="name", op="equal", value=evil)) == "name eq 'x'' or name ne ''x'"
    conn = make(server, filters=[{"field": "name", "op": "equal", "value": some.name}])
    got = fetch(conn, True) + fetch(conn, False)
    assert some.native_id in {o.source_id for o in got}
    assert all(o.project_name.casefold() == some.name.casefold() for o in got)
    owner = world.users[some.owner].native_id
    conn = make(
        server,
        filters=[
            {"field": "estimatedvalue", "op": "at_least", "value": 100000},
            {"field": "_ownerid_value", "op": "in", "value": [owner]},
        ],
    )
    got = fetch(conn, True) + fetch(conn, False)
    expect = {
        o.native_id
        for o in world.live()
        if o.amount is not None and o.amount >= 100000 and world.users[o.owner].native_id == owner
    }
    assert {o.source_id for o in got} == expect
    # the filter really went to the server: fewer requests than a full read (12+ pages of 50); the rest is the
    # token, discovery (attribute metadata, currencies, the account expand probe) and the status reasons
    assert conn.stats.requests < 10 and conn.stats.token_requests == 1


def test_custom_created_at_field_override(server):
    conn = make(server, fields={"created_at": "new_originalcreatedon"})
    world = server.simulator.world
    got = {o.source_id: o for o in fetch(conn, True)}
    for sid, g in got.items():
        o = world.opps[sid]
        expect = None if o.seq % 5 == 0 else o.created_at - timedelta(days=30 + o.seq % 90)
        assert g.created_at == expect


def test_quota_usage_is_observed_and_stops_the_run(server):
    conn = make(server)
    list(conn.users())
    assert conn.stats.quota_limit == 6000 and conn.stats.quota_used >= 1
    server.simulator.request_limit = 30
    conn = make(server, page_size=10, options={"request_limit": 30})
    with pytest.raises(QuotaExhausted):
        fetch(conn, True)
    # the simulator's own window answers 429 + 0x80072322 once spent; a long Retry-After ends the run
    server.simulator.request_limit = 1
    conn = make(server, options={"request_limit": 6000})
    conn.client.budget = QuotaBudget(max_requests=None)
    with pytest.raises(QuotaExhausted):
        fetch(conn, True)


def test_teams_are_owners_among_the_users(server):
    """Every user resolves every owner and creator: tests/crm/test_contract.py. Dataverse owners are teams too."""
    users = {u.crm_user_id: u for u in make(server).users()}
    teams = [u for u in users.values() if u.kind == "team"]
    assert len(teams) == 3 and all(t.name.startswith("Team ") for t in teams)


def test_deletes_via_change_tracking(server):
    conn = make(server, options={"change_tracking": True})
    world = server.simulator.world
    assert list(conn.deleted(None)) == []  # baseline read establishes the delta link
    assert conn.delta_link and "$deltatoken=" in conn.delta_link
    victims = [o.native_id for o in list(world.live())[:3]]
    world.clock.advance(timedelta(seconds=5))
    for v in victims:
        world.delete(v)
    gone = [sid for page in conn.deleted(None) for sid, _ in page]
    assert sorted(gone) == sorted(victims)
    # next call: nothing new
    assert [sid for page in conn.deleted(None) for sid, _ in page] == []
    # without the option there is no delete feed
    assert list(make(server).deleted(None)) == []


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(st.text(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
    field=st.sampled_from(["name", "estimatedvalue", "_ownerid_value", "new_region", "modifiedon"]),
)
def test_rendered_filters_parse_as_one_literal(value, field):
    """Whatever the value, the rendered clause is `field op <one literal>` to the server's OData parser."""
    clause = render_filter(RecordFilter(field=field, op="not_equal", value=value))
    toks = sandbox.tokenize(clause)
    assert toks[:2] == [("ident", field), ("ident", "ne")] and len(toks) == 3 and toks[2][0] == "lit"
    if isinstance(value, str) and toks[2][1].__class__ is str:
        assert toks[2][1] == value or toks[2][1] == value.lower()


def test_sandbox_cluster_connection_end_to_end():
    with Sandbox(crms=("dynamics",), opportunities=300) as sb:
        entry = sb.connections()[0]
        entry["options"] = sandbox.connection_options(entry["base_url"])
        conn = ConnectionConfig(**entry)
        assert DynamicsConnector.validate_connection(conn) == []
        connector = DynamicsConnector(conn, dict(sandbox.SANDBOX_CREDENTIALS))
        n = sum(len(p) for open_set in (True, False) for p in connector.opportunities(open_set, None))
        assert n == 300
        assert list(connector.deleted(None)) == [] and connector.delta_link


def test_pages_of_2000_unless_the_connection_asks_for_up_to_5000(server):
    """Dataverse rows are wide (~2.5 kB with their annotations): the default page is 2,000, for memory
    (dynamics.py); `page_size` still asks for up to Dataverse's 5,000, and no more."""
    assert make(server, page_size=None).page_size == 2000
    assert make(server, page_size=5000).page_size == 5000
    assert make(server, page_size=9000).page_size == 5000
    assert "odata.maxpagesize=2000" in make(server, page_size=None)._headers()["Prefer"]
