"""The Dataverse simulator over real HTTP: Entra token (through msal), listing, every paging mode, writes,
and the quirks of the fidelity checklist (docs/crm-api-notes.md §3.11)."""

from __future__ import annotations

from datetime import timedelta

import msal
import pytest
import requests

from oppsync_pipeline.sandbox import dynamics as sandbox
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

API = "/api/data/v9.2"
SECRET = sandbox.SANDBOX_CREDENTIALS["client_secret"]


class _HttpsToHttp(requests.Session):
    """msal insists on an https authority; the simulator speaks http on localhost. Rewrite the scheme."""

    def request(self, method, url, *args, **kwargs):
        return super().request(method, url.replace("https://127.0.0.1", "http://127.0.0.1"), *args, **kwargs)


@pytest.fixture
def srv():
    with SandboxServer(sandbox.build(seed=3, opportunities=400)) as server:
        yield server


def token_for(url: str) -> str:
    r = requests.post(
        f"{url}/{sandbox.TENANT_ID}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.CLIENT_ID,
            "client_secret": SECRET,
            "scope": f"{url}/.default",
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


@pytest.fixture
def api(srv):
    session = requests.Session()
    session.headers.update(
        {
            "Authorization": f"Bearer {token_for(srv.url)}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
        }
    )
    session.base = srv.url + API  # type: ignore[attr-defined]
    return session


def test_msal_client_credentials_against_simulated_entra(srv):
    port = srv.port
    app = msal.ConfidentialClientApplication(
        sandbox.CLIENT_ID,
        client_credential=SECRET,
        authority=f"https://127.0.0.1:{port}/{sandbox.TENANT_ID}",
        http_client=_HttpsToHttp(),
        validate_authority=False,
    )
    result = app.acquire_token_for_client(scopes=[f"{srv.url}/.default"])
    assert result.get("token_type") == "Bearer" and result["access_token"], result
    r = requests.get(f"{srv.url}{API}/", headers={"Authorization": f"Bearer {result['access_token']}"})
    assert r.status_code == 200 and any(s["name"] == "opportunities" for s in r.json()["value"])
    bad = msal.ConfidentialClientApplication(
        sandbox.CLIENT_ID,
        client_credential="nope",
        authority=f"https://127.0.0.1:{port}/{sandbox.TENANT_ID}",
        http_client=_HttpsToHttp(),
        validate_authority=False,
    ).acquire_token_for_client([f"{srv.url}/.default"])
    assert bad["error"] == "invalid_client" and 7000215 in bad["error_codes"]


def test_token_endpoint_errors_are_aadsts_shaped(srv):
    url = f"{srv.url}/{sandbox.TENANT_ID}/oauth2/v2.0/token"
    good = {
        "grant_type": "client_credentials",
        "client_id": sandbox.CLIENT_ID,
        "client_secret": SECRET,
        "scope": f"{srv.url}/.default",
    }
    r = requests.post(url, data={**good, "client_secret": "x"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert r.json()["error_description"].startswith("AADSTS7000215:") and "Trace ID" in r.json()["error_description"]
    r = requests.post(url, data={**good, "scope": "https://org.crm.dynamics.com"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    r = requests.post(url, data={**good, "client_id": "00000000-0000-0000-0000-000000000000"})
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"
    r = requests.post(url.replace(sandbox.TENANT_ID, "nosuchtenant"), data=good)
    assert r.status_code == 400 and 90002 in r.json()["error_codes"]
    r = requests.post(url, data=good).json()
    assert set(r) == {"token_type", "expires_in", "ext_expires_in", "access_token"}


def test_401_has_www_authenticate_and_empty_body(srv):
    r = requests.get(f"{srv.url}{API}/opportunities", headers={"Authorization": "Bearer stale"})
    assert r.status_code == 401 and r.content == b""
    assert r.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=https://login.microsoftonline.com/")


def test_list_paging_annotations_and_context(api, srv):
    world = srv.simulator.world
    r = api.get(
        api.base + "/opportunities",
        params={"$select": "name,estimatedvalue,statuscode,_ownerid_value"},
        headers={"Prefer": "odata.maxpagesize=70"},
    )
    body = r.json()
    assert r.headers["Preference-Applied"] == "odata.maxpagesize=70"
    assert body["@odata.context"].endswith(
        "/$metadata#opportunities(name,estimatedvalue,statuscode,_ownerid_value,_transactioncurrencyid_value)"
    )
    row = body["value"][0]
    assert row["@odata.etag"].startswith('W/"') and "opportunityid" in row
    assert not any("@" in k for k in row if k != "@odata.etag")  # no annotations unless asked
    assert isinstance(row["statuscode"], int)
    seen = [x["opportunityid"] for x in body["value"]]
    link = body["@odata.nextLink"]
    assert link.startswith("http://") and "$skiptoken=" in link and "%3Ccookie" in link
    again = api.get(link, headers={"Prefer": "odata.maxpagesize=70"}).json()
    assert again == api.get(link, headers={"Prefer": "odata.maxpagesize=70"}).json()  # reusing a nextLink
    while link:
        page = api.get(link, headers={"Prefer": "odata.maxpagesize=70"}).json()
        assert len(page["value"]) <= 70
        seen += [x["opportunityid"] for x in page["value"]]
        link = page.get("@odata.nextLink")
    assert len(seen) == len(set(seen)) == sum(1 for _ in world.live())
    # annotations on request
    r = api.get(
        api.base + "/opportunities",
        params={"$select": "statuscode,_ownerid_value,estimatedclosedate", "$top": "40"},
        headers={"Prefer": 'odata.include-annotations="*"'},
    )
    rows = r.json()["value"]
    assert len(rows) == 40 and "@odata.nextLink" not in r.json()
    assert r.headers["Preference-Applied"] == 'odata.include-annotations="*"'
    kinds = {x["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] for x in rows}
    assert kinds == {"systemuser", "team"} or kinds == {"systemuser"}
    assert all("statuscode@OData.Community.Display.V1.FormattedValue" in x for x in rows)
    assert all(len(x["estimatedclosedate"]) == 10 for x in rows)


def test_default_page_is_5000_and_larger_maxpagesize_is_ignored(srv):
    with SandboxServer(sandbox.build(seed=1, opportunities=5200)) as big:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token_for(big.url)}"
        r = s.get(
            f"{big.url}{API}/opportunities", params={"$select": "name"}, headers={"Prefer": "odata.maxpagesize=9000"}
        )
        assert "Preference-Applied" not in r.headers and len(r.json()["value"]) == 5000
        rest = s.get(r.json()["@odata.nextLink"]).json()
        assert len(rest["value"]) == 200 and "@odata.nextLink" not in rest


def test_filter_language(api, srv):
    world = srv.simulator.world

    def ids(flt, **extra):
        r = api.get(api.base + "/opportunities", params={"$select": "name", "$filter": flt, **extra})
        assert r.status_code == 200, r.text
        return {x["opportunityid"] for x in r.json()["value"]}

    live = list(world.live())
    open_ids = {o.native_id for o in live if world.status(o) == "open"}
    assert ids("statecode eq 0") == open_ids
    assert ids("not (statecode eq 0)") == {o.native_id for o in live} - open_ids
    assert (
        ids("Microsoft.Dynamics.CRM.In(PropertyName='statuscode',PropertyValues=['1','100000000'])")
        == ids("statuscode eq 1 or statuscode eq 100000000")
        == {o.native_id for o in live if o.stage in ("1", "100000000")}
    )
    some = live[5]
    assert ids(f"opportunityid eq {some.native_id}") == {some.native_id}
    cut = sorted(o.modified_at for o in live)[len(live) // 2]
    assert ids(f"modifiedon ge {cut.strftime('%Y-%m-%dT%H:%M:%SZ')} and (statecode eq 1 or statecode eq 2)") == {
        o.native_id for o in live if o.modified_at >= cut and world.status(o) != "open"
    }
    assert ids("estimatedvalue eq null") == {o.native_id for o in live if o.amount is None}
    quoted = next(o for o in live if "'" in o.name or '"' in o.name or ";" in o.name)
    lit = quoted.name.replace("'", "''")
    assert quoted.native_id in ids(f"name eq '{lit}'")
    assert ids("name eq 'x'' or name ne ''x'") == set()
    assert ids(f"_ownerid_value eq {world.users[0].native_id}") == {o.native_id for o in live if o.owner == 0}
    assert ids("contains(name,'renewal')") == {o.native_id for o in live if "renewal" in o.name.lower()}
    r = api.get(api.base + "/opportunities", params={"$filter": "nosuch eq 1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "0x80060888"
    r = api.get(api.base + "/opportunities", params={"$filter": "name eq 'unterminated"})
    assert r.status_code == 400
    r = api.get(api.base + "/opportunities", params={"$skip": "10"})
    assert r.status_code == 400 and "$skip" in r.json()["error"]["message"]
    r = api.get(api.base + "/opportunities", params={"$count": "true", "$filter": "statecode eq 0", "$top": "1"})
    assert r.json()["@odata.count"] == len(open_ids)


def test_orderby_expand_and_lookups(api, srv):
    world = srv.simulator.world
    r = api.get(
        api.base + "/opportunities",
        params={
            "$select": "name,modifiedon,_ownerid_value",
            "$orderby": "modifiedon desc,opportunityid",
            "$expand": "parentaccountid($select=name,address1_composite),transactioncurrencyid($select=isocurrencycode),"
            "ownerid($select=fullname,name)",
        },
        headers={"Prefer": "odata.maxpagesize=500"},
    )
    rows = r.json()["value"]
    stamps = [x["modifiedon"] for x in rows]
    assert stamps == sorted(stamps, reverse=True) and stamps[0].endswith("Z")
    for x in rows:
        o = world.opps[x["opportunityid"]]
        if o.account is None:
            assert x["parentaccountid"] is None
        else:
            assert x["parentaccountid"]["name"] == world.accounts[o.account].name
        assert x["transactioncurrencyid"]["isocurrencycode"] == o.currency
        owner = world.users[o.owner]
        assert x["ownerid"]["@odata.type"] == (
            "#Microsoft.Dynamics.CRM.team" if owner.kind == "team" else "#Microsoft.Dynamics.CRM.systemuser"
        )
    teams = api.get(api.base + "/teams", params={"$select": "name"}).json()["value"]
    users = api.get(api.base + "/systemusers", params={"$select": "fullname,internalemailaddress"}).json()["value"]
    assert len(teams) == 3 and len(users) == 26 and users[0]["internalemailaddress"]
    assert sandbox.APP_USER_NAME in {u["fullname"] for u in users}  # the application user the connector calls as
    one = api.get(api.base + f"/systemusers({users[0]['systemuserid']})", params={"$select": "fullname"}).json()
    assert one["fullname"] == users[0]["fullname"]


def test_metadata_endpoints(api):
    r = api.get(api.base + "/$metadata")
    assert r.headers["Content-Type"] == "application/xml" and b'<EntitySet Name="opportunities"' in r.content
    assert b'<Property Name="new_region" Type="Edm.String" />' in r.content
    r = api.get(
        api.base + "/EntityDefinitions",
        params={"$select": "LogicalName,EntitySetName,PrimaryIdAttribute", "$filter": "LogicalName eq 'opportunity'"},
    )
    assert r.json()["value"][0]["EntitySetName"] == "opportunities"
    r = api.get(
        api.base + "/EntityDefinitions(LogicalName='opportunity')/Attributes(LogicalName='statuscode')/"
        "Microsoft.Dynamics.CRM.StatusAttributeMetadata",
        params={"$expand": "OptionSet"},
    )
    opts = {
        o["Value"]: (o["State"], o["Label"]["UserLocalizedLabel"]["Label"]) for o in r.json()["OptionSet"]["Options"]
    }
    assert opts[1] == (0, "In Progress") and opts[2] == (0, "On Hold") and opts[3] == (1, "Won")
    assert opts[4] == (2, "Canceled") and opts[5] == (2, "Out-Sold") and opts[100000000][0] == 0


def test_change_tracking_delta_links_and_deleted_entities(api, srv):
    world = srv.simulator.world
    track = {"Prefer": "odata.track-changes,odata.maxpagesize=150"}
    r = api.get(api.base + "/opportunities", params={"$select": "name,modifiedon"}, headers=track)
    assert "odata.track-changes" in r.headers["Preference-Applied"]
    body, n = r.json(), len(r.json()["value"])
    while "@odata.nextLink" in body:
        assert "@odata.deltaLink" not in body
        body = api.get(body["@odata.nextLink"], headers=track).json()
        n += len(body["value"])
    assert n == sum(1 for _ in world.live())
    delta = body["@odata.deltaLink"]
    assert "$deltatoken=" in delta
    live = list(world.live())
    world.clock.advance(timedelta(minutes=5))
    world.update(live[0].native_id, amount=123.0)
    world.delete(live[1].native_id)
    rows = api.get(delta, headers=track).json()["value"]
    changed = [x for x in rows if "reason" not in x]
    gone = [x for x in rows if x.get("reason") == "deleted"]
    assert [x["opportunityid"] for x in changed] == [live[0].native_id]
    assert gone == [{"@odata.context": gone[0]["@odata.context"], "id": live[1].native_id, "reason": "deleted"}]
    assert gone[0]["@odata.context"].endswith("/$metadata#opportunities/$deletedEntity")
    for p in ("$filter", "$orderby", "$expand", "$top"):
        r = api.get(
            api.base + "/opportunities",
            params={
                "$select": "name",
                p: {"$filter": "statecode eq 0", "$orderby": "name", "$expand": "parentaccountid", "$top": "5"}[p],
            },
            headers=track,
        )
        assert r.status_code == 400 and p in r.json()["error"]["message"]
    r = api.get(api.base + "/opportunities", params={"$select": "name", "$deltatoken": "1!01/01/2020 00:00:00"})
    assert r.status_code == 400 and "error" in r.json()
    world.clock.advance(timedelta(days=8))
    r = api.get(delta, headers=track)
    assert r.status_code == 400 and "expired" in r.json()["error"]["message"]


def test_writes_create_update_close_delete(api, srv):
    world = srv.simulator.world
    acc, owner = world.accounts[0], next(u for u in world.users if u.kind == "team")
    r = api.post(
        api.base + "/opportunities",
        json={
            "name": "Acme - 500 seats",
            "estimatedvalue": 125000,
            "estimatedclosedate": "2030-09-30",
            "parentaccountid@odata.bind": f"/accounts({acc.native_id})",
            "ownerid@odata.bind": f"/teams({owner.native_id})",
            "transactioncurrencyid@odata.bind": f"/transactioncurrencies({sandbox.CURRENCIES['EUR'][0]})",
            "new_region": "EU",
        },
    )
    assert r.status_code == 204 and r.headers["OData-EntityId"].endswith(")")
    new_id = r.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    r = api.post(api.base + "/opportunities", json={"name": "Rep"}, headers={"Prefer": "return=representation"})
    assert r.status_code == 201 and r.json()["statuscode"] == 1
    got = api.get(
        api.base + f"/opportunities({new_id})",
        params={"$select": "name,estimatedvalue,statecode,_ownerid_value,new_region,_createdby_value,createdon"},
    ).json()
    assert got["_createdby_value"] == srv.simulator.app_user.native_id and got["createdon"].endswith("Z")
    assert got["estimatedvalue"] == 125000 and got["statecode"] == 0 and got["new_region"] == "EU"
    assert (
        got["_ownerid_value"] == owner.native_id and got["_transactioncurrencyid_value"] == sandbox.CURRENCIES["EUR"][0]
    )
    r = api.patch(api.base + f"/opportunities({new_id})", json={"estimatedvalue": 99.5, "closeprobability": 70})
    assert r.status_code == 204 and world.opps[new_id].amount == 99.5
    r = api.post(api.base + "/opportunities", json={"new_nosuchcolumn": 1})
    assert r.status_code == 400 and r.json()["error"]["code"].startswith("0x")
    r = api.post(
        api.base + "/WinOpportunity",
        json={
            "Status": 3,
            "OpportunityClose": {"subject": "Won!", "opportunityid@odata.bind": f"/opportunities({new_id})"},
        },
    )
    assert r.status_code == 204 and world.status(world.opps[new_id]) == "won"
    r = api.patch(api.base + f"/opportunities({new_id})", json={"name": "renamed"})
    assert r.status_code == 400  # closed records are read-only
    r = api.patch(api.base + f"/opportunities({new_id})", json={"statecode": 0, "statuscode": 2})
    assert r.status_code == 204 and world.status(world.opps[new_id]) == "open"
    r = api.post(
        api.base + "/LoseOpportunity",
        json={"Status": 100000001, "OpportunityClose": {"opportunityid@odata.bind": f"/opportunities({new_id})"}},
    )
    assert r.status_code == 204 and world.opps[new_id].stage == "100000001"
    assert srv.simulator.closes[-1]["statuscode"] == 100000001
    assert api.delete(api.base + f"/opportunities({new_id})").status_code == 204
    r = api.get(api.base + f"/opportunities({new_id})")
    assert r.status_code == 404 and r.json()["error"]["code"] == "0x80040217"


def test_throttling_429_and_usage_headers(api, srv):
    r = api.get(api.base + "/teams")
    before = int(r.headers["x-ms-ratelimit-burst-remaining-xrm-requests"])
    r = api.get(api.base + "/teams")
    assert int(r.headers["x-ms-ratelimit-burst-remaining-xrm-requests"]) == before - 1
    srv.simulator.faults = FaultPlan([FaultRule("rate_limit", seconds=7)])
    r = api.get(api.base + "/teams")
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert r.json() == {
        "error": {
            "code": "0x80072322",
            "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
        }
    }
    srv.simulator.faults = FaultPlan()
    srv.simulator.request_limit = 1
    r = api.get(api.base + "/teams")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 200
    srv.simulator.expire_tokens()
    srv.simulator.request_limit = 6000
    assert api.get(api.base + "/teams").status_code == 401


# The 100,000-opportunity build-and-answer check: benchmarks/simulator_scale.py (`make bench`).


def test_attribute_metadata_lists_columns_lookups_and_custom_columns(api):
    r = api.get(
        api.base + "/EntityDefinitions(LogicalName='opportunity')/Attributes",
        params={"$select": "LogicalName,AttributeType,IsCustomAttribute"},
    )
    assert r.status_code == 200
    attrs = {a["LogicalName"]: a for a in r.json()["value"]}
    assert attrs["parentaccountid"]["AttributeType"] == "Lookup" and "_parentaccountid_value" not in attrs
    assert attrs["ownerid"]["AttributeType"] == "Owner" and attrs["customerid"]["AttributeType"] == "Customer"
    assert attrs["statuscode"]["AttributeType"] == "Status" and attrs["stageid"]["AttributeType"] == "Uniqueidentifier"
    assert attrs["new_region"]["IsCustomAttribute"] and not attrs["name"]["IsCustomAttribute"]
    assert "new_servicesite" not in attrs  # only the custom_fields tenant has it
    assert all(a["@odata.type"].endswith("AttributeMetadata") for a in attrs.values())


def test_business_process_stages_and_the_records_stage(api, srv):
    world = srv.simulator.world
    r = api.get(
        api.base + "/processstages",
        params={
            "$select": "processstageid,stagename,stagecategory",
            "$filter": "primaryentitytypecode eq 'opportunity'",
            "$orderby": "stagecategory",
        },
        headers={"Prefer": 'odata.include-annotations="*"'},
    )
    stages = r.json()["value"]
    assert [s["stagename"] for s in stages] == ["1-Qualify", "2-Develop", "3-Propose", "4-Close"]
    assert stages[1]["stagecategory@OData.Community.Display.V1.FormattedValue"] == "Develop"
    rows = api.get(api.base + "/opportunities", params={"$select": "stageid,stepname,salesstage,statecode"}).json()
    by_id = {s["processstageid"]: s["stagename"] for s in stages}
    for x in rows["value"]:
        assert by_id[x["stageid"]] == x["stepname"]
        if x["statecode"] == 1:
            assert x["stepname"] == "4-Close"  # won deals stand in the last stage
        o = world.opps[x["opportunityid"]]
        assert x["stepname"] == world.sales_stage_of(o).label


def test_account_address_lines_and_modifiedon(api, srv):
    world = srv.simulator.world
    rows = api.get(
        api.base + "/accounts", params={"$select": "address1_line1,address1_line2,address1_line3,modifiedon"}
    ).json()["value"]
    assert any(r["address1_line2"] for r in rows) and any(r["address1_line3"] for r in rows)
    assert any("\r\n" in (r["address1_line1"] or "") for r in rows)
    acc = world.accounts[3]
    before = {r["accountid"]: r["modifiedon"] for r in rows}[acc.native_id]
    world.clock.advance(timedelta(minutes=10))
    acc.name += " (renamed)"
    stamp = world.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
    ids = {
        x["opportunityid"]
        for x in api.get(
            api.base + "/opportunities", params={"$select": "name", "$filter": f"parentaccountid/modifiedon ge {stamp}"}
        ).json()["value"]
    }
    assert ids == {o.native_id for o in world.live() if o.account == 3}
    after = api.get(api.base + f"/accounts({acc.native_id})", params={"$select": "modifiedon"}).json()["modifiedon"]
    assert after > before


@pytest.mark.parametrize(
    "variant,path,params,privilege",
    [
        ("no_optional_rights", "/EntityDefinitions(LogicalName='opportunity')/Attributes", {}, "prvReadEntity"),
        ("no_optional_rights", "/systemusers", {"$select": "fullname"}, "prvReadUser"),
        ("no_optional_rights", "/teams", {"$select": "name"}, "prvReadTeam"),
        ("no_optional_rights", "/processstages", {"$select": "stagename"}, "prvReadWorkflow"),
        (
            "no_optional_rights",
            "/EntityDefinitions(LogicalName='opportunity')/Attributes(LogicalName='statuscode')/"
            "Microsoft.Dynamics.CRM.StatusAttributeMetadata",
            {},
            "prvReadEntity",
        ),
        (
            "no_expand",
            "/opportunities",
            {"$select": "name", "$expand": "parentaccountid($select=name)"},
            "prvReadAccount",
        ),
        ("no_expand", "/accounts", {"$select": "name"}, "prvReadAccount"),
    ],
)
def test_variants_refuse_in_dataverses_403_shape(variant, path, params, privilege):
    with SandboxServer(sandbox.build(seed=3, opportunities=50, variant=variant)) as server:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token_for(server.url)}"
        r = s.get(server.url + API + path, params=params)
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "0x80040220" and f"is missing {privilege} privilege" in err["message"]
        assert err["message"].startswith("Principal user (Id=")
        # what the user may read still answers, with lookup names as formatted values
        r = s.get(
            server.url + API + "/opportunities",
            params={"$select": "name,_parentaccountid_value"},
            headers={"Prefer": 'odata.include-annotations="*"'},
        )
        assert r.status_code == 200
        assert any("_parentaccountid_value@OData.Community.Display.V1.FormattedValue" in x for x in r.json()["value"])


def test_a_hidden_navigation_property_is_an_unknown_property():
    sim = sandbox.build(seed=3, opportunities=20)
    sim.hidden_navigation.add("parentaccountid")
    with SandboxServer(sim) as server:
        r = requests.get(
            server.url + API + "/opportunities",
            params={"$expand": "parentaccountid($select=name)"},
            headers={"Authorization": f"Bearer {token_for(server.url)}"},
        )
        assert (
            r.status_code == 400 and "Could not find a property named 'parentaccountid'" in r.json()["error"]["message"]
        )


def test_variants_and_truth():
    assert {"default", "no_optional_rights", "no_expand", "custom_fields"} <= set(sandbox.VARIANTS)
    with pytest.raises(ValueError):
        sandbox.build(seed=1, opportunities=5, variant="nope")
    default, custom = (sandbox.build(seed=4, opportunities=40, variant=v) for v in ("default", "custom_fields"))
    t, c = sandbox.truth(default), sandbox.truth(custom)
    assert set(t) == set(c)
    assert {r["stage"] for r in t.values()} <= {"1-Qualify", "2-Develop", "3-Propose", "4-Close"}
    assert {r["stage"] for r in c.values()} <= {"Discovery", "Solution Design", "Commercials", "Legal Review", "Signed"}
    assert all(r["stage_id"] != r["stage"] for r in t.values())
    restricted = sandbox.truth(sandbox.build(seed=4, opportunities=40, variant="no_expand"))
    assert all(r["service_location"] is None for r in restricted.values())
    assert [r["client_name"] for r in restricted.values()] == [r["client_name"] for r in t.values()]


def test_actualclosedate_is_date_only_kept_on_reopen_and_overwritten_by_the_next_close(api, srv):
    world = srv.simulator.world
    closed = next(o for o in world.live() if world.status(o) == "won")
    row = api.get(
        api.base + f"/opportunities({closed.native_id})",
        params={"$select": "actualclosedate,statecode"},
        headers={"Prefer": 'odata.include-annotations="*"'},
    ).json()
    d = closed.closed_at.date()
    assert row["actualclosedate"] == d.isoformat() and row["statecode"] == 1
    assert row["actualclosedate@OData.Community.Display.V1.FormattedValue"] == f"{d.month}/{d.day}/{d.year}"
    assert (
        api.patch(api.base + f"/opportunities({closed.native_id})", json={"statecode": 0, "statuscode": 1}).status_code
        == 204
    )
    row = api.get(api.base + f"/opportunities({closed.native_id})", params={"$select": "actualclosedate"}).json()
    assert world.opps[closed.native_id].closed_at is None and row["actualclosedate"] == d.isoformat()
    r = api.post(
        api.base + "/LoseOpportunity",
        json={
            "Status": 5,
            "OpportunityClose": {
                "actualend": "2031-02-03",
                "opportunityid@odata.bind": f"/opportunities({closed.native_id})",
            },
        },
    )
    assert r.status_code == 204
    row = api.get(api.base + f"/opportunities({closed.native_id})", params={"$select": "actualclosedate"}).json()
    assert row["actualclosedate"] == "2031-02-03" and world.status(world.opps[closed.native_id]) == "lost"
    r = api.post(api.base + "/opportunities", json={"name": "never closed"})
    never = r.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    row = api.get(api.base + f"/opportunities({never})", params={"$select": "actualclosedate"}).json()
    assert row["actualclosedate"] is None
    r = api.post(
        api.base + "/WinOpportunity",
        json={
            "Status": 3,
            "OpportunityClose": {"actualend": "March", "opportunityid@odata.bind": f"/opportunities({never})"},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "0x80048d19"


def test_a_reopen_inside_world_activity_keeps_the_last_close_date(srv, api):
    world = srv.simulator.world
    won = next(o for o in world.live() if world.status(o) == "won")
    d = won.closed_at.date()
    world.update(won.native_id, stage="1")  # reopened by someone else, between two reads
    rows = api.get(
        api.base + "/opportunities",
        params={"$select": "actualclosedate", "$filter": f"opportunityid eq {won.native_id}"},
    ).json()["value"]
    assert rows == [
        {"@odata.etag": rows[0]["@odata.etag"], "opportunityid": won.native_id, "actualclosedate": d.isoformat()}
    ]


def test_read_by_id_with_the_in_function_and_the_url_limit(api, srv):
    world = srv.simulator.world
    ids = sorted(o.native_id for o in world.live())[:120]
    world.delete(ids[0])
    unknown = sandbox.opportunity_id(99_999)
    values = ",".join(f"'{i}'" for i in [*ids, unknown])
    r = api.get(
        api.base + "/opportunities",
        params={
            "$select": "name,statecode",
            "$filter": f"Microsoft.Dynamics.CRM.In(PropertyName='opportunityid',PropertyValues=[{values}])",
        },
        headers={"Prefer": "odata.maxpagesize=100"},
    )
    assert r.status_code == 200
    body = r.json()
    page2 = api.get(body["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=100"}).json()
    got = [row["opportunityid"] for row in body["value"] + page2["value"]]
    assert sorted(got) == ids[1:] and "@odata.nextLink" not in page2  # deleted and unknown ids: simply absent
    # the same through an `or` chain
    chain = " or ".join(f"opportunityid eq {i}" for i in ids[:5])
    rows = api.get(api.base + "/opportunities", params={"$select": "name", "$filter": chain}).json()["value"]
    assert sorted(row["opportunityid"] for row in rows) == ids[1:5]
    # past 32,768 characters the front end refuses the URL before the service sees it
    many = ",".join(f"'{sandbox.opportunity_id(i)}'" for i in range(1, 800))
    before = srv.simulator.request_count
    r = api.get(
        api.base + "/opportunities",
        params={"$filter": f"Microsoft.Dynamics.CRM.In(PropertyName='opportunityid',PropertyValues=[{many}])"},
    )
    assert r.status_code == 414 and len(r.request.url) > sandbox.MAX_URL_LENGTH
    assert srv.simulator.request_count == before


def test_secured_close_date_variant_reads_empty_and_says_so_in_metadata():
    with SandboxServer(sandbox.build(seed=3, opportunities=60, variant="secured_close_date")) as server:
        headers = {"Authorization": f"Bearer {token_for(server.url)}", "Accept": "application/json"}
        attrs = requests.get(
            server.url + API + "/EntityDefinitions(LogicalName='opportunity')/Attributes",
            params={"$select": "LogicalName,IsSecured"},
            headers=headers,
        ).json()["value"]
        assert {a["LogicalName"] for a in attrs if a["IsSecured"]} == {"actualclosedate"}
        rows = requests.get(
            server.url + API + "/opportunities",
            params={"$select": "actualclosedate,statecode", "$filter": "statecode ne 0"},
            headers=headers,
        ).json()["value"]
        assert rows and all(r["actualclosedate"] is None for r in rows)
    with SandboxServer(sandbox.build(seed=3, opportunities=60)) as server:
        headers = {"Authorization": f"Bearer {token_for(server.url)}", "Accept": "application/json"}
        attrs = requests.get(
            server.url + API + "/EntityDefinitions(LogicalName='opportunity')/Attributes",
            params={"$select": "LogicalName,IsSecured"},
            headers=headers,
        ).json()["value"]
        assert not any(a["IsSecured"] for a in attrs)
