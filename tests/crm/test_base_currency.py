"""Amounts in the org's base currency and the account id (issue 19 item 4), per CRM against its simulator: the connector maps what
the vendor converts (`amount_base`) and the org's base currency (`base_currency`), equal to the simulator's
truth, computed from its own exchange rates and never through a connector. Each tenant here holds amounts in
more than one currency, so a connector that copied `amount` would fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from oppsync_pipeline.lib.config import ConnectionConfig
from oppsync_pipeline.lib.sync import build_connector
from oppsync_pipeline.sandbox.cluster import build_simulator, crm_module
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

SIZE = 60
# CRMs whose opportunities each carry their own currency (Salesforce only in multi-currency orgs; Autotask never)
SEVERAL_CURRENCIES = ("hubspot", "dynamics", "connectwise")
CW_BASE = "USD"


def _fetch(connector: Any) -> dict[str, Any]:
    return {
        o.source_id: o for open_set in (True, False) for page in connector.opportunities(open_set, None) for o in page
    }


def _check(crm: str, variant: str, tmp_path: Path) -> tuple[set[str], set[str | None]]:
    sim = build_simulator(crm, seed=11, opportunities=SIZE, variant=variant)
    with SandboxServer(sim) as srv:
        extra = {
            "hubspot": {"options": {"search_requests_per_second": 0}},  # test speed only
            "connectwise": {"options": {"base_currency": CW_BASE}},
        }
        cfg = sandbox_config({crm: srv}, f"duckdb:///{tmp_path}/unused.duckdb", tmp_path, extra)
        conn: ConnectionConfig = cfg.connections[0]
        connector = build_connector(cfg, conn, sleep=lambda s: None)
        connector.discover_tenant()
        got = _fetch(connector)
        truth = crm_module(crm).truth(sim)
        if crm == "connectwise":  # no conversion in ConnectWise: the amount where it is in the base currency
            for t in truth.values():
                t["base_currency"] = CW_BASE
                t["amount_base"] = t["amount"] if t["currency"] == CW_BASE else None
        assert set(got) == set(truth)
        for sid, want in truth.items():
            g = got[sid]
            assert g.base_currency == want["base_currency"], (sid, g.base_currency, want["base_currency"])
            assert g.account_id == want["account_id"], (sid, g.account_id, want["account_id"])
            if want["amount_base"] is None:
                assert g.amount_base is None, sid
            else:
                assert g.amount_base == pytest.approx(want["amount_base"], abs=0.01), (sid, g.amount, g.currency)
        return {g.currency for g in got.values()}, {g.base_currency for g in got.values()}


@pytest.mark.parametrize(
    "crm, variant",
    [
        ("dynamics", "default"),
        ("hubspot", "default"),
        ("hubspot", "no_optional_rights"),
        ("salesforce", "multi_currency"),
        ("salesforce", "default"),
        ("salesforce", "no_optional_rights"),
        ("autotask", "default"),
        ("autotask", "no_optional_rights"),
        ("connectwise", "default"),
    ],
)
def test_base_amounts_and_account_ids_equal_the_crms(crm: str, variant: str, tmp_path: Path):
    currencies, bases = _check(crm, variant, tmp_path)
    assert len(bases) == 1
    if crm in SEVERAL_CURRENCIES or variant == "multi_currency":
        assert len(currencies) > 1, "the tenant must hold several currencies for this test to mean anything"
