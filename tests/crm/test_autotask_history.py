"""Autotask's own close time, reads by id and filter evaluation, against the simulator over HTTP."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import pytest
import requests

from oppsync_pipeline.lib.config import ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.autotask import IDS_PER_IN, AutotaskConnector
from oppsync_pipeline.lib.crm.base import matches
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.server import SandboxServer

CREDS = dict(at.SANDBOX_CREDENTIALS)
HEADERS = {
    "ApiIntegrationCode": CREDS["integration_code"],
    "UserName": CREDS["username"],
    "Secret": CREDS["secret"],
    "Content-Type": "application/json",
}


def connector(url: str, **kw) -> tuple[AutotaskConnector, list[str]]:
    """A connector, and the list of URLs it requested (in order)."""
    seen: list[str] = []
    session = requests.Session()
    session.hooks["response"].append(lambda r, *a, **k: seen.append(f"{r.request.method} {r.request.url}"))
    conn = ConnectionConfig(
        name="at-history", crm="autotask", base_url=url, credentials={k: "${AT_" + k.upper() + "}" for k in CREDS}, **kw
    )
    return AutotaskConnector(conn, dict(CREDS), session=session, sleep=lambda s: None), seen


def fetch(c: AutotaskConnector) -> dict:
    return {
        o.source_id: o
        for open_set in (True, False)
        for page in c.opportunities(open_set=open_set, since=None)
        for o in page
    }


def by_id(c: AutotaskConnector, ids) -> dict:
    out = {}
    for page in c.fetch_by_ids(ids):
        assert 0 < len(page) <= c.page_size
        for o in page:
            assert o.source_id not in out
            out[o.source_id] = o
    return out


@pytest.fixture(scope="module")
def served():
    sim = at.build(seed=21, opportunities=1300)
    with SandboxServer(sim) as srv:
        yield sim, srv


# -- (a) close time -------------------------------------------------------------------------------------------------


def test_closed_records_carry_the_crms_close_time_not_the_last_edit(served):
    sim, srv = served
    c, _ = connector(srv.url)
    got = fetch(c)
    w = sim.world
    long_before = 0
    for o in w.live():
        rec = got[o.native_id]
        status = w.status(o)
        assert rec.status == status, o.native_id
        if status == "open":
            assert (rec.crm_closed_at, rec.crm_closed_at_field) == (None, None), o.native_id
            continue
        assert rec.crm_closed_at == o.closed_at, o.native_id
        assert rec.crm_closed_at_field == ("closedDate" if status == "won" else "lostDate")
        if o.closed_at < o.modified_at - timedelta(days=30):
            long_before += 1
            assert rec.crm_closed_at != rec.modified_at
    assert long_before > 100
    assert {o.crm_closed_at_field for o in got.values()} == {None, "closedDate", "lostDate"}
    assert c.capabilities["close time of lost opportunities (lostDate)"].available


def test_a_close_made_now_is_dated_now_and_a_reopen_clears_it(served):
    sim, srv = served
    w = sim.world
    oid = next(o.native_id for o in w.live() if w.status(o) == "open")
    api = srv.url + "/ATServicesRest/V1.0/"

    def set_status(value: int):
        w.clock.advance(timedelta(minutes=5))
        r = requests.patch(
            api + "Opportunities", data=json.dumps({"id": int(oid), "status": value}), headers=HEADERS, timeout=10
        )
        assert r.status_code == 200, r.text
        c, _ = connector(srv.url)
        return by_id(c, [oid])[oid]

    lost = set_status(2)
    assert lost.status == "lost" and lost.crm_closed_at_field == "lostDate"
    assert lost.crm_closed_at == lost.modified_at == w.get(oid).closed_at
    won = set_status(3)
    assert won.status == "won" and won.crm_closed_at_field == "closedDate" and won.crm_closed_at > lost.crm_closed_at
    reopened = set_status(1)
    assert reopened.status == "open" and (reopened.crm_closed_at, reopened.crm_closed_at_field) == (None, None)


def test_a_date_only_close_value_reads_as_midnight_utc(served):
    sim, srv = served
    c, _ = connector(srv.url)
    c.prepare()
    won = {"id": 1, "status": 3, "closedDate": "2024-06-11", "lastActivity": "2024-09-01T10:00:00Z"}
    assert c._closed_at(won, "won") == (datetime(2024, 6, 11), "closedDate")
    assert c._closed_at({"id": 1, "status": 2, "lostDate": None}, "lost") == (None, None)


# -- (b) the tenant without lostDate, and without entityInformation ---------------------------------------------------


def test_tenant_without_lost_date_falls_back_for_lost_records_only():
    sim = at.build(seed=22, opportunities=150, variant="no_lost_date")
    with SandboxServer(sim) as srv:
        c, _ = connector(srv.url)
        got = fetch(c)
    w = sim.world
    statuses = {w.status(o) for o in w.live()}
    assert statuses == {"open", "won", "lost"}
    for o in w.live():
        rec = got[o.native_id]
        if w.status(o) == "won":
            assert (rec.crm_closed_at, rec.crm_closed_at_field) == (o.closed_at, "closedDate")
        else:  # lost: nothing in the CRM; the reconcile dates the close by modified_at
            assert (rec.crm_closed_at, rec.crm_closed_at_field) == (None, None)
    note = c.capabilities["close time of lost opportunities (lostDate)"]
    assert not note.available and "lastActivity" in note.detail
    assert c.capabilities["close time of won opportunities (closedDate)"].available
    assert not c.stats.warnings  # a documented absence, not a refused read


def test_without_entity_information_the_close_time_is_read_from_the_records():
    sim = at.build(seed=23, opportunities=120, variant="no_optional_rights")
    with SandboxServer(sim) as srv:
        c, _ = connector(srv.url)
        got = fetch(c)
    closed = [o for o in sim.world.live() if sim.world.status(o) != "open"]
    assert closed
    for o in closed:
        assert got[o.native_id].crm_closed_at == o.closed_at


# -- (c) fetch_by_ids ----------------------------------------------------------------------------------------------


def test_fetch_by_ids_ignores_filters_and_status_omits_deleted_and_unknown_and_batches(served):
    sim, srv = served
    w = sim.world
    deleted = [o.native_id for o in list(w.live())[5:12]]
    for oid in deleted:
        w.delete(oid)
    live = {o.native_id for o in w.live()}
    unknown = ["1", str(at.OPP_BASE + 10_000_000), "not-an-id"]
    ids = sorted(live) + deleted + unknown + sorted(live)[:20]  # duplicates are read once
    filters = [
        RecordFilter(field="amount", op="at_least", value=200000),
        RecordFilter(field="status", op="equal", value=1),
    ]
    c, seen = connector(srv.url, filters=filters)
    got = by_id(c, ids)
    assert set(got) == live
    assert {o.status for o in got.values()} == {"open", "won", "lost"}
    assert sum(1 for o in got.values() if not c.matches_filters(o)) > len(live) // 2
    queries = [u for u in seen if "/Opportunities/query" in u]
    numeric = len(live) + len(deleted) + 2
    assert len(queries) == math.ceil(numeric / IDS_PER_IN) == 3 and all(u.startswith("POST") for u in queries)
    # mapped exactly as the set reads map them (companies, contacts, owners, close time, raw record)
    plain, _ = connector(srv.url)
    assert got == {sid: o for sid, o in fetch(plain).items() if sid in live}


def test_fetch_by_ids_with_nothing_known_reads_nothing_and_fails_nothing(served):
    sim, srv = served
    c, seen = connector(srv.url)
    assert by_id(c, []) == {} and by_id(c, ["12", "x"]) == {}
    assert len([u for u in seen if "/Opportunities/query" in u]) == 1  # "x" is no Autotask id


# -- (d) filters evaluated in Python agree with Autotask's -----------------------------------------------------------
# (matches_filters agrees with the server: tests/crm/test_contract.py, every CRM)


def test_filter_value_reads_fields_and_user_defined_fields():
    raw = {"amount": 12.5, "title": "Acme RENEWAL", "userDefinedFields": [{"name": "Region", "value": "West"}]}
    assert AutotaskConnector.filter_value(raw, "amount") == 12.5
    assert AutotaskConnector.filter_value(raw, "udf:Region") == "West"
    assert AutotaskConnector.filter_value(raw, "title") == "Acme RENEWAL"
    # compared as Autotask compares text: case-insensitively, on both sides (the shared `matches`)
    assert AutotaskConnector.filters_ignore_case
    assert matches(
        RecordFilter(field="udf:Region", op="equal", value="west"),
        AutotaskConnector.filter_value(raw, "udf:Region"),
        ignore_case=True,
    )
    assert matches(
        RecordFilter(field="title", op="in", value=["acme renewal"]),
        AutotaskConnector.filter_value(raw, "title"),
        ignore_case=True,
    )
    assert AutotaskConnector.filter_value(raw, "udf:Missing") is None
    assert (
        AutotaskConnector.filter_value({"lastActivity": "2024-06-11T09:12:44.12Z"}, "lastActivity")
        == "2024-06-11T09:12:44.12Z"
    )
