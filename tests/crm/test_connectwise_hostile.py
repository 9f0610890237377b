"""ConnectWise against hostile answers (issue 22): pages of the wrong shape, ids that are not ids, next links
that point back, a server that ignores `page`, pages silently short of records, and records that cannot be
trusted. Over real HTTP against the simulator, through sync_connection into DuckDB and Postgres: each case
checks what the run says and that the warehouse lost nothing.

ConnectWise's next-page cursor is the `Link` response header, not a key of the body, so the rewrites that
move it (`loop_back`, `IgnoresPage`) return `(body, headers)` and are served by `Rewriter` (PageHook's
contract plus headers; bodies go out ASCII-escaped, so a lone surrogate arrives as the `\\ud800` escape a
.NET serializer writes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.config import OppsyncConfig
from oppsync_pipeline.lib.crm.pages import PageError
from oppsync_pipeline.lib.sync import ExtractFailed, SyncSummary, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, Request, Response, SandboxServer
from tests.conftest import sandbox_config
from tests.reliability.harness import OPPORTUNITY_PAGES, PageHook, snapshot

CONNECTION = "sandbox-connectwise"
PAGE_SIZE = 20
SIZE = 80  # about 40 open opportunities: two pages of the open set


# -- rewrites of served pages ----------------------------------------------------------------------------------


def page_of(req: Request) -> int:
    return int(req.arg("page") or 1)


def link(req: Request, page: int) -> str:
    """The request's own query with another page number, `page=` last (as CW and the simulator write it)."""
    params = [(k, v) for k, vs in req.query.items() if k != "page" for v in vs] + [("page", str(page))]
    return f"http://{req.header('host')}{req.path}?" + urlencode(params, quote_via=quote)


def next_link(url: str) -> dict[str, str]:
    return {"Link": f'<{url}>; rel="next"'}


def loop_back(body: Any, n: int, req: Request) -> Any:
    """A rewrite_body: from page 2 of a query on (the request's own page number; `n` counts every page the hook
    served, the custom-field sample read at discovery included), the next link points back at page 1 of the
    same query. Returns (body, headers): ConnectWise's next-page cursor is the Link header."""
    if page_of(req) < 2:
        return body
    return body, next_link(link(req, 1))


class IgnoresPage:
    """A rewrite_body for a server that ignores `page`: every page of a query is its first, each with a next
    link one page further (ever-new cursors)."""

    def __init__(self) -> None:
        self.first: dict[tuple, Any] = {}

    def __call__(self, body: Any, n: int, req: Request) -> Any:
        query = (req.path, tuple(sorted((k, tuple(v)) for k, v in req.query.items() if k != "page")))
        if page_of(req) == 1:
            self.first[query] = body
        return self.first.get(query, body), next_link(link(req, page_of(req) + 1))


def full_open_page(req: Request, page: int) -> bool:
    """Page `page` of the full read of the open set (not the incremental re-read, not a read by id)."""
    conditions = req.arg("conditions") or ""
    return page_of(req) == page and conditions.startswith("status/id in (") and "lastUpdated" not in conditions


@dataclass
class Rewriter:
    """Serves the simulator's opportunity pages through `rewrite(body, n, req)`, which returns the body or
    (body, headers). After `limit` rewritten pages it lets pages through unchanged: a connector without a
    guard then ends its read (with the duplicates) instead of hanging the test."""

    sim: cw.ConnectWiseSimulator
    rewrite: Callable[[Any, int, Request], Any]
    limit: int = 1000
    pages: int = 0

    def install(self) -> Rewriter:
        pattern = re.compile(OPPORTUNITY_PAGES["connectwise"])
        original = type(self.sim).handle.__get__(self.sim)

        def handle(req: Request) -> Response:
            resp = original(req)
            if not pattern.search(req.path) or resp.status != 200 or self.pages >= self.limit:
                return resp
            self.pages += 1
            out = self.rewrite(json.loads(resp.body), self.pages, req)
            body, changed = out if isinstance(out, tuple) else (out, {})
            headers = (
                {**{k: v for k, v in resp.headers.items() if k.lower() != "link"}, **changed}
                if changed
                else resp.headers
            )
            return Response(resp.status, json.dumps(body, ensure_ascii=True).encode("ascii"), headers)

        self.sim.handle = handle  # type: ignore[method-assign]
        return self


