"""History truth for HubSpot, over HTTP against the simulator: when a deal closed (HubSpot's calculated close
properties, `closedate` where a portal lacks them), deals read again by id through the batch read API whatever
the connection's filters, and filters evaluated in Python as deal search evaluates them."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest
import requests

from oppsync_pipeline.lib.config import RecordFilter
from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.crm.hubspot import CLOSE_TIME_READ
from oppsync_pipeline.lib.record import parse_datetime
from oppsync_pipeline.sandbox import hubspot as sim
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.crm.test_hubspot_connector import NO_LIMITS, make, sync

AUTH = {"Authorization": f"Bearer {sim.PRIVATE_APP_TOKEN}"}


def serve(variant: str = "default", n: int = 400, seed: int = 23) -> SandboxServer:
    return SandboxServer(sim.build(seed=seed, opportunities=n, limits=NO_LIMITS, variant=variant))


def record_requests(connector) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request the connector sends from now on."""
    seen: list[tuple[str, str, int]] = []
    connector.client.session.hooks["response"].append(
        lambda r, *a, **k: seen.append((r.request.method, r.url.split("://", 1)[1].split("/", 1)[1], r.status_code))
    )
    return seen


def patch(srv: SandboxServer, deal: str, **props: str) -> None:
    r = requests.patch(f"{srv.url}/crm/v3/objects/deals/{deal}", json={"properties": props}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text


# -- (a) close time ----------------------------------------------------------------------------------------------


def test_closed_deals_are_dated_by_hubspots_close_properties_not_the_last_edit():
    with serve() as srv:
        world = srv.simulator.world
        got = sync(make(srv.url))
        long_before = 0
        for sid, opp in got.items():
            w = world.opps[sid]
            status = world.status(w)
            if status == "open":
                assert opp.crm_closed_at is None and opp.crm_closed_at_field is None
                continue
            assert opp.crm_closed_at == w.closed_at
            assert opp.crm_closed_at_field == ("hs_closed_won_date" if status == "won" else "hs_closed_lost_date")
            raw = opp.raw["properties"][opp.crm_closed_at_field]
            assert raw.endswith("Z") and len(raw) == len("2024-06-11T09:12:44.123Z")  # as HubSpot writes it
            if w.modified_at - w.closed_at > timedelta(days=30):
                long_before += 1
                assert opp.crm_closed_at != opp.modified_at
        assert long_before > 20  # the tenant has deals closed long before their last edit


def test_a_close_through_the_api_is_stamped_and_a_reopen_clears_it():
    with serve(n=60) as srv:
        world = srv.simulator.world
        deal = next(o for o in world.live() if world.status(o) == "open")
        world.clock.advance(timedelta(days=3))
        patch(srv, deal.native_id, dealstage="closedwon" if deal.stage in sim.RENAMED else "145236004")
        closed_at = world.opps[deal.native_id].closed_at
        world.clock.advance(timedelta(days=40))
        patch(srv, deal.native_id, amount="1234.5")  # a later edit does not move the close
        connector = make(srv.url)
        opp = next(b for page in connector.fetch_by_ids([deal.native_id]) for b in page)
        assert opp.status == "won" and opp.crm_closed_at == closed_at
        assert opp.crm_closed_at_field == "hs_closed_won_date" and opp.modified_at - closed_at >= timedelta(days=40)
        patch(srv, deal.native_id, dealstage="contractsent" if deal.stage in sim.RENAMED else "145236002")
        opp = next(b for page in make(srv.url).fetch_by_ids([deal.native_id]) for b in page)
        assert opp.status == "open" and opp.crm_closed_at is None
        assert opp.raw["properties"]["hs_closed_won_date"] is None  # cleared with the won stage


# -- (b) a portal without the calculated close properties ---------------------------------------------------------


def test_portal_without_calculated_close_properties_falls_back_to_closedate():
    with serve("no_closed_won_date") as srv:
        world = srv.simulator.world
        connector = make(srv.url)
        got = sync(connector)
        closed = [o for o in got.values() if o.status != "open"]
        assert closed
        for opp in got.values():
            props = opp.raw["properties"]
            assert "hs_closed_won_date" not in props and "hs_closed_lost_date" not in props  # left out, no error
            if opp.status == "open":
                assert opp.crm_closed_at is None and opp.crm_closed_at_field is None
            else:
                assert opp.crm_closed_at_field == "closedate"
                assert opp.crm_closed_at == parse_datetime(props["closedate"])
                assert opp.crm_closed_at == sim.close_time_truth(srv.simulator, world.opps[opp.source_id])
        cap = connector.capabilities[CLOSE_TIME_READ]
        assert not cap.available and "closedate" in cap.detail
        assert connector.stats.warnings == []  # a documented fallback, not a fault


def test_closedate_left_empty_is_filled_with_the_close_moment():
    with serve("no_closed_won_date", n=30) as srv:
        world = srv.simulator.world
        world.clock.advance(timedelta(hours=5))
        r = requests.post(
            f"{srv.url}/crm/v3/objects/deals",
            headers=AUTH,
            timeout=10,
            json={
                "properties": {
                    "dealname": "Closed at once",
                    "pipeline": "default",
                    "dealstage": "closedlost",
                    "amount": "10",
                }
            },
        )
        assert r.status_code == 201, r.text
        new = r.json()["id"]
        opp = next(b for page in make(srv.url).fetch_by_ids([new]) for b in page)
        assert opp.status == "lost" and opp.crm_closed_at_field == "closedate"
        assert opp.crm_closed_at == world.opps[new].closed_at
        assert opp.raw["properties"]["closedate"].endswith("Z")


def test_close_time_properties_are_requested_unchecked_when_the_properties_api_is_refused():
    with serve("no_optional_rights", n=120) as srv:
        world = srv.simulator.world
        got = sync(make(srv.url))
        won = [o for o in got.values() if o.status == "won"]
        assert won and all(o.crm_closed_at_field == "hs_closed_won_date" for o in won)
        assert all(o.crm_closed_at == world.opps[o.source_id].closed_at for o in won)


# -- (c) read by id -------------------------------------------------------------------------------------------------


def test_fetch_by_ids_ignores_filters_and_status_omits_archived_and_unknown_ids_in_batches_of_100():
    with serve(n=300) as srv:
        world = srv.simulator.world
        live = sorted((o for o in world.live()), key=lambda o: int(o.native_id))
        archived = [o.native_id for o in live[:5]]
        for sid in archived:
            assert requests.delete(f"{srv.url}/crm/v3/objects/deals/{sid}", headers=AUTH, timeout=10).status_code == 204
        # a connection whose filter leaves most deals out, and whose open set is a stage list
        filtered = make(srv.url, filters=[RecordFilter(field="amount", op="more_than", value=200_000)])
        in_scope = set(sync(filtered))
        unfiltered = sync(make(srv.url))
        unknown = ["1", "18299999999", "not-a-deal-id"]
        ids = [o.native_id for o in live] + unknown
        assert len(ids) > 250
        seen = record_requests(filtered)
        got = {o.source_id: o for page in filtered.fetch_by_ids(ids) for o in page}
        assert set(got) == set(unfiltered) and not set(got) & set(archived + unknown)
        assert set(got) - in_scope and {o.status for o in got.values()} == {"open", "won", "lost"}
        for sid, opp in got.items():  # mapped exactly as opportunities() maps
            ref = unfiltered[sid]
            for f in (
                "project_name",
                "client_name",
                "service_location",
                "sales_executive",
                "owner_crm_id",
                "stage",
                "stage_id",
                "crm_status",
                "status",
                "amount",
                "currency",
                "close_date",
                "probability",
                "created_at",
                "created_by_crm_id",
                "modified_at",
                "crm_closed_at",
                "crm_closed_at_field",
            ):
                assert getattr(opp, f) == getattr(ref, f), (sid, f)
        reads = [s for m, p, s in seen if p.startswith("crm/v3/objects/deals/batch/read")]
        assert len(reads) == math.ceil(len(ids) / 100) == 4
        assert reads[0] == 207 and 207 in reads  # archived / unknown ids: Multi-Status
        assert all(p.endswith("archived=false") for m, p, s in seen if "deals/batch/read" in p)
        assert not [p for m, p, s in seen if p.endswith("/search")]  # never through search


def test_fetch_by_ids_fails_on_batch_errors_other_than_not_found(monkeypatch):
    with serve(n=20) as srv:
        connector = make(srv.url)
        some = next(iter(srv.simulator.world.live())).native_id
        real = connector.client.post_json

        def post_json(path, body, **kwargs):
            out = real(path, body, **kwargs)
            if path.endswith("deals/batch/read"):
                out.setdefault("errors", []).append(
                    {
                        "status": "error",
                        "category": "VALIDATION_ERROR",
                        "message": "Property values were not valid",
                        "context": {},
                    }
                )
            return out

        monkeypatch.setattr(connector.client, "post_json", post_json)
        with pytest.raises(CrmError) as err:
            list(connector.fetch_by_ids([some, "1"]))
        assert err.value.permanent and "VALIDATION_ERROR" in str(err.value)


def test_batch_read_answers_as_hubspot_does():
    with serve(n=20) as srv:
        world = srv.simulator.world
        a, b = [o.native_id for o in list(world.live())[:2]]
        requests.delete(f"{srv.url}/crm/v3/objects/deals/{b}", headers=AUTH, timeout=10)
        url = f"{srv.url}/crm/v3/objects/deals/batch/read"
        r = requests.post(
            url,
            headers=AUTH,
            timeout=10,
            json={"properties": ["dealname"], "inputs": [{"id": a}, {"id": b}, {"id": "7"}]},
        )
        body = r.json()
        assert r.status_code == 207 and [d["id"] for d in body["results"]] == [a]
        assert body["numErrors"] == 1 and body["errors"][0]["category"] == "OBJECT_NOT_FOUND"
        assert body["errors"][0]["context"]["ids"] == [b, "7"]
        r = requests.post(url + "?archived=true", headers=AUTH, timeout=10, json={"inputs": [{"id": b}]})
        assert r.status_code == 200 and r.json()["results"][0]["archived"] is True
        r = requests.post(url, headers=AUTH, timeout=10, json={"inputs": [{"id": a}] * 101})
        assert r.status_code == 400 and r.json()["category"] == "VALIDATION_ERROR"


# -- (d) filters evaluated in Python --------------------------------------------------------------------------------
# (matches_filters agrees with the server: tests/crm/test_contract.py, every CRM)


def test_filter_value_reads_the_deal_property():
    from oppsync_pipeline.lib.crm.hubspot import HubSpotConnector

    raw = {"id": "5", "properties": {"amount": "1200.5", "closedate": "2024-06-11T09:00:00Z"}}
    assert HubSpotConnector.filter_value(raw, "amount") == "1200.5"
    assert HubSpotConnector.filter_value(raw, "hs_priority") is None
    assert parse_datetime(HubSpotConnector.filter_value(raw, "closedate")) == datetime(2024, 6, 11, 9)
