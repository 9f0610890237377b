"""SalesforceConnector against the Salesforce simulator over real HTTP (no HTTP mocks)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from oppsync_pipeline.lib.config import ConnectionConfig, QuotaConfig, RecordFilter
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.http import CrmError, QuotaExhausted, RequestStats, RetryableHttpError
from oppsync_pipeline.lib.crm.salesforce import (
    SalesforceConnector,
    classify,
    observe,
    soql_string,
)
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

N = 1500
PAGE = 200


def make_conn(url: str, **kw) -> ConnectionConfig:
    return ConnectionConfig(
        name="sf",
        crm="salesforce",
        base_url=url,
        credentials={"client_id": "${SF_CLIENT_ID}", "client_secret": "${SF_CLIENT_SECRET}"},
        page_size=kw.pop("page_size", PAGE),
        **kw,
    )


def connect(url: str, credentials: dict | None = None, **kw) -> SalesforceConnector:
    cls = connector_class("salesforce")
    waits: list[float] = []
    conn = cls(make_conn(url, **kw), dict(credentials or sfsim.SANDBOX_CREDENTIALS), sleep=waits.append)
    conn.waits = waits  # type: ignore[attr-defined]
    return conn


@pytest.fixture
def sandbox():
    """A fresh tenant per test (tests move its clock and write to it)."""
    sim = sfsim.build(seed=5, opportunities=N)
    with SandboxServer(sim) as srv:
        yield srv


def sync(connector, since=None):
    out, pages = {}, []
    for open_set in (True, False):
        for page in connector.opportunities(open_set=open_set, since=since):
            pages.append((open_set, len(page)))
            for opp in page:
                assert opp.source_id not in out, "a record in both the open and the not-open set"
                out[opp.source_id] = opp
    return out, pages


def assert_matches_world(sim, got: dict, expected_ids) -> None:
    """Field by field against the tenant as its users see it (sfsim.truth), plus what truth does not cover."""
    world, truth = sim.world, sfsim.truth(sim)
    assert set(got) == set(expected_ids)
    for oid in expected_ids:
        o, r = world.opps[oid], got[oid]
        for f, value in truth[oid].items():
            assert getattr(r, f) == value, (oid, f)
        assert r.sales_executive == world.users[o.owner].name
        assert r.owner_crm_id == world.users[o.owner].native_id
        assert r.stage == world.stages[o.stage].label and r.stage_id == o.stage and r.status == world.status(o)
        assert r.crm_status == sfsim.FORECAST[o.stage]
        assert r.probability == o.probability
        assert r.created_at == o.created_at and r.created_by_crm_id == world.users[o.creator].native_id
        assert r.modified_at == o.modified_at
        assert r.raw["Id"] == oid and r.raw["attributes"]["type"] == "Opportunity"
        assert r.connection == "sf" and r.crm == "salesforce"


# -- full and incremental -----------------------------------------------------------------------------------------


def test_full_sync_equals_world_field_by_field(sandbox):
    w = sandbox.simulator.world
    # one cursor per set, so that every request after discovery is a page (a split read also asks ranges that
    # may come back empty; its records equal these: tests/crm/test_parallel_reads.py)
    c = connect(sandbox.url, options={"parallel_reads": 1})
    stages = c.stages()
    assert set(stages) == set(w.stages) and stages["Closed Won"].category == "won"
    assert stages["Closed Lost"].category == "lost" and stages["Customer's Legal Review"].category == "open"
    got, pages = sync(c)
    live = [o.native_id for o in w.live()]
    assert_matches_world(sandbox.simulator, got, live)
    assert sum(1 for s, _ in pages if s) > 1 and sum(1 for s, _ in pages if not s) > 1  # paged in both sets
    assert max(n for _, n in pages) <= PAGE
    assert {o.status for o in got.values()} == {"open", "won", "lost"}
    # token, describe, limits, org currency, stage dictionary, then the pages
    assert c.stats.requests == 5 + len(pages) and c.stats.retries == 0 and c.stats.token_requests == 1
    assert c.stats.warnings == [] and {o.currency for o in got.values()} == {sfsim.ORG_CURRENCY}
    # the org's allocation counts REST calls; the token request is ours to count (api_requests includes it)
    assert c.stats.quota_limit == sfsim.DEFAULT_DAILY_LIMIT
    assert c.stats.quota_used == c.stats.requests - c.stats.token_requests


def test_incremental_after_activity_returns_every_change(sandbox):
    w = sandbox.simulator.world
    c = connect(sandbox.url)
    sync(c)
    t0 = w.clock.now()
    counts = w.advance(hours=3, rate=0.03)
    assert counts["created"] and counts["stage_moved"]
    since = t0 - timedelta(minutes=10)  # the caller's overlap window
    got, pages = sync(connect(sandbox.url), since=since)
    # the changed records, and the records of accounts renamed since (their own stamp did not move)
    renamed = {a.idx for a in w.accounts if w.account_modified(a) >= since}
    expected = [o.native_id for o in w.live() if o.modified_at >= since or o.account in renamed]
    changed = {o.native_id for o in w.live() if o.modified_at >= t0}
    assert changed and changed <= set(got)
    assert_matches_world(sandbox.simulator, got, expected)
    ties = Counter(o.modified_at for o in got.values() if o.modified_at >= t0)
    assert max(ties.values()) >= 3  # the burst shares one timestamp: all of it came back
    # the cursor is inclusive: asking from the burst's own second still returns the whole burst
    burst_at, burst_n = ties.most_common(1)[0]
    again, _ = sync(connect(sandbox.url), since=burst_at)
    assert sum(1 for o in again.values() if o.modified_at == burst_at) == burst_n


def test_incremental_pages_are_ordered_by_modstamp_then_id(sandbox):
    c = connect(sandbox.url)
    since = sorted(o.modified_at for o in sandbox.simulator.world.live())[N // 3]
    seen = []
    for page in c.opportunities(open_set=True, since=since):
        seen += [(o.modified_at, o.source_id) for o in page]
    assert len(seen) > PAGE and seen == sorted(seen)
    soql = c.opportunity_soql(True, since)
    assert "SystemModstamp >= " + since.strftime("%Y-%m-%dT%H:%M:%SZ") in soql and soql.endswith(
        "ORDER BY SystemModstamp, Id"
    )


def test_open_statuses_are_escaped_in_the_in_list(sandbox):
    """Which records are open: tests/crm/test_contract.py. The apostrophe must be escaped in the IN list."""
    c = connect(sandbox.url, open_statuses=["Prospecting", "Customer's Legal Review"])
    assert "StageName IN ('Prospecting', 'Customer\\'s Legal Review')" in c.opportunity_soql(True, None)
    assert "StageName NOT IN (" in c.opportunity_soql(False, None)


# -- filters -------------------------------------------------------------------------------------------------------


def test_filters_are_pushed_down(sandbox):
    w = sandbox.simulator.world
    filters = [
        RecordFilter(field="Amount", op="at_least", value=50000),
        RecordFilter(field="StageName", op="in", value=["Prospecting", "Closed Won", "Negotiation/Review"]),
        RecordFilter(field="Account.BillingCountry", op="not_equal", value="Japan"),
        RecordFilter(field="CloseDate", op="more_than", value="2024-01-01"),
        RecordFilter(field="CreatedDate", op="less_than", value="2100-01-01T00:00:00Z"),
    ]
    c = connect(sandbox.url, filters=filters)
    assert SalesforceConnector.validate_connection(c.conn) == []
    soql = c.opportunity_soql(True, None)
    assert "Amount >= 50000" in soql and "CloseDate > 2024-01-01" in soql
    assert "CreatedDate < 2100-01-01T00:00:00Z" in soql
    assert "StageName IN ('Prospecting', 'Closed Won', 'Negotiation/Review')" in soql
    got, _ = sync(c)

    def keep(o):
        acc = w.accounts[o.account] if o.account is not None else None
        country = acc.country if acc else None
        return (
            o.amount is not None
            and o.amount >= 50000
            and o.stage in ("Prospecting", "Closed Won", "Negotiation/Review")
            and country != "Japan"
            and o.close_date.isoformat() > "2024-01-01"
        )

    expected = {o.native_id for o in w.live() if keep(o)}
    assert expected and set(got) == expected
    # filtered on the server: only the matching rows crossed the wire
    assert c.stats.requests <= 1 + 2 * (-(-len(expected) // PAGE) + 1)


def test_filter_values_are_escaped_not_executed(sandbox):
    w = sandbox.simulator.world
    victim = next(iter(w.live()))
    w.update(victim.native_id, name='O\'Brien \\ Co "x"\nline2')
    evil = RecordFilter(field="Name", op="equal", value="x' OR Name != 'y")
    got, _ = sync(connect(sandbox.url, filters=[evil]))
    assert got == {}  # the quote did not end the literal
    exact = RecordFilter(field="Name", op="equal", value='O\'Brien \\ Co "x"\nline2')
    got, _ = sync(connect(sandbox.url, filters=[exact]))
    assert list(got) == [victim.native_id]
    assert soql_string("a'b\\c") == "'a\\'b\\\\c'"
    # a value that does not fit a number / date field is refused before any request
    for f in (
        RecordFilter(field="Amount", op="more_than", value="1 OR IsDeleted = false"),
        RecordFilter(field="CloseDate", op="equal", value="2024-01-01 OR Name != null"),
    ):
        c = connect(sandbox.url, filters=[f])
        with pytest.raises(CrmError):
            next(iter(c.opportunities(True, None)))
    with pytest.raises(CrmError):
        connect(sandbox.url, filters=[RecordFilter(field="Name) OR (Id", op="equal", value="x")]).opportunity_soql(
            True, None
        )


def test_custom_field_names_are_told_from_injection():
    """Which fields validate_connection accepts: tests/crm/test_contract.py."""
    assert SalesforceConnector.is_custom_field("Account.Region__c")
    assert not SalesforceConnector.is_custom_field("x__c OR Id")


# -- custom fields (seed 002) -------------------------------------------------------------------------------------------


def test_created_fields_from_custom_fields():
    sim = sfsim.build(seed=5, opportunities=400, variant="custom_fields")
    w = sim.world
    with SandboxServer(sim) as srv:
        c = connect(
            srv.url, fields={"created_at": "Original_Created_Date__c", "created_by_crm_id": "Original_Creator__c"}
        )
        got, _ = sync(c)
        assert c.capabilities["fields.created_by_crm_id"].detail == "Original_Creator__c (reference)"
    with_custom = 0
    for oid, r in got.items():
        extra = w.opps[oid].extra or {}
        assert r.created_at == extra.get("Original_Created_Date__c")
        assert r.created_by_crm_id == extra.get("Original_Creator__c")
        with_custom += bool(extra)
    assert 0 < with_custom < len(got)


# -- auth, retries, quota ------------------------------------------------------------------------------------------------


def test_spent_allocation_is_quota_exhausted_not_retried():
    sim = sfsim.build(seed=5, opportunities=400, daily_limit=100_000)
    sim.api_usage = sim.daily_limit
    with SandboxServer(sim) as srv:
        c = connect(srv.url)
        with pytest.raises(QuotaExhausted):
            c.stages()
        assert c.stats.retries == 0 and c.stats.quota_used == c.stats.quota_limit == 100_000


def test_rate_limit_fault_is_salesforce_403_quota(sandbox):
    sandbox.simulator.faults = FaultPlan(rules=[FaultRule("rate_limit", after=2)])
    c = connect(sandbox.url)
    with pytest.raises(QuotaExhausted):
        sync(c)
    assert c.stats.retries == 0


def test_run_stops_early_when_org_usage_is_high():
    sim = sfsim.build(seed=5, opportunities=1000, daily_limit=10_000)
    sim.api_usage = 9_495
    with SandboxServer(sim) as srv:
        conn = make_conn(srv.url, quota=QuotaConfig(run_share=0.25, stop_at_usage=0.95))
        c = SalesforceConnector(conn, dict(sfsim.SANDBOX_CREDENTIALS), sleep=lambda s: None)
        with pytest.raises(QuotaExhausted) as err:
            sync(c)
        assert "9500/10000" in str(err.value) or "of its quota used" in str(err.value)
        assert sim.api_usage == 9_500  # the sync stopped as soon as usage reached 95%


# -- users and deletes ---------------------------------------------------------------------------------------------------


def test_deleted_uses_the_delete_log_inside_15_days(sandbox):
    w = sandbox.simulator.world
    c = connect(sandbox.url)
    sync(c)
    t0 = w.clock.now()
    w.clock.advance(timedelta(minutes=5))
    victims = [o.native_id for o in list(w.live())[:7]]
    for oid in victims:
        w.delete(oid)
    w.clock.advance(timedelta(minutes=2))  # the log covers whole minutes
    fresh = connect(sandbox.url)  # no earlier request: it asks the server for its clock
    rows = [r for page in fresh.deleted(t0) for r in page]
    assert sorted(i for i, _ in rows) == sorted(victims)
    assert all(at is not None and at >= t0 for _, at in rows)
    # token, describe (its Date header is the server's clock), limits, org currency, one getDeleted
    assert fresh.stats.requests <= 5 and fresh.stats.token_requests == 1


def test_deleted_falls_back_to_query_all_beyond_15_days(sandbox):
    w = sandbox.simulator.world
    since = w.clock.now()
    purged = next(iter(w.live())).native_id
    w.delete(purged)  # 20 days before the run: gone from log and Recycle Bin
    w.clock.advance(timedelta(days=10))
    victims = [o.native_id for o in list(w.live())[:4]]
    for oid in victims:
        w.delete(oid)
    w.clock.advance(timedelta(days=10))
    c = connect(sandbox.url)
    sync(c)
    rows = [r for page in c.deleted(since) for r in page]  # older than getDeleted's window: queryAll
    assert sorted(i for i, _ in rows) == sorted(victims)
    rows_all = [r for page in c.deleted(None) for r in page]
    assert sorted(i for i, _ in rows_all) == sorted(victims)
    # the purged delete is not reported by any native feed: the caller finds it by reconciling ids
    assert purged not in {i for i, _ in rows_all}


def test_single_currency_org_is_the_default_and_needs_no_option():
    """Salesforce's default org has no CurrencyIsoCode: the connector learns it from describe, never names the
    field, and takes the org's currency (options.currency overrides)."""
    sim = sfsim.build(seed=5, opportunities=300)
    with SandboxServer(sim) as srv:
        c = connect(srv.url)
        got, _ = sync(c)
        assert "CurrencyIsoCode" not in c.opportunity_soql(True, None)
        assert len(got) == 300 and {o.currency for o in got.values()} == {sfsim.ORG_CURRENCY}
        assert c.capabilities["org currency (Organization.DefaultCurrencyIsoCode)"].available is True
        got, _ = sync(connect(srv.url, options={"currency": "EUR"}))
        assert {o.currency for o in got.values()} == {"EUR"}
        # forcing multi-currency on a single-currency org: a permanent error naming the option, before any query
        forced = connect(srv.url, options={"multi_currency": True})
        with pytest.raises(CrmError) as err:
            sync(forced)
        assert err.value.permanent and "options.multi_currency" in str(err.value)
        assert forced.stats.requests == 2  # token and describe


