"""HubSpot revenue writer: seed 000's mapping (deal `amount` = total contract revenue), the raw deal after a
write, the error shapes HubSpot gives a deal write (notes §2.1), and the app without crm.objects.deals.write.

The sandbox is checked against the official client too (hubspot-api-client: `crm.deals.basic_api.update` and its
`Error` model), so that a shape the writer relies on is one HubSpot's own SDK reads.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from hubspot import HubSpot
from hubspot.crm.deals import SimplePublicObjectInput
from hubspot.crm.deals.exceptions import ApiException
from hubspot.crm.deals.models import Error

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm.http import CrmError, QuotaExhausted
from oppsync_pipeline.lib.crm.hubspot import HubSpotConnector
from oppsync_pipeline.lib.writeback.contract import validate
from oppsync_pipeline.lib.writeback.hubspot import HubSpotWriter, amount_text, amount_value
from oppsync_pipeline.lib.writeback.writer import WritePermissionError
from oppsync_pipeline.sandbox import hubspot as sim
from oppsync_pipeline.sandbox.cluster import build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer

NOW = datetime(2026, 12, 1, 10, 0)
PAT = sim.PRIVATE_APP_TOKEN


def _row(**values):
    base = {
        "connection": "hs",
        "opportunity_id": "18300000001",
        "total_contract_revenue": 125_000.0,
        "approval_state": "approved",
        "approval_changed_at": NOW,
    }
    rows, problems = validate([{**base, **values}])
    assert not problems, problems
    return rows[0]


def _writer(url: str = "http://127.0.0.1:9") -> HubSpotWriter:
    conn = ConnectionConfig(
        name="hs",
        crm="hubspot",
        base_url=url,
        credentials={"access_token": "${HS_TOKEN}"},
        options={"search_requests_per_second": 0},
    )
    return HubSpotWriter(HubSpotConnector(conn, dict(sim.SANDBOX_CREDENTIALS), sleep=lambda s: None))


def _http(srv: SandboxServer, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, srv.url + path, headers={"Authorization": f"Bearer {PAT}"}, timeout=10, **kwargs)


def _deal(srv: SandboxServer, deal: str) -> dict:
    """The raw deal with every property the portal has (values as HubSpot returns them)."""
    names = sorted(srv.simulator.property_names())
    return _http(srv, "GET", f"/crm/v3/objects/deals/{deal}", params={"properties": ",".join(names)}).json()


def _sent_bodies(writer: HubSpotWriter) -> list[tuple[str, dict]]:
    sent: list[tuple[str, dict]] = []
    writer.client.session.hooks["response"].append(
        lambda r, *a, **k: sent.append((r.request.method, json.loads(r.request.body))) if r.request.body else None
    )
    return sent


# -- pure: the mapping ----------------------------------------------------------------------------------------------


def test_desired_is_the_amount_from_total_contract_revenue_and_nothing_else():
    writer = _writer()
    assert writer.desired(_row()) == {"amount": 125_000.0}
    every_column = _row(
        total_contract_revenue=98_765.43,
        total_contract_cost=50_000,
        ps_revenue=1,
        ps_cost=1,
        ms_revenue=1,
        ms_cost=1,
        product_revenue=1,
        payment_frequency="monthly",
        mrr_term_months=12,
        include_expenses=True,
        include_materials=False,
        billing_method="T&M",
    )
    assert writer.desired(every_column) == {"amount": 98_765.43}  # seed 000: HubSpot takes the revenue only
    assert writer.desired(_row(total_contract_revenue=0)) == {"amount": 0.0}  # zero is a value, not "not given"
    assert [(t.field, t.source) for t in HubSpotWriter.targets] == [("amount", "total_contract_revenue")]
    assert "crm.objects.deals.write" in HubSpotWriter.permission


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (125_000.0, "125000.00"),
        (0, "0.00"),
        (98_765.43, "98765.43"),
        (1.4210854715202004e-14, "0.00"),  # the value HubSpot refused in exponent form
        (1e20, "100000000000000000000.00"),
        (" 12.5 ", "12.50"),
        (None, ""),  # clears the value
    ],
)
def test_amount_is_sent_as_plain_decimal_text(value, text):
    got = amount_text(value)
    assert got == text and got == got.strip() and "e" not in got.lower()


def test_amount_read_back_as_a_number():
    assert amount_value("125000", "1") == 125_000.0 and amount_value("0.5", "1") == 0.5
    assert amount_value(None, "1") is None and amount_value("", "1") is None
    with pytest.raises(CrmError, match="not a number"):
        amount_value("lots", "1")


def test_explain_names_the_write_scope_and_keeps_other_errors():
    writer = _writer()
    for code in ("MISSING_SCOPES", "INSUFFICIENT_ACCESS"):
        err = writer.explain(CrmError("HubSpot refused PATCH ... (403 x)", status=403, code=code))
        assert isinstance(err, WritePermissionError) and err.permanent
        assert "crm.objects.deals.write" in str(err) and "Private Apps" in str(err) and "grant" in str(err)
    bad = writer.explain(
        CrmError(
            "HubSpot refused PATCH /crm/v3/objects/deals/1 (400 VALIDATION_ERROR): Property values were not valid"
            "; check the connection's `fields:` and `filters:` (every property ...)",
            status=400,
            code="VALIDATION_ERROR",
            hint="(PATCH /crm/v3/objects/deals/1) a read hint",
        )
    )
    assert not isinstance(bad, WritePermissionError) and bad.permanent and bad.status == 400
    assert "Property values were not valid" in str(bad) and "fields:" not in str(bad) and "read hint" not in str(bad)
    spent = QuotaExhausted("daily limit spent", status=429, code="DAILY")
    assert writer.explain(spent) is spent


# -- against the sandbox: the raw deal --------------------------------------------------------------------------------


def test_a_write_sets_exactly_the_amount_and_the_next_sync_reads_it():
    with SandboxServer(build_simulator("hubspot", seed=11, opportunities=30)) as srv:
        world = srv.simulator.world
        deal = next(o.native_id for o in world.live() if o.amount is not None)
        writer = _writer(srv.url)
        sent = _sent_bodies(writer)
        before = _deal(srv, deal)
        n_deals = len(world.opps)
        world.clock.advance(timedelta(minutes=5))

        current = writer.read_current(deal)
        assert current.values == {"amount": float(before["properties"]["amount"])}
        writer.write(deal, {"amount": 125_000.0}, current)
        assert sent == [("PATCH", {"properties": {"amount": "125000.00"}})]  # a string, two decimals

        after = _deal(srv, deal)
        assert float(after["properties"]["amount"]) == 125_000.0
        changed = {k for k in before["properties"] if before["properties"][k] != after["properties"][k]}
        # nothing else moved: the modified time did, and the calculated company-currency twin follows the amount
        assert changed == {"amount", "amount_in_home_currency", "hs_lastmodifieddate"}
        assert after["properties"]["amount_in_home_currency"] == after["properties"]["amount"]
        assert after["updatedAt"] > before["updatedAt"]
        assert writer.read_current(deal).values == {"amount": 125_000.0}
        assert len(world.opps) == n_deals  # no record created (HubSpot's write is the deal itself)

        # the next sync reads the written value
        got = [o for page in writer.connector.fetch_by_ids([deal]) for o in page]
        assert [o.amount for o in got] == [125_000.0]

        # writing the same value again sends the same body and leaves the deal as it is
        writer.write(deal, {"amount": 125_000.0}, writer.read_current(deal))
        assert len(world.opps) == n_deals and float(_deal(srv, deal)["properties"]["amount"]) == 125_000.0


def test_an_empty_string_clears_the_amount_and_a_deal_without_one_reads_as_none():
    with SandboxServer(build_simulator("hubspot", seed=11, opportunities=20)) as srv:
        deal = next(o.native_id for o in srv.simulator.world.live())
        writer = _writer(srv.url)
        r = _http(srv, "PATCH", f"/crm/v3/objects/deals/{deal}", json={"properties": {"amount": ""}})
        assert r.status_code == 200 and r.json()["properties"]["amount"] is None
        assert srv.simulator.world.opps[deal].amount is None
        assert writer.read_current(deal).values == {"amount": None}
        writer.write(deal, {"amount": 42.0}, writer.read_current(deal))
        assert writer.read_current(deal).values == {"amount": 42.0}


# -- against the sandbox: HubSpot's error shapes for a deal write ------------------------------------------------------


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"amount": " 125000.00"}, [("amount", "LEADING_TRAILING_WHITESPACE")]),
        ({"amount": "125000.00\u00a0"}, [("amount", "LEADING_TRAILING_WHITESPACE")]),  # a no-break space
        ({"amount": "\u200b125000"}, [("amount", "LEADING_TRAILING_WHITESPACE")]),  # invisible
        ({"amount": "1.4210854715202004e-14"}, [("amount", "INVALID_INTEGER")]),
        ({"amount": "12,500"}, [("amount", "INVALID_INTEGER")]),
        ({"amount": "$100"}, [("amount", "INVALID_INTEGER")]),
        ({"hs_object_id": "5"}, [("hs_object_id", "READ_ONLY_VALUE")]),
        ({"no_such_property": "x"}, [("no_such_property", "PROPERTY_DOESNT_EXIST")]),
        (
            {"amount": "abc", "hs_lastmodifieddate": "1", "nope": "1", "dealname": "fine"},
            [
                ("amount", "INVALID_INTEGER"),
                ("hs_lastmodifieddate", "READ_ONLY_VALUE"),
                ("nope", "PROPERTY_DOESNT_EXIST"),
            ],
        ),
    ],
)
def test_invalid_values_are_a_400_naming_every_property_and_nothing_is_written(properties, expected):
    with SandboxServer(build_simulator("hubspot", seed=12, opportunities=10)) as srv:
        deal = next(o.native_id for o in srv.simulator.world.live())
        before = _deal(srv, deal)
        r = _http(srv, "PATCH", f"/crm/v3/objects/deals/{deal}", json={"properties": properties})
        assert r.status_code == 400
        body = r.json()
        assert body["status"] == "error" and body["category"] == "VALIDATION_ERROR" and body["correlationId"]
        assert body["message"].startswith("Property values were not valid: [")
        listed = json.loads(body["message"].removeprefix("Property values were not valid: "))
        assert [(i["name"], i["error"]) for i in listed] == expected and not any(i["isValid"] for i in listed)
        assert [(e["context"]["propertyName"], e["code"]) for e in body["errors"]] == [([n], c) for n, c in expected]
        assert _deal(srv, deal) == before  # nothing written, not even the valid properties


def test_the_error_shapes_read_by_the_official_client_and_by_the_writer():
    with SandboxServer(build_simulator("hubspot", seed=13, opportunities=10)) as srv:
        deal = next(o.native_id for o in srv.simulator.world.live())
        api = HubSpot(access_token=PAT, host=srv.url)
        ok = api.crm.deals.basic_api.update(deal, SimplePublicObjectInput(properties={"amount": "125000.00"}))
        assert ok.id == deal and float(ok.properties["amount"]) == 125_000.0
        with pytest.raises(ApiException) as raised:
            api.crm.deals.basic_api.update(deal, SimplePublicObjectInput(properties={"amount": "1e5"}))
        assert raised.value.status == 400
        # the client's own deserializer reads the body into its Error / ErrorDetail models
        body = SimpleNamespace(data=raised.value.body)
        error = api.crm.deals.basic_api.api_client.deserialize(body, "Error")
        assert isinstance(error, Error) and error.category == "VALIDATION_ERROR" and error.correlation_id
        assert [(d.code, d.context) for d in error.errors] == [("INVALID_INTEGER", {"propertyName": ["amount"]})]

        writer = _writer(srv.url)
        with pytest.raises(CrmError) as failed:
            writer.client.request("PATCH", f"/crm/v3/objects/deals/{deal}", json={"properties": {"amount": " 1"}})
        explained = writer.explain(failed.value)
        assert explained.status == 400 and explained.permanent and not isinstance(explained, WritePermissionError)
        assert "LEADING_TRAILING_WHITESPACE" in str(explained) and "fields:" not in str(explained)
        missing = _http(srv, "GET", "/crm/v3/objects/deals/18399999999", params={"properties": "amount"})
        assert missing.status_code == 404 and missing.json()["category"] == "OBJECT_NOT_FOUND"


# -- the app without crm.objects.deals.write ---------------------------------------------------------------------------


def test_read_only_app_reads_but_every_deal_write_is_403_missing_scopes():
    with SandboxServer(build_simulator("hubspot", seed=14, opportunities=20, variant="read_only_app")) as srv:
        deal = next(o.native_id for o in srv.simulator.world.live() if o.amount is not None)
        before = _deal(srv, deal)
        writer = _writer(srv.url)
        assert writer.read_current(deal).values["amount"] == float(before["properties"]["amount"])
        assert _http(srv, "POST", "/crm/v3/objects/deals/search", json={"limit": 5}).status_code == 200
        assert _http(srv, "POST", "/crm/v3/objects/deals/batch/read", json={"inputs": [{"id": deal}]}).ok
        assert _http(srv, "GET", "/crm/v3/pipelines/deals").ok and _http(srv, "GET", "/crm/v3/owners").ok
        for method, path, body in (
            ("PATCH", f"/crm/v3/objects/deals/{deal}", {"properties": {"amount": "1.00"}}),
            ("POST", "/crm/v3/objects/deals", {"properties": {"dealname": "x"}}),
            ("DELETE", f"/crm/v3/objects/deals/{deal}", None),
        ):
            r = _http(srv, method, path, json=body)
            assert r.status_code == 403, (method, path)
            refusal = r.json()
            assert refusal["category"] == "MISSING_SCOPES" and refusal["status"] == "error"
            assert refusal["errors"][0]["context"]["requiredGranularScopes"] == ["crm.objects.deals.write"]
        with pytest.raises(CrmError) as refused:
            writer.write(deal, {"amount": 1.0}, writer.read_current(deal))
        explained = writer.explain(refused.value)
        assert isinstance(explained, WritePermissionError) and "crm.objects.deals.write" in str(explained)
        assert _deal(srv, deal) == before


def test_the_engine_stops_on_the_missing_scope_and_names_it(duckdb_url: str, tmp_path: Path):
    from sqlalchemy import text

    from oppsync_pipeline.lib.crm.registry import REGISTRY
    from oppsync_pipeline.lib.sync import sync_connection
    from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
    from oppsync_pipeline.lib.writeback.engine import run_writeback
    from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows
    from tests.conftest import sandbox_config

    with SandboxServer(build_simulator("hubspot", seed=15, opportunities=20, variant="read_only_app")) as srv:
        cfg = sandbox_config(
            {"hubspot": srv},
            duckdb_url,
            tmp_path,
            extra={"hubspot": {"options": dict(REGISTRY["hubspot"].test_options)}},
        )
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        sync_connection(cfg, conn, engine, run_id="sync-1")
        ids = sorted(o.native_id for o in srv.simulator.world.live())[:2]
        amounts = {i: srv.simulator.world.opps[i].amount for i in ids}
        upsert_rows(engine, [revenue_row(conn.name, i, NOW, total_contract_revenue=123_456.0) for i in ids])
        result = run_writeback(cfg, engine, conn.name, run_id="wb-ro", now=NOW)
        assert result.error and "crm.objects.deals.write" in result.error and "grant" in result.error
        assert result.counts == {"failed": 2}, result.rows  # each refused on its own (3 in a row stop the run)
        assert {i: srv.simulator.world.opps[i].amount for i in ids} == amounts
        with engine.connect() as c:
            logged = c.execute(text("SELECT status FROM oppsync.writeback_log WHERE run_id = 'wb-ro'")).fetchall()
        assert sorted(s for (s,) in logged) == ["failed", "failed"]
