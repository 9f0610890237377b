"""Salesforce answering strangely (issue 22), over real HTTP against the simulator, through the library's sync into
a real warehouse (DuckDB and Postgres):

  a. a page of the wrong shape mid-paging fails the run naming the CRM, the URL path and the page number;
  b. a record whose Id is null or not a string fails the run naming the page and the key;
  c. a next link pointing back fails fast ("paging loops"); a server that ignores the page position fails by the
     bound the first page's totalSize sets;
  d. a page silently missing records: the CRM's count says the read is short, no delete is inferred;
  e. bad records are quarantined, the rest synced; more than 1% bad blocks the run.

Each faulted run must leave the warehouse exactly as it was (no event, no delete). `loop_back` is a
PageHook.rewrite_body the fault matrix imports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.crm.http import CrmError, QuotaBudget
from oppsync_pipeline.lib.crm.pages import PageError
from oppsync_pipeline.lib.sync import ExtractFailed, build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import FaultRule, SandboxServer
from tests.conftest import sandbox_config
from tests.crm.test_salesforce_history import connect
from tests.reliability.harness import PageHook, snapshot

N = 500
PAGE = 200  # Salesforce's smallest batch: the open set (about 420) takes three pages
# A page read through a nextRecordsUrl (`/services/data/v62.0/query/<locator>-<offset>`): page 2 and on of a query.
FOLLOWED = re.compile(r"/(?:query|queryAll)/[A-Za-z0-9]+-\d+/?$")
LONE_SURROGATE_MARK = b"LONE-SURROGATE-MARK"


def loop_back(body: Any, n: int, req: Any) -> Any:
    """PageHook.rewrite_body: from the second page served on, a page read through a next link says it is not the
    last and names as its next page the link it was read through (an earlier page: the reader followed it)."""
    if n >= 2 and isinstance(body, dict) and FOLLOWED.search(req.path):
        body["done"] = False
        body["nextRecordsUrl"] = req.path
    return body


def ignore_page_position(body: Any, n: int, req: Any) -> Any:
    """A server that ignores the page position: every page read through a next link serves the same records and
    names a next link never seen before (the same offset, written with ever more leading zeros)."""
    if isinstance(body, dict) and FOLLOWED.search(req.path):
        locator, offset = req.path.rsplit("-", 1)
        body["done"] = False
        body["nextRecordsUrl"] = f"{locator}-{'0' * n}{int(offset)}"
    return body


def on_first_followed_page(change: Callable[[dict], None]) -> Callable[[Any, int, Any], Any]:
    """A rewrite_body applying `change` to the first page read through a next link (page 2 of the open set)."""
    fired: list[int] = []

    def rewrite_body(body: Any, n: int, req: Any) -> Any:
        if not fired and FOLLOWED.search(req.path):
            fired.append(n)
            change(body)
        return body

    return rewrite_body


def send_lone_surrogates(sim: Any) -> None:
    """Answers carry `\\ud800` (a lone UTF-16 surrogate, as JSON allows) where a record holds the marker text: the
    simulator's own JSON writer cannot encode one."""
    inner = sim.handle

    def handle(req: Any) -> Any:
        resp = inner(req)
        if LONE_SURROGATE_MARK in resp.body:
            resp.body = resp.body.replace(LONE_SURROGATE_MARK, b"\\ud800")
        return resp

    sim.handle = handle


@contextmanager
def tenant(warehouse_url: str, tmp_path: Path) -> Iterator[tuple[Any, Any, Any, Any]]:
    """A 500-opportunity org and a first clean full sync of it: (simulator, config, connection, engine)."""
    sim = sfsim.build(seed=7, opportunities=N)
    with SandboxServer(sim) as srv:
        # one cursor per set (parallel_reads 1): these tests are of a cursor's paging guards, page by page
        extra = {"page_size": PAGE, "options": {"parallel_reads": 1}}
        cfg = sandbox_config({"salesforce": srv}, warehouse_url, tmp_path, extra={"salesforce": extra})
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        try:
            first = sync_connection(cfg, conn, engine, run_id="r1", mode="full")
            assert first.extract.status == "complete" and first.extract.stats["deletes_inferable"] is True
            yield sim, cfg, conn, engine
        finally:
            engine.dispose()


def failed_run(cfg: Any, conn: Any, engine: Any, run_id: str, **connector_kw: Any) -> str:
    """The error of a full sync that must fail (ExtractFailed), with its connector's retries unslept."""
    connector = build_connector(cfg, conn, sleep=lambda s: None, **connector_kw)
    with pytest.raises(ExtractFailed) as failed:
        sync_connection(cfg, conn, engine, run_id=run_id, mode="full", connector=connector)
    return str(failed.value)