def test_multi_currency_org_reads_each_records_currency():
    sim = sfsim.build(seed=5, opportunities=300, variant="multi_currency")
    with SandboxServer(sim) as srv:
        c = connect(srv.url)
        got, _ = sync(c)
        assert "CurrencyIsoCode" in c.opportunity_soql(True, None)
        assert {o.currency for o in got.values()} == {"USD", "EUR", "GBP"}
        for oid, r in got.items():
            assert r.currency == sim.world.opps[oid].currency
        got, _ = sync(connect(srv.url, options={"multi_currency": False, "currency": "CHF"}))
        assert {o.currency for o in got.values()} == {"CHF"}


# -- pure pieces ---------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_soql_string_round_trips_through_the_sandbox_tokenizer(text):
    toks = sfsim.tokenize(f"SELECT Id FROM Opportunity WHERE Name = {soql_string(text)}")
    assert [t.kind for t in toks[-2:]] == ["str", "eof"] and toks[-2].value == text


def test_usage_header_parsing_and_classification():
    stats = RequestStats()
    observe(
        _response(200, headers={"Sforce-Limit-Info": "api-usage=25/5000; per-app-api-usage=17/250(appName=x)"}), stats
    )
    assert (stats.quota_used, stats.quota_limit) == (25, 5000)
    spent = classify(
        _response(403, [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])
    )
    assert isinstance(spent, QuotaExhausted)
    busy = classify(
        _response(
            403,
            [
                {
                    "message": "ConcurrentRequests (concurrent API requests) Limit exceeded.",
                    "errorCode": "REQUEST_LIMIT_EXCEEDED",
                }
            ],
        )
    )
    assert isinstance(busy, RetryableHttpError)
    bad = classify(_response(400, [{"message": "No such column", "errorCode": "INVALID_FIELD"}]))
    assert isinstance(bad, CrmError) and bad.code == "INVALID_FIELD" and bad.permanent
    assert classify(_response(503, [{"message": "busy", "errorCode": "SERVER_UNAVAILABLE"}])) is None
    assert classify(_response(401, [{"message": "x", "errorCode": "INVALID_SESSION_ID"}])) is None


