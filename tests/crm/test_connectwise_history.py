"""ConnectWise history truth: the CRM's own close time (`closedDate`), reads by id (`conditions=id in (...)`)
and filters evaluated in Python as CW's conditions evaluate them. Over HTTP against the simulator, no mocks."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from oppsync_pipeline.lib.config import ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.connectwise import (
    BY_ID_CHUNK,
    MAX_QUERY_CHARS,
    ConnectWiseConnector,
    _by_id_query_length,
    _id_chunks,
)
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox.server import SandboxServer

CREDS = dict(cw.SANDBOX_CREDENTIALS)
AUTH = (f"{CREDS['company_id']}+{CREDS['public_key']}", CREDS["private_key"])
HEADERS = {"clientId": CREDS["client_id"]}


class CountingSession(requests.Session):
    """Records each request's path under apis/3.0 and its query parameters."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def request(self, method, url, *args, **kwargs):
        path = url.split("?", 1)[0].split("/apis/3.0", 1)[-1]
        params = dict(kwargs.get("params") or {})
        params.update({k: v[0] for k, v in parse_qs(urlsplit(url).query).items()})
        self.calls.append((path, params))
        return super().request(method, url, *args, **kwargs)

    def of(self, path_start: str) -> list[tuple[str, dict]]:
        return [c for c in self.calls if c[0].startswith(path_start)]


def connector(url: str, session: requests.Session | None = None, **kw) -> ConnectWiseConnector:
    conn = ConnectionConfig(
        name="sandbox-connectwise",
        crm="connectwise",
        base_url=url,
        credentials={k: "${CW_" + k.upper() + "}" for k in CREDS},
        page_size=kw.pop("page_size", 50),
        **kw,
    )
    return ConnectWiseConnector(conn, CREDS, sleep=lambda s: None, session=session)


def collect(conn: ConnectWiseConnector) -> dict:
    return {
        o.source_id: o
        for open_set in (True, False)
        for page in conn.opportunities(open_set=open_set, since=None)
        for o in page
    }


def by_id(conn: ConnectWiseConnector, ids) -> dict:
    out = {}
    for page in conn.fetch_by_ids(ids):
        assert 0 < len(page) <= conn.page_size
        for o in page:
            assert o.source_id not in out, "an opportunity came twice"
            out[o.source_id] = o
    return out


def patch(srv: SandboxServer, opp_id: str, **values) -> None:
    ops = [{"op": "replace", "path": k, "value": v} for k, v in values.items()]
    r = requests.patch(
        f"{srv.url}/v4_6_release/apis/3.0/sales/opportunities/{opp_id}",
        json=ops,
        auth=AUTH,
        headers=HEADERS,
        timeout=10,
    )
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def server():
    with SandboxServer(cw.build(seed=41, opportunities=300)) as srv:
        yield srv


# -- close time ----------------------------------------------------------------------------------------------


def test_a_close_long_before_the_last_edit_is_dated_by_closed_date_not_the_edit(server):
    sim = server.simulator
    w = sim.world
    got = collect(connector(server.url, options={"forecast": False}))
    closed = [o for o in w.live() if w.status(o) != "open"]
    long_before = [o for o in closed if o.modified_at - o.closed_at > timedelta(days=30)]
    assert long_before, "the sandbox should hold closes well before their last edit"
    for o in closed:
        opp = got[o.native_id]
        assert opp.crm_closed_at == o.closed_at and opp.crm_closed_at_field == "closedDate", o.native_id
        assert opp.raw["closedDate"] == o.closed_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert all(got[o.native_id].crm_closed_at != got[o.native_id].modified_at for o in long_before)
    for o in w.live():
        if w.status(o) == "open":
            opp = got[o.native_id]
            assert opp.crm_closed_at is None and opp.crm_closed_at_field is None
            assert opp.raw["closedDate"] is None and opp.raw["closedBy"] is None


def test_close_reopen_and_later_edits_through_the_api():
    sim = cw.build(seed=42, opportunities=40)
    w = sim.world
    with SandboxServer(sim) as srv:
        o = next(o for o in w.live() if w.status(o) == "open")
        won = next(int(s[0]) for s in cw.STATUSES if s[2] and s[3])
        w.clock.advance(timedelta(days=2))
        patch(srv, o.native_id, status={"id": won})
        closed_at = w.clock.now()
        w.clock.advance(timedelta(days=40))
        patch(srv, o.native_id, name="Renamed long after the win")
        conn = connector(srv.url, options={"forecast": False})
        opp = by_id(conn, [o.native_id])[o.native_id]
        assert opp.status == "won" and opp.modified_at - opp.crm_closed_at >= timedelta(days=40)
        assert abs(opp.crm_closed_at - closed_at) <= timedelta(seconds=1)
        # a reopen clears closedDate (and so the close time)
        patch(srv, o.native_id, status={"id": 1})
        opp = by_id(conn, [o.native_id])[o.native_id]
        assert opp.status == "open" and opp.crm_closed_at is None and opp.raw["closedDate"] is None


def test_a_closed_status_the_connection_calls_open_has_no_close_time(server):
    """open_statuses decides the status: a Won record read as open carries no close time, whatever CW shows."""
    w = server.simulator.world
    conn = connector(
        server.url, open_statuses=["Open", "Quoted", "Negotiation", "On Hold", "Won"], options={"forecast": False}
    )
    won = [o for o in w.live() if w.stages[o.stage].label == "Won"]
    got = by_id(conn, [o.native_id for o in won])
    assert got and all(o.status == "open" and o.raw["closedDate"] for o in got.values())
    assert all(o.crm_closed_at is None and o.crm_closed_at_field is None for o in got.values())


