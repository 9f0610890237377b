"""Dictionaries kept between runs (issue 21, lib/crm/lookups.py): HubSpot companies, Autotask Companies /
Contacts / Countries and ConnectWise company sites are read once and kept in `oppsync.crm_lookups`; an
incremental sync reads only the entries it does not know, and a renamed company (or owner) still reaches the
warehouse on the next sync. Over HTTP against the in-process simulators, into a DuckDB warehouse, no mocks."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import make_engine
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox import hubspot as hs
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import live_client_names, sandbox_config

SIMULATORS = {"hubspot": hs, "autotask": at, "connectwise": cw}

# The requests that read a dictionary entry by id (what a kept entry saves), by CRM: (method, path part, body
# part). Autotask's change-cursor read of Companies (lastTrackedModifiedDateTime) is not one of them.
LOOKUPS = {
    "hubspot": [("POST", "/crm/v3/objects/companies/batch/read", "")],
    "autotask": [
        ("POST", "/Companies/query", '"field": "id"'),
        ("POST", "/Contacts/query", ""),
        ("POST", "/Countries/query", ""),
    ],
    "connectwise": [("GET", "/sites/", "")],
}

# Every request of an incremental sync with nothing changed since the last one, by path: the exact minimum
# of each CRM's design (metadata, one read per set, the company change read, the delete feed), plus what the
# overlap window re-reads (the one opportunity edited just before the bookmark); no dictionary lookup.
QUIET_RUN = {
    "hubspot": {
        "GET /crm/v3/properties/deals": 1,
        "GET /account-info/v3/details": 1,
        "GET /crm/v3/pipelines/deals": 1,
        "GET /crm/v3/owners": 2,  # active and archived owners: the users, read whole every run
        "POST /crm/v3/objects/companies/search": 1,  # companies modified since the bookmark
        "POST /crm/v3/objects/deals/search": 2,  # one per set
        "POST /crm/v4/associations/deals/companies/batch/read": 1,  # the re-read deal's company (known)
        "GET /crm/v3/objects/deals": 1,  # the archived deals (delete feed)
    },
    "autotask": {
        "GET /atservicesrest/v1.0/zoneInformation": 1,
        "GET /ATServicesRest/V1.0/ThresholdInformation": 1,
        "GET /ATServicesRest/V1.0/Opportunities/entityInformation/fields": 1,
        "GET /ATServicesRest/V1.0/Opportunities/entityInformation/userDefinedFields": 1,
        "POST /ATServicesRest/V1.0/Currencies/query": 1,
        "POST /ATServicesRest/V1.0/Resources/query": 1,  # the users, read whole every run
        "POST /ATServicesRest/V1.0/Companies/query": 1,  # companies changed since the bookmark
        "POST /ATServicesRest/V1.0/Opportunities/query": 2,  # one per set
    },
    "connectwise": {
        "GET /login/companyinfo/oppsync": 1,
        "GET /{id}/apis/3.0/sales/opportunities/statuses": 1,
        "GET /{id}/apis/3.0/sales/stages": 1,
        "GET /{id}/apis/3.0/sales/probabilities": 1,
        "GET /{id}/apis/3.0/system/members": 1,  # the users, read whole every run
        "GET /{id}/apis/3.0/company/companies": 1,  # companies changed since the bookmark
        "GET /{id}/apis/3.0/sales/opportunities": 3,  # custom-field discovery (1 record), then one per set
        "GET /{id}/apis/3.0/sales/opportunities/{id}/forecast": 1,  # the re-read opportunity's amount
    },
}


class Log(requests.Session):
    """Each request's method, path and body, as sent (the simulator counts them too: `request_count`)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []
        self.throttled = 0

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        path = url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        body = json.dumps(kwargs.get("json")) if kwargs.get("json") is not None else ""
        response = super().request(method, url, *args, **kwargs)
        # a 429 the client waits out and sends again is the API's pacing (HubSpot's 5 searches a second span the
        # previous sync's last searches on a slow machine), not a read: counted apart, the retry counts once
        if response.status_code == 429:
            self.throttled += 1
        else:
            self.calls.append((method, "/" + path, body))
        return response

    def lookups(self, crm: str) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if any(c[0] == m and p in c[1] and b in c[2] for m, p, b in LOOKUPS[crm])]

    def by_path(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for method, path, _ in self.calls:
            parts = ["{id}" if p.isdigit() or p.startswith("v20") else p for p in path.split("/")]
            label = f"{method} " + "/".join(parts)
            out[label] = out.get(label, 0) + 1
        return out


def kept(engine, connection: str, kind: str) -> dict[str, object]:
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT lookup_key, value FROM oppsync.crm_lookups WHERE connection = :c AND kind = :k"),
            {"c": connection, "k": kind},
        )
        return {key: json.loads(value) for key, value in rows}