def rows(engine: Any, sql: str, **params: Any) -> list:
    with engine.connect() as c:
        return c.execute(text(sql), params).fetchall()


def assert_untouched(engine: Any, conn: Any, before: Any, run_id: str) -> None:
    assert snapshot(engine, conn.name).differences(before) == []
    assert rows(engine, "SELECT count(*) FROM oppsync.opportunity_events WHERE run_id = :r", r=run_id)[0][0] == 0
    assert rows(engine, "SELECT count(*) FROM oppsync.opportunities WHERE deleted_at IS NOT NULL")[0][0] == 0


def live_ids(sim: Any, status: str = "open") -> list[str]:
    w = sim.world
    return [o.native_id for o in sorted(w.live(), key=lambda o: o.seq) if w.status(o) == status]


# -- a. wrong shape mid-paging ----------------------------------------------------------------------------------------


def _drop_records(body: dict) -> None:
    body.pop("records")


def _done_as_text(body: dict) -> None:
    body["done"] = "false"


def _not_done_without_next_link(body: dict) -> None:
    body["done"] = False
    body.pop("nextRecordsUrl", None)


WRONG_SHAPES = {
    "fault-wrong-shape": (None, "totalSize is missing; done is missing; records is missing"),
    "records-dropped": (_drop_records, "records is missing"),
    "done-as-text": (_done_as_text, "done: input should be a valid boolean (got 'false')"),
    # pages.describe lower-cases the reason
    "not-done-without-next-link": (_not_done_without_next_link, "done is false but there is no nextRecordsUrl"),
}


