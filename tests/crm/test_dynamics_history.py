"""History truth for Dataverse (issue 15), against the simulator over real HTTP: the close time from
`actualclosedate`, its fallback under column security, reads by id, and filters evaluated in Python."""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta

import pytest
import requests

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.dynamics import BY_ID_BATCH, DynamicsConnector
from oppsync_pipeline.lib.record import TRACKED_FIELDS
from oppsync_pipeline.sandbox import dynamics as sandbox
from oppsync_pipeline.sandbox.server import SandboxServer

N = 400


class RecordingSession(requests.Session):
    """Keeps every URL the connector sent (the by-id batches must stay under Dataverse's URL limit)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def send(self, request, **kwargs):  # type: ignore[override]
        self.urls.append(request.url)
        return super().send(request, **kwargs)


@pytest.fixture
def server():
    with SandboxServer(sandbox.build(seed=21, opportunities=N)) as srv:
        yield srv


def make(srv, page_size: int = 5000, session: requests.Session | None = None, **overrides) -> DynamicsConnector:
    conn = ConnectionConfig(
        **{
            "name": "dyn",
            "crm": "dynamics",
            "base_url": srv.url,
            "page_size": page_size,
            "credentials": dict.fromkeys(sandbox.SANDBOX_CREDENTIALS, "${X}"),
            "options": {"authority_url": srv.url},
            **overrides,
        }
    )
    assert DynamicsConnector.validate_connection(conn) == []
    return DynamicsConnector(conn, dict(sandbox.SANDBOX_CREDENTIALS), sleep=lambda s: None, session=session)


def read_all(conn) -> dict[str, object]:
    return {o.source_id: o for open_set in (True, False) for page in conn.opportunities(open_set, None) for o in page}


def midnight(d: date) -> datetime:
    return datetime.combine(d, time())


def app_headers(srv) -> dict[str, str]:
    """What another Dataverse client (a seller's app) sends: its own client-credentials token."""
    r = requests.post(
        f"{srv.url}/{sandbox.TENANT_ID}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.CLIENT_ID,
            "client_secret": sandbox.SANDBOX_CREDENTIALS["client_secret"],
            "scope": f"{srv.url}/.default",
        },
    )
    return {"Authorization": f"Bearer {r.json()['access_token']}", "Accept": "application/json"}


def warmed(conn) -> int:
    """Discovery and the dictionaries read, so that only the by-id reads are counted after this."""
    conn.prepare()
    conn.statuses()
    conn.stages()
    return conn.stats.requests


# -- (a) close time ------------------------------------------------------------------------------------------------


def test_closed_opportunities_carry_the_crm_close_date_not_the_last_edit(server):
    world = server.simulator.world
    got = read_all(make(server))
    closed = [o for o in world.live() if world.status(o) != "open"]
    long_before = [o for o in closed if o.closed_at.date() < o.modified_at.date() - timedelta(days=30)]
    assert len(long_before) > 20, "the world should hold closes long before the last edit"
    for o in closed:
        g = got[o.native_id]
        assert (g.crm_closed_at, g.crm_closed_at_field) == (midnight(o.closed_at.date()), "actualclosedate")
        assert g.raw["actualclosedate"] == o.closed_at.date().isoformat()  # Date Only: YYYY-MM-DD
    for o in long_before:
        assert got[o.native_id].crm_closed_at < got[o.native_id].modified_at - timedelta(days=29)
    for o in world.live():
        if world.status(o) == "open":
            assert (got[o.native_id].crm_closed_at, got[o.native_id].crm_closed_at_field) == (None, None)


def test_a_close_through_win_opportunity_is_dated_by_its_actualend_and_a_reopen_drops_it(server):
    world, sim = server.simulator.world, server.simulator
    opp = next(o for o in world.live() if world.status(o) == "open")
    session, headers, base = requests.Session(), app_headers(server), server.url + sandbox.API
    conn = make(server)
    r = session.post(
        f"{base}/WinOpportunity",
        headers=headers,
        json={
            "Status": 3,
            "OpportunityClose": {
                "subject": "signed in March",
                "actualend": "2024-03-15T17:30:00Z",
                "opportunityid@odata.bind": f"/opportunities({opp.native_id})",
            },
        },
    )
    assert r.status_code == 204 and sim.closes[-1]["actualend"] == "2024-03-15T17:30:00Z"
    g = read_all(conn)[opp.native_id]
    assert g.status == "won" and g.crm_closed_at == datetime(2024, 3, 15) and g.modified_at > datetime(2024, 4, 1)

    # Reopened: Dataverse keeps actualclosedate on the open record; it is not a close time any more.
    r = session.patch(f"{base}/opportunities({opp.native_id})", headers=headers, json={"statecode": 0, "statuscode": 2})
    assert r.status_code == 204
    g = read_all(make(server))[opp.native_id]
    assert g.status == "open" and g.raw["actualclosedate"] == "2024-03-15"
    assert (g.crm_closed_at, g.crm_closed_at_field) == (None, None)