def _response(status, body=None, headers=None):
    r = requests.Response()
    r.status_code = status
    r._content = json.dumps(body).encode() if body is not None else b""
    r.headers.update(headers or {})
    return r


def test_account_rename_does_not_move_the_cursor_but_is_read_incrementally(sandbox):
    """Salesforce quirk: a parent (Account) change does not bump the Opportunity's SystemModstamp. The incremental
    query also asks for opportunities whose Account.SystemModstamp moved (one SOQL, no extra request), so the
    rename arrives with the next incremental read, once, in its set."""
    w = sandbox.simulator.world
    opp = next(o for o in w.live() if o.account is not None)
    siblings = {o.native_id for o in w.live() if o.account == opp.account}
    stamp = opp.modified_at
    t0 = w.clock.now()
    w.clock.advance(timedelta(minutes=1))
    with w.lock:  # as world.advance renames an account: the account's own stamp moves
        acc = w.accounts[opp.account]
        acc.name, acc.modified_at = "Renamed Holdings", w.clock.now()
        w.version += 1
    assert opp.modified_at == stamp  # the opportunity's cursor did not move
    c = connect(sandbox.url)
    served = sandbox.simulator.request_count
    inc, pages = sync(c, since=t0)  # sync() asserts each record comes back once
    assert set(inc) == siblings and inc[opp.native_id].client_name == "Renamed Holdings"
    assert all(r.modified_at == w.opps[i].modified_at < t0 for i, r in inc.items())
    # honest counts: every request the server saw is in the stats (the renamed accounts cost no extra query)
    assert c.stats.requests == sandbox.simulator.request_count - served
    assert len(pages) == 2
    soql = c.opportunity_soql(True, t0)
    lit = t0.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"(SystemModstamp >= {lit} OR Account.SystemModstamp >= {lit})" in soql
    # a later incremental run from after the rename no longer reads them
    later, _ = sync(connect(sandbox.url), since=w.clock.now() + timedelta(seconds=1))
    assert not set(later) & siblings
    full, _ = sync(connect(sandbox.url))
    assert full[opp.native_id].client_name == "Renamed Holdings"