def test_a_page_of_the_wrong_shape_mid_paging_fails_the_run_and_changes_nothing(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as (sim, cfg, conn, engine):
        sim.world.advance(hours=1, rate=0.05)
        before = snapshot(engine, conn.name)
        for shape, (change, problem) in WRONG_SHAPES.items():
            run_id = f"r-{shape}"
            if change is None:
                sim.faults.rules = [FaultRule("wrong_shape", path=FOLLOWED.pattern, count=1)]
            else:
                hook = PageHook(sim, "salesforce", rewrite_body=on_first_followed_page(change)).install()
            error = failed_run(cfg, conn, engine, run_id)
            sim.faults.rules = []
            if change is not None:
                hook.remove()
            assert re.search(
                r"salesforce: page 2 of /services/data/v62\.0/query/[A-Za-z0-9]+-200: unexpected "
                r"page shape",
                error,
            ), (shape, error)
            assert problem in error, (shape, error)
            assert_untouched(engine, conn, before, run_id)


# -- b. ids -----------------------------------------------------------------------------------------------------------


def test_a_record_without_a_usable_id_fails_the_run_naming_the_page_and_the_key(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as (sim, cfg, conn, engine):
        before = snapshot(engine, conn.name)
        for bad_id in (None, 12345, "", "not an id"):

            def change(body: dict, bad_id: Any = bad_id) -> None:
                body["records"][3]["Id"] = bad_id

            run_id = f"r-{bad_id}"
            hook = PageHook(sim, "salesforce", rewrite_body=on_first_followed_page(change)).install()
            error = failed_run(cfg, conn, engine, run_id)
            hook.remove()
            assert "salesforce: page 2 of /services/data/v62.0/query/" in error, error
            assert "records[3].Id: " in error and f"(got {bad_id!r})" in error, error
            assert_untouched(engine, conn, before, run_id)
        assert (
            rows(
                engine,
                "SELECT count(*) FROM oppsync.opportunities WHERE source_id IN ('None', '12345', '', 'not an id')",
            )[0][0]
            == 0
        )


# -- c. paging that does not end --------------------------------------------------------------------------------------

# Without the checks these loops would run until killed: a request budget stops them (as 'skipped') instead.
BUDGET = QuotaBudget(max_requests=80)


def test_a_next_link_pointing_back_fails_fast(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as (sim, cfg, conn, engine):
        before = snapshot(engine, conn.name)
        PageHook(sim, "salesforce", rewrite_body=loop_back).install()
        served = sim.request_count
        error = failed_run(cfg, conn, engine, "r2", budget=BUDGET)
        assert "paging loops" in error and "salesforce: page 2 of /services/data/v62.0/query" in error
        assert sim.request_count - served < 15  # discovery, page 1, page 2: then the repeated link is refused
        assert_untouched(engine, conn, before, "r2")


def test_a_server_that_ignores_the_page_position_fails_by_the_count_bound(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as (sim, cfg, conn, engine):
        before = snapshot(engine, conn.name)
        n_open = len(live_ids(sim))
        PageHook(sim, "salesforce", rewrite_body=ignore_page_position).install()
        error = failed_run(cfg, conn, engine, "r2", budget=BUDGET)
        # the bound: the pages the smallest batch Salesforce sends (200) needs for totalSize, plus 3
        allowed = -(-n_open // 200) + 3
        assert (
            f"more pages ({allowed + 1}) than the CRM's count of {n_open} records allows ({allowed}): paging "
            "does not terminate"
        ) in error
        assert_untouched(engine, conn, before, "r2")


# -- d. a page silently missing records -------------------------------------------------------------------------------


def test_a_page_missing_records_infers_no_delete_and_the_next_full_sync_nothing_spurious(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as (sim, cfg, conn, engine):
        lost = set(live_ids(sim)[250:255])  # open ones, left out of every answer (by-id reads too)

        def drop_lost(records: list, n: int, req: Any) -> None:
            records[:] = [r for r in records if r.get("Id") not in lost]

        hook = PageHook(sim, "salesforce", rewrite=drop_lost).install()
        short = sync_connection(cfg, conn, engine, run_id="r2", mode="full")
        assert short.extract.status == "complete" and short.result is not None
        stats = short.extract.stats
        n_open = len(live_ids(sim))
        assert (stats["crm_count_open"], stats["received_open"]) == (n_open, n_open - 5)
        assert stats["deletes_inferable"] is False
        assert any(
            "deletes not inferred" in w and f"{n_open - 5} received, the CRM counts {n_open}" in w
            for w in stats["warnings"]
        )
        assert rows(
            engine,
            "SELECT deletes_inferable, crm_count_open, received_open FROM oppsync.extracts WHERE extract_id = 'r2'",
        )[0] == (False, n_open, n_open - 5)
        assert short.result.deleted == 0
        assert rows(engine, "SELECT count(*) FROM oppsync.opportunities WHERE deleted_at IS NOT NULL")[0][0] == 0

        hook.remove()
        clean = sync_connection(cfg, conn, engine, run_id="r3", mode="full")
        assert clean.extract.stats["deletes_inferable"] is True and clean.result is not None
        assert (clean.result.deleted, clean.result.restored) == (0, 0)
        assert (
            rows(engine, "SELECT count(*) FROM oppsync.opportunity_events WHERE event_type IN ('deleted', 'restored')")[
                0
            ][0]
            == 0
        )


# -- e. bad records ---------------------------------------------------------------------------------------------------


def test_bad_records_are_quarantined_the_rest_synced_and_too_many_block_the_run(warehouse_url, tmp_path):
    with tenant(warehouse_url, tmp_path) as (sim, cfg, conn, engine):
        w = sim.world
        ids = live_ids(sim)
        negative, unreadable, surrogate, future, renamed = ids[10], ids[100], ids[200], ids[300], ids[5]
        bad = {
            negative: ("Amount", -1500.0),
            unreadable: ("CreatedDate", "31/12/2024 10:00"),
            surrogate: ("Name", f"Deal {LONE_SURROGATE_MARK.decode()}"),
            future: ("CreatedDate", sfsim.sf_datetime(w.clock.now() + timedelta(days=30))),
        }
        # the field each is quarantined under: the canonical field for a value read but not acceptable, the
        # record's own key for a value that could not be read
        field_of = {negative: "amount", unreadable: "CreatedDate", surrogate: "project_name", future: "created_at"}
        names = dict(rows(engine, "SELECT source_id, project_name FROM oppsync.opportunities"))
        w.clock.advance(timedelta(minutes=5))
        for i in [*bad, renamed]:
            w.update(i, name=f"Renamed {i}")  # would be an update, if the record could be trusted
        w.clock.advance(timedelta(minutes=1))

        def corrupt(records: list, n: int, req: Any) -> None:
            for r in records:
                if r.get("Id") in bad:
                    key, value = bad[r["Id"]]
                    r[key] = value

        hook = PageHook(sim, "salesforce", rewrite=corrupt).install()
        send_lone_surrogates(sim)
        out = sync_connection(cfg, conn, engine, run_id="r2", mode="full")
        assert out.extract.status == "complete" and out.result is not None
        fields = {
            (r[0], r[1])
            for r in rows(engine, "SELECT source_id, field FROM oppsync.quarantine WHERE extract_id = 'r2'")
        }
        assert fields == set(field_of.items())
        stats = out.extract.stats
        assert stats["quarantined"] == 4 and any("4 record(s) quarantined" in x for x in stats["warnings"])
        # a quarantined record was received: the read is not short, deletes stay inferable
        assert stats["received_open"] == stats["crm_count_open"] and stats["deletes_inferable"] is True
        now = dict(rows(engine, "SELECT source_id, project_name FROM oppsync.opportunities WHERE deleted_at IS NULL"))
        assert now[renamed] == f"Renamed {renamed}" and out.result.updated == 1
        assert {i: now[i] for i in bad} == {i: names[i] for i in bad}
        assert not {
            r[0] for r in rows(engine, "SELECT source_id FROM oppsync.opportunity_events WHERE run_id = 'r2'")
        } & set(bad)

        # more than quarantine_max_share (1%) of the records: a broken connection, the run is refused
        many = ids[20:40]
        bad.update(dict.fromkeys(many, ("Amount", -1.0)))
        field_of.update(dict.fromkeys(many, "amount"))
        before = snapshot(engine, conn.name)
        error = failed_run(cfg, conn, engine, "r3")
        assert "24 of " in error and "failed validation" in error and "quarantine_max_share=1.0%" in error
        first = min(bad)  # the message names the first ones by id, with their field
        assert f"First: {first}.{field_of[first]}: " in error
        assert_untouched(engine, conn, before, "r3")
        hook.remove()


# -- connector level: counts, the delete log, next links --------------------------------------------------------------


def test_count_is_the_crm_count_of_each_set_as_the_full_read_queries_it():
    with SandboxServer(sfsim.build(seed=7, opportunities=N)) as srv:
        c = connect(
            srv.url,
            page_size=PAGE,
            open_statuses=["Prospecting", "Commit"],
            filters=[{"field": "Amount", "op": "at_least", "value": 50000}],
        )
        read = {s: {o.source_id for page in c.opportunities(s, None) for o in page} for s in (True, False)}
        assert all(read.values())
        assert {s: (t.crm_count, t.received) for s, t in c.tallies.items()} == {
            s: (len(ids), len(ids)) for s, ids in read.items()
        }
        before = c.stats.requests
        assert (c.count(True), c.count(False)) == (len(read[True]), len(read[False]))
        assert c.stats.requests == before + 2  # one COUNT() each; the reads themselves asked none


def test_a_delete_log_of_the_wrong_shape_fails_instead_of_reporting_no_deletes():
    sim = sfsim.build(seed=7, opportunities=200, faults=None)
    with SandboxServer(sim) as srv:
        w = sim.world
        since = w.clock.now()
        w.clock.advance(timedelta(minutes=5))
        w.delete(live_ids(sim)[0])
        w.clock.advance(timedelta(minutes=2))  # the log covers whole minutes
        assert [r for page in connect(srv.url).deleted(since) for r in page]  # the log has it
        sim.faults.rules = [FaultRule("wrong_shape", path=r"/sobjects/Opportunity/deleted/?$", count=1)]
        with pytest.raises(
            PageError,
            match=r"salesforce: /services/data/v62\.0/sobjects/Opportunity/deleted/: "
            r"unexpected page shape: deletedRecords is missing",
        ):
            list(connect(srv.url).deleted(since))


def test_a_next_link_to_another_host_is_refused_before_anything_is_sent_there():
    elsewhere = sfsim.build(seed=8, opportunities=10)
    with SandboxServer(sfsim.build(seed=7, opportunities=N)) as srv, SandboxServer(elsewhere) as other:

        def redirect(body: dict) -> None:
            body["nextRecordsUrl"] = other.url + body["nextRecordsUrl"]

        first_pages = {"fired": False}

        def rewrite_body(body: Any, n: int, req: Any) -> Any:
            if not first_pages["fired"] and isinstance(body, dict) and body.get("nextRecordsUrl"):
                first_pages["fired"] = True
                redirect(body)
            return body

        PageHook(srv.simulator, "salesforce", rewrite_body=rewrite_body).install()
        c = connect(srv.url, page_size=PAGE)
        with pytest.raises(
            PageError,
            match=r"page 1 of /services/data/v62\.0/query: unexpected page shape: "
            r"nextRecordsUrl: string should match pattern",
        ):
            list(c.opportunities(True, None))
        assert elsewhere.request_count == 0


def test_the_simulator_refuses_count_with_order_by_as_salesforce_does():
    """ "You can't use COUNT() with an ORDER BY clause" (SOQL reference): count() must not send one."""
    with SandboxServer(sfsim.build(seed=7, opportunities=50)) as srv:
        c = connect(srv.url)
        soql = f"SELECT COUNT() FROM Opportunity WHERE {c.opportunity_where(True, None)}"
        assert c.count(True) == sum(len(p) for p in c.opportunities(True, None))
        with pytest.raises(CrmError, match="MALFORMED_QUERY") as refused:
            c.client.get_json(f"{c.data_path}/query", params={"q": soql + " ORDER BY SystemModstamp"})
        assert refused.value.status == 400
