"""Simulator scale (moved here from tests/sandbox/test_<crm>_sandbox.py by issue 16): each simulator builds a
100,000-opportunity tenant and answers its first pages. The checks are the tests' own, unchanged, their time
limits included; as tests they cost ~10-40 s of CPU each and their wall-clock limits failed on a loaded machine,
so they are figures of `make bench` now: the build seconds and the first pages' seconds per CRM.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import requests

from benchmarks.common import Figure, progress, timed
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox import dynamics as dy
from oppsync_pipeline.sandbox import hubspot as hs
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import SandboxServer

NAME = "simulator scale"
SIZE = 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:  # the tenant size is the checks' own (100,000)
    parser.add_argument_group("simulator scale")


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    out = []
    for crm, check in CHECKS.items():
        progress(f"simulator scale: {crm}, {SIZE:,} opportunities")
        problem = ""
        with timed() as t:
            try:
                check()
            except AssertionError as err:
                problem = str(err).splitlines()[0][:200] if str(err) else "assertion failed"
        out.append(
            Figure(
                NAME,
                crm,
                f"{t['s']:.1f}s",
                "checks pass (build + first pages, their own limits)",
                "MISS" if problem else "PASS",
                problem or f"{SIZE:,} opportunities",
            )
        )
    return out


# -- the checks, as the sandbox tests wrote them -----------------------------------------------------------------


def salesforce() -> None:
    sim = sfsim.build(seed=1, opportunities=100_000)
    with SandboxServer(sim) as srv:
        token = requests.post(
            f"{srv.url}/services/oauth2/token", data={"grant_type": "client_credentials", **sfsim.SANDBOX_CREDENTIALS}
        ).json()
        h = {"Authorization": f"Bearer {token['access_token']}", "Sforce-Query-Options": "batchSize=2000"}
        r = requests.get(
            f"{srv.url}/services/data/v62.0/query",
            params={
                "q": "SELECT Id, Name, Account.Name, Owner.Name FROM Opportunity WHERE "
                "IsClosed = false ORDER BY SystemModstamp, Id"
            },
            headers=h,
        )
        assert r.status_code == 200 and r.json()["totalSize"] > 50_000
        nxt = requests.get(srv.url + r.json()["nextRecordsUrl"], headers=h)
        assert len(nxt.json()["records"]) == 2000


def hubspot() -> None:
    s = hs.build(seed=1, opportunities=100_000, limits=hs.Limits(ten_secondly=0, search_per_second=0, daily=1_000_000))
    with SandboxServer(s) as srv:

        def http(method: str, path: str, **kwargs) -> requests.Response:
            return requests.request(
                method,
                srv.url + path,
                headers={"Authorization": f"Bearer {hs.PRIVATE_APP_TOKEN}"},
                timeout=10,
                **kwargs,
            )

        search = {
            "filterGroups": [{"filters": [{"propertyName": "dealstage", "operator": "IN", "values": ["closedwon"]}]}],
            "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
            "limit": 200,
        }
        r = http("POST", "/crm/v3/objects/deals/search", json=search)
        assert r.status_code == 200 and r.json()["total"] > 1000
        r2 = http("POST", "/crm/v3/objects/deals/search", json={**search, "after": "200"})
        assert r2.status_code == 200
        listed = http("GET", "/crm/v3/objects/deals?limit=100")
        assert listed.status_code == 200


def dynamics() -> None:
    sim = dy.build(seed=9, opportunities=100_000)
    with SandboxServer(sim) as big:
        token = requests.post(
            f"{big.url}/{dy.TENANT_ID}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": dy.CLIENT_ID,
                "client_secret": dy.SANDBOX_CREDENTIALS["client_secret"],
                "scope": f"{big.url}/.default",
            },
        )
        assert token.status_code == 200, token.text
        s = requests.Session()
        s.headers.update(
            {"Authorization": f"Bearer {token.json()['access_token']}", "Prefer": "odata.maxpagesize=5000"}
        )
        r = s.get(
            f"{big.url}/api/data/v9.2/opportunities",
            params={
                "$select": "name,modifiedon",
                "$filter": "statecode eq 0 and modifiedon ge 2000-01-01T00:00:00Z",
                "$orderby": "modifiedon,opportunityid",
            },
        )
        assert r.status_code == 200 and len(r.json()["value"]) == 5000
        assert s.get(r.json()["@odata.nextLink"]).status_code == 200


def connectwise() -> None:
    creds = cw.SANDBOX_CREDENTIALS
    auth = (f"{creds['company_id']}+{creds['public_key']}", creds["private_key"])
    headers = {"clientId": creds["client_id"]}
    t0 = datetime.now()
    sim = cw.build(seed=5, opportunities=100_000)
    with SandboxServer(sim) as srv:
        r = requests.get(
            f"{srv.url}/v4_6_release/apis/3.0/sales/opportunities",
            auth=auth,
            headers=headers,
            timeout=10,
            params={
                "pageSize": 1000,
                "orderBy": "_info/lastUpdated asc, id asc",
                "conditions": "status/id in (1,5,6,7) and _info/lastUpdated >= [2000-01-01T00:00:00Z]",
            },
        )
        assert r.status_code == 200 and len(r.json()) == 1000
        r2 = requests.get(r.links["next"]["url"], auth=auth, headers=headers, timeout=10)
        assert r2.status_code == 200 and len(r2.json()) == 1000
    assert (datetime.now() - t0).total_seconds() < 25


def autotask() -> None:
    headers = {
        "ApiIntegrationCode": at.SANDBOX_CREDENTIALS["integration_code"],
        "UserName": at.SANDBOX_CREDENTIALS["username"],
        "Secret": at.SANDBOX_CREDENTIALS["secret"],
        "Content-Type": "application/json",
    }

    def post(url: str, body: dict) -> requests.Response:
        return requests.post(url, data=json.dumps(body), headers=headers, timeout=30)

    t = time.perf_counter()
    sim = at.build(seed=5, opportunities=100_000)
    with SandboxServer(sim) as srv:
        r = post(
            srv.url + "/ATServicesRest/V1.0/Opportunities/query",
            {"MaxRecords": 500, "filter": [{"op": "in", "field": "status", "value": [0, 1, 5]}]},
        )
        assert r.status_code == 200 and r.json()["pageDetails"]["count"] == 500
        t2 = time.perf_counter()
        r = post(
            r.json()["pageDetails"]["nextPageUrl"],
            {"MaxRecords": 500, "filter": [{"op": "in", "field": "status", "value": [0, 1, 5]}]},
        )
        assert r.status_code == 200 and time.perf_counter() - t2 < 2
    assert time.perf_counter() - t < 30


CHECKS: dict[str, Callable[[], None]] = {
    "salesforce": salesforce,
    "hubspot": hubspot,
    "dynamics": dynamics,
    "connectwise": connectwise,
    "autotask": autotask,
}
