"""HubSpot answering strangely (issue 22), against the simulator over HTTP, through the real sync into both
warehouses: pages of the wrong shape, ids that are null or of the wrong type, paging that loops or never
ends, pages that silently miss deals, and deals that cannot be trusted.

Each case starts from a clean full sync; the hostile answer is served to a second full sync. A run that
cannot trust a page fails naming the CRM, the URL and the page, and leaves the warehouse exactly as it was;
a run that received fewer deals than HubSpot's own count infers no delete; a bad deal is quarantined and
the rest is synced.

`loop_back` is a PageHook.rewrite_body for the fault matrix.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.config import ConnectionConfig, OppsyncConfig
from oppsync_pipeline.lib.sync import ExtractFailed, SyncSummary, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox import hubspot as hubspot_sim
from oppsync_pipeline.sandbox.server import FaultRule, Request, Response, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import OPPORTUNITY_PAGES, PageHook, snapshot

NO_LIMITS = hubspot_sim.Limits(ten_secondly=0, search_per_second=0, daily=1_000_000)
PAGE_SIZE = 40
DEAL_PAGES = OPPORTUNITY_PAGES["hubspot"]
SEARCH_URL = r"http://127\.0\.0\.1:\d+/crm/v3/objects/deals/search"


# -- the hook the fault matrix imports ---------------------------------------------------------------------------


def loop_back(body: Any, n: int, req: Request) -> Any:
    """PageHook.rewrite_body: from page 2 on, the page's next-page cursor points back at an earlier page.

    Deal search is read by keyset: the next query starts after the page's last deal, so that deal IS the
    cursor; it becomes the deal the page was asked to read after (the previous page's last), and
    `paging.next.after` goes back to the offset that fetched the page. A list page (`GET .../deals`, the
    archived deals) gets the `after` cursor that fetched it as its next cursor."""
    if n < 2 or not isinstance(body, dict) or not body.get("results"):
        return body
    if req.path.endswith("/search"):
        bound = keyset_bound(req)
        if bound:
            last = body["results"][-1]
            body["results"][-1] = {
                **last,
                "id": str(bound),
                "properties": {**(last.get("properties") or {}), "hs_object_id": str(bound)},
            }
            offset = str((req.json() or {}).get("after") or 0)
            body["paging"] = {"next": {"after": offset, "link": f"?after={offset}"}}
    elif req.arg("after"):
        body["paging"] = {"next": {"after": req.arg("after"), "link": f"?after={req.arg('after')}"}}
    return body


def keyset_bound(req: Request) -> int | None:
    """The `hs_object_id GT <n>` bound of a search request (None without one)."""
    for group in (req.json() or {}).get("filterGroups") or []:
        for f in group.get("filters") or []:
            if f.get("propertyName") == "hs_object_id" and f.get("operator") == "GT":
                return int(f["value"])
    return None


# -- a tenant: the simulator, a connection to it, a warehouse -----------------------------------------------------


@dataclass
class Tenant:
    sim: hubspot_sim.HubSpotSimulator
    cfg: OppsyncConfig
    conn: ConnectionConfig
    engine: Engine

    def sync(self, run_id: str, mode: str = "full") -> SyncSummary:
        return sync_connection(self.cfg, self.conn, self.engine, run_id=run_id, mode=mode)

    def rows(self, sql: str, **params: Any) -> list:
        with self.engine.connect() as c:
            return c.execute(text(sql), params).fetchall()

    def events(self, run_id: str) -> list[tuple[str, str]]:
        return [
            tuple(r)
            for r in self.rows(
                "SELECT source_id, event_type FROM oppsync.opportunity_events WHERE run_id = :r", r=run_id
            )
        ]

    def extract(self, run_id: str) -> Any:
        return self.rows(
            "SELECT deletes_inferable, crm_count_open, received_open, crm_count_closed, "
            "received_closed, warnings FROM oppsync.extracts WHERE extract_id = :r",
            r=run_id,
        )[0]

    def deals_in_order(self, status: str = "open") -> list[str]:
        world = self.sim.world
        return sorted((o.native_id for o in world.live() if world.status(o) == status), key=int)


@contextmanager
def tenant(warehouse_url: str, tmp_path: Path, n: int = 150, **connection: Any) -> Iterator[Tenant]:
    """A HubSpot portal of `n` deals synced once in full (run "r1") into the warehouse."""
    sim = hubspot_sim.build(seed=31, opportunities=n, limits=NO_LIMITS)
    with SandboxServer(sim) as server:
        # one keyset read per set (parallel_reads 1): these tests are of its paging guards, page by page
        options = {"search_requests_per_second": 0, "parallel_reads": 1}
        extra = {"page_size": PAGE_SIZE, "options": options, **connection}
        cfg = sandbox_config({"hubspot": server}, warehouse_url, tmp_path, extra={"hubspot": extra})
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        t = Tenant(sim, cfg, cfg.connections[0], engine)
        first = t.sync("r1")
        assert first.extract.status == "complete" and first.result.created == n
        try:
            yield t
        finally:
            engine.dispose()


def fails_and_changes_nothing(t: Tenant, match: str, run_id: str = "r2") -> ExtractFailed:
    """The next full sync fails with `match` and the warehouse is exactly what it was."""
    before = snapshot(t.engine, t.conn.name)
    with pytest.raises(ExtractFailed, match=match) as failed:
        t.sync(run_id)
    assert snapshot(t.engine, t.conn.name).differences(before) == []
    assert t.events(run_id) == []
    assert (
        t.rows("SELECT count(*) FROM oppsync.opportunities WHERE source_id IN ('None', '') OR deleted_at IS NOT NULL")[
            0
        ][0]
        == 0
    )
    return failed.value


def rewrite_answers(sim: hubspot_sim.HubSpotSimulator, path: str, change: Callable[[dict], None]) -> None:
    """Every 200 answer on `path` has `change` applied to each of its results, and is sent as ASCII JSON so that
    text may carry what JSON can escape and UTF-8 cannot encode (a lone surrogate: "\\ud800")."""
    original = sim.handle

    def handle(req: Request) -> Response:
        resp = original(req)
        if resp.status not in (200, 207) or not re.search(path, req.path):
            return resp
        body = json.loads(resp.body)
        for record in body.get("results") or []:
            change(record)
        return Response(resp.status, json.dumps(body).encode("ascii"), dict(resp.headers))

    sim.handle = handle  # type: ignore[method-assign]


def ignore_paging(sim: hubspot_sim.HubSpotSimulator, path: str, *, give_up_after: int = 300) -> None:
    """A server that ignores the page it is asked for: a search answers its first page whatever its
    `hs_object_id` bound, a list its first page whatever its `after`, each time with a new `after` cursor.
    After `give_up_after` pages it lets the list end (so that a reader without a guard stops, eventually)."""
    original = sim.handle
    served = [0]

    def handle(req: Request) -> Response:
        if not re.search(path, req.path):
            return original(req)
        if req.method == "POST":
            body = req.json() or {}
            for group in body.get("filterGroups") or []:
                for f in group.get("filters") or []:
                    if f.get("propertyName") == "hs_object_id" and f.get("operator") == "GT":
                        f["value"] = "0"
            req = dataclasses.replace(req, body=json.dumps(body).encode())
        else:
            req = dataclasses.replace(req, query={k: v for k, v in req.query.items() if k != "after"})
        resp = original(req)
        served[0] += 1
        if resp.status != 200 or served[0] > give_up_after:
            return resp
        answer = json.loads(resp.body)
        answer["paging"] = {"next": {"after": f"fresh-{served[0]}", "link": f"?after=fresh-{served[0]}"}}
        return Response.json(
            answer, resp.status, {k: v for k, v in resp.headers.items() if k.lower() != "content-type"}
        )

    sim.handle = handle  # type: ignore[method-assign]


# -- a. a page of the wrong shape ---------------------------------------------------------------------------------


def test_a_wrong_shape_page_mid_paging_fails_the_run_naming_crm_url_and_page(warehouse_url, tmp_path):
    """Valid JSON, status 200, none of the keys of a search answer, on the second page of the open set: the
    run fails (not "the set ended here") and nothing is inferred deleted or out of scope."""
    with tenant(warehouse_url, tmp_path) as t:
        t.sim.faults.rules = [FaultRule("wrong_shape", after=2, count=1, path=DEAL_PAGES)]
        err = fails_and_changes_nothing(
            t,
            rf"hubspot: page 2 of {SEARCH_URL}: unexpected page shape: "
            r"results is missing; total is missing",
        )
        assert t.sim.faults.rules[0].fired == 1
        assert "nothing was written" in str(err) and not err.permanent


DAMAGED_ENVELOPES = {
    "no-results": (lambda body: body.pop("results"), "results is missing"),
    "results-not-a-list": (
        lambda body: body.update(results={"0": {"id": "1"}}),
        "results: input should be a valid list",
    ),
    "next-without-after": (lambda body: body.update(paging={"next": {}}), r"paging\.next\.after is missing"),
    "total-not-a-number": (
        lambda body: body.update(total="many"),
        r"total: input should be a valid integer \(got 'many'\)",
    ),
}


def test_a_damaged_envelope_mid_paging_fails_the_run(warehouse_url, tmp_path):
    """Page 3 of a full read without its list, with a list that is not one, with a next page that has no
    cursor, with a count that is not a number: each run fails and changes nothing."""
    with tenant(warehouse_url, tmp_path) as t:
        for name, (damage, problem) in DAMAGED_ENVELOPES.items():

            def rewrite_body(body, n, req, damage=damage):
                if n == 3:
                    damage(body)
                return body

            hook = PageHook(t.sim, "hubspot", rewrite_body=rewrite_body).install()
            fails_and_changes_nothing(
                t, rf"hubspot: page 3 of {SEARCH_URL}: unexpected page shape: .*{problem}", run_id=f"r-{name}"
            )
            hook.remove()


# -- b. ids that are null or of the wrong type --------------------------------------------------------------------


def test_b_a_deal_without_a_proper_id_fails_the_run_naming_page_and_key(warehouse_url, tmp_path):
    """A deal whose `id` is null (or a number, or empty) on page 2: no 'None' row, nothing deleted, and the
    error names the page and the key."""
    with tenant(warehouse_url, tmp_path) as t:
        for bad_id, shown in ((None, "None"), (18300000042, "18300000042"), ("", "''")):

            def rewrite(records, n, req, bad_id=bad_id):
                if n == 2:
                    records[5]["id"] = bad_id

            hook = PageHook(t.sim, "hubspot", rewrite=rewrite).install()
            fails_and_changes_nothing(
                t,
                rf"hubspot: page 2 of {SEARCH_URL}: unexpected page shape: "
                rf"results\[5\]\.id: .*\(got {shown}\)",
                run_id=f"r-{shown}",
            )
            hook.remove()


def test_b_a_by_id_answer_with_a_null_id_fails_the_run(warehouse_url, tmp_path):
    """The by-id read decides what is deleted: a deal the search did not deliver is read by id, and an answer
    with a null id there fails the run too."""
    with tenant(warehouse_url, tmp_path) as t:

        def rewrite(records, n, req):
            if n == 2:
                records.pop(7)

        PageHook(t.sim, "hubspot", rewrite=rewrite).install()
        rewrite_answers(t.sim, r"/objects/deals/batch/read$", lambda r: r.update(id=None))
        fails_and_changes_nothing(
            t,
            r"hubspot: page 1 of http://127\.0\.0\.1:\d+/crm/v3/objects/deals/batch/read: "
            r"unexpected page shape: results\[0\]\.id: .*\(got None\)",
        )


# -- c. paging that loops or never ends ---------------------------------------------------------------------------


def test_c_a_cursor_pointing_back_fails_fast(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as t:
        PageHook(t.sim, "hubspot", rewrite_body=loop_back).install()
        served = t.sim.request_count
        fails_and_changes_nothing(t, rf"hubspot: page 2 of {SEARCH_URL}: .*already followed: paging loops")
        assert t.sim.request_count - served < 40, (
            t.sim.request_count - served
        )  # fails fast: a few requests, not a runaway read (the seconds: make bench)


def test_c_a_search_that_ignores_its_keyset_bound_fails_fast(warehouse_url, tmp_path):
    """The server answers the first page whatever position it is asked to read after (a new `after` each
    time): the page's last deal, the next position, repeats."""
    with tenant(warehouse_url, tmp_path) as t:
        ignore_paging(t.sim, r"/objects/deals/search$")
        served = t.sim.request_count
        fails_and_changes_nothing(t, rf"hubspot: page 2 of {SEARCH_URL}: .*paging loops")
        assert t.sim.request_count - served < 40, (
            t.sim.request_count - served
        )  # fails fast: a few requests, not a runaway read (the seconds: make bench)


def test_c_the_archived_deal_list_ignoring_its_cursor_fails_fast(warehouse_url, tmp_path):
    """The delete feed (`GET /crm/v3/objects/deals?archived=true`) carries no count: the same deals under ever
    new cursors are a loop all the same."""
    with tenant(warehouse_url, tmp_path) as t:
        for deal in t.deals_in_order()[:5]:
            t.sim.world.delete(deal)
        ignore_paging(t.sim, r"/objects/deals$")
        served = t.sim.request_count
        fails_and_changes_nothing(
            t,
            r"hubspot: page 2 of http://127\.0\.0\.1:\d+/crm/v3/objects/deals: it starts with "
            r"record .*, as page 1 did: .*paging loops",
        )
        assert t.sim.request_count - served < 40, (
            t.sim.request_count - served
        )  # fails fast: a few requests, not a runaway read (the seconds: make bench)


def test_c_more_pages_than_the_count_allows_fail_the_run(warehouse_url, tmp_path):
    """A search whose pages keep coming past the number its first page counted stops at the count's bound
    (here: 3 deals counted, 10 per page: at most 1 page and the slack)."""
    with tenant(warehouse_url, tmp_path, page_size=10) as t:
        assert len(t.deals_in_order()) > 60

        def undercount(body, n, req):
            if n == 1:
                body["total"] = 3
            return body

        PageHook(t.sim, "hubspot", rewrite_body=undercount).install()
        fails_and_changes_nothing(
            t,
            rf"hubspot: page 5 of {SEARCH_URL}: more pages \(5\) than the CRM's count of "
            r"3 records allows \(4\): paging does not terminate",
        )


# -- d. a page silently missing deals -----------------------------------------------------------------------------


def test_d_fewer_deals_than_hubspot_counts_infer_no_delete(warehouse_url, tmp_path):
    """Page 2 of the open set arrives well-formed but one deal short: the run completes, says it did not
    infer deletes, and records HubSpot's count and what arrived; the next clean sync infers nothing spurious."""
    with tenant(warehouse_url, tmp_path) as t:
        open_deals = t.deals_in_order()
        dropped: list[str] = []

        def rewrite(records, n, req):
            if n == 2:
                dropped.append(records.pop(7)["id"])

        hook = PageHook(t.sim, "hubspot", rewrite=rewrite).install()
        out = t.sync("r2")
        hook.remove()
        assert dropped and out.extract.status == "complete"
        assert out.extract.stats["deletes_inferable"] is False
        assert any(
            "deletes not inferred" in w and f"{len(open_deals) - 1} received, the CRM counts {len(open_deals)}" in w
            for w in out.extract.stats["warnings"]
        )
        row = t.extract("r2")
        assert (row.deletes_inferable, row.crm_count_open, row.received_open) == (
            False,
            len(open_deals),
            len(open_deals) - 1,
        )
        assert not [e for e in t.events("r2") if e[1] in ("deleted", "left_scope")]
        assert t.rows("SELECT deleted_at FROM oppsync.opportunities WHERE source_id = :s", s=dropped[0]) == [(None,)]

        again = t.sync("r3")
        assert again.extract.stats["deletes_inferable"] is True
        assert t.extract("r3").received_open == t.extract("r3").crm_count_open == len(open_deals)
        assert t.events("r3") == []


# -- e. deals that cannot be trusted ------------------------------------------------------------------------------


def test_e_bad_deals_are_quarantined_and_the_rest_is_synced(warehouse_url, tmp_path):
    """A negative amount, an unparsable created date, a lone surrogate in the name and a created date ahead of
    HubSpot's clock: each deal is set aside with its field (the property's path where the value could not be
    read), its warehouse row stays as it was, and every other change of the run is synced."""
    with tenant(warehouse_url, tmp_path, n=500) as t:
        world = t.sim.world
        deals = t.deals_in_order()
        negative, unreadable, surrogate, future, edited = deals[3], deals[50], deals[90], deals[120], deals[130]
        world.update(edited, amount=123456.0)
        ahead = (world.clock.now() + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        damage = {
            negative: {"amount": "-2500"},
            unreadable: {"createdate": "31/02/2024 25:61"},
            surrogate: {"dealname": "Acme \ud800 renewal"},
            future: {"createdate": ahead},
        }
        rewrite_answers(
            t.sim, r"/objects/deals/(search|batch/read)$", lambda r: r["properties"].update(damage.get(r["id"], {}))
        )
        before = snapshot(t.engine, t.conn.name)

        out = t.sync("r2")
        assert out.extract.status == "complete" and out.extract.stats["quarantined"] == 4
        got = set(t.rows("SELECT source_id, field FROM oppsync.quarantine WHERE extract_id = 'r2'"))
        assert got == {
            (negative, "amount"),
            (unreadable, "properties.createdate"),
            (surrogate, "project_name"),
            (future, "created_at"),
        }
        after = snapshot(t.engine, t.conn.name)
        for deal in damage:
            assert after.current[deal] == before.current[deal]
        assert t.events("r2") == [(edited, "updated")]
        assert t.rows("SELECT amount FROM oppsync.opportunities WHERE source_id = :s", s=edited) == [(123456.0,)]
        assert any("4 record(s) quarantined" in w and negative in w for w in out.extract.stats["warnings"])


def test_e_more_than_one_percent_bad_blocks_the_run_naming_ids_and_fields(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as t:
        bad = t.deals_in_order()[:4]
        rewrite_answers(
            t.sim, r"/objects/deals/search$", lambda r: r["properties"].update(amount="-1") if r["id"] in bad else None
        )
        err = fails_and_changes_nothing(
            t,
            r"4 of 150 hubspot records failed validation \(2\.7%\), more than "
            r"quarantine_max_share=1\.0%",
        )
        assert all(f"{deal}.amount: negative amount" in str(err) for deal in bad)
