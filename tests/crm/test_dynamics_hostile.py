"""Hostile answers from Dataverse (issue 22), against the simulator over real HTTP, through the real sync into
both warehouses: pages of the wrong shape, ids that are null or of the wrong type, next links that loop, a
server that ignores paging, records silently left out, and bad records.

Each case starts from a clean full sync, so "the warehouse is unchanged" means something: a failed run must
leave current rows, events and history exactly as they were, and nothing may be inferred deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import requests
from sqlalchemy import text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.config import ConnectionConfig, OppsyncConfig
from oppsync_pipeline.lib.crm import dynamics
from oppsync_pipeline.lib.crm.dynamics import DynamicsConnector
from oppsync_pipeline.lib.sync import ExtractFailed, SyncSummary, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox import dynamics as sandbox
from oppsync_pipeline.sandbox.server import Request, Response, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import PageHook, snapshot

N = 400  # 4 bad records stay within the default quarantine_max_share of 1%
PAGE = 100  # so that each set is read in more than one page
OPPORTUNITIES = "/api/data/v9.2/opportunities"


def loop_back(body: Any, n: int, req: Request) -> Any:
    """A PageHook.rewrite_body: from the n-th opportunity answer on (n >= 2), a next link points back at the
    first page of the same query (the request's own URL without its paging cookie)."""
    if n >= 2 and isinstance(body, dict) and body.get("@odata.nextLink"):
        query = {k: v[0] for k, v in req.query.items() if k != "$skiptoken"}
        body["@odata.nextLink"] = f"http://{req.header('host')}{req.path}?" + urlencode(
            query, quote_via=quote, safe="$,()'=/"
        )
    return body


@dataclass
class Tenant:
    sim: sandbox.DynamicsSimulator
    server: SandboxServer
    cfg: OppsyncConfig
    conn: ConnectionConfig
    engine: Engine

    def sync(self, run_id: str) -> SyncSummary:
        return sync_connection(self.cfg, self.conn, self.engine, run_id=run_id, mode="full")

    def failing_sync(self, run_id: str) -> str:
        with pytest.raises(ExtractFailed) as failed:
            self.sync(run_id)
        return str(failed.value)

    def rows(self, sql: str, **params: Any) -> list:
        with self.engine.connect() as c:
            return c.execute(text(sql), params).fetchall()

    def deleted_events(self) -> list:
        return self.rows("SELECT source_id FROM oppsync.opportunity_events WHERE event_type = 'deleted'")

    def hook(self, **kwargs: Any) -> PageHook:
        return PageHook(self.sim, "dynamics", **kwargs).install()

    def open_ids(self) -> list[str]:
        return sorted(o.native_id for o in self.sim.world.live() if self.sim.world.status(o) == "open")


@pytest.fixture
def tenant(tmp_path, warehouse_url):
    sim = sandbox.build(seed=7, opportunities=N)
    with SandboxServer(sim) as server:
        # one cursor per set (parallel_reads 1): these tests are of a cursor's paging guards, page by page;
        # split reads run the same guards per range (tests/crm/test_parallel_reads.py)
        options = {**sandbox.connection_options(server.url), "parallel_reads": 1}
        cfg = sandbox_config(
            {"dynamics": server}, warehouse_url, tmp_path, extra={"dynamics": {"page_size": PAGE, "options": options}}
        )
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        t = Tenant(sim, server, cfg, cfg.connections[0], engine)
        t.sync("clean")
        assert len(t.open_ids()) > PAGE, "the open set must span more than one page"
        yield t
        engine.dispose()


def set_read(req: Request) -> bool:
    """A page of an open / not-open set read (not discovery, a count or a read by id)."""
    order = req.arg("$orderby") or ""  # full reads in creation order, incremental ones by modification
    return order.startswith(("modifiedon", "createdon")) and "opportunityid" in order


def second_page(req: Request) -> bool:
    return set_read(req) and "$skiptoken" in req.query


# -- (a) pages of the wrong shape --------------------------------------------------------------------------------


def test_a_wrong_shape_page_mid_paging_fails_the_sync_naming_crm_url_and_page(tenant):
    before = snapshot(tenant.engine, tenant.conn.name)
    # the second page of a set answered as the simulator's wrong_shape fault answers (valid JSON, none of the keys):
    # chosen by its request, as the not-open set's read begins beside the open set's (their order is not fixed)
    tenant.hook(rewrite_body=lambda body, n, req: {"status": "COMPLETE"} if second_page(req) else body)
    message = tenant.failing_sync("wrong-shape")
    assert "dynamics: page 2 of" in message and OPPORTUNITIES in message, message
    assert "value is missing" in message
    assert snapshot(tenant.engine, tenant.conn.name) == before
    assert tenant.deleted_events() == []


@pytest.mark.parametrize("breakage", ["no value list", "value not a list", "next link not a string"])
def test_an_envelope_rewritten_mid_paging_fails_the_sync(tenant, breakage):
    def rewrite(body: Any, n: int, req: Request) -> Any:
        if second_page(req):
            if breakage == "no value list":
                body["records"] = body.pop("value")
            elif breakage == "value not a list":
                body["value"] = {"rows": body["value"]}
            else:
                body["@odata.nextLink"] = {"href": body.get("@odata.nextLink")}
        return body

    before = snapshot(tenant.engine, tenant.conn.name)
    tenant.hook(rewrite_body=rewrite)
    message = tenant.failing_sync("envelope")
    assert "dynamics: page 2 of" in message and OPPORTUNITIES in message, message
    assert ("@odata.nextLink" if breakage == "next link not a string" else "value") in message
    assert snapshot(tenant.engine, tenant.conn.name) == before
    assert tenant.deleted_events() == []


# -- (b) ids that are null or of the wrong type ------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [None, 12345, "not-a-guid"])
def test_a_record_without_a_usable_id_fails_the_sync_naming_page_and_key(tenant, bad_id):
    def rewrite(records: list, n: int, req: Request) -> None:
        if second_page(req):
            records[3]["opportunityid"] = bad_id

    before = snapshot(tenant.engine, tenant.conn.name)
    tenant.hook(rewrite=rewrite)
    message = tenant.failing_sync("bad-id")
    assert "dynamics: page 2 of" in message and "value[3].opportunityid" in message, message
    assert snapshot(tenant.engine, tenant.conn.name) == before
    assert (
        tenant.rows("SELECT source_id FROM oppsync.opportunities WHERE source_id IN ('None', '12345', 'not-a-guid')")
        == []
    )
    assert tenant.deleted_events() == []


# -- (c) paging that does not end ----------------------------------------------------------------------------------


def test_a_next_link_pointing_back_fails_fast_with_paging_loops(tenant):
    before = snapshot(tenant.engine, tenant.conn.name)
    tenant.hook(rewrite_body=loop_back)
    served = tenant.sim.request_count
    message = tenant.failing_sync("loop")
    assert "paging loops" in message and "dynamics" in message, message
    assert tenant.sim.request_count - served < 40, (
        tenant.sim.request_count - served
    )  # fails fast: a few requests, not a runaway read (the seconds: make bench)
    assert snapshot(tenant.engine, tenant.conn.name) == before


def test_a_server_ignoring_the_paging_cookie_fails_by_the_crm_count(tenant):
    """Every page is the first one again, under an ever-new next link: no link repeats, so only the count of
    the set bounds the paging."""
    first: dict[str, dict] = {}

    def rewrite(body: Any, n: int, req: Request) -> Any:
        if not set_read(req):
            return body
        query = req.arg("$filter") or ""
        if "$skiptoken" not in req.query:
            first[query] = body
            return body
        return {**first[query], "@odata.nextLink": first[query]["@odata.nextLink"] + quote(f" again{n}")}

    before = snapshot(tenant.engine, tenant.conn.name)
    hook = tenant.hook(rewrite_body=rewrite)
    message = tenant.failing_sync("ignored-cookie")
    assert "paging does not terminate" in message and f"count of {len(tenant.open_ids())} records" in message
    assert hook.pages < 20  # fails fast: bounded by the page count (the seconds: make bench)
    assert snapshot(tenant.engine, tenant.conn.name) == before


# -- (d) records silently left out ---------------------------------------------------------------------------------


def test_records_left_out_of_every_answer_are_not_inferred_deleted(tenant):
    """A CRM (or a proxy) that drops five records from every answer, pages and reads by id alike: the set's
    count says more exist than were read, so the full sync infers no delete and says why."""
    hidden = set(tenant.open_ids()[:5])
    live_before = tenant.rows("SELECT count(*) FROM oppsync.opportunities WHERE deleted_at IS NULL")[0][0]

    def rewrite(records: list, n: int, req: Request) -> None:
        records[:] = [r for r in records if r.get("opportunityid") not in hidden]

    hook = tenant.hook(rewrite=rewrite)
    out = tenant.sync("short")
    assert tenant.deleted_events() == []
    assert out.extract.stats["deletes_inferable"] is False
    assert out.extract.stats["crm_count_open"] == out.extract.stats["received_open"] + 5
    assert any("deletes not inferred" in w for w in out.extract.stats["warnings"])
    assert tenant.rows("SELECT deletes_inferable FROM oppsync.extracts WHERE extract_id = 'short'")[0][0] is False
    assert tenant.rows("SELECT count(*) FROM oppsync.opportunities WHERE deleted_at IS NULL")[0][0] == live_before

    hook.remove()
    again = tenant.sync("clean-again")
    assert tenant.deleted_events() == []
    assert again.extract.stats["deletes_inferable"] is True
    assert again.extract.stats["crm_count_open"] == again.extract.stats["received_open"] == len(tenant.open_ids())


# -- (e) bad records -----------------------------------------------------------------------------------------------

LONE = b"<<lone surrogate>>"


def serve_lone_surrogates(sim: sandbox.DynamicsSimulator) -> None:
    """Opportunity answers carry `\\ud800` (a lone UTF-16 surrogate, valid JSON) where the world has LONE:
    json.dumps of the simulator cannot write one, so it is put in the bytes."""
    original = sim.handle

    def handle(req: Request) -> Response:
        resp = original(req)
        if req.path.endswith("/opportunities") and LONE in resp.body:
            resp.body = resp.body.replace(LONE, b"\\ud800")
        return resp

    sim.handle = handle  # type: ignore[method-assign]


def spoil(tenant: Tenant, ids: list[str]) -> dict[str, str]:
    """Make `ids` bad in every answer, one way each in turn; returns id -> the quarantined field."""
    clock = tenant.sim.world.clock.now()
    kinds = [
        ("amount", lambda r: r.update(estimatedvalue=-2500.0)),
        ("createdon", lambda r: r.update(createdon="2024-02-30T10:00:00Z")),
        ("project_name", None),
        ("created_at", lambda r: r.update(createdon=(clock + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ"))),
    ]
    fields, edits = {}, {}
    for i, sid in enumerate(ids):
        field, edit = kinds[i % len(kinds)]
        fields[sid] = field
        if edit is None:
            tenant.sim.world.update(sid, bump=False, name=f"Deal {LONE.decode()} {i}")
        else:
            edits[sid] = edit

    def rewrite(records: list, n: int, req: Request) -> None:
        for r in records:
            if r.get("opportunityid") in edits:
                edits[r["opportunityid"]](r)

    tenant.hook(rewrite=rewrite)
    serve_lone_surrogates(tenant.sim)  # after the hook: PageHook wraps the class's handle, not the instance's
    return fields


def current(tenant: Tenant, ids: list[str]) -> dict[str, tuple]:
    rows = tenant.rows(
        "SELECT source_id, project_name, amount, created_at, version, deleted_at FROM oppsync.opportunities"
    )
    return {r[0]: tuple(r[1:]) for r in rows if r[0] in ids}


def test_bad_records_are_quarantined_and_the_rest_is_synced(tenant):
    world = tenant.sim.world
    ids = tenant.open_ids()
    bad, renamed = ids[10:14], ids[20]
    kept = current(tenant, bad)
    world.clock.advance(timedelta(minutes=5))
    world.update(renamed, name="Renamed while others were bad")
    fields = spoil(tenant, bad)

    out = tenant.sync("bad-records")
    assert out.extract.status == "complete" and out.extract.stats["quarantined"] == 4
    quarantined = {
        (r.source_id, r.field)
        for r in tenant.rows("SELECT source_id, field FROM oppsync.quarantine WHERE extract_id = 'bad-records'")
    }
    assert quarantined == set(fields.items())
    assert current(tenant, bad) == kept  # neither updated nor deleted
    assert tenant.deleted_events() == []
    assert (
        tenant.rows("SELECT project_name FROM oppsync.opportunities WHERE source_id = :s", s=renamed)[0][0]
        == "Renamed while others were bad"
    )
    warning = next(w for w in out.extract.stats["warnings"] if "quarantined" in w)
    assert bad[0] in warning and "amount" in warning


def test_more_than_one_percent_of_bad_records_blocks_the_run_naming_ids_and_fields(tenant):
    bad = tenant.open_ids()[:6]  # 6 of 400: 1.5%
    before = snapshot(tenant.engine, tenant.conn.name)
    spoil(tenant, bad)
    message = tenant.failing_sync("too-many-bad")
    assert "failed validation" in message and "quarantine_max_share" in message, message
    assert f"{bad[0]}.amount" in message and f"{bad[1]}.createdon" in message
    assert snapshot(tenant.engine, tenant.conn.name) == before


# -- counts: the CRM's own, past $count's 5,000 and past the aggregate limit ------------------------------------------


def connector(server: SandboxServer, page_size: int = PAGE) -> DynamicsConnector:
    conn = ConnectionConfig(
        name="dyn",
        crm="dynamics",
        base_url=server.url,
        page_size=page_size,
        credentials=dict.fromkeys(sandbox.SANDBOX_CREDENTIALS, "${X}"),
        options={"authority_url": server.url},
    )
    return DynamicsConnector(conn, dict(sandbox.SANDBOX_CREDENTIALS), sleep=lambda s: None)


def test_counts_are_exact_past_the_count_cap_and_the_aggregate_limit(monkeypatch):
    """$count=true stops at 5,000 and an aggregate at 50,000 records: both are lowered here (in the simulator
    and in what the connector assumes) so that a 600-record tenant crosses them."""
    with SandboxServer(sandbox.build(seed=5, opportunities=600)) as server:
        world = server.simulator.world
        truth = {True: sum(1 for o in world.live() if world.status(o) == "open")}
        truth[False] = 600 - truth[True]
        monkeypatch.setattr(sandbox, "COUNT_LIMIT", 100)
        monkeypatch.setattr(dynamics, "COUNT_CAP", 100)
        server.simulator.aggregate_limit = 70
        conn = connector(server)
        for open_set in (True, False):
            assert sum(len(p) for p in conn.opportunities(open_set, None)) == truth[open_set]
            assert conn.tallies[open_set].crm_count == truth[open_set]
            assert conn.count(open_set) == truth[open_set]


def test_the_simulator_counts_as_dataverse_documents(monkeypatch):
    """$count=true: @odata.count up to the cap, the limit annotations only when asked for; $apply aggregate:
    exact, refused past the aggregate limit with Dataverse's error code."""
    with SandboxServer(sandbox.build(seed=5, opportunities=120)) as server:
        world = server.simulator.world
        n_open = sum(1 for o in world.live() if world.status(o) == "open")
        token = requests.post(
            f"{server.url}/{sandbox.TENANT_ID}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": sandbox.CLIENT_ID,
                "scope": f"{server.url}/.default",
                "client_secret": sandbox.SANDBOX_CREDENTIALS["client_secret"],
            },
        ).json()["access_token"]

        def get(params: dict[str, str], prefer: str | None = None) -> requests.Response:
            headers = {"Authorization": f"Bearer {token}", **({"Prefer": prefer} if prefer else {})}
            return requests.get(server.url + OPPORTUNITIES, params=params, headers=headers)

        counted = get({"$apply": "filter(statecode eq 0)/aggregate($count as n)"}).json()
        assert counted["value"] == [{"n": n_open}]
        server.simulator.aggregate_limit = n_open - 1
        refused = get({"$apply": "filter(statecode eq 0)/aggregate($count as n)"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "0x8004E023"

        monkeypatch.setattr(sandbox, "COUNT_LIMIT", 10)
        plain = get({"$select": "name", "$count": "true"}).json()
        assert plain["@odata.count"] == 10 and not any("totalrecordcount" in k for k in plain)
        asked = get(
            {"$select": "name", "$count": "true"},
            'odata.include-annotations="Microsoft.Dynamics.CRM.'
            'totalrecordcount,Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"',
        ).json()
        assert asked["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is True
        assert asked["@Microsoft.Dynamics.CRM.totalrecordcount"] == 10
