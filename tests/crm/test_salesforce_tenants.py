"""SalesforceConnector against the tenants Salesforce documents and our default did not meet (issue 14): what
describe says, API users without optional rights, relabelled stages, custom fields, overrides, fail-fast errors.
Over real HTTP against the simulator's variants (no HTTP mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import OVERRIDABLE_FIELDS, ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.http import CrmError, QuotaExhausted
from oppsync_pipeline.lib.crm.salesforce import SalesforceConnector, fix_for
from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config

N = 300


def connect(url: str, **kw) -> SalesforceConnector:
    conn = ConnectionConfig(
        name="sf",
        crm="salesforce",
        base_url=url,
        credentials={"client_id": "${SF_CLIENT_ID}", "client_secret": "${SF_CLIENT_SECRET}"},
        page_size=kw.pop("page_size", 200),
        **kw,
    )
    return SalesforceConnector(conn, dict(sfsim.SANDBOX_CREDENTIALS), sleep=lambda s: None)


def sync(c: SalesforceConnector) -> dict:
    out = {}
    for open_set in (True, False):
        for page in c.opportunities(open_set=open_set, since=None):
            for o in page:
                out[o.source_id] = o
    return out


def served(variant: str, n: int = N):
    return SandboxServer(sfsim.build(seed=3, opportunities=n, variant=variant))


# -- what discovery reads -------------------------------------------------------------------------------------------


def test_discover_reports_what_will_be_read():
    with served("default") as srv:
        caps = {c.name: c for c in connect(srv.url).discover()}
    with served("no_optional_rights") as srv:
        refused = {c.name: c for c in connect(srv.url).discover() if not c.available}
    assert set(refused) == {
        "API limits (/limits)",
        "org currency (Organization.DefaultCurrencyIsoCode)",
        "stage dictionary (OpportunityStage)",
        "CurrencyIsoCode",
        "users (User query)",
        "stage list",
        "users (owners and creators)",
    }
    assert "INVALID_TYPE" in refused["stage dictionary (OpportunityStage)"].detail
    assert caps["Opportunity describe"].available and "custom fields: none" in caps["Opportunity describe"].detail
    assert not caps["CurrencyIsoCode"].available and "single-currency" in caps["CurrencyIsoCode"].detail
    assert caps["org currency (Organization.DefaultCurrencyIsoCode)"].available
    assert caps["stage dictionary (OpportunityStage)"].available and caps["API limits (/limits)"].available
    assert caps["opportunities (open set)"].available and caps["opportunities (not-open set)"].available


def test_discovery_runs_once_per_run():
    with served("default") as srv:
        c = connect(srv.url)
        sync(c)
        before = c.stats.requests
        c.prepare()
        c.opportunity_soql(True, None)
        assert c.stats.requests == before
        assert srv.simulator.request_count >= before - 1


# -- optional reads refused ------------------------------------------------------------------------------------------


def test_no_optional_rights_syncs_with_warnings_and_fallbacks():
    with served("no_optional_rights") as srv:
        sim = srv.simulator
        c = connect(srv.url)
        got = sync(c)
        users = list(c.users())
        truth = sfsim.truth(sim)
        assert set(got) == set(truth)
        for oid, r in got.items():
            o = sim.world.opps[oid]
            assert r.stage == r.stage_id == o.stage  # StageName for both
            assert r.status == sim.world.status(o)  # from IsClosed / IsWon
            assert r.currency is None and r.crm_status == sfsim.FORECAST[o.stage]
        assert users == [] and c.stages() == {}
        text_ = "\n".join(c.stats.warnings)
        for name in ("API limits (/limits)", "org currency", "stage dictionary (OpportunityStage)", "users (User"):
            assert name in text_, name
        assert "HTTP 403" in text_ and "INVALID_TYPE" in text_
        # the quota still comes from the header of every response
        assert c.stats.quota_limit == sfsim.DEFAULT_DAILY_LIMIT
        assert {k for k, v in c.capabilities.items() if not v.available} == {
            "API limits (/limits)",
            "org currency (Organization.DefaultCurrencyIsoCode)",
            "stage dictionary (OpportunityStage)",
            "users (User query)",
            "CurrencyIsoCode",
        }


def test_no_optional_rights_with_configured_currency_and_open_statuses():
    with served("no_optional_rights") as srv:
        w = srv.simulator.world
        c = connect(srv.url, options={"currency": "EUR"}, open_statuses=["Prospecting", "Qualification"])
        got = sync(c)
        assert {o.currency for o in got.values()} == {"EUR"}
        for oid, r in got.items():
            stage = w.opps[oid].stage
            expected = (
                "open" if stage in ("Prospecting", "Qualification") else ("won" if stage == "Closed Won" else "lost")
            )
            assert r.status == expected


def test_a_spent_allocation_in_an_optional_read_is_not_a_refusal():
    with served("default") as srv:
        srv.simulator.faults = FaultPlan(rules=[FaultRule("rate_limit", after=1, path=r"/limits")])
        c = connect(srv.url)
        with pytest.raises(QuotaExhausted):
            c.prepare()
        assert c.stats.warnings == []


# -- stage model ----------------------------------------------------------------------------------------------------------


def test_relabelled_stages_name_what_users_see_and_keep_the_api_name():
    with served("stage_api_names") as srv:
        w = srv.simulator.world
        c = connect(srv.url)
        got = sync(c)
        seen = set()
        for oid, r in got.items():
            o = w.opps[oid]
            assert r.stage_id == o.stage and r.stage == w.stages[o.stage].label
            assert r.crm_status == sfsim.FORECAST[o.stage] and r.status == w.status(o)
            seen.add((r.stage_id, r.stage))
        assert ("Closed Won", "Won - Signed") in seen and ("Prospecting", "Discovery") in seen
        assert c.stages()["Negotiation/Review"].label == "Negotiation"


def test_open_statuses_and_stage_categories_use_the_names_users_see():
    with served("stage_api_names") as srv:
        w = srv.simulator.world
        open_names = ["Discovery", "Negotiation"]  # labels of Prospecting, Negotiation/Review
        c = connect(srv.url, open_statuses=open_names, stage_categories={"Identify Decision Makers": "won"})
        soql = c.opportunity_soql(True, None)
        assert "StageName IN ('Prospecting', 'Negotiation/Review')" in soql
        opened = {o.source_id: o for page in c.opportunities(True, None) for o in page}
        closed = {o.source_id: o for page in c.opportunities(False, None) for o in page}
        assert not set(opened) & set(closed)
        assert set(opened) == {o.native_id for o in w.live() if o.stage in ("Prospecting", "Negotiation/Review")}
        for r in [*opened.values(), *closed.values()]:
            o = w.opps[r.source_id]
            if o.stage == "Id. Decision Makers":
                assert r.status == "won"  # stage_categories by name, first
            elif o.stage in ("Prospecting", "Negotiation/Review"):
                assert r.status == "open"
            else:
                assert r.status == ("won" if o.stage == "Closed Won" else "lost")


def test_forecast_category_in_open_statuses_matches_the_open_set():
    with served("default") as srv:
        w = srv.simulator.world
        c = connect(srv.url, open_statuses=["Commit", "Best Case"])
        opened = {o.source_id: o for page in c.opportunities(True, None) for o in page}
        expected = {o.native_id for o in w.live() if sfsim.FORECAST[o.stage] in ("Commit", "Best Case")}
        assert set(opened) == expected and all(r.status == "open" for r in opened.values())


# -- configured fields ----------------------------------------------------------------------------------------------------


def test_every_accepted_field_override_takes_effect():
    """Each canonical field `config check` lets a connection point elsewhere, pointed at another field of the
    tenant: the mapped record carries that field's value."""
    overrides = {
        "created_at": "Original_Created_Date__c",
        "created_by_crm_id": "Original_Creator__c",
        "project_name": "Legacy_Id__c",
        "client_name": "Account.BillingCity",
        "stage": "Region__c",
        "amount": "ExpectedRevenue",
        "close_date": "Original_Created_Date__c",
        "probability": "Amount",
        "sales_executive": "Owner.Email",
    }
    assert set(overrides) == set(OVERRIDABLE_FIELDS)
    with served("custom_fields") as srv:
        w = srv.simulator.world
        with w.lock:
            for i, o in enumerate(w.live()):
                if i % 2:
                    o.extra = {**(o.extra or {}), "Region__c": "EMEA"}
        c = connect(srv.url, fields=overrides)
        assert SalesforceConnector.validate_connection(c.conn) == []
        got = sync(c)
        regions = set()
        for oid, r in got.items():
            o = w.opps[oid]
            extra = o.extra or {}
            acc = w.accounts[o.account] if o.account is not None else None
            assert r.created_at == extra.get("Original_Created_Date__c")
            assert r.created_by_crm_id == extra.get("Original_Creator__c")
            assert r.project_name == extra.get("Legacy_Id__c")
            assert r.client_name == (acc.city if acc else None)
            assert r.stage == r.stage_id == extra.get("Region__c")
            assert r.status == w.status(o)  # still the record's IsClosed / IsWon
            expected_rev = None if o.amount is None else round(o.amount * (o.probability or 0) / 100, 2)
            assert r.amount == expected_rev
            created = extra.get("Original_Created_Date__c")
            assert r.close_date == (created.date() if created else None)
            assert r.probability == o.amount
            assert r.sales_executive == w.users[o.owner].email
            regions.add(r.stage)
        assert regions == {"EMEA", None}


