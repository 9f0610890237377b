"""The HubSpot simulator over real HTTP, driven by the official client (hubspot-api-client) where it can be."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from hubspot import HubSpot
from hubspot.crm.deals import (
    ApiException,
    Filter,
    FilterGroup,
    PublicObjectSearchRequest,
    SimplePublicObjectInput,
    SimplePublicObjectInputForCreate,
)

from oppsync_pipeline.sandbox import hubspot as sim
from oppsync_pipeline.sandbox.server import SandboxServer

PAT = sim.PRIVATE_APP_TOKEN
NO_LIMITS = sim.Limits(ten_secondly=0, search_per_second=0, daily=1_000_000)


@pytest.fixture(scope="module")
def server():
    with SandboxServer(sim.build(seed=7, opportunities=400, limits=NO_LIMITS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    return HubSpot(access_token=PAT, host=server.url)


def http(server, method, path, token=PAT, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, server.url + path, headers=headers, timeout=10, **kwargs)


def live_ids(server) -> set[str]:
    return {o.native_id for o in server.simulator.world.live()}


# -- listing ----------------------------------------------------------------------------------------------------------


def test_list_pages_to_the_end_with_the_official_client(server, api):
    seen, after, pages = [], None, 0
    while True:
        page = api.crm.deals.basic_api.get_page(
            limit=100, after=after, associations=["companies"], properties=["dealname", "amount", "hubspot_owner_id"]
        )
        pages += 1
        seen.extend(page.results)
        if page.paging is None:
            break
        after = page.paging.next.after
    assert pages == 4 and {d.id for d in seen} == live_ids(server)
    assert len(seen) == len({d.id for d in seen})
    for deal in seen:
        assert all(v is None or isinstance(v, str) for v in deal.properties.values())
        assert set(deal.properties) >= {"dealname", "amount", "hubspot_owner_id"}


def test_list_defaults_limits_and_opaque_cursor(server):
    body = http(server, "GET", "/crm/v3/objects/deals").json()
    assert len(body["results"]) == 10  # default limit 10
    assert set(body["results"][0]["properties"]) == set(sim.DEFAULT_PROPERTIES)
    assert not body["paging"]["next"]["after"].isdigit()  # opaque
    assert body["paging"]["next"]["link"].startswith("?after=")
    assert body["results"][0]["createdAt"].endswith("Z") and len(body["results"][0]["createdAt"]) == 24
    bad = http(server, "GET", "/crm/v3/objects/deals?limit=101")
    assert bad.status_code == 400 and bad.json()["category"] == "VALIDATION_ERROR"


def test_duplicate_company_associations_v3_and_v4(server):
    body = http(server, "GET", "/crm/v3/objects/deals?limit=100&associations=companies").json()
    with_company = [d for d in body["results"] if "associations" in d]
    deal = with_company[0]
    types = [(a["id"], a["type"]) for a in deal["associations"]["companies"]["results"]]
    primary = types[0][0]
    assert (primary, "deal_to_company") in types and (primary, "deal_to_company_unlabeled") in types
    v4 = http(server, "GET", f"/crm/v4/objects/deals/{deal['id']}/associations/companies").json()
    assert v4["results"][0]["toObjectId"] == int(primary)
    assert {t["typeId"] for t in v4["results"][0]["associationTypes"]} == {5, 341}
    ids = [d["id"] for d in with_company[:20]]
    v3 = http(
        server, "POST", "/crm/v3/associations/deals/companies/batch/read", json={"inputs": [{"id": i} for i in ids]}
    ).json()
    assert {r["from"]["id"] for r in v3["results"]} == set(ids)
    assert all(len(r["to"]) >= 2 for r in v3["results"])
    v4b = http(
        server, "POST", "/crm/v4/associations/deals/companies/batch/read", json={"inputs": [{"id": i} for i in ids]}
    ).json()
    assert {r["from"]["id"] for r in v4b["results"]} == set(ids)
    companies = http(
        server,
        "POST",
        "/crm/v3/objects/companies/batch/read",
        json={"properties": ["name", "address", "city", "state", "zip", "country"], "inputs": [{"id": primary}]},
    ).json()
    assert companies["results"][0]["properties"]["name"]
    one = http(server, "GET", f"/crm/v3/objects/companies/{primary}?properties=name,city").json()
    assert set(one["properties"]) == {"name", "city"}


# -- search -----------------------------------------------------------------------------------------------------------


def test_search_pages_to_the_end_sorted_with_total(server, api):
    world = server.simulator.world
    since = sorted(o.modified_at for o in world.live())[100]
    since_ms = str(sim.epoch_ms(since))
    expected = {o.native_id for o in world.live() if o.modified_at >= since}
    seen, after, pages = [], None, 0
    while True:
        req = PublicObjectSearchRequest(
            filter_groups=[
                FilterGroup(filters=[Filter(property_name="hs_lastmodifieddate", operator="GTE", value=since_ms)])
            ],
            sorts=["hs_lastmodifieddate"],
            properties=["dealname", "hs_lastmodifieddate"],
            limit=50,
            after=after,
        )
        res = api.crm.deals.search_api.do_search(public_object_search_request=req)
        pages += 1
        assert res.total == len(expected)
        seen.extend(res.results)
        if res.paging is None:
            break
        after = res.paging.next.after
        assert after.isdigit()  # search offsets are numbers as strings
    assert pages > 1 and {d.id for d in seen} == expected
    mods = [d.properties["hs_lastmodifieddate"] for d in seen]
    assert mods == sorted(mods)


def test_search_default_properties_operators_and_injection(server):
    body = http(server, "POST", "/crm/v3/objects/deals/search", json={"limit": 5}).json()
    assert set(body["results"][0]["properties"]) == set(sim.DEFAULT_PROPERTIES)
    world = server.simulator.world

    def total(*filters, groups=None):
        b = {"filterGroups": groups or [{"filters": list(filters)}], "limit": 1}
        r = http(server, "POST", "/crm/v3/objects/deals/search", json=b)
        assert r.status_code == 200, r.text
        return r.json()["total"]

    live = list(world.live())
    assert total({"propertyName": "dealstage", "operator": "IN", "values": ["closedwon", "closedlost"]}) == sum(
        1 for o in live if o.stage in ("closedwon", "closedlost")
    )
    assert total({"propertyName": "amount", "operator": "BETWEEN", "value": "1000", "highValue": "50000"}) == sum(
        1 for o in live if o.amount is not None and 1000 <= o.amount <= 50000
    )
    assert total({"propertyName": "amount", "operator": "NOT_HAS_PROPERTY"}) == sum(1 for o in live if o.amount is None)
    assert total({"propertyName": "pipeline", "operator": "NEQ", "value": "default"}) == sum(
        1 for o in live if world.stages[o.stage].pipeline != "default"
    )
    # groups are ORed
    assert total(
        groups=[
            {"filters": [{"propertyName": "dealstage", "operator": "EQ", "value": "closedwon"}]},
            {"filters": [{"propertyName": "dealstage", "operator": "EQ", "value": "closedlost"}]},
        ]
    ) == sum(1 for o in live if o.stage in ("closedwon", "closedlost"))
    # a value is a value: quotes and operators inside it are never parsed
    assert total({"propertyName": "dealname", "operator": "EQ", "value": "x' OR '1'='1"}) == 0


def test_search_rejects_paging_past_ten_thousand(server):
    ok = http(server, "POST", "/crm/v3/objects/deals/search", json={"limit": 200, "after": "9800"})
    assert ok.status_code == 200 and ok.json()["results"] == []
    bad = http(server, "POST", "/crm/v3/objects/deals/search", json={"limit": 200, "after": "9900"})
    assert bad.status_code == 400
    body = bad.json()
    assert body["status"] == "error" and body["category"] == "VALIDATION_ERROR" and body["correlationId"]
    assert http(server, "POST", "/crm/v3/objects/deals/search", json={"limit": 201}).status_code == 400


# -- pipelines and owners ---------------------------------------------------------------------------------------------


def test_pipelines_have_string_metadata(server, api):
    raw = http(server, "GET", "/crm/v3/pipelines/deals").json()
    stages = {s["id"]: s for p in raw["results"] for s in p["stages"]}
    assert stages["closedwon"]["metadata"] == {"isClosed": "true", "probability": "1.0"}
    assert stages["appointmentscheduled"]["metadata"] == {"isClosed": "false", "probability": "0.2"}
    assert any(k.isdigit() for k in stages)  # the custom pipeline's numeric stage ids
    pipelines = api.crm.pipelines.pipelines_api.get_all(object_type="deals")
    assert {p.id for p in pipelines.results} == {"default", sim.CUSTOM_PIPELINE}


def test_owners_have_user_ids_and_creators_are_users(server, api):
    world = server.simulator.world
    active = api.crm.owners.owners_api.get_page(limit=10)
    owners = list(active.results)
    after = active.paging.next.after if active.paging else None
    while after:
        page = api.crm.owners.owners_api.get_page(limit=10, after=after)
        owners.extend(page.results)
        after = page.paging.next.after if page.paging else None
    archived = http(server, "GET", "/crm/v3/owners?archived=true").json()["results"]
    assert len(owners) + len(archived) == len(world.users)
    assert all(o["archived"] for o in archived)
    assert all(o["userId"] is None and o["userIdIncludingInactive"] for o in archived)
    user_ids = {str(o.user_id) for o in owners} | {str(o["userIdIncludingInactive"]) for o in archived}
    owner_ids = {o.id for o in owners} | {o["id"] for o in archived}
    body = http(
        server, "GET", "/crm/v3/objects/deals?limit=100&properties=hs_created_by_user_id,hubspot_owner_id"
    ).json()
    for deal in body["results"]:
        assert deal["properties"]["hs_created_by_user_id"] in user_ids
        assert deal["properties"]["hs_created_by_user_id"] not in owner_ids
        assert deal["properties"]["hubspot_owner_id"] in owner_ids


# -- writes -----------------------------------------------------------------------------------------------------------


def test_create_update_archive_through_the_client(server, api):
    world = server.simulator.world
    company = world.accounts[0].native_id
    created = api.crm.deals.basic_api.create(
        SimplePublicObjectInputForCreate(
            properties={
                "dealname": 'Sandbox "quoted" deal',
                "amount": "1234.5",
                "pipeline": "default",
                "dealstage": "qualifiedtobuy",
                "closedate": "2026-12-31T23:30:00Z",
            },
            associations=[
                {"to": {"id": company}, "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 5}]}
            ],
        )
    )
    assert created.properties["amount"] == "1234.5" and created.properties["dealstage"] == "qualifiedtobuy"
    opp = world.get(created.id)
    assert opp is not None and opp.account == 0 and opp.close_date.isoformat() == "2026-12-31"
    world.clock.advance(timedelta(seconds=5))
    updated = api.crm.deals.basic_api.update(created.id, SimplePublicObjectInput(properties={"dealstage": "closedwon"}))
    assert updated.properties["dealstage"] == "closedwon"
    assert updated.properties["hs_lastmodifieddate"] > created.properties["hs_lastmodifieddate"]
    with pytest.raises(ApiException) as err:
        api.crm.deals.basic_api.update(created.id, SimplePublicObjectInput(properties={"dealstage": "145236001"}))
    assert err.value.status == 400
    modified_before = world.get(created.id).modified_at
    world.clock.advance(timedelta(seconds=5))
    api.crm.deals.basic_api.archive(created.id)
    archived = world.get(created.id, include_deleted=True)
    assert archived.deleted_at is not None and archived.modified_at == modified_before  # no bump on archive
    search = http(
        server,
        "POST",
        "/crm/v3/objects/deals/search",
        json={"filterGroups": [{"filters": [{"propertyName": "hs_object_id", "operator": "EQ", "value": created.id}]}]},
    ).json()
    assert search["total"] == 0
    listed, after = [], None
    while True:
        page = api.crm.deals.basic_api.get_page(limit=100, after=after, archived=True)
        listed.extend(page.results)
        if page.paging is None:
            break
        after = page.paging.next.after
    mine = [d for d in listed if d.id == created.id]
    assert mine and mine[0].archived and mine[0].archived_at is not None
    assert created.id not in {o.native_id for o in world.live()}


# -- auth, errors, limits ----------------------------------------------------------------------------------------------


def test_bad_token_and_oauth_expiry(server):
    r = http(server, "GET", "/crm/v3/objects/deals", token="pat-na1-wrong")
    assert r.status_code == 401 and r.json()["category"] == "INVALID_AUTHENTICATION" and r.json()["correlationId"]
    assert http(server, "GET", "/crm/v3/objects/deals", token=None).status_code == 401
    bad = requests.post(
        server.url + "/oauth/v1/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "nope",
            "client_id": sim.OAUTH_CLIENT_ID,
            "client_secret": sim.OAUTH_CLIENT_SECRET,
        },
    )
    assert bad.status_code == 400 and bad.json()["status"] == "BAD_REFRESH_TOKEN"
    tok = requests.post(
        server.url + "/oauth/v1/token", data={"grant_type": "refresh_token", **sim.SANDBOX_OAUTH_CREDENTIALS}
    ).json()
    assert tok["expires_in"] == 1800 and tok["token_type"] == "bearer"
    assert http(server, "GET", "/crm/v3/objects/deals", token=tok["access_token"]).status_code == 200
    server.simulator.world.clock.advance(timedelta(seconds=1801))
    expired = http(server, "GET", "/crm/v3/objects/deals", token=tok["access_token"])
    assert expired.status_code == 401 and expired.json()["category"] == "EXPIRED_AUTHENTICATION"
    assert "expired" in expired.json()["message"]
    assert http(server, "GET", "/crm/v3/objects/deals/123").json()["category"] == "OBJECT_NOT_FOUND"


def test_rate_limits_headers_and_bodies():
    s = sim.build(seed=3, opportunities=50, limits=sim.Limits(ten_secondly=4, search_per_second=2, daily=9))
    with SandboxServer(s) as srv:
        codes = [http(srv, "GET", "/crm/v3/pipelines/deals") for _ in range(5)]
        assert [r.status_code for r in codes] == [200, 200, 200, 200, 429]
        assert codes[0].headers["X-HubSpot-RateLimit-Daily"] == "9"
        assert codes[0].headers["X-HubSpot-RateLimit-Daily-Remaining"] == "8"
        assert codes[0].headers["X-HubSpot-RateLimit-Max"] == "4"
        assert codes[0].headers["X-HubSpot-RateLimit-Remaining"] == "3"
        body = codes[4].json()
        assert body["errorType"] == "RATE_LIMIT" and body["policyName"] == "TEN_SECONDLY_ROLLING"
        assert body["message"] == "You have reached your ten_secondly_rolling limit." and body["correlationId"]
        searches = [http(srv, "POST", "/crm/v3/objects/deals/search", json={}) for _ in range(3)]
        assert [r.status_code for r in searches] == [200, 200, 429]
        assert "X-HubSpot-RateLimit-Daily" not in searches[0].headers  # search carries no rate-limit headers
        assert searches[2].json()["policyName"] == "SECONDLY"
        s.limits.search_per_second = 0
        for _ in range(3):  # calls 7, 8, 9 of the daily 9
            assert http(srv, "POST", "/crm/v3/objects/deals/search", json={}).status_code == 200
        daily = http(srv, "POST", "/crm/v3/objects/deals/search", json={})
        assert daily.status_code == 429 and daily.json()["policyName"] == "DAILY"


# The 100,000-opportunity build-and-answer check: benchmarks/simulator_scale.py (`make bench`).


# -- tenant variants, properties, companies ------------------------------------------------------------------------


def test_properties_api_lists_types_options_and_owner_references(server):
    props = {p["name"]: p for p in http(server, "GET", "/crm/v3/properties/deals").json()["results"]}
    assert props["dealstage"]["type"] == "enumeration"
    options = {o["value"]: o["label"] for o in props["dealstage"]["options"]}
    assert options["contractsent"] == "Contract Sent" and options["145236002"] == "Proposal"
    assert props["hubspot_owner_id"]["referencedObjectType"] == "OWNER"
    assert all(p["hubspotDefined"] for p in props.values())  # no custom properties by default
    assert http(server, "GET", "/crm/v3/properties/deals/closedate").json()["type"] == "datetime"
    assert http(server, "GET", "/crm/v3/properties/deals/project_code").status_code == 404


def test_unknown_properties_are_refused_in_filters_sorts_and_writes_and_ignored_when_requested(server):
    bad = http(
        server,
        "POST",
        "/crm/v3/objects/deals/search",
        json={"filterGroups": [{"filters": [{"propertyName": "project_code", "operator": "EQ", "value": "x"}]}]},
    )
    assert bad.status_code == 400 and bad.json()["category"] == "VALIDATION_ERROR" and "project_code" in bad.text
    assert (
        http(
            server,
            "POST",
            "/crm/v3/objects/deals/search",
            json={"sorts": [{"propertyName": "nope", "direction": "ASCENDING"}]},
        ).status_code
        == 400
    )
    deal = next(iter(live_ids(server)))
    write = http(server, "PATCH", f"/crm/v3/objects/deals/{deal}", json={"properties": {"project_code": "x"}})
    assert write.status_code == 400 and "PROPERTY_DOESNT_EXIST" in write.text
    got = http(server, "GET", f"/crm/v3/objects/deals/{deal}?properties=dealname,project_code").json()
    assert set(got["properties"]) == {"dealname"}


def test_company_address_lines(server):
    accounts = server.simulator.world.accounts
    ids = [a.native_id for a in accounts[:40]]
    body = http(
        server,
        "POST",
        "/crm/v3/objects/companies/batch/read",
        json={"properties": ["address", "address2"], "inputs": [{"id": i} for i in ids]},
    ).json()
    props = [c["properties"] for c in body["results"]]
    assert any(p["address2"] for p in props) and any("\n" in (p["address"] or "") for p in props)


def test_no_optional_rights_refuses_every_optional_endpoint_in_hubspots_shape():
    with SandboxServer(sim.build(seed=7, opportunities=30, limits=NO_LIMITS, variant="no_optional_rights")) as srv:
        deal = next(o.native_id for o in srv.simulator.world.live() if o.account is not None)
        refused = [
            ("GET", "/crm/v3/pipelines/deals", None),
            ("GET", "/crm/v3/owners", None),
            ("GET", "/crm/v3/properties/deals", None),
            ("POST", "/crm/v3/objects/companies/batch/read", {"inputs": [{"id": "1"}]}),
            ("POST", "/crm/v3/objects/companies/search", {}),
            ("POST", "/crm/v4/associations/deals/companies/batch/read", {"inputs": [{"id": deal}]}),
            ("POST", "/crm/v4/associations/companies/deals/batch/read", {"inputs": [{"id": "1"}]}),
            ("GET", f"/crm/v4/objects/deals/{deal}/associations/companies", None),
        ]
        for method, path, body in refused:
            r = http(srv, method, path, json=body)
            assert r.status_code == 403, path
            refusal = r.json()
            assert refusal["category"] == "MISSING_SCOPES"
            assert refusal["errors"][0]["context"]["requiredGranularScopes"]
        assert http(srv, "POST", "/crm/v3/objects/deals/search", json={"limit": 5}).status_code == 200
        assert http(srv, "GET", f"/crm/v3/objects/deals/{deal}").status_code == 200


def test_renamed_stages_and_custom_fields_variants():
    with SandboxServer(sim.build(seed=7, opportunities=60, limits=NO_LIMITS, variant="renamed_stages")) as srv:
        pipelines = http(srv, "GET", "/crm/v3/pipelines/deals").json()["results"]
        stages = [s for p in pipelines for s in p["stages"]]
        assert len(pipelines) == 3 and all(s["id"] != s["label"] for s in stages)
        assert {s["label"] for s in stages} >= {"Won", "Proposal out", "Renewed"}
    with SandboxServer(sim.build(seed=7, opportunities=60, limits=NO_LIMITS, variant="custom_fields")) as srv:
        props = {p["name"]: p for p in http(srv, "GET", "/crm/v3/properties/deals").json()["results"]}
        assert not props["sales_stage_custom"]["hubspotDefined"] and props["sales_stage_custom"]["options"]
        body = http(
            srv,
            "POST",
            "/crm/v3/objects/deals/search",
            json={
                "filterGroups": [{"filters": [{"propertyName": "project_code", "operator": "HAS_PROPERTY"}]}],
                "properties": ["project_code", "original_create_date"],
                "limit": 5,
            },
        ).json()
        assert body["total"] == 60 and body["results"][0]["properties"]["project_code"].startswith("PRJ-")


def test_a_renamed_company_is_modified_its_deals_are_not():
    with SandboxServer(sim.build(seed=7, opportunities=60, limits=NO_LIMITS)) as srv:
        world = srv.simulator.world
        opp = next(o for o in world.live() if o.account is not None)
        cid, before = world.accounts[opp.account].native_id, opp.modified_at
        world.clock.advance(timedelta(minutes=5))
        since = sim.epoch_ms(world.clock.now())
        world.accounts[opp.account].name += " (renamed)"
        world.version += 1
        found = http(
            srv,
            "POST",
            "/crm/v3/objects/companies/search",
            json={
                "filterGroups": [
                    {"filters": [{"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": str(since)}]}
                ],
                "limit": 100,
            },
        ).json()
        assert [c["id"] for c in found["results"]] == [cid]
        deals = http(
            srv, "POST", "/crm/v4/associations/companies/deals/batch/read", json={"inputs": [{"id": cid}]}
        ).json()["results"][0]["to"]
        assert int(opp.native_id) in {d["toObjectId"] for d in deals}
        assert world.opps[opp.native_id].modified_at == before
