"""The Salesforce simulator over real HTTP, driven through simple-salesforce (the official-style client) and
plain requests for the quirks of the fidelity checklist (docs/crm-api-notes.md §1.11)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import requests
from requests.adapters import HTTPAdapter
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)

from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

N = 2500
V = "62.0"


class _HttpsToHttp(HTTPAdapter):
    """simple-salesforce always builds https:// URLs; the sandbox speaks plain http."""

    def send(self, request, **kwargs):  # type: ignore[override]
        request.url = "http://" + request.url[len("https://") :]
        return super().send(request, **kwargs)


def _session() -> requests.Session:
    s = requests.Session()
    s.mount("https://", _HttpsToHttp())
    return s


@pytest.fixture(scope="module")
def server():
    sim = sfsim.build(seed=7, opportunities=N)
    with SandboxServer(sim) as srv:
        yield srv


def token(url: str) -> dict:
    r = requests.post(
        f"{url}/services/oauth2/token", data={"grant_type": "client_credentials", **sfsim.SANDBOX_CREDENTIALS}
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def sf(server):
    tok = token(server.url)
    return Salesforce(instance_url=tok["instance_url"], session_id=tok["access_token"], version=V, session=_session())


def auth_headers(url: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(url)['access_token']}"}


def world_live(server):
    return [o for o in server.simulator.world.opps.values() if o.deleted_at is None]


# -- auth ----------------------------------------------------------------------------------------------------


def test_token_response_shape(server):
    tok = token(server.url)
    assert set(tok) >= {"access_token", "instance_url", "id", "token_type", "issued_at", "signature"}
    assert tok["token_type"] == "Bearer" and "expires_in" not in tok
    assert tok["issued_at"].isdigit() and tok["id"].startswith("https://login.salesforce.com/id/00D")
    assert tok["instance_url"] == server.url


def test_bad_credentials_and_grant(server):
    r = requests.post(
        f"{server.url}/services/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": "x", "client_secret": "y"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    r = requests.post(f"{server.url}/services/oauth2/token", data={"grant_type": "password"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_bad_token_is_401_invalid_session(server):
    r = requests.get(
        f"{server.url}/services/data/v{V}/query",
        params={"q": "SELECT Id FROM User"},
        headers={"Authorization": "Bearer nope"},
    )
    assert r.status_code == 401
    assert r.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    bad = Salesforce(instance_url=server.url, session_id="nope", version=V, session=_session())
    with pytest.raises(SalesforceExpiredSession):
        bad.query("SELECT Id FROM User")


# -- query and paging ---------------------------------------------------------------------------------------------


def test_query_all_pages_through_simple_salesforce(sf, server):
    live = world_live(server)
    result = sf.query_all("SELECT Id, Name, StageName FROM Opportunity ORDER BY Id")
    assert result["totalSize"] == len(live) > 2000  # more than one default (2000-row) page
    assert sorted(r["Id"] for r in result["records"]) == sorted(o.native_id for o in live)


def test_batch_size_header_paging_and_totalsize(sf, server):
    live = world_live(server)
    headers = {"Sforce-Query-Options": "batchSize=200"}
    first = sf.query("SELECT Id FROM Opportunity ORDER BY SystemModstamp, Id", headers=headers)
    assert first["totalSize"] == len(live) and not first["done"] and len(first["records"]) == 200
    assert first["nextRecordsUrl"].startswith(f"/services/data/v{V}/query/")
    assert first["nextRecordsUrl"].endswith("-200")
    ids, page, pages = [r["Id"] for r in first["records"]], first, 1
    while not page["done"]:
        page = sf.query_more(page["nextRecordsUrl"], identifier_is_url=True, headers=headers)
        assert page["totalSize"] == len(live)
        ids += [r["Id"] for r in page["records"]]
        pages += 1
    assert pages == -(-len(live) // 200) and len(ids) == len(set(ids)) == len(live)
    # query_all_iter follows the same cursor; the locator also works when identified without the URL
    assert sum(1 for _ in sf.query_all_iter("SELECT Id FROM Opportunity", headers=headers)) == len(live)
    locator = first["nextRecordsUrl"].rsplit("/", 1)[1]
    assert len(sf.query_more(locator, headers=headers)["records"]) == 200


def test_forgetting_the_evaluated_queries_keeps_the_cursors_handed_out(server):
    h = {**auth_headers(server.url), "Sforce-Query-Options": "batchSize=200"}
    url = f"{server.url}/services/data/v{V}/query"
    first = requests.get(url, params={"q": "SELECT Id FROM Opportunity ORDER BY Id"}, headers=h).json()
    cache = server.simulator.cache
    assert cache._entries
    cleared = requests.post(f"{server.url}/__sandbox/forget-queries")
    assert cleared.status_code == 200 and cleared.json() == {"cleared": 1} and not cache._entries
    # the cursor handed out before still pages; the same query is evaluated again, to the same answer
    more = requests.get(f"{server.url}{first['nextRecordsUrl']}", headers=h).json()
    assert len(more["records"]) == 200 and not {r["Id"] for r in more["records"]} & {r["Id"] for r in first["records"]}
    again = requests.get(url, params={"q": "SELECT Id FROM Opportunity ORDER BY Id"}, headers=h).json()
    assert cache._entries and again["records"] == first["records"]


def test_batch_size_is_clamped_to_200_2000(server):
    h = auth_headers(server.url)
    url = f"{server.url}/services/data/v{V}/query"
    small = requests.get(
        url, params={"q": "SELECT Id FROM Opportunity"}, headers={**h, "Sforce-Query-Options": "batchSize=5"}
    ).json()
    assert len(small["records"]) == 200
    big = requests.get(
        url, params={"q": "SELECT Id FROM Opportunity"}, headers={**h, "Sforce-Query-Options": "batchSize=50000"}
    ).json()
    assert len(big["records"]) == min(2000, big["totalSize"])


def test_record_shape_relationships_and_formats(sf, server):
    w = server.simulator.world
    soql = (
        "SELECT Id, Name, AccountId, Account.Name, Account.BillingCity, OwnerId, Owner.Name, Owner.Email, "
        "CreatedBy.Name, Amount, StageName, Probability, CloseDate, IsClosed, IsWon, "
        "CreatedDate, CreatedById, SystemModstamp FROM Opportunity"
    )
    records = sf.query_all(soql)["records"]
    with_account = next(r for r in records if r["AccountId"])
    without_account = next(r for r in records if r["AccountId"] is None)
    assert with_account["attributes"] == {
        "type": "Opportunity",
        "url": f"/services/data/v{V}/sobjects/Opportunity/{with_account['Id']}",
    }
    assert with_account["Account"]["attributes"]["type"] == "Account"
    assert set(with_account["Account"]) == {"attributes", "Name", "BillingCity"}
    assert without_account["Account"] is None  # a null parent is null, not an object of nulls
    assert with_account["Owner"]["attributes"]["type"] == "User" and "@" in with_account["Owner"]["Email"]
    for r in records:
        o = w.opps[r["Id"]]
        assert len(r["Id"]) == 18 and r["Id"].startswith("006")
        assert r["OwnerId"].startswith("005") and r["CreatedById"].startswith("005")
        assert r["CreatedDate"] == o.created_at.strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        assert r["CloseDate"] == o.close_date.isoformat()
        assert r["IsClosed"] == w.stages[o.stage].is_closed and r["StageName"] == o.stage
        assert isinstance(r["Probability"], float)
        assert r["Amount"] is None or isinstance(r["Amount"], float)
        assert r["CreatedBy"]["Name"] == w.users[o.creator].name


def test_soql_where_grammar(sf, server):
    w = server.simulator.world
    live = world_live(server)
    cutoff = sorted(o.modified_at for o in live)[len(live) // 2]
    lit = cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")

    def ids(where: str) -> set[str]:
        return {r["Id"] for r in sf.query_all(f"SELECT Id FROM Opportunity WHERE {where}")["records"]}

    assert ids(f"SystemModstamp >= {lit}") == {o.native_id for o in live if o.modified_at >= cutoff}
    # offset form of the same instant
    plus2 = (cutoff + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")
    assert ids(f"SystemModstamp >= {plus2}") == ids(f"SystemModstamp >= {lit}")
    assert ids("IsClosed = false") == {o.native_id for o in live if not w.stages[o.stage].is_closed}
    assert ids("IsClosed = true AND IsWon = false") == {o.native_id for o in live if w.status(o) == "lost"}
    assert ids("(IsWon = true OR StageName = 'Closed Lost') AND Amount > 100000") == {
        o.native_id for o in live if w.stages[o.stage].is_closed and o.amount is not None and o.amount > 100000
    }
    assert ids("NOT (IsClosed = true)") == ids("IsClosed = false")
    assert ids("StageName IN ('Customer\\'s Legal Review', 'prospecting')") == {
        o.native_id for o in live if o.stage in ("Customer's Legal Review", "Prospecting")
    }  # case-insensitive
    assert ids("StageName NOT IN ('Closed Won', 'Closed Lost')") == ids("IsClosed = false")
    assert ids("Amount = null") == {o.native_id for o in live if o.amount is None}
    d = date.today().isoformat()
    assert ids(f"CloseDate < {d}") == {o.native_id for o in live if o.close_date < date.today()}
    assert ids("Name LIKE 'acme%'") == {o.native_id for o in live if o.name.lower().startswith("acme")}
    ordered = sf.query_all("SELECT Id, Amount FROM Opportunity WHERE Amount != null ORDER BY Amount DESC, Id LIMIT 10")[
        "records"
    ]
    top = sorted((o for o in live if o.amount is not None), key=lambda o: -o.amount)[:10]
    assert [r["Id"] for r in ordered] == [o.native_id for o in top]
    assert sf.query("SELECT COUNT() FROM Opportunity WHERE IsClosed = false")["totalSize"] == len(
        ids("IsClosed = false")
    )


def test_soql_errors_are_json_arrays(sf, server):
    h = auth_headers(server.url)
    url = f"{server.url}/services/data/v{V}/query"
    cases = {
        "SELECT Id FROM Opportunity WHERE CreatedDate > '2024-01-01T00:00:00Z'": "INVALID_FIELD",  # quoted datetime
        "SELECT Id FROM Opportunity WHERE Amount > '5'": "INVALID_FIELD",
        "SELECT Id FROM Opportunity WHERE Name = 5": "INVALID_FIELD",
        "SELECT Nope FROM Opportunity": "INVALID_FIELD",
        "SELECT Bogus.Name FROM Opportunity": "INVALID_FIELD",
        "SELECT Id FROM Opportunity WHERE IsClosed = true AND IsWon = true OR Amount > 1": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity WHERE Name = 'unterminated": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity WHERE Name = 'bad \\q escape'": "MALFORMED_QUERY",
        "SELECT Id, Id FROM Opportunity": "MALFORMED_QUERY",
        "SELECT Id FROM Widget": "INVALID_TYPE",
        "SELECT FROM Opportunity": "MALFORMED_QUERY",
    }
    for soql, code in cases.items():
        r = requests.get(url, params={"q": soql}, headers=h)
        assert r.status_code == 400, soql
        body = r.json()
        assert isinstance(body, list) and body[0]["errorCode"] == code, (soql, body)
    with pytest.raises(SalesforceMalformedRequest):
        sf.query("SELECT Nope FROM Opportunity")
    r = requests.get(f"{server.url}/services/data/v{V}/query/01gXXXXXXXXXXXXXXX-200", headers=h)
    assert r.status_code == 400 and r.json()[0]["errorCode"] == "INVALID_QUERY_LOCATOR"


def test_injection_attempt_is_just_a_string(sf):
    evil = "x' OR Name != 'y"
    escaped = evil.replace("\\", "\\\\").replace("'", "\\'")
    assert sf.query(f"SELECT Id FROM Opportunity WHERE Name = '{escaped}'")["totalSize"] == 0


def test_stages_and_users(sf, server):
    stages = sf.query(
        "SELECT MasterLabel, ApiName, IsClosed, IsWon, DefaultProbability, SortOrder "
        "FROM OpportunityStage ORDER BY SortOrder"
    )["records"]
    labels = [s["MasterLabel"] for s in stages]
    assert labels[:2] == ["Prospecting", "Qualification"] and "Customer's Legal Review" in labels
    won = [s for s in stages if s["IsWon"]]
    assert [s["MasterLabel"] for s in won] == ["Closed Won"] and won[0]["IsClosed"] is True
    users = sf.query_all("SELECT Id, Name, Email, IsActive FROM User")["records"]
    assert len(users) == len(server.simulator.world.users)
    assert all(u["Id"].startswith("005") and len(u["Id"]) == 18 for u in users)


# -- writes -------------------------------------------------------------------------------------------------------


def test_create_update_get_delete_and_query_all_sees_deleted():
    sim = sfsim.build(seed=11, opportunities=300, variant="custom_fields")
    with SandboxServer(sim) as srv:
        tok = token(srv.url)
        sf = Salesforce(instance_url=srv.url, session_id=tok["access_token"], version=V, session=_session())
        account = sim.world.accounts[0]
        created = sf.Opportunity.create(
            {
                "Name": "Hooli - pilot",
                "StageName": "Prospecting",
                "CloseDate": "2026-12-31",
                "Amount": 1234.5,
                "AccountId": account.native_id,
                "Region__c": "EMEA",
            }
        )
        assert created["success"] and len(created["id"]) == 18 and created["id"].startswith("006")
        rec = sf.Opportunity.get(created["id"])
        assert rec["Name"] == "Hooli - pilot" and rec["Amount"] == 1234.5 and rec["Probability"] == 10.0
        assert rec["IsClosed"] is False and rec["Region__c"] == "EMEA" and rec["AccountId"] == account.native_id
        before = rec["SystemModstamp"]
        sim.world.clock.advance(timedelta(seconds=5))
        assert sf.Opportunity.update(created["id"], {"StageName": "Closed Won"}) == 204
        rec = sf.Opportunity.get(created["id"])
        assert rec["IsWon"] is True and rec["Probability"] == 100.0 and rec["SystemModstamp"] > before
        # validation errors in Salesforce's shape
        for body, code in (
            ({"Name": "x"}, "REQUIRED_FIELD_MISSING"),
            ({"Name": "x", "StageName": "Nope", "CloseDate": "2026-01-01"}, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"),
            (
                {"Name": "x", "StageName": "Prospecting", "CloseDate": "2026-01-01", "IsWon": True},
                "INVALID_FIELD_FOR_INSERT_UPDATE",
            ),
            ({"Nope": 1}, "INVALID_FIELD"),
        ):
            with pytest.raises(SalesforceMalformedRequest) as err:
                sf.Opportunity.create(body)
            assert err.value.content[0]["errorCode"] == code
            if code == "REQUIRED_FIELD_MISSING":
                assert err.value.content[0]["fields"] == ["StageName", "CloseDate"]
        start = datetime.now(UTC) - timedelta(days=1)
        assert sf.Opportunity.delete(created["id"]) == 204
        with pytest.raises(SalesforceResourceNotFound):
            sf.Opportunity.get(created["id"])
        soql = f"SELECT Id, IsDeleted FROM Opportunity WHERE Id = '{created['id']}'"
        assert sf.query(soql)["totalSize"] == 0
        rows = sf.query_all(soql, include_deleted=True)["records"]
        assert rows == [{"attributes": rows[0]["attributes"], "Id": created["id"], "IsDeleted": True}]
        sim.world.clock.advance(timedelta(minutes=2))  # getDeleted covers whole minutes only
        end = datetime.now(UTC) + timedelta(minutes=5)
        deleted = sf.Opportunity.deleted(start, end)
        assert [d["id"] for d in deleted["deletedRecords"]] == [created["id"]]
        assert deleted["deletedRecords"][0]["deletedDate"].endswith("+0000")
        assert set(deleted) == {"deletedRecords", "earliestDateAvailable", "latestDateCovered"}
        updated = sf.Opportunity.updated(start, end)
        assert set(updated) == {"ids", "latestDateCovered"}
        with pytest.raises(SalesforceMalformedRequest):  # the log reaches back 30 days at most
            sf.Opportunity.deleted(start - timedelta(days=40), end)


def test_delete_log_and_recycle_bin_cover_15_days():
    sim = sfsim.build(seed=12, opportunities=300)
    w = sim.world
    with SandboxServer(sim) as srv:
        old, recent = list(w.opps)[:2]
        w.delete(old)
        w.clock.advance(timedelta(days=10))
        w.delete(recent)
        w.clock.advance(timedelta(days=10))
        tok = token(srv.url)
        sf = Salesforce(instance_url=srv.url, session_id=tok["access_token"], version=V, session=_session())
        now = w.clock.now().replace(tzinfo=UTC)
        result = sf.Opportunity.deleted(now - timedelta(days=25), now)
        assert [d["id"] for d in result["deletedRecords"]] == [recent]  # the 20-day-old delete left the log
        assert result["earliestDateAvailable"] > (now - timedelta(days=16)).strftime("%Y-%m-%dT%H:%M:%S")
        rows = sf.query_all("SELECT Id FROM Opportunity WHERE IsDeleted = true", include_deleted=True)["records"]
        assert [r["Id"] for r in rows] == [recent]  # ... and was purged from the Recycle Bin
        with pytest.raises(SalesforceResourceNotFound) as err:
            sf.Opportunity.get(old)
        assert err.value.content[0]["errorCode"] == "NOT_FOUND"
        with pytest.raises(SalesforceResourceNotFound) as err:
            sf.Opportunity.get(recent)
        assert err.value.content[0]["errorCode"] == "ENTITY_IS_DELETED"


# -- limits and faults -------------------------------------------------------------------------------------------------


def test_usage_header_on_every_response_and_allocation():
    sim = sfsim.build(seed=3, opportunities=300, daily_limit=5)
    with SandboxServer(sim) as srv:
        h = auth_headers(srv.url)
        url = f"{srv.url}/services/data/v{V}/query"
        seen = []
        for _ in range(5):
            r = requests.get(url, params={"q": "SELECT Id FROM User"}, headers=h)
            assert r.status_code == 200
            seen.append(r.headers["Sforce-Limit-Info"])
        assert seen == [f"api-usage={i}/5" for i in range(1, 6)]
        r = requests.get(url, params={"q": "SELECT Id FROM User"}, headers=h)
        assert r.status_code == 403 and r.headers["Sforce-Limit-Info"] == "api-usage=5/5"
        assert r.json() == [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
        r = requests.get(url, params={"q": "SELECT Id FROM User"}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 401 and "Sforce-Limit-Info" in r.headers
        sf = Salesforce(instance_url=srv.url, session_id=h["Authorization"][7:], version=V, session=_session())
        with pytest.raises(SalesforceRefusedRequest):
            sf.query("SELECT Id FROM User")


def test_faults_in_salesforce_form():
    faults = FaultPlan(
        rules=[
            FaultRule("rate_limit", after=2, count=1),
            FaultRule("token_expiry", after=4),
            FaultRule("server_error", after=6),
        ]
    )
    sim = sfsim.build(seed=3, opportunities=300, faults=faults)
    with SandboxServer(sim) as srv:
        h = auth_headers(srv.url)
        url = f"{srv.url}/services/data/v{V}/query"
        statuses = []
        for _ in range(7):
            r = requests.get(url, params={"q": "SELECT Id FROM User"}, headers=h)
            statuses.append((r.status_code, r.json()[0]["errorCode"] if r.status_code >= 400 else None))
        # a rule counts the requests that reach it (a rule that fires hides the request from later rules)
        assert statuses[1] == (403, "REQUEST_LIMIT_EXCEEDED")  # SF has no 429
        assert statuses[0] == statuses[2] == statuses[3] == (200, None)
        assert statuses[4:] == [(401, "INVALID_SESSION_ID")] * 3  # every token expired until a new one
        h = auth_headers(srv.url)  # token endpoint is never faulted
        r = requests.get(url, params={"q": "SELECT Id FROM User"}, headers=h)
        assert r.status_code == 503 and r.json()[0]["errorCode"] == "SERVER_UNAVAILABLE"
        assert requests.get(url, params={"q": "SELECT Id FROM User"}, headers=h).status_code == 200


# The 100,000-opportunity build-and-answer check: benchmarks/simulator_scale.py (`make bench`).


# -- tenant variants -----------------------------------------------------------------------------------------------


def _get(url: str, path: str, **params) -> requests.Response:
    return requests.get(f"{url}/services/data/v{V}{path}", params=params, headers=auth_headers(url))


def test_variants_are_listed_and_default_is_single_currency():
    assert {"default", "no_optional_rights", "multi_currency", "custom_fields", "stage_api_names"} <= set(
        sfsim.VARIANTS
    )
    with pytest.raises(ValueError):
        sfsim.build(seed=1, opportunities=10, variant="nope")
    with SandboxServer(sfsim.build(seed=1, opportunities=50)) as srv:
        fields = {f["name"]: f for f in _get(srv.url, "/sobjects/Opportunity/describe").json()["fields"]}
        assert "CurrencyIsoCode" not in fields and not any(n.endswith("__c") for n in fields)
        assert fields["OwnerId"]["type"] == "reference" and fields["OwnerId"]["referenceTo"] == ["User"]
        assert fields["OwnerId"]["relationshipName"] == "Owner" and fields["Amount"]["type"] == "currency"
        r = _get(srv.url, "/query", q="SELECT Id, CurrencyIsoCode FROM Opportunity")
        assert r.status_code == 400 and r.json()[0]["errorCode"] == "INVALID_FIELD"
        assert "No such column 'CurrencyIsoCode'" in r.json()[0]["message"]
        org = _get(srv.url, "/query", q="SELECT DefaultCurrencyIsoCode FROM Organization").json()["records"]
        assert org[0]["DefaultCurrencyIsoCode"] == sfsim.ORG_CURRENCY
        account = {f["name"]: f for f in _get(srv.url, "/sobjects/Account/describe").json()["fields"]}
        assert account["BillingStreet"]["type"] == "textarea"
        streets = _get(srv.url, "/query", q="SELECT BillingStreet FROM Account").json()["records"]
        assert any("\n" in (s["BillingStreet"] or "") for s in streets)
        assert _get(srv.url, "/sobjects/Nope/describe").status_code == 404


def test_multi_currency_and_custom_fields_variants():
    with SandboxServer(sfsim.build(seed=1, opportunities=50, variant="multi_currency")) as srv:
        fields = {f["name"] for f in _get(srv.url, "/sobjects/Opportunity/describe").json()["fields"]}
        assert "CurrencyIsoCode" in fields
        rows = _get(srv.url, "/query", q="SELECT CurrencyIsoCode FROM Opportunity").json()["records"]
        assert {r["CurrencyIsoCode"] for r in rows} == {"USD", "EUR", "GBP"}
    with SandboxServer(sfsim.build(seed=1, opportunities=50, variant="custom_fields")) as srv:
        fields = {f["name"]: f for f in _get(srv.url, "/sobjects/Opportunity/describe").json()["fields"]}
        creator = fields["Original_Creator__c"]
        assert creator["type"] == "reference" and creator["referenceTo"] == ["User"] and creator["custom"]
        assert fields["Partner_Account__c"]["referenceTo"] == ["Account"]
        assert fields["Original_Created_Date__c"]["type"] == "datetime"


def test_stage_api_names_variant_relabels_master_labels_only():
    with SandboxServer(sfsim.build(seed=1, opportunities=50, variant="stage_api_names")) as srv:
        stages = _get(srv.url, "/query", q="SELECT MasterLabel, ApiName FROM OpportunityStage").json()["records"]
        pairs = {s["ApiName"]: s["MasterLabel"] for s in stages}
        assert pairs["Closed Won"] == "Won - Signed" and pairs["Qualification"] == "Qualification"
        values = {
            r["StageName"] for r in _get(srv.url, "/query", q="SELECT StageName FROM Opportunity").json()["records"]
        }
        assert values <= set(pairs) and "Won - Signed" not in values


def test_no_optional_rights_refuses_in_salesforce_shapes():
    with SandboxServer(sfsim.build(seed=1, opportunities=50, variant="no_optional_rights")) as srv:
        r = _get(srv.url, "/limits/")
        assert r.status_code == 403 and r.json()[0]["errorCode"] == "INSUFFICIENT_ACCESS"
        for obj in ("OpportunityStage", "Organization", "User"):
            r = _get(srv.url, "/query", q=f"SELECT Id FROM {obj}")
            assert r.status_code == 400 and r.json()[0]["errorCode"] == "INVALID_TYPE", obj
            assert _get(srv.url, f"/sobjects/{obj}/describe").json()[0]["errorCode"] == "INVALID_TYPE"
        # the opportunities (and their Owner relationship) stay readable
        rows = _get(srv.url, "/query", q="SELECT Id, Owner.Name FROM Opportunity").json()["records"]
        assert len(rows) == 50 and all(r["Owner"]["Name"] for r in rows)


def test_truth_is_the_tenant_as_its_users_see_it():
    sim = sfsim.build(seed=1, opportunities=60, variant="stage_api_names")
    truth = sfsim.truth(sim)
    assert set(truth) == {o.native_id for o in sim.world.live()}
    o = next(o for o in sim.world.live() if o.stage == "Closed Won")
    assert truth[o.native_id]["stage"] == "Won - Signed" and truth[o.native_id]["stage_id"] == "Closed Won"
    assert truth[o.native_id]["status"] == "won" and truth[o.native_id]["currency"] == sfsim.ORG_CURRENCY


# -- account change stamps (renames) ---------------------------------------------------------------------------------


def test_a_renamed_account_moves_its_own_stamp_never_its_opportunities():
    """A rename stamps Account.SystemModstamp / LastModifiedDate only; Opportunity.SystemModstamp stays. From
    Opportunity the account's stamp is a parent field: selectable, and comparable inside an OR group."""
    sim = sfsim.build(seed=11, opportunities=400)
    w = sim.world
    with SandboxServer(sim) as srv:
        h = auth_headers(srv.url)

        def query(soql: str) -> requests.Response:
            return requests.get(f"{srv.url}/services/data/v{V}/query", params={"q": soql}, headers=h)

        def ids(where: str) -> set[str]:
            r = query(f"SELECT Id FROM Opportunity WHERE {where}")
            assert r.status_code == 200, r.text
            return {rec["Id"] for rec in r.json()["records"]}

        t0 = w.clock.now()
        before = {o.native_id: o.modified_at for o in w.live()}
        w.clock.advance(timedelta(minutes=5))
        counts = w.advance(hours=24, rate=0.05)
        assert counts["account_renamed"]
        renamed = {a.idx for a in w.accounts if a.modified_at is not None and a.modified_at >= t0}
        assert renamed
        of_renamed = {o.native_id for o in w.live() if o.account in renamed}
        # an opportunity whose only change is its account's rename kept its stamp
        untouched = {i for i in of_renamed if i in before and w.opps[i].modified_at == before[i]}
        assert untouched
        lit = t0.strftime("%Y-%m-%dT%H:%M:%SZ")
        changed = {o.native_id for o in w.live() if o.modified_at >= t0}
        assert ids(f"SystemModstamp >= {lit}") == changed
        assert ids(f"Account.SystemModstamp >= {lit}") == of_renamed
        assert ids(f"Account.LastModifiedDate >= {lit}") == of_renamed
        both = ids(f"IsClosed = false AND (SystemModstamp >= {lit} OR Account.SystemModstamp >= {lit})")
        assert both == {
            o.native_id
            for o in w.live()
            if (o.native_id in changed or o.native_id in of_renamed) and not w.stages[o.stage].is_closed
        }
        # an opportunity without an account never matches a comparison on its account's fields
        assert not any(w.opps[i].account is None for i in ids("Account.SystemModstamp >= 2000-01-01T00:00:00Z"))
        # the stamps as records carry them, and the Account object itself answers on its own stamp
        r = query(f"SELECT Id, Account.SystemModstamp FROM Opportunity WHERE Id = '{sorted(untouched)[0]}'")
        acc = w.accounts[w.opps[sorted(untouched)[0]].account]
        assert r.json()["records"][0]["Account"]["SystemModstamp"] == sfsim.sf_datetime(acc.modified_at)
        r = query(f"SELECT Id, Name, SystemModstamp FROM Account WHERE SystemModstamp >= {lit}")
        assert {rec["Id"] for rec in r.json()["records"]} == {w.accounts[i].native_id for i in renamed}
        names = {f["name"] for f in _get(srv.url, "/sobjects/Account/describe").json()["fields"]}
        assert {"SystemModstamp", "LastModifiedDate"} <= names
        # nothing kinder than SOQL: AND and OR at one level need parentheses, datetimes are unquoted, the
        # relationship must exist, and there is no sub-query to lean on
        refused = {
            f"SELECT Id FROM Opportunity WHERE IsClosed = false AND SystemModstamp >= {lit} OR "
            f"Account.SystemModstamp >= {lit}": "MALFORMED_QUERY",
            f"SELECT Id FROM Opportunity WHERE Account.SystemModstamp >= '{lit}'": "INVALID_FIELD",
            f"SELECT Id FROM Opportunity WHERE Account.SystemModstamp >= {t0.date().isoformat()}": "INVALID_FIELD",
            f"SELECT Id FROM Opportunity WHERE Accounts.SystemModstamp >= {lit}": "INVALID_FIELD",
            f"SELECT Id FROM Opportunity WHERE Account.Modstamp >= {lit}": "INVALID_FIELD",
            f"SELECT Id FROM Opportunity WHERE SystemModstamp >= {lit} OR AccountId IN "
            f"(SELECT Id FROM Account WHERE SystemModstamp >= {lit})": "MALFORMED_QUERY",
        }
        for soql, code in refused.items():
            r = query(soql)
            assert r.status_code == 400 and r.json()[0]["errorCode"] == code, (soql, r.text)


# -- close time and reads by id (issue 15) ------------------------------------------------------------------------


def _describe_fields(url: str, headers: dict, version: str = V) -> dict[str, dict]:
    r = requests.get(f"{url}/services/data/v{version}/sobjects/Opportunity/describe", headers=headers)
    assert r.status_code == 200, r.text
    return {f["name"]: f for f in r.json()["fields"]}


def test_last_stage_change_date_is_when_the_stage_last_changed():
    sim = sfsim.build(seed=13, opportunities=300)
    w = sim.world
    with SandboxServer(sim) as srv:
        tok = token(srv.url)
        h = {"Authorization": f"Bearer {tok['access_token']}"}
        sf = Salesforce(instance_url=srv.url, session_id=tok["access_token"], version=V, session=_session())
        field = _describe_fields(srv.url, h)["LastStageChangeDate"]
        assert field["type"] == "datetime" and field["nillable"] and not field["updateable"]

        def row(oid: str) -> dict:
            return sf.query(
                f"SELECT Id, StageName, LastStageChangeDate, CloseDate FROM Opportunity WHERE Id = '{oid}'"
            )["records"][0]

        rows = sf.query_all("SELECT Id, IsClosed, LastStageChangeDate, CloseDate FROM Opportunity")["records"]
        closed = [r for r in rows if r["IsClosed"]]
        assert closed and all(r["IsClosed"] is not None for r in rows)
        for r in closed:  # entering the closed stage; generated closes long before the last edit, often
            o = w.opps[r["Id"]]
            assert r["LastStageChangeDate"] == sfsim.sf_datetime(o.closed_at)
            assert r["CloseDate"] == o.closed_at.date().isoformat()
        assert sum(w.opps[r["Id"]].closed_at < w.opps[r["Id"]].modified_at - timedelta(days=30) for r in closed) > 10
        assert all(r["LastStageChangeDate"] is None for r in rows if not r["IsClosed"])  # never moved yet

        oid = next(r["Id"] for r in rows if not r["IsClosed"])
        w.clock.advance(timedelta(hours=1))
        sf.Opportunity.update(
            oid, {"StageName": "Needs Analysis" if w.opps[oid].stage != "Needs Analysis" else "Qualification"}
        )
        moved = w.opps[oid].modified_at  # the write's time (the clock runs on in real time)
        assert row(oid)["LastStageChangeDate"] == sfsim.sf_datetime(moved)
        w.clock.advance(timedelta(hours=1))
        sf.Opportunity.update(oid, {"Amount": 10.0})  # not a stage change
        assert row(oid)["LastStageChangeDate"] == sfsim.sf_datetime(moved)
        w.clock.advance(timedelta(hours=1))
        sf.Opportunity.update(oid, {"StageName": "Closed Lost"})
        lost = w.opps[oid].modified_at
        assert row(oid)["LastStageChangeDate"] == sfsim.sf_datetime(lost) == sfsim.sf_datetime(w.opps[oid].closed_at)
        w.clock.advance(timedelta(hours=1))
        sf.Opportunity.update(oid, {"StageName": "Prospecting"})  # a reopen moves it, never clears it
        assert row(oid)["LastStageChangeDate"] == sfsim.sf_datetime(w.opps[oid].modified_at) > sfsim.sf_datetime(lost)
        # activity that moves stages outside the API is seen too: a move between open stages is dated by the
        # record's last edit (the world keeps no time for it), never earlier than the move
        stages_before = {i: o.stage for i, o in w.opps.items()}
        start = w.clock.now()
        w.advance(hours=24, rate=0.05)
        after = sf.query_all("SELECT Id, IsClosed, LastStageChangeDate FROM Opportunity")["records"]
        moved_open = 0
        for r in after:
            o = w.opps[r["Id"]]
            if r["IsClosed"]:
                assert r["LastStageChangeDate"] == sfsim.sf_datetime(o.closed_at)
            elif stages_before.get(o.native_id, o.stage) != o.stage:
                moved_open += 1
                assert r["LastStageChangeDate"] == sfsim.sf_datetime(o.modified_at) and o.modified_at > start
        assert moved_open
        with pytest.raises(SalesforceMalformedRequest) as err:
            sf.Opportunity.update(oid, {"LastStageChangeDate": "2024-01-01T00:00:00Z"})
        assert err.value.content[0]["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"


@pytest.mark.parametrize("variant,version", [("default", "51.0"), ("no_last_stage_change_date", V)])
def test_last_stage_change_date_absent_before_52_and_when_hidden(variant, version):
    with SandboxServer(sfsim.build(seed=13, opportunities=50, variant=variant)) as srv:
        h = auth_headers(srv.url)
        fields = _describe_fields(srv.url, h, version)
        assert "LastStageChangeDate" not in fields and "CloseDate" in fields
        r = requests.get(
            f"{srv.url}/services/data/v{version}/query",
            headers=h,
            params={"q": "SELECT Id, LastStageChangeDate FROM Opportunity"},
        )
        assert r.status_code == 400 and r.json()[0]["errorCode"] == "INVALID_FIELD"
        assert "No such column 'LastStageChangeDate'" in r.json()[0]["message"]
        oid = next(iter(srv.simulator.world.opps))
        assert (
            "LastStageChangeDate"
            not in requests.get(f"{srv.url}/services/data/v{version}/sobjects/Opportunity/{oid}", headers=h).json()
        )


def test_query_by_ids_absent_ids_malformed_ids_and_the_request_size_limit():
    sim = sfsim.build(seed=13, opportunities=300)
    w = sim.world
    with SandboxServer(sim) as srv:
        h = auth_headers(srv.url)

        def query(soql: str, endpoint: str = "query") -> requests.Response:
            return requests.get(f"{srv.url}/services/data/v{V}/{endpoint}", params={"q": soql}, headers=h)

        live = list(w.opps)[:3]
        gone = list(w.opps)[3]
        w.delete(gone)
        unknown = sfsim.sf_id("006", 99_999)
        soql = f"SELECT Id FROM Opportunity WHERE Id IN ({', '.join(repr(i) for i in [*live, gone, unknown])})"
        assert {r["Id"] for r in query(soql).json()["records"]} == set(live)  # Recycle Bin: queryAll only
        assert {r["Id"] for r in query(soql, "queryAll").json()["records"]} == {*live, gone}
        bad = query("SELECT Id FROM Opportunity WHERE Id IN ('006Hs0000000001', 'not-an-id')")
        assert bad.status_code == 400 and bad.json()[0]["errorCode"] == "INVALID_QUERY_FILTER_OPERATOR"
        assert "invalid ID field: not-an-id" in bad.json()[0]["message"]
        assert query("SELECT Id FROM Opportunity WHERE Id = null").json()["totalSize"] == 0
        # URI plus headers over 16,384 bytes: refused before the API (no JSON array, no allocation spent)
        used = sim.api_usage
        ids = ", ".join(repr(sfsim.sf_id("006", n)) for n in range(1, 700))
        r = query(f"SELECT Id FROM Opportunity WHERE Id IN ({ids})")
        assert r.status_code == 414 and sim.api_usage == used
        r = requests.get(
            f"{srv.url}/services/data/v{V}/query",
            params={"q": "SELECT Id FROM Opportunity"},
            headers={**h, "X-Padding": "x" * 16_300},
        )
        assert r.status_code == 431
