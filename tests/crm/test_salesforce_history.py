"""SalesforceConnector, issue 15 ("history truth"): the close time Salesforce records (LastStageChangeDate, else
CloseDate's day), reads by id (SOQL `Id IN` through /query) and filters evaluated in Python as SOQL evaluates them.
Over real HTTP against the simulator and its variants (no HTTP mocks)."""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import urlencode

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.salesforce import ID_BATCH, MAX_QUERY_URI, SalesforceConnector, id_batches
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.crm.test_contract import SF_FILTERS


def connect(url: str, **kw) -> SalesforceConnector:
    conn = ConnectionConfig(
        name="sf",
        crm="salesforce",
        base_url=url,
        credentials={"client_id": "${SF_CLIENT_ID}", "client_secret": "${SF_CLIENT_SECRET}"},
        page_size=kw.pop("page_size", 2000),
        **kw,
    )
    return SalesforceConnector(conn, dict(sfsim.SANDBOX_CREDENTIALS), sleep=lambda s: None)


def served(variant: str = "default", n: int = 400) -> SandboxServer:
    return SandboxServer(sfsim.build(seed=21, opportunities=n, variant=variant))


def read_all(c: SalesforceConnector, since: datetime | None = None) -> dict:
    return {o.source_id: o for open_set in (True, False) for page in c.opportunities(open_set, since) for o in page}


def midnight(d) -> datetime:
    return datetime(d.year, d.month, d.day)


# -- (a) the close time is the CRM's, not the last edit ---------------------------------------------------------------


def test_closed_records_carry_last_stage_change_date_not_the_last_edit():
    with served() as srv:
        w = srv.simulator.world
        c = connect(srv.url)
        got = read_all(c)
        closed = [o for o in got.values() if o.status != "open"]
        assert closed and len(closed) < len(got)
        for o in got.values():
            sim = w.opps[o.source_id]
            if o.status == "open":
                assert (o.crm_closed_at, o.crm_closed_at_field) == (None, None)
            else:
                assert (o.crm_closed_at, o.crm_closed_at_field) == (sim.closed_at, "LastStageChangeDate")
        long_before = [o for o in closed if o.crm_closed_at < o.modified_at - timedelta(days=30)]
        assert len(long_before) > len(closed) // 4  # generated closes often long before the last edit
        assert "LastStageChangeDate" in c.opportunity_soql(False, None)
        assert c.capabilities["LastStageChangeDate"].available and c.stats.warnings == []


def test_a_close_and_a_reopen_since_the_last_run():
    with served() as srv:
        w = srv.simulator.world
        c = connect(srv.url)
        before = read_all(c)
        open_id = next(i for i, o in before.items() if o.status == "open")
        closed_id = next(i for i, o in before.items() if o.status == "won")
        since = w.clock.now()
        w.clock.advance(timedelta(hours=2))
        w.update(open_id, stage="Closed Lost")
        closed_at = w.opps[open_id].modified_at  # the close's time (the clock runs on in real time)
        w.clock.advance(timedelta(days=3))
        w.update(open_id, amount=12.0)  # a later edit does not move the close time
        w.update(closed_id, stage="Prospecting")  # a reopen clears it
        after = read_all(connect(srv.url), since=since)
        assert (after[open_id].status, after[open_id].crm_closed_at) == ("lost", closed_at)
        assert after[open_id].modified_at > closed_at + timedelta(days=2)
        assert (after[closed_id].status, after[closed_id].crm_closed_at, after[closed_id].crm_closed_at_field) == (
            "open",
            None,
            None,
        )


# -- (b) tenants without LastStageChangeDate: CloseDate's day -------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,options",
    [("no_last_stage_change_date", {}), ("default", {"api_version": "51.0"})],
    ids=["hidden-by-field-level-security", "api-version-before-52"],
)
def test_without_last_stage_change_date_closes_are_dated_by_close_date(variant, options):
    with served(variant) as srv:
        w = srv.simulator.world
        c = connect(srv.url, options=options)
        got = read_all(c)  # no INVALID_FIELD: the field is not asked for
        closed = [o for o in got.values() if o.status != "open"]
        assert closed
        for o in got.values():
            sim = w.opps[o.source_id]
            if o.status == "open":
                assert o.crm_closed_at is None and o.crm_closed_at_field is None
            else:
                assert o.crm_closed_at == midnight(sim.close_date) == midnight(sim.closed_at.date())
                assert o.crm_closed_at_field == "CloseDate" and "LastStageChangeDate" not in o.raw
        assert "LastStageChangeDate" not in c.opportunity_soql(False, None)
        assert not c.capabilities["LastStageChangeDate"].available
        assert "CloseDate at 00:00 UTC only" in c.capabilities["close time"].detail


