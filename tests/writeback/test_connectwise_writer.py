"""ConnectWiseWriter: seed 000's three forecast entries, the mapping (pure), and the writes against the ConnectWise
simulator over HTTP: raw forecast lines read back through the API, other users' lines untouched, lines created
once and then patched, the read-only security role, CW's error shapes."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import requests

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.crm import connector_class
from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.writeback.connectwise import LINES, ConnectWiseWriter
from oppsync_pipeline.lib.writeback.contract import validate
from oppsync_pipeline.lib.writeback.example import revenue_row
from oppsync_pipeline.lib.writeback.writer import WritePermissionError, diff
from oppsync_pipeline.sandbox import connectwise as cw
from oppsync_pipeline.sandbox.server import SandboxServer

NOW = datetime(2026, 12, 1, 10, 0)
CREDS = dict(cw.SANDBOX_CREDENTIALS)
AUTH = (f"{CREDS['company_id']}+{CREDS['public_key']}", CREDS["private_key"])
HEADERS = {"clientId": CREDS["client_id"]}


def row(**overrides):
    base = {
        "ps_revenue": 10_000.0,
        "ps_cost": 5_500.0,
        "ms_revenue": 800.0,
        "ms_cost": 520.0,
        "product_revenue": 2_250.0,
        "payment_frequency": "quarterly",
        "mrr_term_months": 24,
    }
    rows, problems = validate([revenue_row("cw", "1", NOW, **{**base, **overrides})])
    assert not problems, problems
    return rows[0]


def writer_for(url: str) -> ConnectWiseWriter:
    conn = ConnectionConfig(
        name="cw",
        crm="connectwise",
        base_url=url,
        credentials={k: "${CW_" + k.upper() + "}" for k in CREDS},
        options={"codebase": "v4_6_release/"},
    )
    return ConnectWiseWriter(connector_class("connectwise")(conn, CREDS, sleep=lambda s: None))


def offline() -> ConnectWiseWriter:
    """A writer whose connector has no server behind it: `desired` is pure and makes no request."""
    return writer_for("http://127.0.0.1:9")


def write(writer: ConnectWiseWriter, opp: str, r) -> dict:
    current = writer.read_current(opp)
    changes = diff(current.values, writer.desired(r))
    if changes:
        writer.write(opp, changes, current)
    return changes


# -- the mapping (pure) ------------------------------------------------------------------------------------------


def test_desired_maps_every_column_onto_its_line():
    got = offline().desired(row())  # pure: no request is made
    assert got == {
        "forecast.Service.revenue": 10_000.0,
        "forecast.Service.cost": 5_500.0,
        "forecast.Agreement.recurringFlag": True,
        "forecast.Agreement.recurringRevenue": 800.0,
        "forecast.Agreement.recurringCost": 520.0,
        "forecast.Agreement.billCycle": "Quarterly",
        "forecast.Agreement.cycles": 8,
        "forecast.Agreement.revenue": 6_400.0,
        "forecast.Agreement.cost": 4_160.0,
        "forecast.Product.revenue": 2_250.0,
    }
    assert set(got) == {t.field for t in ConnectWiseWriter.targets}


@pytest.mark.parametrize(
    ("frequency", "term", "option", "cycles"),
    [
        ("monthly", 12, "Monthly", 12),
        ("quarterly", 10, "Quarterly", 4),
        ("yearly", 36, "Yearly", 3),
        ("yearly", 0, "Yearly", 0),
    ],
)
def test_managed_services_periods(frequency, term, option, cycles):
    got = offline().desired(row(payment_frequency=frequency, mrr_term_months=term))
    assert got["forecast.Agreement.billCycle"] == option
    assert got["forecast.Agreement.cycles"] == cycles
    assert got["forecast.Agreement.revenue"] == pytest.approx(800.0 * cycles)
    assert got["forecast.Agreement.cost"] == pytest.approx(520.0 * cycles)


def test_desired_leaves_out_what_the_row_leaves_none():
    d = lambda **kw: offline().desired(row(**kw))  # noqa: E731
    assert "forecast.Service.cost" not in d(ps_cost=None)
    assert not any(k.startswith("forecast.Service.") for k in d(ps_revenue=None, ps_cost=None))
    assert not any(k.startswith("forecast.Product.") for k in d(product_revenue=None))
    # no managed-services money: no Managed Services line, whatever frequency and term say
    assert not any(k.startswith("forecast.Agreement.") for k in d(ms_revenue=None, ms_cost=None))
    no_cost = d(ms_cost=None)
    assert "forecast.Agreement.recurringCost" not in no_cost and "forecast.Agreement.cost" not in no_cost
    assert no_cost["forecast.Agreement.revenue"] == 6_400.0
    # no frequency: the per-period amounts only (no cycle, so no total)
    no_freq = d(payment_frequency=None)
    assert {k for k in no_freq if k.startswith("forecast.Agreement.")} == {
        "forecast.Agreement.recurringFlag",
        "forecast.Agreement.recurringRevenue",
        "forecast.Agreement.recurringCost",
    }
    # a frequency but no term: the billing cycle, still no count and no total
    no_term = d(mrr_term_months=None)
    assert no_term["forecast.Agreement.billCycle"] == "Quarterly"
    assert not {"forecast.Agreement.cycles", "forecast.Agreement.revenue"} & set(no_term)


# -- against the sandbox -----------------------------------------------------------------------------------------


@pytest.fixture
def sim():
    return cw.build(seed=21, opportunities=12)


def _api(srv: SandboxServer) -> str:
    return f"{srv.url}/v4_6_release/apis/3.0"


def _get(url: str, **params) -> requests.Response:
    return requests.get(url, params=params, auth=AUTH, headers=HEADERS, timeout=10)


def _send(method: str, url: str, body) -> requests.Response:
    return requests.request(method, url, json=body, auth=AUTH, headers=HEADERS, timeout=10)


def _opp_with_lines(sim) -> str:
    return next(o.native_id for o in sim.world.live() if o.amount is not None and o.seq % 3 == 2)


def test_write_sets_exactly_the_mapped_values_and_nothing_else(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        forecast_url = f"{api}/sales/opportunities/{opp}/forecast"
        before_lines = _get(forecast_url).json()["forecastItems"]
        before_opp = _get(f"{api}/sales/opportunities/{opp}").json()
        assert len(before_lines) == 3  # another user's Service / Product / Agreement lines

        writer = writer_for(srv.url)
        changes = write(writer, opp, row())
        assert set(changes) == {t.field for t in ConnectWiseWriter.targets}, "nothing was ours yet: all written"

        after = _get(forecast_url).json()
        lines = {i["id"]: i for i in after["forecastItems"]}
        assert [lines[i["id"]] for i in before_lines] == before_lines, "other users' lines are untouched"
        new = [i for i in after["forecastItems"] if i["id"] not in {b["id"] for b in before_lines}]
        by_type = {i["forecastType"]: i for i in new}
        assert len(new) == 3 and set(by_type) == set(LINES)
        assert {t: i["forecastDescription"] for t, i in by_type.items()} == LINES
        assert all(i["includeFlag"] for i in new)
        service, agreement, product = by_type["Service"], by_type["Agreement"], by_type["Product"]
        assert (service["revenue"], service["cost"], service["recurringFlag"]) == (10_000.0, 5_500.0, False)
        assert "cycles" not in service and "billCycle" not in service
        quarterly = next(c for c in cw.BILLING_CYCLES if c[3] == "Quarterly")
        assert agreement["recurringFlag"] is True
        assert (agreement["recurringRevenue"], agreement["recurringCost"]) == (800.0, 520.0)
        assert (agreement["cycles"], agreement["billCycle"]["id"]) == (8, quarterly[0])
        assert (agreement["revenue"], agreement["cost"]) == (6_400.0, 4_160.0)
        assert (product["revenue"], product["cost"], product["recurringFlag"]) == (2_250.0, 0.0, False)

        # the opportunity itself: nothing but its change time moved; the amount a sync reads includes our lines
        after_opp = _get(f"{api}/sales/opportunities/{opp}").json()
        assert {k: v for k, v in after_opp.items() if k != "_info"} == {
            k: v for k, v in before_opp.items() if k != "_info"
        }
        assert after_opp["_info"]["lastUpdated"] >= before_opp["_info"]["lastUpdated"]
        total = round(sum(i["revenue"] for i in after["forecastItems"]), 2)
        assert after["forecastRevenueTotals"]["revenue"] == total
        assert writer.connector.forecast_amount(opp) == total == round(sim.world.get(opp).amount, 2)

        # read back through the writer: exactly the desired values
        assert diff(writer.read_current(opp).values, writer.desired(row())) == {}


def test_lines_are_created_once_then_patched_never_duplicated(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        seen: list[tuple[str, str]] = []
        handle = sim.handle
        sim.handle = lambda req: (seen.append((req.method, req.path)), handle(req))[1]

        write(writer_for(srv.url), opp, row())
        first = {i["forecastType"]: i["id"] for i in _ours(api, opp)}
        assert sum(m == "POST" for m, _ in seen) == 3

        seen.clear()
        assert write(writer_for(srv.url), opp, row()) == {}, "a second run writes nothing"
        assert [m for m, _ in seen if m != "GET"] == []

        seen.clear()
        changes = write(writer_for(srv.url), opp, row(ps_revenue=12_000.0, ms_revenue=900.0, product_revenue=None))
        assert changes == {
            "forecast.Service.revenue": 12_000.0,
            "forecast.Agreement.recurringRevenue": 900.0,
            "forecast.Agreement.revenue": 7_200.0,
        }
        writes = [(m, p) for m, p in seen if m != "GET"]
        assert sorted(m for m, _ in writes) == ["PATCH", "PATCH"], writes
        assert {p.rsplit("/", 1)[1] for _, p in writes} == {str(first["Service"]), str(first["Agreement"])}
        assert {i["forecastType"]: i["id"] for i in _ours(api, opp)} == first, "same lines, none added"
        product = next(i for i in _ours(api, opp) if i["forecastType"] == "Product")
        assert product["revenue"] == 2_250.0, "product_revenue None: the Product line is left as it was"


def test_other_users_lines_that_look_like_ours_are_left_alone(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        url = f"{api}/sales/opportunities/{opp}/forecast"
        lookalikes = [
            {"forecastType": "Product", "forecastDescription": "Professional Services", "revenue": 111.0},
            {"forecastType": "Product", "forecastDescription": "product revenue", "revenue": 222.0},
            {"forecastType": "Service", "forecastDescription": "Managed Services", "revenue": 333.0},
        ]
        ids = [_send("POST", url, body).json()["id"] for body in lookalikes]
        theirs = [_get(f"{url}/{i}").json() for i in ids]

        write(writer_for(srv.url), opp, row())
        assert [_get(f"{url}/{i}").json() for i in ids] == theirs
        assert len(_ours(api, opp)) == 3


def test_two_lines_with_our_marker_fail_the_row_naming_both(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        write(writer_for(srv.url), opp, row())
        url = f"{api}/sales/opportunities/{opp}/forecast"
        extra = _send(
            "POST", url, {"forecastType": "Product", "forecastDescription": "Product Revenue", "revenue": 1.0}
        )
        with pytest.raises(CrmError, match=f"two Product forecast lines.*{extra.json()['id']}") as dup:
            writer_for(srv.url).read_current(opp)
        assert dup.value.permanent and not isinstance(dup.value, WritePermissionError)


def test_a_line_deleted_in_connectwise_is_created_again(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        write(writer_for(srv.url), opp, row())
        service = next(i for i in _ours(api, opp) if i["forecastType"] == "Service")
        assert _send("DELETE", f"{api}/sales/opportunities/{opp}/forecast/{service['id']}", None).status_code == 204

        changes = write(writer_for(srv.url), opp, row())
        assert set(changes) == {"forecast.Service.revenue", "forecast.Service.cost"}
        assert sorted(i["forecastType"] for i in _ours(api, opp)) == ["Agreement", "Product", "Service"]


def test_read_only_security_role_names_the_add_and_edit_level():
    sim = cw.build(seed=21, opportunities=12, variant="read_only_opportunities")
    with SandboxServer(sim) as srv:
        opp = _opp_with_lines(sim)
        writer = writer_for(srv.url)
        current = writer.read_current(opp)  # reads still work
        before = _get(f"{_api(srv)}/sales/opportunities/{opp}/forecast").json()
        with pytest.raises(CrmError) as refused:
            writer.write(opp, diff(current.values, writer.desired(row())), current)
        assert refused.value.status == 403
        explained = writer.explain(refused.value)
        assert isinstance(explained, WritePermissionError)
        assert "Sales > Opportunities" in str(explained) and "Add Level" in str(explained)
        assert "Edit Level" in str(explained) and "System > Security Roles" in str(explained)
        assert _get(f"{_api(srv)}/sales/opportunities/{opp}/forecast").json() == before

        raw = _send("PATCH", f"{_api(srv)}/sales/opportunities/{opp}/forecast/{before['forecastItems'][0]['id']}", [])
        assert raw.status_code == 403 and raw.json()["code"] == "Unauthorized"
        assert "Sales > Opportunities (Edit Level)" in raw.json()["message"]


def test_refused_billing_cycles_name_their_table(sim):
    sim.refused = frozenset({"billing_cycles"})
    with SandboxServer(sim) as srv:
        opp = _opp_with_lines(sim)
        writer = writer_for(srv.url)
        current = writer.read_current(opp)
        with pytest.raises(CrmError) as refused:
            writer.write(opp, diff(current.values, writer.desired(row())), current)
        explained = writer.explain(refused.value)
        assert isinstance(explained, WritePermissionError) and "Finance > Billing Cycles" in str(explained)


def test_refused_forecast_read_names_the_inquire_right():
    sim = cw.build(seed=21, opportunities=12, variant="no_optional_rights")
    with SandboxServer(sim) as srv:
        writer = writer_for(srv.url)
        with pytest.raises(WritePermissionError) as refused:
            writer.read_current(_opp_with_lines(sim))
        assert "Sales > Opportunities (forecast), Inquire Level" in str(refused.value)
        assert writer.explain(refused.value) is refused.value


def test_billing_cycle_is_found_by_billing_option_not_name(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        write(writer_for(srv.url), opp, row(payment_frequency="yearly", mrr_term_months=36))
        agreement = next(i for i in _ours(api, opp) if i["forecastType"] == "Agreement")
        assert agreement["billCycle"]["name"] == "Annual"  # the tenant's name for its Yearly cycle
        assert writer_for(srv.url).read_current(opp).values["forecast.Agreement.billCycle"] == "Yearly"


# -- the simulator's forecast API: CW's shapes -------------------------------------------------------------------


def test_forecast_item_errors_in_connectwise_shape(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        url = f"{api}/sales/opportunities/{opp}/forecast"
        missing = _send("POST", url, {"revenue": 10.0})
        assert missing.status_code == 400
        assert missing.json() == {
            "code": "InvalidObject",
            "message": "forecastItem object is invalid",
            "errors": [
                {
                    "code": "MissingRequiredField",
                    "message": "The forecastType field is required.",
                    "resource": "forecastItem",
                    "field": "forecastType",
                }
            ],
        }
        bad_type = _send("POST", url, {"forecastType": "Managed", "revenue": 10.0}).json()
        assert bad_type["errors"][0]["code"] == "InvalidField" and bad_type["errors"][0]["field"] == "forecastType"
        too_long = _send("POST", url, {"forecastType": "Service", "forecastDescription": "x" * 51}).json()
        assert too_long["errors"][0]["field"] == "forecastDescription"

        line = _get(url).json()["forecastItems"][0]
        item = f"{url}/{line['id']}"
        bad_op = _send("PATCH", item, [{"op": "move", "path": "revenue", "value": 1}])
        assert bad_op.status_code == 400 and bad_op.json()["code"] == "InvalidObject"
        assert {"code", "message", "resource", "field"} == set(bad_op.json()["errors"][0])
        assert bad_op.json()["errors"][0]["field"] == "op"
        assert _send("PATCH", item, {"op": "replace"}).status_code == 400, "PATCH takes an array"
        assert _send("PATCH", item, [{"op": "replace", "path": "nosuch", "value": 1}]).status_code == 400
        removed = _send(
            "PATCH", item, [{"op": "remove", "path": "forecastType"}, {"op": "replace", "path": "revenue", "value": 5}]
        )
        assert removed.status_code == 400 and removed.json()["errors"][0]["code"] == "MissingRequiredField"
        assert _get(item).json()["revenue"] == line["revenue"], "a refused PATCH changes nothing"

        for method in ("GET", "PATCH", "PUT", "DELETE"):
            gone = _send(method, f"{url}/987654", [] if method == "PATCH" else {"forecastType": "Service"})
            assert gone.status_code == 404 and gone.json()["code"] == "NotFound", method


def test_forecast_item_patch_put_delete(sim):
    with SandboxServer(sim) as srv:
        api, opp = _api(srv), _opp_with_lines(sim)
        url = f"{api}/sales/opportunities/{opp}/forecast"
        line = _get(url).json()["forecastItems"][0]
        item = f"{url}/{line['id']}"
        ops = [
            {"op": "replace", "path": "revenue", "value": 1_000},
            {"op": "replace", "path": "/cost", "value": 400.5},
            {"op": "add", "path": "billCycle/id", "value": 1},
            {"op": "replace", "path": "/recurringFlag", "value": True},
        ]
        patched = _send("PATCH", item, ops)
        assert patched.status_code == 200
        got = patched.json()
        assert (got["revenue"], got["cost"], got["margin"], got["billCycle"]["id"]) == (1_000.0, 400.5, 599.5, 1)
        assert _get(item).json() == got
        assert _send("PATCH", item, [{"op": "remove", "path": "billCycle"}]).json().get("billCycle") is None

        put = _send("PUT", item, {"forecastType": "Product", "revenue": 50.0}).json()
        assert (put["forecastType"], put["revenue"], put["cost"], put["forecastDescription"]) == (
            "Product",
            50.0,
            0.0,
            None,
        )

        n = len(_get(url).json()["forecastItems"])
        assert _send("DELETE", item, None).status_code == 204
        after = _get(url).json()
        assert len(after["forecastItems"]) == n - 1
        assert round(sim.world.get(opp).amount, 2) == round(sum(i["revenue"] for i in after["forecastItems"]), 2)


def test_whether_a_forecast_write_moves_last_updated_is_a_variant():
    """Default: a forecast write moves the opportunity's `_info.lastUpdated`, so an incremental read sees it.
    forecast_keeps_last_updated (CW's behaviour is unverified): it does not, and only a full read sees the new
    amount: the write-back's changes wait for the next full sync there."""
    for variant, moves in (("default", True), ("forecast_keeps_last_updated", False)):
        sim = cw.build(seed=21, opportunities=12, variant=variant)
        with SandboxServer(sim) as srv:
            opp = _opp_with_lines(sim)
            stamp = sim.world.get(opp).modified_at
            sim.world.clock.advance(timedelta(minutes=5))
            since = sim.world.clock.now()
            writer = writer_for(srv.url)
            write(writer, opp, row())
            assert (sim.world.get(opp).modified_at != stamp) is moves, variant
            incremental = {
                o.source_id for s in (True, False) for p in writer.connector.opportunities(s, since) for o in p
            }
            assert (opp in incremental) is moves, variant
            assert writer.connector.forecast_amount(opp) == round(sim.world.get(opp).amount, 2)


def _ours(api: str, opp: str) -> list[dict]:
    items = _get(f"{api}/sales/opportunities/{opp}/forecast").json()["forecastItems"]
    return [i for i in items if LINES.get(i["forecastType"]) == i["forecastDescription"]]