def test_migrated_history_closes_without_closed_date_fall_back_to_none():
    sim = cw.build(seed=43, opportunities=200, variant="migrated_history")
    w = sim.world
    with SandboxServer(sim) as srv:
        got = collect(connector(srv.url, options={"forecast": False}))
        closed = [o for o in w.live() if w.status(o) != "open"]
        imported = [o for o in closed if o.closed_at < sim.go_live()]
        native = [o for o in closed if o.closed_at >= sim.go_live()]
        assert imported and native
        for o in imported:
            opp = got[o.native_id]
            # closed in CW's eyes, no closedDate: no close time (the reconcile dates it by lastUpdated)
            assert opp.status in ("won", "lost") and opp.raw["closedDate"] is None
            assert opp.crm_closed_at is None and opp.crm_closed_at_field is None
        assert all(got[o.native_id].crm_closed_at == o.closed_at for o in native)
        assert {sid: o.crm_closed_at for sid, o in got.items()} == {
            sid: t["crm_closed_at"] for sid, t in cw.truth(sim).items()
        }
        # reopened and closed again on ConnectWise, an imported record gets its closedDate
        o = imported[0]
        lost = next(int(s[0]) for s in cw.STATUSES if s[4])
        patch(srv, o.native_id, status={"id": 1})
        w.clock.advance(timedelta(hours=1))
        patch(srv, o.native_id, status={"id": lost})
        opp = by_id(connector(srv.url, options={"forecast": False}), [o.native_id])[o.native_id]
        assert opp.status == "lost" and opp.crm_closed_at is not None and opp.crm_closed_at >= sim.go_live()


# -- read by id ----------------------------------------------------------------------------------------------


def test_fetch_by_ids_ignores_filters_and_status_omits_deleted_and_unknown_ids():
    sim = cw.build(seed=44, opportunities=120)
    w = sim.world
    with SandboxServer(sim) as srv:
        everything = collect(connector(srv.url))
        region = next(r for r in cw.REGIONS if r)
        filtered = connector(
            srv.url,
            filters=[
                RecordFilter(field="custom:Region", op="equal", value=region),
                RecordFilter(field="status/name", op="in", value=["Open", "Won"]),
            ],
        )
        in_scope = set(collect(filtered))
        assert in_scope and in_scope != set(everything)
        gone = sorted(everything, key=int)[:3]
        for sid in gone:
            w.delete(sid)
        asked = list(everything) + ["99999", "abc", ""]
        got = by_id(filtered, asked)
        assert set(got) == set(everything) - set(gone)
        assert {o.status for o in got.values()} == {"open", "won", "lost"}
        # mapped exactly as the lists map them (forecast amount, site address, names, close time)
        for sid, opp in got.items():
            assert opp == everything[sid], sid
        assert {sid for sid, o in got.items() if filtered.matches_filters(o)} == in_scope - set(gone)


def test_fetch_by_ids_batches_200_ids_a_request_and_reads_each_site_once():
    sim = cw.build(seed=45, opportunities=450)
    with SandboxServer(sim) as srv:
        session = CountingSession()
        conn = connector(srv.url, session=session, options={"forecast": False})
        conn.prepare()
        ids = [o.native_id for o in sim.world.live()]
        assert len(ids) == 450
        got = by_id(conn, ids)
        assert set(got) == set(ids)
        lists = [
            p
            for path, p in session.of("/sales/opportunities")
            if path == "/sales/opportunities" and "id in (" in p.get("conditions", "")
        ]
        assert [p["conditions"].count(",") + 1 for p in lists] == [200, 200, 50]
        assert all(p["pageSize"] in (1000, "1000") and "status/id" not in p["conditions"] for p in lists)
        sites = [path for path, _ in session.of("/company/companies/") if "/sites/" in path]
        assert (
            len(sites)
            == len(set(sites))
            == len({(o.raw["company"]["id"], o.raw["site"]["id"]) for o in got.values() if o.raw.get("site")})
        )
        before = len(session.calls)
        by_id(conn, ids[:10])  # sites are cached for the run: one list request, nothing else
        assert len(session.calls) == before + 1


def test_long_ids_are_chunked_by_query_length_and_the_server_accepts_every_chunk(server):
    ids = list(range(10_000_000, 10_000_450))
    chunks = list(_id_chunks(ids))
    assert [i for c in chunks for i in c] == ids
    assert all(len(c) <= BY_ID_CHUNK and _by_id_query_length(c) <= MAX_QUERY_CHARS for c in chunks)
    assert max(len(c) for c in chunks) < BY_ID_CHUNK  # 8-digit ids: the length, not the count, decides
    session = CountingSession()
    conn = connector(server.url, session=session, options={"forecast": False})
    assert by_id(conn, [str(i) for i in ids]) == {}  # none exist: absent, no error (and no 404.15)
    assert len([c for c in session.calls if "id in (" in c[1].get("conditions", "")]) == len(chunks)


# -- filters evaluated in Python --------------------------------------------------------------------------------
# (matches_filters agrees with the server: tests/crm/test_contract.py, every CRM)


def test_filter_value_reads_condition_paths_and_custom_fields(server):
    o = next(iter(collect(connector(server.url, options={"forecast": False})).values()))
    raw = o.raw
    assert ConnectWiseConnector.filter_value(raw, "company/name") == (raw["company"] or {}).get("name")
    assert ConnectWiseConnector.filter_value(raw, "_info/lastUpdated") == raw["_info"]["lastUpdated"]
    assert ConnectWiseConnector.filter_value(raw, "custom:Region") == next(
        (cf.get("value") for cf in raw["customFields"] if cf["caption"] == "Region"), None
    )
    assert ConnectWiseConnector.filter_value(raw, "closedDate") == raw["closedDate"]