def test_a_field_the_org_does_not_have_fails_at_once_naming_the_key():
    with served("default") as srv:  # the default org has no custom fields
        c = connect(srv.url, fields={"created_at": "Original_Created_Date__c"})
        with pytest.raises(CrmError) as err:
            sync(c)
        assert err.value.permanent and "fields.created_at" in str(err.value)
        assert c.stats.requests == 2  # token and describe: no query was sent
        c = connect(srv.url, filters=[RecordFilter(field="Region__c", op="equal", value="EMEA")])
        with pytest.raises(CrmError) as err:
            sync(c)
        assert err.value.permanent and "filters[0].field" in str(err.value)
        c = connect(srv.url, fields={"client_name": "Partner__r.Name"})
        with pytest.raises(CrmError) as err:
            sync(c)
        assert "no relationship 'Partner__r'" in str(err.value)


def test_creator_field_must_be_a_user_lookup():
    with served("custom_fields") as srv:
        for field, what in (("Partner_Account__c", "a lookup to Account"), ("Region__c", "a string field")):
            c = connect(srv.url, fields={"created_by_crm_id": field})
            with pytest.raises(CrmError) as err:
                sync(c)
            assert err.value.permanent and what in str(err.value) and "not a lookup to User" in str(err.value)


def test_filter_types_come_from_describe():
    with served("custom_fields") as srv:
        w = srv.simulator.world
        c = connect(
            srv.url,
            filters=[RecordFilter(field="Original_Created_Date__c", op="at_least", value="2020-01-01T00:00:00Z")],
        )
        assert "Original_Created_Date__c >= 2020-01-01T00:00:00Z" in c.opportunity_soql(True, None)
        got = sync(c)
        assert set(got) == {o.native_id for o in w.live() if (o.extra or {}).get("Original_Created_Date__c")}