def crm_user_names(engine, connection: str) -> dict[str, str]:
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT crm_user_id, name FROM oppsync.crm_users WHERE connection = :c"), {"c": connection}
        )
        return {r.crm_user_id: r.name for r in rows}


def incremental(cfg, conn, engine, srv, run_id: str):
    session = Log()
    connector = build_connector(cfg, conn, session=session)
    before = srv.simulator.request_count
    out = sync_connection(cfg, conn, engine, run_id=run_id, mode="incremental", connector=connector)
    assert out.extract.status == "complete", out.extract.error
    assert out.extract.mode == "incremental"
    # every request counted, by the connector, by our log and by the simulator alike
    # every request sent, the throttled ones included, is the connector's and the simulator's count
    sent = len(session.calls) + session.throttled
    assert connector.stats.requests == sent == srv.simulator.request_count - before
    assert session.throttled == connector.stats.rate_limited
    return session


@pytest.mark.parametrize("crm", sorted(SIMULATORS))
def test_incremental_syncs_read_only_unknown_entries_and_renames_still_arrive(
    crm: str, duckdb_url: str, tmp_path: Path
):
    mod = SIMULATORS[crm]
    sim = mod.build(seed=41, opportunities=150)
    world = sim.world
    options = dict(REGISTRY[crm].test_options)
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({crm: srv}, duckdb_url, tmp_path, extra={crm: {"options": options}} if options else None)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        try:
            full = sync_connection(cfg, conn, engine, run_id="full", mode="full")
            assert full.extract.status == "complete", full.extract.error
            kind = "sites" if crm == "connectwise" else "companies"
            assert kept(engine, conn.name, kind), "the full sync keeps what it read"

            # (a) records of known companies change: the next incremental reads no dictionary entry
            world.clock.advance(timedelta(hours=1))
            with_company = [o for o in world.live() if o.account is not None][:5]
            for i, o in enumerate(with_company):
                world.update(o.native_id, amount=1000.0 + i)
            log = incremental(cfg, conn, engine, srv, "inc-1")
            assert log.lookups(crm) == []
            assert any(c[1].endswith(("deals/search", "Opportunities/query", "sales/opportunities")) for c in log.calls)

            # (b) a company is renamed and an owner too: both reach the warehouse on the next incremental sync
            world.clock.advance(timedelta(hours=1))
            acc = world.accounts[with_company[0].account]
            world.rename_account(acc.idx, acc.name + " Renamed")
            owner = world.users[with_company[0].owner]
            with world.lock:
                owner.name = owner.name + " Renamed"
                world.version += 1
            of_renamed = {o.native_id for o in world.live() if o.account == acc.idx}
            world.clock.advance(timedelta(minutes=10))
            log = incremental(cfg, conn, engine, srv, "inc-2")
            names = live_client_names(engine, conn.name)
            truth = mod.truth(sim)
            assert all(names[sid] == acc.name for sid in of_renamed)
            assert {sid: names[sid] for sid in truth} == {sid: t["client_name"] for sid, t in truth.items()}
            assert any(n == owner.name for n in crm_user_names(engine, conn.name).values())
            if crm != "connectwise":  # ConnectWise's company name comes with the opportunity; its sites are kept
                assert any(acc.name in json.dumps(v) for v in kept(engine, conn.name, "companies").values())
            # the rename was read by the change cursor, not by looking the company up again
            assert log.lookups(crm) == [] or crm == "connectwise"

            # (c) nothing changed since the last run (a later edit moved the bookmark past the rename): the exact
            # requests of the CRM's minimum, the overlap window's re-read of that last edit included; no lookup
            world.clock.advance(timedelta(hours=1))
            world.update(with_company[1].native_id, amount=2024.0)
            incremental(cfg, conn, engine, srv, "inc-3")
            world.clock.advance(timedelta(hours=1))
            log = incremental(cfg, conn, engine, srv, "inc-4")
            assert log.by_path() == QUIET_RUN[crm]
        finally:
            engine.dispose()