# -- a sandbox tenant synced into a warehouse -------------------------------------------------------------------


@dataclass
class Tenant:
    sim: cw.ConnectWiseSimulator
    cfg: OppsyncConfig
    engine: Any

    def sync(self, run_id: str, mode: str = "full") -> SyncSummary:
        return sync_connection(self.cfg, self.cfg.connections[0], self.engine, run_id=run_id, mode=mode)

    def fails(self, run_id: str, mode: str = "full") -> str:
        """The message of a sync that must fail."""
        with pytest.raises(ExtractFailed) as err:
            self.sync(run_id, mode)
        return str(err.value)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as c:
            return c.execute(text(sql), {"c": CONNECTION, **params}).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as c:
            return list(c.execute(text(sql), {"c": CONNECTION, **params}).fetchall())

    def deleted_ids(self) -> set[str]:
        return {
            r[0]
            for r in self.rows(
                "SELECT source_id FROM oppsync.opportunity_events WHERE connection = :c AND event_type = 'deleted'"
            )
        }

    def extract(self, run_id: str) -> dict[str, Any]:
        with self.engine.connect() as c:
            return dict(
                c.execute(text("SELECT * FROM oppsync.extracts WHERE extract_id = :x"), {"x": run_id}).mappings().one()
            )

    def current(self, ids: list[str]) -> dict[str, tuple]:
        shot = snapshot(self.engine, CONNECTION).current
        return {i: shot[i] for i in ids}


@contextmanager
def open_tenant(warehouse_url: str, tmp_path: Path, seed: int = 22, **connection: Any) -> Iterator[Tenant]:
    sim = cw.build(seed=seed, opportunities=SIZE)
    with SandboxServer(sim) as server:
        extra = {"page_size": PAGE_SIZE, "options": {"forecast": False}, **connection}
        cfg = sandbox_config({"connectwise": server}, warehouse_url, tmp_path, extra={"connectwise": extra})
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        try:
            yield Tenant(sim, cfg, engine)
        finally:
            engine.dispose()


@pytest.fixture
def synced(warehouse_url: str, tmp_path: Path) -> Iterator[Tenant]:
    """A tenant after one clean full sync."""
    with open_tenant(warehouse_url, tmp_path) as t:
        assert t.sync("clean-1").result is not None
        yield t


def changes_nothing(t: Tenant, run: Callable[[], str]) -> str:
    """Run a sync that must fail; the warehouse (rows, events, history) must be exactly as before."""
    before = snapshot(t.engine, CONNECTION)
    message = run()
    assert snapshot(t.engine, CONNECTION) == before
    assert not t.deleted_ids()
    return message


# -- a: a page of the wrong shape mid-paging ---------------------------------------------------------------------


def wrapped(body: Any, n: int, req: Request) -> Any:
    """A proxy (or a new API version) wrapping page 2's array in an object."""
    return {"items": body} if full_open_page(req, 2) else body


def without_ids(body: Any, n: int, req: Request) -> Any:
    return [{k: v for k, v in r.items() if k != "id"} for r in body] if full_open_page(req, 2) else body


@pytest.mark.parametrize("answer", ["wrong_shape fault", "array wrapped in an object", "rows without ids"])
def test_a_page_of_the_wrong_shape_mid_paging_fails_the_run_naming_crm_path_and_page(answer: str, synced: Tenant):
    t = synced
    t.sim.world.delete(next(iter(t.sim.world.live())).native_id)  # a real delete must wait too
    if answer == "wrong_shape fault":
        # matching requests: the custom-field sample read at discovery, then pages 1 and 2 of the open set
        t.sim.faults = FaultPlan(rules=[FaultRule("wrong_shape", path=r"/sales/opportunities$", after=3)])
    else:
        PageHook(t.sim, "connectwise", rewrite_body=wrapped if answer.startswith("array") else without_ids).install()
    message = changes_nothing(t, lambda: t.fails("hostile"))
    assert "PageError: connectwise: page 2 of http://" in message
    assert "/apis/3.0/sales/opportunities: unexpected page shape" in message
    assert ("[0].id is missing" if answer == "rows without ids" else "valid list") in message


