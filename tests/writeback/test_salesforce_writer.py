"""The Salesforce revenue writer (seed 000: Opportunity.Amount = total contract revenue) against the simulator.

Raw records are read through the REST API (`GET sobjects/Opportunity/{Id}`, every field) before and after a
write; the tenant variants `products`, `amount_read_only` and `no_edit_rights` are the traps the vendor documents
(docs/crm-write-webhook-notes.md §1.1), driven through `run_writeback` as a user would meet them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import requests
from requests.adapters import HTTPAdapter
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest
from sqlalchemy import text

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.writeback.contract import RevenueRow, validate
from oppsync_pipeline.lib.writeback.engine import run_writeback, writer_for
from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows
from oppsync_pipeline.lib.writeback.salesforce import SalesforceWriter
from oppsync_pipeline.lib.writeback.writer import WritePermissionError
from oppsync_pipeline.sandbox import salesforce as sfsim
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

NOW = datetime(2026, 12, 1, 10, 0)
V = "62.0"
# what a write of Amount may change besides Amount: the formula field on it and the change stamps
DERIVED = {"Amount", "ExpectedRevenue", "LastModifiedDate", "SystemModstamp"}


# -- desired: pure ---------------------------------------------------------------------------------------------------


def _row(**overrides) -> RevenueRow:
    rows, problems = validate([revenue_row("sandbox-salesforce", "006Hs00000000001AAA", NOW, **overrides)])
    assert not problems, problems
    return rows[0]


def test_desired_is_the_total_contract_revenue_as_amount_and_nothing_else():
    writer = SalesforceWriter.__new__(SalesforceWriter)  # desired is pure: no connector needed
    row = _row(total_contract_revenue=123_456.785, ps_revenue=1.0, ms_revenue=2.0, product_revenue=3.0)
    assert writer.desired(row) == {"Amount": 123_456.79}  # the contract rounds to the cent, as Amount stores
    # every other column of the row (costs, PS/MS/product split, frequency, billing) has no Salesforce target
    assert writer.desired(_row(total_contract_cost=None, ps_revenue=None, payment_frequency=None)) == {
        "Amount": _row().total_contract_revenue
    }
    assert writer.desired(_row(total_contract_revenue=0.0)) == {"Amount": 0.0}  # zero is a value, not "none"


def test_desired_leaves_out_a_revenue_that_is_none():
    writer = SalesforceWriter.__new__(SalesforceWriter)
    row = RevenueRow("c", "006Hs00000000001AAA", None, "approved", NOW)  # type: ignore[arg-type]
    assert writer.desired(row) == {}


def test_targets_name_every_field_desired_sets():
    assert [t.field for t in SalesforceWriter.targets] == list(
        SalesforceWriter.__new__(SalesforceWriter).desired(_row())
    )
    assert SalesforceWriter.targets[0].source == "total_contract_revenue"


@pytest.mark.parametrize("status", [400, 403])
@pytest.mark.parametrize(
    "code,names",
    [("INVALID_FIELD_FOR_INSERT_UPDATE", "Field-Level Security"), ("INSUFFICIENT_ACCESS_OR_READONLY", "Edit on")],
)
def test_explain_names_the_missing_right_whatever_the_status(status, code, names):
    writer = SalesforceWriter.__new__(SalesforceWriter)
    err = writer.explain(CrmError(f"Salesforce {status} {code}: refused", status=status, code=code))
    assert isinstance(err, WritePermissionError) and err.permanent
    assert names in str(err) and code in str(err)


@pytest.mark.parametrize(
    "err",
    [
        CrmError(
            "Salesforce 400 FIELD_CUSTOM_VALIDATION_EXCEPTION: no", status=400, code="FIELD_CUSTOM_VALIDATION_EXCEPTION"
        ),
        CrmError("Salesforce 404 ENTITY_IS_DELETED: gone", status=404, code="ENTITY_IS_DELETED"),
        CrmError("Salesforce 403 REQUEST_LIMIT_EXCEEDED: spent", status=403, code="REQUEST_LIMIT_EXCEEDED"),
    ],
)
def test_explain_leaves_other_refusals_alone(err):
    assert SalesforceWriter.__new__(SalesforceWriter).explain(err) is err


# -- against the simulator ---------------------------------------------------------------------------------------------


def _headers(url: str) -> dict[str, str]:
    r = requests.post(
        f"{url}/services/oauth2/token", data={"grant_type": "client_credentials", **sfsim.SANDBOX_CREDENTIALS}
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _record(url: str, opp_id: str, **params) -> requests.Response:
    return requests.get(f"{url}/services/data/v{V}/sobjects/Opportunity/{opp_id}", params=params, headers=_headers(url))


def _patch(url: str, opp_id: str, body: dict) -> requests.Response:
    return requests.patch(f"{url}/services/data/v{V}/sobjects/Opportunity/{opp_id}", json=body, headers=_headers(url))


def _setup(sim, duckdb_url: str, tmp_path: Path):
    server = SandboxServer(sim).start()
    cfg = sandbox_config({"salesforce": server}, duckdb_url, tmp_path)
    conn = cfg.connections[0]
    engine = make_engine(cfg.warehouse.url)
    ensure_schema(engine)
    sync_connection(cfg, conn, engine, run_id="sync-1")
    return server, cfg, conn, engine


def _open_ids(sim, products: bool | None = None) -> list[str]:
    return sorted(
        o.native_id
        for o in sim.world.live()
        if sim.world.status(o) == "open" and (products is None or (o.native_id in sim.with_products) == products)
    )


def _log(engine, run_id: str) -> list[tuple]:
    with engine.connect() as c:
        return c.execute(
            text("SELECT opportunity_id, field, status FROM oppsync.writeback_log WHERE run_id = :r ORDER BY 1, 2"),
            {"r": run_id},
        ).fetchall()


def test_get_record_with_fields_answers_only_those_fields():
    sim = sfsim.build(seed=3, opportunities=20)
    with SandboxServer(sim) as srv:
        opp = _open_ids(sim)[0]
        r = _record(srv.url, opp, fields="amount, HasOpportunityLineItem,Amount")
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"attributes", "Amount", "HasOpportunityLineItem"}  # canonical names, once each
        assert body["attributes"] == {"type": "Opportunity", "url": f"/services/data/v{V}/sobjects/Opportunity/{opp}"}
        assert body["HasOpportunityLineItem"] is False
        assert {"Id", "Name", "StageName", "HasOpportunityLineItem"} <= set(_record(srv.url, opp).json())  # all
        for bad in ("Nope__c", "Amount,Bogus", "Account.Name"):
            r = _record(srv.url, opp, fields=bad)
            assert r.status_code == 400, bad
            assert r.json()[0]["errorCode"] == "INVALID_FIELD" and "No such column" in r.json()[0]["message"]
        # a field field-level security hides is as unknown as one that does not exist
        with SandboxServer(sfsim.build(seed=3, opportunities=20, variant="no_last_stage_change_date")) as hidden:
            r = _record(hidden.url, opp, fields="LastStageChangeDate")
            assert r.status_code == 400 and r.json()[0]["errorCode"] == "INVALID_FIELD"


def test_has_opportunity_line_item_is_a_read_only_boolean():
    with SandboxServer(sfsim.build(seed=3, opportunities=20)) as srv:
        described = requests.get(
            f"{srv.url}/services/data/v{V}/sobjects/Opportunity/describe", headers=_headers(srv.url)
        ).json()
        field = next(f for f in described["fields"] if f["name"] == "HasOpportunityLineItem")
        assert field["type"] == "boolean" and field["updateable"] is False
        amount = next(f for f in described["fields"] if f["name"] == "Amount")
        assert amount["type"] == "currency" and amount["updateable"] is True
        opp = _open_ids(srv.simulator)[0]
        r = _patch(srv.url, opp, {"HasOpportunityLineItem": True})
        assert r.status_code == 400
        assert r.json() == [
            {
                "message": "Unable to create/update fields: HasOpportunityLineItem. Please check the security "
                "settings of this field and verify that it is read/write for your profile or permission set.",
                "errorCode": "INVALID_FIELD_FOR_INSERT_UPDATE",
                "fields": ["HasOpportunityLineItem"],
            }
        ]


def test_a_write_changes_amount_and_nothing_else_and_is_not_repeated(duckdb_url: str, tmp_path: Path):
    sim = sfsim.build(seed=4, opportunities=30)
    server, cfg, conn, engine = _setup(sim, duckdb_url, tmp_path)
    try:
        target, other = _open_ids(sim)[:2]
        upsert_rows(engine, [revenue_row(conn.name, target, NOW, total_contract_revenue=98_765.43)])
        before = {i: _record(server.url, i).json() for i in (target, other)}
        sim.world.clock.advance(__import__("datetime").timedelta(seconds=5))
        opportunities = len(sim.world.opps)

        result = run_writeback(cfg, engine, conn.name, run_id="wb-1", now=NOW)
        assert result.counts == {"written": 1}, result.rows
        after = {i: _record(server.url, i).json() for i in (target, other)}
        assert after[target]["Amount"] == 98_765.43
        changed = {k for k in after[target] if after[target][k] != before[target][k]}
        assert changed <= DERIVED and "Amount" in changed, changed
        assert after[other] == before[other], "another opportunity was touched"
        assert _log(engine, "wb-1") == [(target, "Amount", "written")]

        again = run_writeback(cfg, engine, conn.name, run_id="wb-2", now=NOW)
        assert again.counts == {"unchanged": 1} and [s for _, _, s in _log(engine, "wb-2")] == ["unchanged"]
        assert _record(server.url, target).json() == after[target], "an unchanged row was written"
        assert len(sim.world.opps) == opportunities, "Salesforce's write creates no records"
    finally:
        server.stop()


def test_products_variant_accepts_and_ignores_amount_and_the_run_audits_not_applied(duckdb_url: str, tmp_path: Path):
    sim = sfsim.build(seed=4, opportunities=40, variant="products")
    server, cfg, conn, engine = _setup(sim, duckdb_url, tmp_path)
    try:
        with_products, plain = _open_ids(sim, products=True)[0], _open_ids(sim, products=False)[0]
        raw = _record(server.url, with_products, fields="Amount,HasOpportunityLineItem,Name").json()
        assert raw["HasOpportunityLineItem"] is True and raw["Amount"] is not None
        assert _record(server.url, plain, fields="HasOpportunityLineItem").json()["HasOpportunityLineItem"] is False

        # the vendor's words, on the wire: the call is not rejected, Amount is ignored, other fields are updated
        r = _patch(server.url, with_products, {"Amount": 1.0, "Name": "Renamed with products"})
        assert r.status_code == 204 and r.content == b""
        now = _record(server.url, with_products, fields="Amount,Name").json()
        assert now["Amount"] == raw["Amount"] and now["Name"] == "Renamed with products"

        upsert_rows(
            engine,
            [
                revenue_row(conn.name, with_products, NOW, total_contract_revenue=raw["Amount"] + 1_000.0),
                revenue_row(conn.name, plain, NOW, total_contract_revenue=54_321.0),
            ],
        )
        result = run_writeback(cfg, engine, conn.name, run_id="wb-1", now=NOW)
        by_id = {r.opportunity_id: r for r in result.rows}
        assert result.counts == {"not_applied": 1, "written": 1}, result.rows
        assert by_id[with_products].status == "not_applied" and "Amount" in (by_id[with_products].error or "")
        assert not result.ok
        assert _log(engine, "wb-1") == sorted([(with_products, "Amount", "not_applied"), (plain, "Amount", "written")])
        assert _record(server.url, with_products, fields="Amount").json()["Amount"] == raw["Amount"]
        assert _record(server.url, plain, fields="Amount").json()["Amount"] == 54_321.0
        writer = writer_for(build_connector(cfg, conn))
        assert writer.read_current(with_products).context == {"has_products": True}
        # the next run tries again and says so again (an ignored write is no baseline for a conflict)
        again = run_writeback(cfg, engine, conn.name, run_id="wb-2", now=NOW)
        assert again.counts == {"not_applied": 1, "unchanged": 1}, again.rows
    finally:
        server.stop()


@pytest.mark.parametrize(
    "variant,code,fields,names",
    [
        ("amount_read_only", "INVALID_FIELD_FOR_INSERT_UPDATE", ["Amount"], "Opportunity.Amount"),
        ("no_edit_rights", "INSUFFICIENT_ACCESS_OR_READONLY", [], "Edit on Opportunity"),
    ],
)
def test_a_user_without_edit_rights_stops_the_run_naming_the_right(
    variant: str, code: str, fields: list, names: str, duckdb_url: str, tmp_path: Path
):
    sim = sfsim.build(seed=4, opportunities=30, variant=variant)
    server, cfg, conn, engine = _setup(sim, duckdb_url, tmp_path)
    try:
        ids = _open_ids(sim)[:3]
        before = {i: _record(server.url, i).json() for i in ids}
        # Salesforce's own error shape: a JSON array of {message, errorCode, fields}
        r = _patch(server.url, ids[0], {"Amount": 1.0})
        assert r.status_code == 400, r.text
        assert r.json()[0]["errorCode"] == code and r.json()[0]["fields"] == fields
        assert set(r.json()[0]) == {"message", "errorCode", "fields"}

        upsert_rows(engine, [revenue_row(conn.name, i, NOW, total_contract_revenue=11_111.0) for i in ids])
        result = run_writeback(cfg, engine, conn.name, run_id="wb-1", now=NOW)
        assert result.error and names in result.error and code in result.error, result.error
        # each row is refused on its own (a record shared read-only refuses only itself); three refusals in a row
        # would stop the rest of the run
        assert result.counts == {"failed": 3}, result.rows
        assert [s for _, _, s in _log(engine, "wb-1")] == ["failed"] * 3
        assert {i: _record(server.url, i).json() for i in ids} == before, "a refused run changed the CRM"
    finally:
        server.stop()


class _HttpsToHttp(HTTPAdapter):
    """simple-salesforce always builds https:// URLs; the sandbox speaks plain http."""

    def send(self, request, **kwargs):  # type: ignore[override]
        request.url = "http://" + request.url[len("https://") :]
        return super().send(request, **kwargs)