# -- errors say what to check -------------------------------------------------------------------------------------------


def test_invalid_field_from_the_server_names_the_config_key():
    with served("default") as srv:
        c = connect(srv.url, options={"multi_currency": False})
        c.prepare()
        c._multi_currency = True  # what an older connector did: name CurrencyIsoCode in every query
        with pytest.raises(CrmError) as err:
            sync(c)
        assert err.value.status == 400 and err.value.code == "INVALID_FIELD" and err.value.permanent
        assert "options.multi_currency" in str(err.value)


def test_a_permanent_error_fails_the_run_at_once_without_retries(warehouse_url: str, tmp_path: Path):
    with served("default", n=50) as srv:
        cfg = sandbox_config(
            {"salesforce": srv},
            warehouse_url,
            tmp_path,
            extra={"salesforce": {"fields": {"created_at": "Original_Created_Date__c"}}},
        )
        engine = make_engine(cfg.warehouse.url)
        try:
            connector = build_connector(cfg, cfg.connections[0])
            with pytest.raises(ExtractFailed) as err:
                sync_connection(cfg, cfg.connections[0], engine, run_id="bad-field", mode="full", connector=connector)
            assert (
                connector.stats.retries == 0 and connector.stats.seconds_waited == 0
            )  # at once: neither retried nor waited (the seconds: benchmarks/fail_fast.py)
            assert err.value.permanent and "fields.created_at" in str(err.value)
        finally:
            engine.dispose()


