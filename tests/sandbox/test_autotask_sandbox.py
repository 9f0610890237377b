"""The Autotask simulator over real HTTP, on the wire (no official Python client installs here)."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta

import pytest
import requests

from oppsync_pipeline.lib.record import parse_datetime
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer

HEADERS = {
    "ApiIntegrationCode": at.SANDBOX_CREDENTIALS["integration_code"],
    "UserName": at.SANDBOX_CREDENTIALS["username"],
    "Secret": at.SANDBOX_CREDENTIALS["secret"],
    "Content-Type": "application/json",
}
ALL = [{"op": "gt", "field": "id", "value": 0}]


@pytest.fixture(scope="module")
def server():
    sim = at.build(seed=7, opportunities=1234, threshold=1_000_000)
    with SandboxServer(sim) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    info = requests.get(
        f"{server.url}/atservicesrest/v1.0/zoneInformation", params={"user": HEADERS["UserName"]}, timeout=10
    ).json()
    return info["url"] + "V1.0/"


def post(url, body, headers=HEADERS):
    return requests.post(url, data=json.dumps(body), headers=headers, timeout=30)


def page_all_post(api, body):
    r = post(api + "Opportunities/query", body)
    assert r.status_code == 200, r.text
    pages = [r.json()]
    while pages[-1]["pageDetails"]["nextPageUrl"]:
        r = post(pages[-1]["pageDetails"]["nextPageUrl"], body)
        assert r.status_code == 200, r.text
        pages.append(r.json())
    return pages


def test_zone_information_needs_no_auth_and_points_at_the_simulator(server):
    r = requests.get(
        f"{server.url}/ATServicesRest/V1.0/zoneInformation", params={"user": HEADERS["UserName"]}, timeout=10
    )
    assert r.status_code == 200
    info = r.json()
    assert set(info) == {"zoneName", "url", "webUrl", "ci"}
    assert info["url"] == f"{server.url}/ATServicesRest/"
    assert (
        requests.get(
            f"{server.url}/atservicesrest/v1.0/zoneInformation", params={"user": "nobody@x.com"}, timeout=10
        ).status_code
        == 500
    )
    assert requests.get(f"{server.url}/atservicesrest/v1.0/zoneInformation", timeout=10).status_code == 500


def test_every_api_call_needs_the_three_headers(api):
    for missing in ("ApiIntegrationCode", "UserName", "Secret"):
        headers = {k: v for k, v in HEADERS.items() if k != missing}
        r = post(api + "Opportunities/query", {"filter": ALL}, headers)
        assert r.status_code == 401 and r.content == b""
    bad = dict(HEADERS, Secret="wrong")
    assert requests.get(api + "ThresholdInformation", headers=bad, timeout=10).status_code == 401


def test_post_query_pages_with_post_and_get_on_next_is_405(server, api):
    world = server.simulator.world
    pages = page_all_post(api, {"MaxRecords": 500, "filter": ALL})
    assert [p["pageDetails"]["count"] for p in pages] == [500, 500, 234]
    assert all(p["pageDetails"]["requestCount"] == 500 for p in pages)
    ids = [o["id"] for p in pages for o in p["items"]]
    assert ids == sorted(int(o.native_id) for o in world.live())
    assert pages[0]["pageDetails"]["prevPageUrl"] is None and pages[1]["pageDetails"]["prevPageUrl"]
    nxt = pages[0]["pageDetails"]["nextPageUrl"]
    assert nxt.startswith(api) and "/query/next?paging=" in nxt and "search=" not in nxt
    prev = post(pages[2]["pageDetails"]["prevPageUrl"], {"MaxRecords": 500, "filter": ALL}).json()
    assert prev["items"] == pages[1]["items"]
    r = requests.get(nxt, headers=HEADERS, timeout=10)
    assert r.status_code == 405
    assert r.json() == {"Message": "The requested resource does not support http method 'GET'."}


def test_get_query_with_search_pages_with_get(api):
    search = json.dumps({"MaxRecords": 100, "filter": [{"op": "eq", "field": "status", "value": 1}]})
    r = requests.get(api + "Opportunities/query", params={"search": search}, headers=HEADERS, timeout=10)
    assert r.status_code == 200
    data, ids = r.json(), [o["id"] for o in r.json()["items"]]
    assert "search=" in data["pageDetails"]["nextPageUrl"]
    while data["pageDetails"]["nextPageUrl"]:
        r = requests.get(data["pageDetails"]["nextPageUrl"], headers=HEADERS, timeout=10)
        assert r.status_code == 200
        data = r.json()
        ids += [o["id"] for o in data["items"]]
    count = post(api + "Opportunities/query/count", {"filter": [{"op": "eq", "field": "status", "value": 1}]})
    assert count.json() == {"queryCount": len(ids)} and len(ids) > 100


def test_filter_grammar(server, api):
    world = server.simulator.world
    live = list(world.live())

    def ids(filters):
        return sorted(o["id"] for p in page_all_post(api, {"MaxRecords": 500, "filter": filters}) for o in p["items"])

    open_ids = sorted(int(o.native_id) for o in live if o.stage in ("0", "1"))
    assert (
        ids(
            [
                {
                    "op": "or",
                    "items": [{"op": "eq", "field": "status", "value": 0}, {"op": "eq", "field": "status", "value": 1}],
                }
            ]
        )
        == open_ids
    )
    assert ids([{"op": "in", "field": "status", "value": [0, 1]}]) == open_ids
    not_open = ids([{"op": "notIn", "field": "status", "value": [0, 1]}])
    assert sorted(open_ids + not_open) == sorted(int(o.native_id) for o in live)
    cutoff = sorted(o.modified_at for o in live)[len(live) // 2]
    since = cutoff.strftime("%Y-%m-%dT%H:%M:%S.") + f"{cutoff.microsecond // 1000:03d}Z"
    assert ids([{"op": "gte", "field": "lastActivity", "value": since}]) == sorted(
        int(o.native_id) for o in live if o.modified_at >= cutoff
    )
    acme = ids([{"op": "beginsWith", "field": "title", "value": "acme"}])  # case-insensitive
    assert acme == sorted(int(o.native_id) for o in live if o.name.lower().startswith("acme"))
    assert ids([{"op": "contains", "field": "title", "value": "GOLD"}]) == sorted(
        int(o.native_id) for o in live if "gold" in o.name.lower()
    )
    assert ids([{"op": "endsWith", "field": "title", "value": "rollout; 3 sites"}]) == sorted(
        int(o.native_id) for o in live if o.name.endswith("rollout; 3 sites")
    )
    west = ids([{"op": "eq", "field": "Region", "value": "West", "udf": True}])
    assert west and len(west) < len(live)
    legacy = ids([{"op": "exist", "field": "Original Create Date", "udf": True}])
    assert len(legacy) + len(ids([{"op": "notExist", "field": "Original Create Date", "udf": True}])) == len(live)
    nested = ids(
        [
            {
                "op": "and",
                "items": [
                    {"op": "gte", "field": "amount", "value": 100000},
                    {
                        "op": "or",
                        "items": [
                            {"op": "eq", "field": "status", "value": 3},
                            {"op": "lt", "field": "probability", "value": 20},
                        ],
                    },
                ],
            }
        ]
    )
    assert nested == sorted(
        int(o.native_id)
        for o in live
        if (o.amount or 0) >= 100000 and (o.stage == "3" or int(round(o.probability or 0)) < 20)
    )
    # a value with quotes is a value, never syntax
    assert ids([{"op": "eq", "field": "title", "value": "x' or '1'='1"}]) == []


def test_query_errors_are_500_with_errors_array(api):
    for body in (
        {"filter": [{"op": "eq", "field": "nope", "value": 1}]},
        {"filter": [{"op": "between", "field": "id", "value": 1}]},
        {"MaxRecords": 501, "filter": ALL},
        {"filter": []},
    ):
        r = post(api + "Opportunities/query", body)
        assert r.status_code == 500
        assert isinstance(r.json()["errors"], list) and r.json()["errors"][0]


def test_include_fields_without_id_gives_no_next_page(api):
    r = post(api + "Opportunities/query", {"MaxRecords": 500, "IncludeFields": ["title"], "filter": ALL})
    data = r.json()
    assert set(data["items"][0]) == {"title"} and data["pageDetails"]["nextPageUrl"] is None
    r = post(api + "Opportunities/query", {"MaxRecords": 500, "IncludeFields": ["id", "status"], "filter": ALL})
    assert set(r.json()["items"][0]) == {"id", "status"} and r.json()["pageDetails"]["nextPageUrl"]


def test_record_shape(api):
    item = post(api + "Opportunities/query", {"MaxRecords": 50, "filter": ALL}).json()["items"][0]
    for key, kind in (
        ("id", int),
        ("companyID", int),
        ("ownerResourceID", int),
        ("creatorResourceID", int),
        ("status", int),
        ("stage", int),
        ("probability", int),
        ("amount", float),
        ("title", str),
        ("userDefinedFields", list),
    ):
        assert isinstance(item[key], kind), key
    dt = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?Z$")
    assert dt.match(item["createDate"]) and dt.match(item["lastActivity"]) and dt.match(item["projectedCloseDate"])
    single = requests.get(api + f"Opportunities/{item['id']}", headers=HEADERS, timeout=10).json()
    assert single == {"item": item}
    fractions = {
        len(o["createDate"])
        for o in post(api + "Opportunities/query", {"MaxRecords": 500, "filter": ALL}).json()["items"]
    }
    assert len(fractions) > 1  # variable-length fractions of a second


def test_entity_information_picklists_are_strings(api):
    fields = requests.get(api + "Opportunities/entityInformation/fields", headers=HEADERS, timeout=10).json()
    status = next(f for f in fields["fields"] if f["name"] == "status")
    assert status["isPickList"] and status["dataType"] == "integer"
    values = {v["value"]: v["label"] for v in status["picklistValues"]}
    assert values == {
        "0": "Not Ready To Buy",
        "1": "Active",
        "2": "Lost",
        "3": "Closed",
        "4": "Implemented",
        "5": "On Hold",
    }
    assert all(isinstance(v["value"], str) and "isActive" in v and "sortOrder" in v for v in status["picklistValues"])
    udfs = requests.get(api + "Opportunities/entityInformation/userDefinedFields", headers=HEADERS, timeout=10)
    assert {f["name"] for f in udfs.json()["fields"]} == set(at.UDF_NAMES)


def test_companies_contacts_resources_countries(server, api):
    world = server.simulator.world
    ids = [int(a.native_id) for a in world.accounts[:3]]
    comps = post(api + "Companies/query", {"filter": [{"op": "in", "field": "id", "value": ids}]}).json()["items"]
    assert [c["id"] for c in comps] == ids
    assert {"companyName", "address1", "city", "state", "postalCode", "countryID"} <= set(comps[0])
    contacts = post(api + "Contacts/query", {"filter": [{"op": "eq", "field": "companyID", "value": ids[0]}]})
    assert len(contacts.json()["items"]) == 2 and {"firstName", "lastName"} <= set(contacts.json()["items"][0])
    res = post(api + "Resources/query", {"MaxRecords": 10, "filter": ALL}).json()
    assert len(res["items"]) == 10 and res["pageDetails"]["nextPageUrl"]
    assert {"firstName", "lastName", "email", "isActive"} <= set(res["items"][0])
    countries = post(api + "Countries/query", {"filter": ALL}).json()["items"]
    assert any(c["displayName"] == "United States" for c in countries)


def test_create_update_and_no_delete(server, api):
    world = server.simulator.world
    body = {
        "title": 'O\'Brien "Test" deal',
        "companyID": int(world.accounts[0].native_id),
        "ownerResourceID": int(world.users[2].native_id),
        "status": 1,
        "stage": 2,
        "amount": 1234.5,
        "probability": 40,
        "projectedCloseDate": "2030-01-31T00:00:00Z",
        "userDefinedFields": [{"name": "Region", "value": "EMEA"}],
    }
    r = post(api + "Opportunities", body)
    assert r.status_code == 200
    new_id = r.json()["itemId"]
    item = requests.get(api + f"Opportunities/{new_id}", headers=HEADERS, timeout=10).json()["item"]
    assert item["title"] == body["title"] and item["status"] == 1 and item["stage"] == 2
    assert item["probability"] == 40 and item["amount"] == 1234.5
    assert item["projectedCloseDate"].startswith("2030-01-31")
    assert {"name": "Region", "value": "EMEA"} in item["userDefinedFields"]
    assert item["creatorResourceID"] == int(world.users[0].native_id)
    assert post(api + "Opportunities", {"title": "x"}).status_code == 500

    world.clock.advance(timedelta(seconds=5))
    r = requests.patch(
        api + "Opportunities", data=json.dumps({"id": new_id, "status": 3, "amount": 99.0}), headers=HEADERS, timeout=10
    )
    assert r.json() == {"itemId": new_id}
    after = requests.get(api + f"Opportunities/{new_id}", headers=HEADERS, timeout=10).json()["item"]
    assert after["status"] == 3 and after["amount"] == 99.0 and after["lastActivity"] > item["lastActivity"]
    assert after["closedDate"] is not None
    # only a UDF changed: lastActivity does not move (why full syncs are still needed)
    world.clock.advance(timedelta(seconds=5))
    requests.patch(
        api + "Opportunities",
        data=json.dumps({"id": new_id, "userDefinedFields": [{"name": "Region", "value": "APAC"}]}),
        headers=HEADERS,
        timeout=10,
    )
    udf = requests.get(api + f"Opportunities/{new_id}", headers=HEADERS, timeout=10).json()["item"]
    assert {"name": "Region", "value": "APAC"} in udf["userDefinedFields"]
    assert udf["lastActivity"] == after["lastActivity"]
    r = requests.delete(api + f"Opportunities/{new_id}", headers=HEADERS, timeout=10)
    assert r.status_code == 405 and "Message" in r.json()


def test_close_times_are_when_the_status_closed_not_the_projected_date(server, api):
    world = server.simulator.world
    items = [o for p in page_all_post(api, {"MaxRecords": 500, "filter": ALL}) for o in p["items"]]
    dt = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?Z$")
    seen = {"won": 0, "lost": 0, "open": 0}
    for item in items:
        o = world.get(str(item["id"]))
        status = world.status(o)
        seen[status] += 1
        won, lost = item["closedDate"], item["lostDate"]
        if status == "open":
            assert won is None and lost is None, item["id"]
            continue
        value, other = (won, lost) if status == "won" else (lost, won)
        assert other is None and dt.match(value), item["id"]
        assert value == at.at_datetime(o.closed_at)
        assert parse_datetime(item["createDate"]) <= parse_datetime(value) <= parse_datetime(item["lastActivity"])
    assert min(seen.values()) > 50
    # generated closes often lie long before the last edit: the projected date or lastActivity would be wrong
    assert sum(1 for i in items if i["closedDate"] and i["closedDate"][:10] < i["lastActivity"][:10]) > 50
    assert sum(1 for i in items if i["lostDate"] and i["lostDate"][:10] < i["lastActivity"][:10]) > 50


def test_close_time_follows_status_changes(server, api):
    world = server.simulator.world
    oid = next(int(o.native_id) for o in world.live() if o.stage == "1")

    def patch_status(value: int) -> dict:
        world.clock.advance(timedelta(seconds=3))
        r = requests.patch(
            api + "Opportunities", data=json.dumps({"id": oid, "status": value}), headers=HEADERS, timeout=10
        )
        assert r.status_code == 200, r.text
        return requests.get(api + f"Opportunities/{oid}", headers=HEADERS, timeout=10).json()["item"]

    lost = patch_status(2)
    assert lost["closedDate"] is None and lost["lostDate"] == lost["lastActivity"]
    won = patch_status(3)
    assert won["lostDate"] is None and won["closedDate"] == won["lastActivity"]
    assert parse_datetime(won["closedDate"]) > parse_datetime(lost["lostDate"])
    still = patch_status(4)  # Closed -> Implemented: still won, the close time stays
    assert still["closedDate"] == won["closedDate"]
    reopened = patch_status(1)
    assert reopened["closedDate"] is None and reopened["lostDate"] is None
    found = post(
        api + "Opportunities/query",
        {"filter": [{"op": "exist", "field": "closedDate"}, {"op": "eq", "field": "id", "value": oid}]},
    )
    assert found.json()["items"] == []


def test_in_takes_at_most_500_values_and_deleted_records_are_absent(server, api):
    world = server.simulator.world
    live = sorted(int(o.native_id) for o in world.live())
    r = post(api + "Opportunities/query", {"filter": [{"op": "in", "field": "id", "value": live[:501]}]})
    assert r.status_code == 500 and "500" in r.json()["errors"][0]
    gone = live[3]
    world.delete(str(gone))
    ids = live[:500]
    r = post(api + "Opportunities/query", {"MaxRecords": 500, "filter": [{"op": "in", "field": "id", "value": ids}]})
    assert r.status_code == 200
    got = [i["id"] for i in r.json()["items"]]
    assert gone not in got and got == [i for i in ids if i != gone]
    assert r.json()["pageDetails"]["nextPageUrl"] is None
    assert requests.get(api + f"Opportunities/{gone}", headers=HEADERS, timeout=10).json() == {"item": None}


def test_id_lookups_answer_what_a_scan_answers_on_every_entity():
    """An `id` `eq` / `in` query is answered from the key (a 300,000-company tenant's lookups must not each scan);
    what it answers is what evaluating the filter on every row answers, other conditions included."""
    sim = at.build(seed=11, opportunities=400)
    sim.world.delete(next(iter(sim.world.opps)))  # a deleted opportunity is not a candidate
    for name, ent in sim.entities.items():
        ids = ent.ids()
        assert ids, name
        named = [ids[0], str(ids[-1]), float(ids[len(ids) // 2]), ids[0] + 0.5, 10**12, -1, *ids[1::5]]
        deleted = [int(o.native_id) for o in sim.world.opps.values() if o.deleted_at] if name == "opportunities" else []
        queries = [
            [{"op": "in", "field": "ID", "value": named + deleted}],
            [{"op": "eq", "field": "id", "value": ids[-1]}],
            [{"op": "eq", "field": "id", "value": 10**12}],
            [{"op": "in", "field": "id", "value": named}, {"op": "gt", "field": "id", "value": ids[len(ids) // 3]}],
        ]
        for filters in queries:
            pred = at._compile({"op": "and", "items": filters}, ent)
            scanned = [i for i in ids if pred(ent.get(i))]
            assert sim._matching(ent, {"filter": filters}) == scanned, (name, filters)
            assert len(at._candidates(ent, filters)) <= len(named), (name, filters)  # the key, not a scan


def test_a_paging_read_keeps_its_snapshot_through_many_one_page_lookups(server, api):
    """Lookups answered in one page keep no snapshot: a read waiting between its pages (one of three id ranges)
    while hundreds of lookups are made is paged from its snapshot, not re-run (at 1,000,000 a re-run scans them
    all, for every page)."""
    sim = server.simulator
    first = post(api + "Opportunities/query", {"MaxRecords": 100, "filter": ALL}).json()
    companies = sim.entities["companies"].ids()
    kept = len(sim._snapshots._entries)
    for i in range(300):  # more lookups than the simulator keeps snapshots
        r = post(api + "Companies/query", {"filter": [{"op": "in", "field": "id", "value": companies[i % 50 :][:3]}]})
        assert r.status_code == 200 and r.json()["pageDetails"]["nextPageUrl"] is None
    assert len(sim._snapshots._entries) == kept
    evaluated = []
    matching = sim._matching
    sim._matching = lambda ent, body: evaluated.append(ent.name) or matching(ent, body)
    try:
        r = post(first["pageDetails"]["nextPageUrl"], {"MaxRecords": 100, "filter": ALL})
    finally:
        del sim._matching
    assert r.status_code == 200 and r.json()["items"][0]["id"] > first["items"][-1]["id"]
    assert evaluated == [], "the second page re-ran the query: its snapshot was pushed out"


def test_threshold_latency_and_429():
    sim = at.build(seed=3, opportunities=50, threshold=20, latency_scale=0.05)
    with SandboxServer(sim) as srv:
        api = srv.url + "/ATServicesRest/V1.0/"
        info = requests.get(api + "ThresholdInformation", headers=HEADERS, timeout=10).json()
        assert info == {
            "externalRequestThreshold": 20,
            "requestThresholdTimeframe": 60,
            "currentTimeframeRequestCount": 0,
        }
        timings = []
        for _ in range(20):
            t = time.perf_counter()
            assert post(api + "Opportunities/query/count", {"filter": ALL}).status_code == 200
            timings.append(time.perf_counter() - t)
        assert min(timings[15:]) >= 0.045 and min(timings[10:14]) >= 0.02  # 1 s / 0.5 s, scaled by 0.05
        r = post(api + "Opportunities/query/count", {"filter": ALL})
        assert r.status_code == 429 and r.json()["errors"] and r.headers.get("Retry-After")
        info = requests.get(api + "ThresholdInformation", headers=HEADERS, timeout=10).json()
        assert info["currentTimeframeRequestCount"] == 20
        sim.world.clock.advance(timedelta(minutes=61))  # the rolling hour moves on
        assert post(api + "Opportunities/query/count", {"filter": ALL}).status_code == 200


def test_zone_move_gives_401_until_rediscovered():
    sim = at.build(seed=3, opportunities=20)
    with SandboxServer(sim) as srv:
        zone = srv.url + "/ATServicesRest/V1.0/"
        assert post(zone + "Opportunities/query/count", {"filter": ALL}).status_code == 200
        sim.expire_tokens()
        assert post(zone + "Opportunities/query/count", {"filter": ALL}).status_code == 401
        info = requests.get(
            f"{srv.url}/atservicesrest/v1.0/zoneInformation", params={"user": HEADERS["UserName"]}, timeout=10
        ).json()
        assert info["url"] != srv.url + "/ATServicesRest/"
        assert post(info["url"] + "V1.0/Opportunities/query/count", {"filter": ALL}).status_code == 200


def test_faults_render_in_autotask_shape():
    sim = at.build(
        seed=3,
        opportunities=20,
        faults=FaultPlan(
            [FaultRule("rate_limit", after=1, count=1, seconds=2), FaultRule("server_error", after=1, count=1)]
        ),
    )
    with SandboxServer(sim) as srv:
        zone = srv.url + "/ATServicesRest/V1.0/"
        r = post(zone + "Opportunities/query/count", {"filter": ALL})
        assert r.status_code == 429 and r.headers["Retry-After"] == "2" and r.json()["errors"]
        r = post(zone + "Opportunities/query/count", {"filter": ALL})
        assert r.status_code == 503 and r.json()["errors"]


# The 100,000-opportunity build-and-answer check: benchmarks/simulator_scale.py (`make bench`).


# -- tenant variants (issue 14) ------------------------------------------------------------------------------------


def _api_of(srv) -> str:
    return srv.url + "/ATServicesRest/V1.0/"


def test_variants_declared_and_built():
    assert {
        "default",
        "no_optional_rights",
        "custom_statuses",
        "udf_fields",
        "no_lost_date",
        "no_edit_rights",
    } == set(at.VARIANTS)
    with pytest.raises(ValueError):
        at.build(seed=1, opportunities=5, variant="nope")


def test_stage_picklist_is_the_sales_stage_apart_from_the_status(server, api):
    world = server.simulator.world
    fields = requests.get(api + "Opportunities/entityInformation/fields", headers=HEADERS, timeout=10).json()
    stage = next(f for f in fields["fields"] if f["name"] == "stage")
    labels = {v["value"]: v["label"] for v in stage["picklistValues"]}
    assert labels == {s.key: s.label for s in at.STAGES}
    items = [o for p in page_all_post(api, {"MaxRecords": 500, "filter": ALL}) for o in p["items"]]
    for item in items[:200]:
        o = world.get(str(item["id"]))
        assert str(item["stage"]) == o.sales_stage and str(item["status"]) == o.stage
    won = {str(i["stage"]) for i in items if i["status"] in (3, 4)}
    assert won == {"6"}  # won deals stand in the won stage
    r = requests.patch(
        api + "Opportunities", data=json.dumps({"id": items[0]["id"], "stage": 99}), headers=HEADERS, timeout=10
    )
    assert r.status_code == 500 and "stage" in r.json()["errors"][0]


def test_no_optional_rights_refuses_each_optional_read_with_403_errors():
    sim = at.build(seed=2, opportunities=30, variant="no_optional_rights")
    with SandboxServer(sim) as srv:
        api = _api_of(srv)
        for method, path in (
            ("GET", "ThresholdInformation"),
            ("GET", "Opportunities/entityInformation/fields"),
            ("GET", "Opportunities/entityInformation/userDefinedFields"),
            ("POST", "Companies/query"),
            ("POST", "Contacts/query"),
            ("POST", "Resources/query"),
            ("POST", "Countries/query"),
            ("GET", f"Companies/{at.COMPANY_BASE}"),
        ):
            r = requests.request(method, api + path, data=json.dumps({"filter": ALL}), headers=HEADERS, timeout=10)
            assert r.status_code == 403, path
            assert r.json() == {"errors": [at.NO_RIGHTS]}
        assert post(api + "Opportunities/query", {"filter": ALL}).status_code == 200
        # credentials are still checked first
        assert (
            requests.get(api + "ThresholdInformation", headers=dict(HEADERS, Secret="x"), timeout=10).status_code == 401
        )


def test_custom_statuses_tenant():
    sim = at.build(seed=3, opportunities=200, variant="custom_statuses")
    with SandboxServer(sim) as srv:
        api = _api_of(srv)
        fields = requests.get(api + "Opportunities/entityInformation/fields", headers=HEADERS, timeout=10).json()
        by_name = {f["name"]: f for f in fields["fields"]}
        statuses = {v["value"]: (v["label"], v["isSystem"]) for v in by_name["status"]["picklistValues"]}
        assert statuses["11"] == ("Awaiting Budget", False) and statuses["1"] == ("Open", True)
        assert {v["value"] for v in by_name["stage"]["picklistValues"]} == {"101", "102", "103", "104", "105"}
        items = [o for p in page_all_post(api, {"MaxRecords": 500, "filter": ALL}) for o in p["items"]]
        assert any(i["status"] == 1 and i["stage"] == 104 for i in items)  # won stage, status still Open
        assert any(i["status"] == 12 for i in items) and any(i["status"] == 11 for i in items)


def test_udf_fields_tenant():
    sim = at.build(seed=4, opportunities=60, variant="udf_fields")
    with SandboxServer(sim) as srv:
        api = _api_of(srv)
        udfs = requests.get(api + "Opportunities/entityInformation/userDefinedFields", headers=HEADERS, timeout=10)
        assert [f["name"] for f in udfs.json()["fields"]] == list(at.EXTRA_UDF_NAMES)
        r = post(
            api + "Opportunities/query", {"filter": [{"op": "eq", "field": "Region", "value": "West", "udf": True}]}
        )
        assert r.status_code == 500 and "Region" in r.json()["errors"][0]
        items = post(
            api + "Opportunities/query", {"filter": [{"op": "exist", "field": "Territory", "udf": True}]}
        ).json()["items"]
        assert items and all(
            any(u["name"] == "Territory" and u["value"] for u in i["userDefinedFields"]) for i in items
        )


def test_company_changes_move_last_tracked_modified():
    sim = at.build(seed=5, opportunities=200)
    with SandboxServer(sim) as srv:
        api = _api_of(srv)
        since = sim.world.clock.now()
        cutoff = since.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        flt = [{"op": "gte", "field": "lastTrackedModifiedDateTime", "value": cutoff}]
        assert post(api + "Companies/query", {"filter": flt}).json()["items"] == []
        acc = sim.world.accounts[3]
        with sim.world.lock:  # as world.advance renames an account
            acc.name += " (renamed)"
            sim.world.version += 1
        sim.world.clock.advance(timedelta(seconds=2))
        items = post(api + "Companies/query", {"filter": flt}).json()["items"]
        assert [c["id"] for c in items] == [int(acc.native_id)] and items[0]["companyName"] == acc.name


def test_truth_is_the_tenant_as_users_see_it():
    sim = at.build(seed=6, opportunities=50, variant="no_optional_rights")
    t = at.truth(sim)
    assert set(t) == {o.native_id for o in sim.world.live()}
    assert {r["client_name"] for r in t.values()} == {None} and {r["service_location"] for r in t.values()} == {None}
    assert all(r["stage"] == r["stage_id"] for r in t.values())
    sim = at.build(seed=6, opportunities=50)
    t = at.truth(sim)
    assert {r["stage"] for r in t.values()} <= {s.label for s in at.STAGES}
    assert any(r["service_location"] and "Suite" in r["service_location"] for r in t.values())


def test_no_lost_date_tenant():
    sim = at.build(seed=8, opportunities=120, variant="no_lost_date")
    with SandboxServer(sim) as srv:
        api = _api_of(srv)
        fields = requests.get(api + "Opportunities/entityInformation/fields", headers=HEADERS, timeout=10).json()
        names = {f["name"] for f in fields["fields"]}
        assert "closedDate" in names and "lostDate" not in names
        items = [o for p in page_all_post(api, {"MaxRecords": 500, "filter": ALL}) for o in p["items"]]
        assert all("lostDate" not in i for i in items)
        assert any(i["closedDate"] for i in items)
        r = post(api + "Opportunities/query", {"filter": [{"op": "exist", "field": "lostDate"}]})
        assert r.status_code == 500 and "lostDate" in r.json()["errors"][0]
        t = at.truth(sim)
        assert all(t[sid]["crm_closed_at"] is None for sid in t if t[sid]["status"] == "lost")