def _simple_salesforce(url: str) -> Salesforce:
    session = requests.Session()
    session.mount("https://", _HttpsToHttp())
    r = requests.post(
        f"{url}/services/oauth2/token", data={"grant_type": "client_credentials", **sfsim.SANDBOX_CREDENTIALS}
    )
    tok = r.json()
    return Salesforce(instance_url=tok["instance_url"], session_id=tok["access_token"], version=V, session=session)


def test_simple_salesforce_update_gets_salesforce_answers():
    sim = sfsim.build(seed=4, opportunities=40, variant="products")
    with SandboxServer(sim) as srv:
        sf = _simple_salesforce(srv.url)
        plain, with_products = _open_ids(sim, products=False)[0], _open_ids(sim, products=True)[0]
        assert sf.Opportunity.update(plain, {"Amount": 4_242.0}) == 204
        assert sf.Opportunity.get(plain)["Amount"] == 4_242.0
        kept = sf.Opportunity.get(with_products)["Amount"]
        assert sf.Opportunity.update(with_products, {"Amount": 1.0}) == 204  # accepted ...
        assert sf.Opportunity.get(with_products)["Amount"] == kept  # ... and ignored
    with SandboxServer(sfsim.build(seed=4, opportunities=20, variant="amount_read_only")) as srv:
        sf = _simple_salesforce(srv.url)
        with pytest.raises(SalesforceMalformedRequest) as refused:
            sf.Opportunity.update(_open_ids(srv.simulator)[0], {"Amount": 1.0})
        assert refused.value.content[0]["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"