def test_kept_entries_round_trip_incremental_upserts_and_full_replaces(warehouse_url: str):
    """What an incremental run writes or drops replaces only those entries; a full run sees none of the kept
    entries and, when it completes, replaces them all; another connection's stay."""
    from datetime import datetime

    from oppsync_pipeline.lib.warehouse import store
    from oppsync_pipeline.lib.warehouse.engine import ensure_schema

    def kept(connection: str, kind: str, key_type: type) -> dict:
        lookup = store.open_lookups(engine, connection, datetime(2030, 1, 1), full=False).lookup(kind, key_type)
        lookup.load(key_type(k) for k in range(20))
        lookup.load(["7:1000"] if key_type is str else [])
        return dict(lookup)

    engine = make_engine(warehouse_url)
    try:
        ensure_schema(engine)
        for connection in ("c1", "c2"):
            first = store.open_lookups(engine, connection, datetime(2026, 1, 1), full=True)
            first.lookup("companies", int).update({1: {"companyName": "A"}, 2: {"companyName": "B"}})
            first.lookup("sites", str)["7:1000"] = "1 Main St"
            first.save()

        inc = store.open_lookups(engine, "c1", datetime(2026, 1, 2), full=False)
        companies = inc.lookup("companies", int)
        assert dict(companies) == {}  # nothing in memory before it is asked for
        companies.load([1, 2, 5])
        assert dict(companies) == {1: {"companyName": "A"}, 2: {"companyName": "B"}}
        companies[2] = {"companyName": "B renamed"}
        del companies[1]
        companies[3] = {}
        inc.save()
        assert kept("c1", "companies", int) == {2: {"companyName": "B renamed"}, 3: {}}
        assert kept("c1", "sites", str) == {"7:1000": "1 Main St"}  # not written: kept as it was

        full = store.open_lookups(engine, "c1", datetime(2026, 1, 3), full=True)
        again = full.lookup("companies", int)
        again.load([2, 3])
        assert dict(again) == {}  # a full run re-reads every entry
        again[9] = {"companyName": "Z"}
        full.save()
        assert kept("c1", "companies", int) == {9: {"companyName": "Z"}}
        assert kept("c1", "sites", str) == {}  # a full sync keeps only what it read
        assert kept("c2", "companies", int) == {1: {"companyName": "A"}, 2: {"companyName": "B"}}
    finally:
        engine.dispose()


def lookup_columns(engine, connection: str) -> dict[str, tuple]:
    """What the dictionaries feed, per live opportunity."""
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT source_id, client_name, service_location, sales_executive FROM oppsync.opportunities "
                "WHERE connection = :c AND deleted_at IS NULL"
            ),
            {"c": connection},
        )
        return {r[0]: tuple(r[1:]) for r in rows}


@pytest.mark.parametrize("crm", sorted(SIMULATORS))
def test_dictionaries_larger_than_memory_keeps_give_the_same_warehouse(
    crm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A tenant whose dictionaries outgrow what a run keeps in memory (lookups.RESIDENT_MAX, lowered here below
    what one page names, read threads and the page read ahead included): entries leave memory once stored, come
    back by query when a page names them, and the warehouse is the one an unbounded run writes; the incremental
    run after it reads no entry from the CRM again."""
    from oppsync_pipeline.lib.crm import lookups

    mod = SIMULATORS[crm]
    sim = mod.build(seed=43, opportunities=300)
    options = dict(REGISTRY[crm].test_options)
    results = {}
    with SandboxServer(sim) as srv:
        for bounded in (False, True):
            if bounded:
                monkeypatch.setattr(lookups, "RESIDENT_MAX", 12)
                monkeypatch.setattr(lookups, "RESIDENT_KEEP", 6)
            extra = {"page_size": 10, **({"options": options} if options else {})}
            url = f"duckdb:///{tmp_path / f'bounded-{bounded}.duckdb'}"
            (tmp_path / str(bounded)).mkdir()
            cfg = sandbox_config({crm: srv}, url, tmp_path / str(bounded), extra={crm: extra})
            conn = cfg.connections[0]
            engine = make_engine(url)
            try:
                connector = build_connector(cfg, conn)
                full = sync_connection(cfg, conn, engine, run_id="full", mode="full", connector=connector)
                assert full.extract.status == "complete", full.extract.error
                kind = "sites" if crm == "connectwise" else "companies"
                stored = kept(engine, conn.name, kind)
                resident = connector.lookups.lookup(kind, str if crm != "autotask" else int)
                if bounded:
                    assert len(stored) > 12, "the run stored more entries than memory keeps"
                # the completed extract let its dictionaries' memory go before the reconcile (all are stored)
                assert len(stored) > 0 and len(resident) == 0
                results[bounded] = (lookup_columns(engine, conn.name), stored)
                sim.world.clock.advance(timedelta(hours=1))
                for i, o in enumerate([o for o in sim.world.live() if o.account is not None][:40]):
                    sim.world.update(o.native_id, amount=3000.0 + i + (100 if bounded else 0))
                log = incremental(cfg, conn, engine, srv, "inc")
                assert log.lookups(crm) == [], "kept entries are asked of the warehouse, not of the CRM"
                assert lookup_columns(engine, conn.name) == results[bounded][0]
            finally:
                engine.dispose()
    diff = {
        k: (results[True][0].get(k), results[False][0].get(k))
        for k in results[True][0].keys() | results[False][0].keys()
        if results[True][0].get(k) != results[False][0].get(k)
    }
    assert not diff, list(diff.items())[:5]
    assert results[True] == results[False]
    assert sum(1 for v in results[True][0].values() if v[0]) > 150  # the dictionaries named most records
