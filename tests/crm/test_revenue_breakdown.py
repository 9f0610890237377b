"""Revenue broken down where the CRM keeps it (issue 19 item 4), per CRM against its simulator: ConnectWise's
forecast lines split by `recurringFlag` with their summed cost, Autotask's one-time vs monthly / quarterly /
semiannual / yearly revenue over `totalAmountMonths` and its total cost. The truth is the simulator's own data
(its forecast lines, its stored revenue fields), never a connector; the parts must also add up to the amount,
which the simulators construct independently of either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from oppsync_pipeline.lib.sync import build_connector
from oppsync_pipeline.sandbox.cluster import build_simulator, crm_module
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config

SIZE = 30
PARTS = ("revenue_one_time", "revenue_recurring", "cost")


def _fetch(crm: str, variant: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    sim = build_simulator(crm, seed=7, opportunities=SIZE, variant=variant)
    with SandboxServer(sim) as srv:
        cfg = sandbox_config({crm: srv}, f"duckdb:///{tmp_path}/unused.duckdb", tmp_path)
        connector = build_connector(cfg, cfg.connections[0], sleep=lambda s: None)
        connector.discover_tenant()
        got = {o.source_id: o for open_set in (True, False) for p in connector.opportunities(open_set, None) for o in p}
        return got, crm_module(crm).truth(sim)


@pytest.mark.parametrize("crm", ["connectwise", "autotask"])
def test_revenue_breakdown_equals_the_crms(crm: str, tmp_path: Path):
    got, truth = _fetch(crm, "default", tmp_path)
    assert set(got) == set(truth)
    recurring_seen = one_time_seen = 0
    for sid, want in truth.items():
        g = got[sid]
        assert {p: getattr(g, p) for p in PARTS} == pytest.approx({p: want[p] for p in PARTS}), sid
        # the parts add up to the CRM's total (Autotask stores each period's revenue to the cent: 12 x 0.005 off)
        if g.amount:
            assert g.revenue_one_time + g.revenue_recurring == pytest.approx(g.amount, abs=0.07), sid
            recurring_seen += g.revenue_recurring > 0
            one_time_seen += g.revenue_one_time > 0
    assert recurring_seen and one_time_seen, "the tenant must hold both kinds for this test to mean anything"


def test_no_forecast_read_is_no_breakdown(tmp_path: Path):
    """A ConnectWise API member without the forecast area gets no amount and no breakdown (None, not zeros)."""
    got, truth = _fetch("connectwise", "no_optional_rights", tmp_path)
    assert got and all(getattr(o, p) is None for o in got.values() for p in PARTS)
    assert all(t[p] is None for t in truth.values() for p in PARTS)


@pytest.mark.parametrize("crm", ["salesforce", "hubspot", "dynamics"])
def test_crms_without_a_breakdown_leave_it_empty(crm: str, tmp_path: Path):
    got, _ = _fetch(crm, "default", tmp_path)
    assert got and all(getattr(o, p) is None for o in got.values() for p in PARTS)
