"""The Dynamics revenue writer (lib/writeback/dynamics.py) against seed 000's mapping and the Dataverse sandbox.

Pure: `desired` for every mapping rule and None. Sandbox: the raw quote and quote line read through the Web API
after a write carry exactly the mapped values (and the opportunity is untouched); oppsync's quote and line are
reused across runs, never duplicated; a non-draft quote is left alone; the tenant variants (no PSA columns, no
metadata rights, no quote privileges) and Dataverse's error shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from oppsync_pipeline.lib.crm.http import CrmError, RequestStats
from oppsync_pipeline.lib.sync import build_connector
from oppsync_pipeline.lib.writeback.contract import validate
from oppsync_pipeline.lib.writeback.dynamics import LINE_NAME, SOLUTION_COLUMNS, DynamicsWriter
from oppsync_pipeline.lib.writeback.example import revenue_row
from oppsync_pipeline.lib.writeback.writer import WritePermissionError, diff
from oppsync_pipeline.sandbox.cluster import build_simulator
from oppsync_pipeline.sandbox.dynamics import API, PRICE_LEVELS
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

NOW = datetime(2026, 12, 1, 10, 0)
ALL = frozenset(SOLUTION_COLUMNS)


def _row(opp: str = "opp-1", **overrides: Any):
    rows, problems = validate([revenue_row("sandbox-dynamics", opp, NOW, **overrides)])
    assert not problems, problems
    return rows[0]


def _pure_writer(columns: frozenset[str] = ALL) -> DynamicsWriter:
    writer = DynamicsWriter(SimpleNamespace(client=None, stats=RequestStats()))
    writer.quotedetail_columns = columns  # what a run's discovery found
    return writer


# -- desired (pure) ---------------------------------------------------------------------------------------------


def test_desired_maps_every_column_of_seed_000():
    row = _row(
        total_contract_revenue=120_000.0,
        total_contract_cost=70_500.25,
        include_expenses=True,
        include_materials=False,
        billing_method="Fixed Fee",
    )
    assert _pure_writer().desired(row) == {
        "quotedetail.priceperunit": 120_000.0,
        "quotedetail.msdyn_costamount": 70_500.25,
        "quotedetail.msdyn_estimatedcost": 70_500.25,
        "quotedetail.msdyn_includeexpense": True,
        "quotedetail.msdyn_includematerial": False,
        "quotedetail.msdyn_billingmethod": 192350001,
    }


@pytest.mark.parametrize(("method", "value"), [("fixed_fee", 192350001), ("T&M", 192350000)])
def test_desired_billing_method_options(method: str, value: int):
    assert _pure_writer().desired(_row(billing_method=method))["quotedetail.msdyn_billingmethod"] == value


def test_desired_leaves_out_fields_whose_input_is_none():
    row = _row(total_contract_cost=None, include_expenses=None, include_materials=None, billing_method=None)
    assert _pure_writer().desired(row) == {"quotedetail.priceperunit": row.total_contract_revenue}
    # False is a value, not a missing one
    assert _pure_writer().desired(_row(include_expenses=False))["quotedetail.msdyn_includeexpense"] is False


def test_desired_leaves_out_columns_the_environment_lacks():
    row = _row(total_contract_cost=10.0)
    assert _pure_writer(frozenset()).desired(row) == {"quotedetail.priceperunit": row.total_contract_revenue}
    only_field_service = _pure_writer(frozenset({"msdyn_estimatedcost"})).desired(row)
    assert set(only_field_service) == {"quotedetail.priceperunit", "quotedetail.msdyn_estimatedcost"}


def test_targets_name_every_desired_field():
    row = _row(include_expenses=True, include_materials=True, billing_method="fixed_fee")
    assert {t.field for t in DynamicsWriter.targets} == set(_pure_writer().desired(row))


# -- against the sandbox ----------------------------------------------------------------------------------------


class Tenant:
    """A running Dataverse sandbox, a writer on it (a fresh one per run) and a raw Web API session."""

    def __init__(self, sim: Any, server: SandboxServer, tmp_path: Path):
        self.sim, self.server = sim, server
        self.cfg = sandbox_config({"dynamics": server}, f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path)
        sim.tokens.issue("raw-test-token")
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Bearer raw-test-token"
        self.api = server.url + API

    def writer(self) -> DynamicsWriter:
        return DynamicsWriter(build_connector(self.cfg, self.cfg.connections[0]))

    def run(self, opp: str, **overrides: Any) -> DynamicsWriter:
        """What one engine run does for one row: desired, read, diff, write the changes."""
        writer = self.writer()
        desired = writer.desired(_row(opp, **overrides))
        current = writer.read_current(opp)
        changes = diff(current.values, desired)
        if changes:
            writer.write(opp, changes, current)
        return writer

    def get(self, path: str, **params: str) -> requests.Response:
        return self.http.get(f"{self.api}/{path}", params=params)

    def rows(self, path: str, **params: str) -> list[dict[str, Any]]:
        response = self.get(path, **params)
        assert response.status_code == 200, response.text
        return response.json()["value"]

    def quotes(self, opp: str) -> list[dict[str, Any]]:
        return self.rows("quotes", **{"$filter": f"_opportunityid_value eq {opp}", "$orderby": "createdon asc"})

    def lines(self, quote: str) -> list[dict[str, Any]]:
        return self.rows("quotedetails", **{"$filter": f"_quoteid_value eq {quote}"})


@pytest.fixture
def tenant(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenant]:
    variant = getattr(request, "param", "default")
    sim = build_simulator("dynamics", seed=11, opportunities=30, variant=variant)
    with SandboxServer(sim) as server:
        yield Tenant(sim, server, tmp_path)


def _open_opp(sim: Any, *, price_list: bool = True) -> Any:
    """An open opportunity with an account, with (or without: every fifth record) a price list."""
    return next(
        o
        for o in sorted(sim.world.live(), key=lambda o: o.native_id)
        if sim.world.status(o) == "open" and o.account is not None and (o.seq % 5 != 0) == price_list
    )


def test_first_write_creates_one_draft_quote_and_line_with_exactly_the_mapped_values(tenant: Tenant):
    opp = _open_opp(tenant.sim)
    before = tenant.get(f"opportunities({opp.native_id})").json()
    tenant.run(
        opp.native_id,
        total_contract_revenue=48_250.5,
        total_contract_cost=30_100.12,
        include_expenses=False,
        include_materials=True,
        billing_method="time_and_materials",
    )
    (quote,) = tenant.quotes(opp.native_id)
    account = tenant.sim.world.accounts[opp.account].native_id
    assert quote["statecode"] == 0 and quote["statuscode"] == 1
    assert quote["_customerid_value"] == account
    assert quote["_pricelevelid_value"] == before["_pricelevelid_value"] is not None
    assert quote["_transactioncurrencyid_value"] == before["_transactioncurrencyid_value"]
    assert quote["name"] == f"{opp.name} (oppsync revenue)"
    (line,) = tenant.lines(quote["quoteid"])
    mapped = {
        "priceperunit": 48_250.5,
        "msdyn_costamount": 30_100.12,
        "msdyn_estimatedcost": 30_100.12,
        "msdyn_includeexpense": False,
        "msdyn_includematerial": True,
        "msdyn_billingmethod": 192350000,
    }
    assert {k: line[k] for k in mapped} == mapped
    line_shape = {
        "productdescription": LINE_NAME,
        "isproductoverridden": True,
        "ispriceoverridden": True,
        "quantity": 1,
        "producttypecode": 1,
        "_productid_value": None,
    }
    assert {k: line[k] for k in line_shape} == line_shape
    # columns oppsync does not map keep their defaults
    assert line["msdyn_includetime"] is True and line["msdyn_includefee"] is True
    assert line["msdyn_costpriceperunit"] is None and line["msdyn_linetype"] is None
    assert line["extendedamount"] == 48_250.5 and quote["totalamount"] == 48_250.5
    # the opportunity itself is untouched (Dataverse does not roll a quote into estimatedvalue)
    after = tenant.get(f"opportunities({opp.native_id})").json()
    assert {k: v for k, v in after.items() if k != "@odata.context"} == {
        k: v for k, v in before.items() if k != "@odata.context"
    }


def test_quote_and_line_are_reused_across_runs_and_only_changes_are_written(tenant: Tenant):
    opp = _open_opp(tenant.sim).native_id
    tenant.run(opp, total_contract_revenue=1_000.0, total_contract_cost=600.0, billing_method="fixed_fee")
    (quote,) = tenant.quotes(opp)
    # a user's own product line on the same quote
    user_line = tenant.http.post(
        f"{tenant.api}/quotedetails",
        json={
            "quoteid@odata.bind": f"/quotes({quote['quoteid']})",
            "isproductoverridden": True,
            "productdescription": "Hardware",
            "quantity": 2,
            "priceperunit": 50.0,
        },
    )
    assert user_line.status_code == 204
    (ours,) = [ln for ln in tenant.lines(quote["quoteid"]) if ln["productdescription"] == LINE_NAME]

    writer = tenant.run(opp, total_contract_revenue=2_000.0, total_contract_cost=600.0, billing_method="fixed_fee")
    assert writer.read_current(opp).values["quotedetail.priceperunit"] == 2_000.0
    assert [q["quoteid"] for q in tenant.quotes(opp)] == [quote["quoteid"]]
    lines = {ln["productdescription"]: ln for ln in tenant.lines(quote["quoteid"])}
    assert set(lines) == {LINE_NAME, "Hardware"}
    again = lines[LINE_NAME]
    assert again["quotedetailid"] == ours["quotedetailid"]
    moved = ("priceperunit", "baseamount", "extendedamount", "versionnumber", "@odata.etag", "modifiedon")
    assert {k: v for k, v in again.items() if k not in moved} == {k: v for k, v in ours.items() if k not in moved}
    assert lines["Hardware"]["priceperunit"] == 50.0
    assert tenant.quotes(opp)[0]["totalamount"] == 2_100.0

    # a third run with the same numbers: nothing differs, nothing is sent
    writer = tenant.writer()
    row = _row(opp, total_contract_revenue=2_000.0, total_contract_cost=600.0, billing_method="fixed_fee")
    assert diff(writer.read_current(opp).values, writer.desired(row)) == {}


def test_opportunity_without_price_list_gets_the_active_list_of_its_currency(tenant: Tenant):
    opp = _open_opp(tenant.sim, price_list=False)
    assert tenant.get(f"opportunities({opp.native_id})").json()["_pricelevelid_value"] is None
    tenant.run(opp.native_id)
    (quote,) = tenant.quotes(opp.native_id)
    expected = next(p[0] for p in PRICE_LEVELS if p[2] == opp.currency and p[3] == 0)
    assert quote["_pricelevelid_value"] == expected


def test_an_activated_quote_is_left_alone_and_a_new_draft_gets_the_line(tenant: Tenant):
    opp = _open_opp(tenant.sim).native_id
    tenant.run(opp, total_contract_revenue=5_000.0)
    (first,) = tenant.quotes(opp)
    stale_writer = tenant.writer()
    stale = stale_writer.read_current(opp)  # read before someone activates the quote
    activate = tenant.http.patch(f"{tenant.api}/quotes({first['quoteid']})", json={"statecode": 1, "statuscode": 2})
    assert activate.status_code == 204
    (old_line,) = tenant.lines(first["quoteid"])
    # Dataverse refuses edits of a non-draft quote's lines
    refused = tenant.http.patch(
        f"{tenant.api}/quotedetails({old_line['quotedetailid']})", json={"priceperunit": 1.0}, headers={"If-Match": "*"}
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "Cannot Update a Read-Only Entity"

    with pytest.raises(CrmError) as caught:  # a write racing the activation fails that row, naming the write
        stale_writer.write(opp, {"quotedetail.priceperunit": 6_000.0}, stale)
    assert caught.value.status == 400 and "PATCH /api/data/v9.2/quotedetails(" in str(caught.value)
    assert "Cannot Update a Read-Only Entity" in str(caught.value)
    assert not isinstance(stale_writer.explain(caught.value), WritePermissionError)

    writer = tenant.writer()
    current = writer.read_current(opp)
    assert current.values["quotedetail.priceperunit"] == 5_000.0, "the active quote's line is what the CRM holds"
    assert current.context["quote_id"] is None and current.context["line_id"] is None
    tenant.run(opp, total_contract_revenue=6_000.0)
    quotes = tenant.quotes(opp)
    assert [q["statecode"] for q in quotes] == [1, 0]
    assert tenant.lines(first["quoteid"]) == [old_line]
    (new_line,) = tenant.lines(quotes[1]["quoteid"])
    assert new_line["priceperunit"] == 6_000.0
    assert new_line["msdyn_costamount"] == old_line["msdyn_costamount"], "unchanged values are carried over"


def test_deleted_line_is_not_upserted_back(tenant: Tenant):
    opp = _open_opp(tenant.sim).native_id
    tenant.run(opp, total_contract_revenue=5_000.0)
    writer = tenant.writer()
    current = writer.read_current(opp)
    deleted = tenant.http.delete(f"{tenant.api}/quotedetails({current.context['line_id']})")
    assert deleted.status_code == 204
    with pytest.raises(CrmError, match="deleted after it was read") as err:
        writer.write(opp, {"quotedetail.priceperunit": 7_000.0}, current)
    assert err.value.status == 404
    assert tenant.lines(current.context["quote_id"]) == []
    tenant.run(opp, total_contract_revenue=7_000.0)  # the next run adds a new line
    (line,) = tenant.lines(current.context["quote_id"])
    assert line["priceperunit"] == 7_000.0


@pytest.mark.parametrize("tenant", ["no_psa"], indirect=True)
def test_without_psa_only_priceperunit_is_written_with_a_warning(tenant: Tenant):
    opp = _open_opp(tenant.sim).native_id
    writer = tenant.run(opp, total_contract_revenue=9_000.0, total_contract_cost=4_000.0, billing_method="fixed_fee")
    assert writer.desired(_row(opp)) == {"quotedetail.priceperunit": _row(opp).total_contract_revenue}
    assert any("msdyn_costamount" in w and "not written" in w for w in writer.connector.stats.warnings)
    (quote,) = tenant.quotes(opp)
    (line,) = tenant.lines(quote["quoteid"])
    assert line["priceperunit"] == 9_000.0 and not [k for k in line if k.startswith("msdyn_")]
    # Dataverse's answers for a column the environment does not have
    selected = tenant.get("quotedetails", **{"$select": "msdyn_costamount"})
    assert selected.status_code == 400
    assert "Could not find a property named 'msdyn_costamount'" in selected.json()["error"]["message"]
    written = tenant.http.patch(
        f"{tenant.api}/quotedetails({line['quotedetailid']})", json={"msdyn_costamount": 1.0}, headers={"If-Match": "*"}
    )
    assert written.status_code == 400
    assert written.json()["error"] == {
        "code": "0x80048d19",
        "message": "Invalid property 'msdyn_costamount' was found in entity 'Microsoft.Dynamics.CRM.quotedetail'.",
    }


@pytest.mark.parametrize("tenant", ["no_optional_rights"], indirect=True)
def test_without_metadata_rights_columns_are_found_by_select_probes(tenant: Tenant):
    writer = tenant.writer()
    assert writer.solution_columns() == ALL
    assert any("prvReadEntity" in w for w in writer.connector.stats.warnings)
    requests_before = writer.connector.stats.requests
    writer.desired(_row())
    assert writer.connector.stats.requests == requests_before, "discovered once per run"


@pytest.mark.parametrize("tenant", ["no_quote_rights"], indirect=True)
def test_missing_quote_privilege_names_it(tenant: Tenant):
    opp = _open_opp(tenant.sim).native_id
    writer = tenant.writer()
    current = writer.read_current(opp)  # reading quotes is allowed
    assert current.values == {}
    with pytest.raises(CrmError) as caught:
        writer.write(opp, writer.desired(_row(opp)), current)
    assert caught.value.status == 403 and caught.value.code == "0x80040220"
    explained = writer.explain(caught.value)
    assert isinstance(explained, WritePermissionError)
    assert "lacks prvCreateQuote" in str(explained) and "grant" in str(explained)
    assert tenant.quotes(opp) == []


def test_dataverse_error_shapes_and_responses(tenant: Tenant):
    opp = _open_opp(tenant.sim)
    account = tenant.sim.world.accounts[opp.account].native_id
    quote = {
        "name": "Q",
        "customerid_account@odata.bind": f"/accounts({account})",
        "opportunityid@odata.bind": f"/opportunities({opp.native_id})",
    }
    created = tenant.http.post(
        f"{tenant.api}/quotes", json=quote, headers={"Prefer": "return=representation"}, params={"$select": "name"}
    )
    assert created.status_code == 201 and created.json()["name"] == "Q" and created.json()["@odata.etag"]
    quote_id = created.json()["quoteid"]
    assert created.headers["OData-EntityId"].endswith(f"/quotes({quote_id})")

    def error(response: requests.Response, status: int) -> dict[str, str]:
        assert response.status_code == status, response.text
        return response.json()["error"]

    missing = "00000000-0000-0000-0000-000000000001"
    bad_bind = tenant.http.post(
        f"{tenant.api}/quotes", json={**quote, "pricelevelid@odata.bind": f"/pricelevels({missing})"}
    )
    assert error(bad_bind, 404) == {"code": "0x80040217", "message": f"pricelevel With Id = {missing} Does Not Exist"}
    no_quote = tenant.http.post(f"{tenant.api}/quotedetails", json={"isproductoverridden": True, "quantity": 1})
    assert error(no_quote, 400)["code"] == "0x80040203"
    line = {"quoteid@odata.bind": f"/quotes({quote_id})", "isproductoverridden": True, "productdescription": "X"}
    bad_option = tenant.http.post(f"{tenant.api}/quotedetails", json={**line, "msdyn_billingmethod": 1})
    assert "outside the valid range" in error(bad_option, 400)["message"]
    posted = tenant.http.post(f"{tenant.api}/quotedetails", json={**line, "quantity": 1, "priceperunit": 10})
    assert posted.status_code == 204 and posted.content == b""
    line_id = posted.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    # update-only PATCH of a missing record; a stale etag; no If-Match on a missing id is an upsert
    assert error(
        tenant.http.patch(f"{tenant.api}/quotedetails({missing})", json={"priceperunit": 1}, headers={"If-Match": "*"}),
        404,
    ) == {"code": "0x80040217", "message": f"quotedetail With Id = {missing} Does Not Exist"}
    stale = tenant.http.patch(
        f"{tenant.api}/quotedetails({line_id})", json={"priceperunit": 1}, headers={"If-Match": 'W/"1"'}
    )
    assert error(stale, 412)["code"] == "0x80060882"
    upsert = tenant.http.patch(f"{tenant.api}/quotedetails({missing})", json={**line, "quantity": 1})
    assert upsert.status_code == 204 and len(tenant.lines(quote_id)) == 2
    updated = tenant.http.patch(
        f"{tenant.api}/quotedetails({line_id})",
        json={"priceperunit": 12.5},
        headers={"If-Match": "*", "Prefer": "return=representation"},
    )
    assert updated.status_code == 200 and updated.json()["priceperunit"] == 12.5
    not_for_update = tenant.http.patch(
        f"{tenant.api}/quotedetails({line_id})", json={"isproductoverridden": False}, headers={"If-Match": "*"}
    )
    assert "not valid for update" in error(not_for_update, 400)["message"]
    closing = tenant.http.patch(f"{tenant.api}/quotes({quote_id})", json={"statecode": 2})
    assert "WinQuote" in error(closing, 400)["message"]