def test_a_status_the_connection_counts_as_closed_while_dataverse_has_it_open_gets_no_crm_close_time(server):
    world = server.simulator.world
    # "On Hold" (statuscode 2, statecode 0) counts as lost for this connection; a reopened record keeps its old date
    on_hold = next(o for o in world.live() if world.status(o) == "won")
    world.update(on_hold.native_id, stage="2")
    conn = make(server, open_statuses=["In Progress", "Awaiting PO"])
    got = read_all(conn)
    g = got[on_hold.native_id]
    assert g.status == "lost" and g.raw["statecode"] == 0 and g.raw["actualclosedate"]
    assert g.crm_closed_at is None and g.crm_closed_at_field is None
    assert any(o.crm_closed_at for o in got.values() if o.status != "open")


# -- (b) the fallback tenant -----------------------------------------------------------------------------------


def test_a_column_secured_actualclosedate_reads_empty_and_falls_back_to_modifiedon():
    with SandboxServer(sandbox.build(seed=21, opportunities=120, variant="secured_close_date")) as srv:
        conn = make(srv)
        got = read_all(conn)
        world = srv.simulator.world
        closed = [o for o in world.live() if world.status(o) != "open"]
        assert closed
        for o in closed:
            g = got[o.native_id]
            assert g.status == world.status(o) and "actualclosedate" in g.raw and g.raw["actualclosedate"] is None
            assert (g.crm_closed_at, g.crm_closed_at_field) == (None, None)
        note = conn.capabilities["close time (actualclosedate)"]
        assert not note.available and "column-secured" in note.detail
        assert [w for w in conn.stats.warnings if "actualclosedate is column-secured" in w]
        truth = sandbox.truth(srv.simulator)
        assert all(t["crm_closed_at"] is None for t in truth.values())


def test_without_metadata_rights_the_close_time_is_still_read():
    with SandboxServer(sandbox.build(seed=21, opportunities=120, variant="no_optional_rights")) as srv:
        conn = make(srv)
        got = read_all(conn)
        truth = sandbox.truth(srv.simulator)
        assert {sid: g.crm_closed_at for sid, g in got.items()} == {sid: t["crm_closed_at"] for sid, t in truth.items()}
        assert any(t["crm_closed_at"] for t in truth.values())
        assert conn.capabilities["close time (actualclosedate)"].available


# -- (c) reads by id -----------------------------------------------------------------------------------------------


def test_fetch_by_ids_ignores_filters_and_status_omits_deleted_and_unknown_and_batches(server):
    world = server.simulator.world
    filters = [{"field": "estimatedvalue", "op": "more_than", "value": 150000}]
    filtered = read_all(make(server, filters=filters))
    live = sorted(o.native_id for o in world.live())
    outside = [sid for sid in live if sid not in filtered]
    gone = live[:3]
    for sid in gone:
        world.delete(sid)
    unknown = [sandbox.opportunity_id(90_000 + i) for i in range(2)]
    asked = live[:262] + unknown + ["not-a-guid", live[5].upper()]
    assert len({s.lower() for s in asked if s != "not-a-guid"}) == 264
    assert {world.status(world.opps[s]) for s in asked[:262]} == {"open", "won", "lost"}
    assert set(outside) & set(asked), "some asked records must fail the connection's filter"

    session = RecordingSession()
    conn = make(server, filters=filters, session=session)
    before = warmed(conn)
    sent = len(session.urls)
    pages = list(conn.fetch_by_ids(asked))
    got = {o.source_id: o for page in pages for o in page}
    assert set(got) == set(live[3:262])
    # one request per 100 ids (264 distinct GUIDs: 3), each one page at this page size
    assert conn.stats.requests - before == math.ceil(264 / BY_ID_BATCH) == len(pages) == 3
    by_id_urls = session.urls[sent:]
    assert all("Microsoft.Dynamics.CRM.In" in u and len(u) < 8_000 for u in by_id_urls)
    # mapped exactly as the filtered read maps them (owners, account, close time, status)
    for sid, g in got.items():
        if sid in filtered:
            want = filtered[sid]
            assert [getattr(g, f) for f in (*TRACKED_FIELDS, "modified_at", "crm_closed_at_field")] == [
                getattr(want, f) for f in (*TRACKED_FIELDS, "modified_at", "crm_closed_at_field")
            ]
    assert any(g.service_location for g in got.values()) and any(g.crm_closed_at for g in got.values())


def test_fetch_by_ids_pages_within_a_batch_by_next_link(server):
    world = server.simulator.world
    ids = sorted(o.native_id for o in world.live())[:250]
    conn = make(server, page_size=50)
    before = warmed(conn)
    pages = list(conn.fetch_by_ids(ids))
    assert [len(p) for p in pages] == [50, 50, 50, 50, 50]  # batches of 100, 100, 50 at 50 a page
    assert conn.stats.requests - before == 5
    assert {o.source_id for p in pages for o in p} == set(ids)
    assert list(conn.fetch_by_ids([])) == []


# (d) filters evaluated in Python agree with the server: tests/crm/test_contract.py (every CRM)