def test_a_closed_record_without_last_stage_change_date_falls_back_to_its_close_date():
    with served() as srv:
        w = srv.simulator.world
        oid = next(o.native_id for o in w.live() if w.status(o) == "open")
        # a record closed with no stage change on record (LastStageChangeDate is nillable)
        w.update(oid, stage="Closed Won", close_date=datetime(2025, 3, 14).date(), closed_at=None)
        got = read_all(connect(srv.url))[oid]
        assert got.raw["LastStageChangeDate"] is None
        assert (got.crm_closed_at, got.crm_closed_at_field) == (datetime(2025, 3, 14), "CloseDate")


# -- (c) reads by id ------------------------------------------------------------------------------------------------------

FILTERS = [RecordFilter(field="Amount", op="at_least", value=100000)]


def test_fetch_by_ids_ignores_filters_and_status_and_leaves_out_deleted_and_unknown_ids():
    with served(n=800) as srv:
        w = srv.simulator.world
        c = connect(srv.url, filters=FILTERS, open_statuses=["Prospecting"])
        in_scope = read_all(c)
        out_of_scope = [o.native_id for o in w.live() if o.native_id not in in_scope]
        assert out_of_scope and any(w.status(w.opps[i]) != "open" for i in out_of_scope)
        gone = out_of_scope[:5]
        for i in gone:
            w.delete(i)
        unknown = [sfsim.sf_id("006", 900_000 + n) for n in range(5)]
        ids = list(in_scope) + out_of_scope + unknown + ["not an id", "006' OR Id != '"]
        c.stages()  # discovery and dictionaries are read once per run
        requests_before = c.stats.requests
        pages = list(c.fetch_by_ids(ids))
        got = {o.source_id: o for page in pages for o in page}
        assert set(got) == set(in_scope) | set(out_of_scope) - set(gone)
        # three queries of at most 300 ids, one page each (page size 2000)
        batches = -(-sum(1 for i in set(ids) if i in w.opps or i in unknown) // ID_BATCH)
        assert len(pages) == batches == 3 and c.stats.requests - requests_before == 3
        # mapped exactly as the opportunity sets map them (same select list, same enrichment)
        for oid, o in in_scope.items():
            assert got[oid] == o
        unfiltered = read_all(connect(srv.url, open_statuses=["Prospecting"]))  # same select list: Amount is in it
        for oid in out_of_scope[5:]:
            assert got[oid] == unfiltered[oid]
        assert list(c.fetch_by_ids([])) == [] and list(c.fetch_by_ids(unknown)) == []


def test_fetch_by_ids_pages_through_next_records_url_within_a_batch():
    with served(n=800) as srv:
        c = connect(srv.url, page_size=200)
        ids = list(srv.simulator.world.opps)[:650]
        c.stages()
        before = c.stats.requests
        pages = list(c.fetch_by_ids(ids))
        # batches of 300, 300, 50 ids; pages of at most 200 records: 2 + 2 + 1 requests
        assert [len(p) for p in pages] == [200, 100, 200, 100, 50]
        assert c.stats.requests - before == 5
        assert {o.source_id for p in pages for o in p} == set(ids)


def test_id_batches_keep_the_uri_under_the_limit():
    ids = [sfsim.sf_id("006", n) for n in range(1, 1001)]
    fixed = len(urlencode({"q": "SELECT Id FROM Opportunity WHERE Id IN () ORDER BY Id"}))
    batches = list(id_batches(ids, fixed))
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    # a long select list (many custom fields) leaves room for fewer ids: the bytes decide, not the count
    tight = list(id_batches(ids, fixed + 9_000))
    assert sum(map(len, tight)) == 1000 and max(map(len, tight)) < 300
    for b in tight:
        soql = "SELECT Id FROM Opportunity WHERE Id IN (" + ", ".join(f"'{i}'" for i in b) + ") ORDER BY Id"
        assert len(urlencode({"q": soql})) + 9_000 <= MAX_QUERY_URI


# -- (d) filters in Python agree with SOQL ----------------------------------------------------------------------------------


def test_a_record_without_an_account_passes_a_not_equal_filter_on_the_account():
    """SOQL's != matches a null parent field; the contract suite checks matches_filters agrees (every CRM)."""
    with served(n=600) as srv:
        w = srv.simulator.world
        filters = [f(srv.simulator) for f in SF_FILTERS.values()]  # the contract case "all"
        server_side = set(read_all(connect(srv.url, filters=filters)))
        assert any(w.opps[i].account is None for i in server_side)