# -- token requests ------------------------------------------------------------------------------------------------------


def test_token_requests_are_counted_with_the_requests():
    with served("default") as srv:
        srv.simulator.faults = FaultPlan(rules=[FaultRule("token_expiry", after=4)])
        c = connect(srv.url)
        sync(c)
        assert c.stats.token_requests == 2 and c.stats.token_refreshes == 1
        served_requests = srv.simulator.request_count
        assert c.stats.requests == served_requests  # every request the server saw, token requests included
        assert c.stats.as_metadata()["token_requests"] == 2


def test_no_optional_rights_run_records_warnings(warehouse_url: str, tmp_path: Path):
    with served("no_optional_rights", n=50) as srv:
        cfg = sandbox_config({"salesforce": srv}, warehouse_url, tmp_path)
        engine = make_engine(cfg.warehouse.url)
        try:
            out = sync_connection(cfg, cfg.connections[0], engine, run_id="r1", mode="full")
            assert out.extract.status == "complete"
            with engine.connect() as conn:
                row = conn.execute(
                    text("SELECT warnings, token_requests, api_requests FROM oppsync.sync_runs WHERE run_id = 'r1'")
                ).one()
            assert "stage dictionary" in row.warnings and row.token_requests == 1 and row.api_requests > 1
        finally:
            engine.dispose()


# -- addresses -----------------------------------------------------------------------------------------------------------


def test_multi_line_billing_street_becomes_one_canonical_address():
    with served("default") as srv:
        w = srv.simulator.world
        got = sync(connect(srv.url))
        multi = [
            r for r in got.values() if r.raw.get("Account") and "\n" in (r.raw["Account"].get("BillingStreet") or "")
        ]
        assert multi
        for r in multi:
            acc = w.accounts[w.opps[r.source_id].account]
            lines = [x.strip() for x in acc.street.splitlines() if x.strip()]
            expected = ", ".join([*lines, *(p for p in (acc.city, acc.state, acc.postal_code, acc.country) if p)])
            assert r.service_location == expected and "\n" not in r.service_location and "\r" not in expected
        austin = next(r for r in got.values() if r.raw.get("Account") and r.raw["Account"].get("BillingState"))
        acc = austin.raw["Account"]
        assert f", {acc['BillingState']}, {acc['BillingPostalCode']}, " in austin.service_location


def test_an_unknown_api_version_fails_at_once_naming_the_option():
    with served("default", n=20) as srv:
        c = connect(srv.url, options={"api_version": "30.0"})
        with pytest.raises(CrmError) as err:
            c.prepare()
        assert err.value.status == 404 and err.value.permanent and "options.api_version" in str(err.value)
        assert c.stats.retries == 0


def test_fix_hints_name_what_to_check():
    conn = connect("https://example.my.salesforce.com", fields={"created_at": "Original_Created_Date__c"}).conn
    assert "fields.created_at" in fix_for(
        "INVALID_FIELD", "No such column 'Original_Created_Date__c' on entity 'Opportunity'", conn
    )
    assert "options.multi_currency" in fix_for("INVALID_FIELD", "No such column 'CurrencyIsoCode' on entity", conn)
    assert "filters:" in fix_for("MALFORMED_QUERY", "unexpected token", conn)
    assert "Read on the object" in fix_for("INVALID_TYPE", "sObject type 'User' is not supported.", conn)
    assert "API Enabled" in fix_for("API_DISABLED_FOR_ORG", "The REST API is not enabled", conn)
    assert fix_for("UNKNOWN_EXCEPTION", "x", conn) is None