# -- b: ids that are not ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spoil", [lambda i: None, str], ids=["null id", "id as a string"])
def test_b_a_record_whose_id_is_null_or_not_an_integer_fails_the_run_naming_page_and_key(spoil, synced: Tenant):
    t = synced

    def rewrite(records: list, n: int, req: Request) -> None:
        if full_open_page(req, 2):
            records[3]["id"] = spoil(records[3]["id"])

    PageHook(t.sim, "connectwise", rewrite=rewrite).install()
    message = changes_nothing(t, lambda: t.fails("hostile"))
    assert "connectwise: page 2 of" in message and "[3].id: input should be a valid integer" in message
    assert t.scalar("SELECT count(*) FROM oppsync.opportunities WHERE source_id = 'None'") == 0


# -- c: paging that does not terminate ----------------------------------------------------------------------------


def test_c_a_next_link_back_to_an_earlier_page_fails_fast(synced: Tenant):
    t = synced
    hook = Rewriter(t.sim, loop_back, limit=200).install()
    message = changes_nothing(t, lambda: t.fails("loop"))
    assert "connectwise: page 2 of" in message and "paging loops" in message
    # page 2 linked back to page 1, whose request was the read's first: refused before requesting it again
    assert hook.pages <= 3


def test_c_a_server_ignoring_the_page_parameter_fails_at_the_first_repeated_page(synced: Tenant):
    """Page 2 starts with the record page 1 started with: the server answers page 1 whatever `page` says. Caught
    at once (the CRM's count would stop it too, pages later)."""
    t = synced
    hook = Rewriter(t.sim, IgnoresPage(), limit=500).install()
    message = changes_nothing(t, lambda: t.fails("ignores-page"))
    assert "connectwise: page 2 of" in message and "as page 1 did: the CRM repeats pages" in message
    assert "paging loops" in message
    assert hook.pages <= 3  # the sample read and two pages


def test_c_an_incremental_read_from_a_server_ignoring_page_fails_at_the_first_repeat(synced: Tenant):
    """An incremental read has no count (asking for one would cost every hourly run a request): a page holding
    exactly the previous page's records ends it."""
    t = synced
    world = t.sim.world
    for o in [o for o in world.live() if world.status(o) == "open"][:5]:
        world.update(o.native_id, name=f"{o.name} (edited)")
    hook = Rewriter(t.sim, IgnoresPage(), limit=500).install()
    message = changes_nothing(t, lambda: t.fails("ignores-page", mode="incremental"))
    assert "page 2 of" in message and "paging loops" in message and hook.pages <= 3


def test_c_keyset_paging_resuming_from_the_same_position_twice_fails(tmp_path: Path):
    """`options.paging: keyset` resumes with `id>last`: a server ignoring that condition answers the same page
    and the same position comes round again."""
    with open_tenant(
        f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path, options={"forecast": False, "paging": "keyset"}
    ) as t:
        first: dict[str, Any] = {}

        def ignores_resume(body: Any, n: int, req: Request) -> Any:
            conditions = req.arg("conditions") or ""
            base = conditions.split(" and id>")[0]
            return first.setdefault(base, body) if conditions.startswith("status/id in (") else body

        Rewriter(t.sim, ignores_resume, limit=200).install()
        connector = build_connector(t.cfg, t.cfg.connections[0])
        with pytest.raises(PageError, match=r"connectwise: page 2 of .*paging loops"):
            for _ in connector.opportunities(open_set=True, since=None):
                pass


# -- d: a page silently short of records ----------------------------------------------------------------------------


def test_d_a_page_short_of_records_infers_no_delete_and_the_next_clean_sync_nothing_spurious(synced: Tenant):
    t = synced
    gone = [o.native_id for o in list(t.sim.world.live())[10:12]]
    for native_id in gone:
        t.sim.world.delete(native_id)

    def drop_three(records: list, n: int, req: Request) -> None:
        if full_open_page(req, 2):
            del records[:3]

    hook = PageHook(t.sim, "connectwise", rewrite=drop_three).install()
    short = t.sync("short")
    assert short.extract.status == "complete" and short.result is not None
    assert any("deletes not inferred" in w and "open set" in w for w in short.extract.stats["warnings"])
    row = t.extract("short")
    assert row["deletes_inferable"] is False and row["received_open"] == row["crm_count_open"] - 3
    assert row["received_closed"] == row["crm_count_closed"]
    assert not t.deleted_ids() and short.result.deleted == 0

    hook.remove()
    clean = t.sync("clean-2")
    row = t.extract("clean-2")
    assert row["deletes_inferable"] is True
    assert (row["received_open"], row["received_closed"]) == (row["crm_count_open"], row["crm_count_closed"])
    assert t.deleted_ids() == set(gone) and clean.result is not None and clean.result.deleted == len(gone)


# -- e: records that cannot be trusted ------------------------------------------------------------------------------


def spoil_records(by_id: dict[str, Callable[[dict], None]]) -> Callable[[Any, int, Request], Any]:
    """A rewrite_body changing the named records wherever they are served (full read, re-read, by id)."""

    def rewrite(body: Any, n: int, req: Request) -> Any:
        for r in body:
            if str(r.get("id")) in by_id:
                by_id[str(r["id"])](r)
        return body

    return rewrite


def set_entered(value: str) -> Callable[[dict], None]:
    def spoil(record: dict) -> None:
        record["_info"]["dateEntered"] = value

    return spoil


def set_name(value: str) -> Callable[[dict], None]:
    def spoil(record: dict) -> None:
        record["name"] = value

    return spoil


def test_e_bad_records_are_quarantined_the_rest_synced(warehouse_url: str, tmp_path: Path):
    with open_tenant(warehouse_url, tmp_path, options={"forecast": True}, quarantine_max_share=0.1) as t:
        assert t.sync("clean-1").result is not None
        world = t.sim.world
        negative, future, unreadable, surrogate, fine = [o.native_id for o in list(world.live())[:5]]
        world.update(negative, amount=-1500.0)
        world.update(future, created_at=world.clock.now() + timedelta(days=30))
        world.update(unreadable, name="Renamed, with an unreadable created date")
        world.update(surrogate, name="Renamed, then garbled")
        world.update(fine, name="Renamed fine")
        before = t.current([negative, future, unreadable, surrogate])
        Rewriter(
            t.sim, spoil_records({unreadable: set_entered("31/12/2025 25:61"), surrogate: set_name("Bad \ud800 name")})
        ).install()

        summary = t.sync("bad")
        assert summary.extract.status == "complete" and summary.result is not None
        quarantined = {
            (r[0], r[1]) for r in t.rows("SELECT source_id, field FROM oppsync.quarantine WHERE extract_id = 'bad'")
        }
        assert quarantined == {
            (negative, "amount"),
            (future, "created_at"),
            (unreadable, "_info.dateEntered"),
            (surrogate, "project_name"),
        }
        assert t.current([negative, future, unreadable, surrogate]) == before  # neither synced ...
        assert not t.deleted_ids()  # ... nor deleted
        assert t.scalar("SELECT project_name FROM oppsync.opportunities WHERE source_id = :i", i=fine) == "Renamed fine"
        assert any("4 record(s) quarantined" in w for w in summary.extract.stats["warnings"])
        assert t.extract("bad")["quarantined"] == 4


def test_e_more_than_one_percent_quarantined_blocks_the_run_naming_ids_and_fields(warehouse_url: str, tmp_path: Path):
    with open_tenant(warehouse_url, tmp_path) as t:
        assert t.sync("clean-1").result is not None
        world = t.sim.world
        future, unreadable = [o.native_id for o in list(world.live())[:2]]
        world.update(future, created_at=world.clock.now() + timedelta(days=30))
        Rewriter(t.sim, spoil_records({unreadable: set_entered("not a date")})).install()
        message = changes_nothing(t, lambda: t.fails("too-many"))
        assert "2 of" in message and "quarantine_max_share=1.0%" in message
        assert f"{future}.created_at" in message and f"{unreadable}._info.dateEntered" in message
