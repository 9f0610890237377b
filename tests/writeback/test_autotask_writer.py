"""The Autotask revenue writer: seed 000's mapping (pure), and against the sandbox over HTTP the raw records
after a write, the frequency rule, the permission variant and Autotask's error shapes
(docs/crm-write-webhook-notes.md §5.1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.writeback.autotask import FIELDS, RECURRING, AutotaskWriter
from oppsync_pipeline.lib.writeback.contract import COLUMNS, RevenueRow, validate
from oppsync_pipeline.lib.writeback.engine import run_writeback
from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows
from oppsync_pipeline.lib.writeback.writer import WritePermissionError, diff, same
from oppsync_pipeline.sandbox import autotask as at
from oppsync_pipeline.sandbox.cluster import build_simulator
from oppsync_pipeline.sandbox.server import FaultPlan, FaultRule, SandboxServer
from tests.conftest import sandbox_config

NOW = datetime(2026, 12, 1, 10, 0)
HEADERS = {
    "ApiIntegrationCode": at.SANDBOX_CREDENTIALS["integration_code"],
    "UserName": at.SANDBOX_CREDENTIALS["username"],
    "Secret": at.SANDBOX_CREDENTIALS["secret"],
    "Content-Type": "application/json",
}


def _row(**values: Any) -> RevenueRow:
    base = {
        "connection": "c",
        "opportunity_id": "29684001",
        "total_contract_revenue": 100_000.0,
        "approval_state": "approved",
        "approval_changed_at": NOW,
    }
    rows, problems = validate([{**base, **values}])
    assert not problems, problems
    return rows[0]


PURE = AutotaskWriter.__new__(AutotaskWriter)  # desired() is pure: no connector
FULL = dict(
    total_contract_cost=60_000.0,
    ps_revenue=20_000.0,
    ps_cost=11_000.0,
    ms_revenue=2_000.0,
    ms_cost=1_300.0,
    mrr_term_months=36,
)


# -- desired: seed 000's mapping, pure --------------------------------------------------------------------------


@pytest.mark.parametrize("frequency", ["monthly", "quarterly", "yearly"])
def test_every_column_maps_to_its_field_and_only_the_frequencys_pair_carries_the_recurring(frequency: str):
    got = PURE.desired(_row(payment_frequency=frequency, **FULL))
    expected = {
        "amount": 100_000.0,
        "cost": 60_000.0,
        "totalAmountMonths": 36,
        "onetimeRevenue": 20_000.0,
        "onetimeCost": 11_000.0,
    }
    for period in RECURRING:  # semiannual too: the input has no such frequency, so it is always 0
        expected[f"{period}Revenue"] = 2_000.0 if period == frequency else 0.0
        expected[f"{period}Cost"] = 1_300.0 if period == frequency else 0.0
    assert got == expected
    assert isinstance(got["totalAmountMonths"], int)
    assert "oneTimeRevenue" not in got  # seed 000's casing is not Autotask's (notes §5.1)


def test_none_leaves_its_fields_out():
    desired = PURE.desired
    assert desired(_row()) == {"amount": 100_000.0}
    assert desired(_row(ps_revenue=5.0)) == {"amount": 100_000.0, "onetimeRevenue": 5.0}
    assert desired(_row(mrr_term_months=0, total_contract_cost=0.0)) == {
        "amount": 100_000.0,
        "totalAmountMonths": 0,
        "cost": 0.0,
    }
    # revenue without cost: the revenues are set (and the other frequencies' revenues zeroed), no cost is touched
    only_revenue = desired(_row(payment_frequency="yearly", ms_revenue=9.0))
    assert only_revenue == {"amount": 100_000.0, **{f"{p}Revenue": 9.0 if p == "yearly" else 0.0 for p in RECURRING}}
    only_cost = desired(_row(payment_frequency="monthly", ms_cost=3.0))
    assert only_cost == {"amount": 100_000.0, **{f"{p}Cost": 3.0 if p == "monthly" else 0.0 for p in RECURRING}}
    # without a payment frequency the recurring amounts have no field: nothing recurring is written
    assert desired(_row(ms_revenue=9.0, ms_cost=3.0)) == {"amount": 100_000.0}
    # a frequency alone writes nothing either
    assert desired(_row(payment_frequency="quarterly")) == {"amount": 100_000.0}


def test_targets_name_every_field_and_a_contract_column():
    assert {t.field for t in AutotaskWriter.targets} == set(FIELDS)
    assert all(t.source in COLUMNS for t in AutotaskWriter.targets)
    assert "Opportunities: View and Edit" in AutotaskWriter.permission


# -- against the sandbox ------------------------------------------------------------------------------------------


@dataclass
class Box:
    sim: at.AutotaskSimulator
    server: SandboxServer
    writer: AutotaskWriter
    sent: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, path, json body) the writer sent

    @property
    def api(self) -> str:
        return self.server.url + "/ATServicesRest/V1.0/"

    def raw(self, oid: str) -> dict[str, Any]:
        """The record as Autotask's API returns it (not through the writer)."""
        r = requests.get(self.api + f"Opportunities/{oid}", headers=HEADERS, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["item"]

    def writes(self) -> list[Any]:
        return [body for method, _, body in self.sent if method != "GET"]

    def opportunity(self, frequency: str) -> str:
        """An open opportunity whose generated recurring revenue is of `frequency` (the sandbox's breakdown)."""
        index = ("monthly", "quarterly", "yearly").index(frequency)
        return next(o.native_id for o in self.sim.world.live() if o.seq % 3 == index)


@contextmanager
def sandbox(tmp_path: Path, variant: str = "default", **faults: Any) -> Iterator[Box]:
    sim = build_simulator("autotask", seed=3, opportunities=30, variant=variant)
    with SandboxServer(sim) as server:
        cfg = sandbox_config({"autotask": server}, f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path)
        session = requests.Session()
        box = Box(sim, server, None)  # type: ignore[arg-type]

        def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            body = response.request.body
            parsed = json.loads(body) if body else None
            box.sent.append((response.request.method, response.request.path_url, parsed))

        session.hooks["response"].append(record)
        box.writer = AutotaskWriter(build_connector(cfg, cfg.connections[0], session=session, sleep=lambda s: None))
        yield box


def _write(box: Box, oid: str, row: RevenueRow) -> dict[str, Any]:
    desired = box.writer.desired(row)
    current = box.writer.read_current(oid)
    changes = diff(current.values, desired)
    if changes:  # as the engine does: nothing differs, nothing is sent
        box.writer.write(oid, changes, current)
    return changes


def test_a_write_sets_exactly_the_mapped_fields_and_nothing_else(tmp_path: Path):
    with sandbox(tmp_path) as box:
        oid = box.opportunity("monthly")
        before = box.raw(oid)
        box.sim.world.clock.advance(timedelta(minutes=1))
        row = _row(opportunity_id=oid, payment_frequency="quarterly", **FULL)
        changes = _write(box, oid, row)
        after = box.raw(oid)

        desired = box.writer.desired(row)
        for f, value in desired.items():
            assert same(after[f], value), (f, after[f], value)
        changed = {k for k in after if after[k] != before[k]}
        assert changed == set(changes) | {"lastActivity"}, changed
        assert set(changes) <= set(desired)
        assert after["lastActivity"] > before["lastActivity"]  # the next incremental sync reads the write
        assert box.sim.world.get(oid).amount == 100_000.0  # the amount the sync maps is the world's own

        # one PATCH to /V1.0/Opportunities: a flat body with the id and only the changed fields
        [body] = box.writes()
        assert body == {"id": int(oid), **changes}
        assert [(m, p.split("?")[0]) for m, p, _ in box.sent if m == "PATCH"] == [
            ("PATCH", "/ATServicesRest/V1.0/Opportunities")
        ]

        # a second run finds nothing to change and writes nothing; no record is ever created
        assert diff(box.writer.read_current(oid).values, desired) == {}
        opportunities = len(box.sim.world.opps)
        box.sent.clear()
        assert _write(box, oid, row) == {} and box.writes() == []
        assert len(box.sim.world.opps) == opportunities
        assert box.raw(oid) == after


def test_a_frequency_change_moves_the_recurring_revenue_and_zeroes_the_old_frequency(tmp_path: Path):
    with sandbox(tmp_path) as box:
        oid = box.opportunity("monthly")
        generated = box.raw(oid)
        assert generated["monthlyRevenue"] > 0 and generated["quarterlyRevenue"] == 0  # the sandbox's breakdown

        for frequency in ("quarterly", "yearly", "monthly"):
            _write(box, oid, _row(opportunity_id=oid, payment_frequency=frequency, ms_revenue=3_000.0, ms_cost=900.0))
            rec = box.raw(oid)
            carried = {p for p in RECURRING if rec[f"{p}Revenue"] or rec[f"{p}Cost"]}
            assert carried == {frequency}, (frequency, {k: rec[k] for k in FIELDS})
            assert rec[f"{frequency}Revenue"] == 3_000.0 and rec[f"{frequency}Cost"] == 900.0

        # a row without managed services leaves the recurring fields as they are
        before = box.raw(oid)
        _write(box, oid, _row(opportunity_id=oid, payment_frequency="yearly", ps_revenue=1.0))
        after = box.raw(oid)
        assert all(after[f"{p}{k}"] == before[f"{p}{k}"] for p in RECURRING for k in ("Revenue", "Cost"))
        assert after["onetimeRevenue"] == 1.0


def test_only_the_changed_fields_are_sent(tmp_path: Path):
    with sandbox(tmp_path) as box:
        oid = box.opportunity("yearly")
        raw = box.raw(oid)
        row = _row(
            opportunity_id=oid,
            total_contract_revenue=raw["amount"],
            total_contract_cost=raw["cost"] + 10,
            ps_revenue=raw["onetimeRevenue"],
        )
        changes = _write(box, oid, row)
        assert changes == {"cost": raw["cost"] + 10}
        assert box.writes() == [{"id": int(oid), "cost": raw["cost"] + 10}]


def test_the_revenue_fields_exist_on_the_entity_with_autotasks_casing(tmp_path: Path):
    with sandbox(tmp_path) as box:
        r = requests.get(box.api + "Opportunities/entityInformation/fields", headers=HEADERS, timeout=10)
        names = {f["name"] for f in r.json()["fields"]}
        assert set(FIELDS) <= names
        assert "oneTimeRevenue" not in names
        item = box.raw(box.opportunity("monthly"))
        assert set(FIELDS) <= set(item) and "useQuoteTotals" in item
        assert box.writer.read_current(str(item["id"])).context == {"useQuoteTotals": False}


def test_a_security_level_without_edit_stops_at_the_first_patch_naming_the_right(tmp_path: Path):
    with sandbox(tmp_path, variant="no_edit_rights") as box:
        oid = box.opportunity("monthly")
        before = box.raw(oid)
        current = box.writer.read_current(oid)  # reading is allowed
        with pytest.raises(WritePermissionError) as caught:
            box.writer.write(oid, {"amount": 1.0}, current)
        message = str(caught.value)
        assert "does not have the adequate permissions" in message  # Autotask's own words
        assert "Opportunities: View and Edit" in message and "Security Levels" in message and "grant" in message
        assert "HTTP 500" in message and caught.value.permanent
        assert len(box.writes()) == 1, "a refused write is not retried"
        assert box.raw(oid) == before


def test_the_no_edit_rights_variant_answers_in_autotasks_shape(tmp_path: Path):
    with sandbox(tmp_path, variant="no_edit_rights") as box:
        oid = int(box.opportunity("monthly"))
        for method in ("PATCH", "PUT"):
            r = requests.request(
                method, box.api + "Opportunities", json={"id": oid, "amount": 1.0}, headers=HEADERS, timeout=10
            )
            assert r.status_code == 500 and r.json() == {"errors": [at.NO_EDIT_RIGHTS]}
        r = requests.get(box.api + "Opportunities/entityInformation", headers=HEADERS, timeout=10)
        assert r.json()["info"]["userAccessForUpdate"] == "None"


def test_a_refused_run_stops_and_names_the_right(tmp_path: Path):
    sim = build_simulator("autotask", seed=4, opportunities=30, variant="no_edit_rights")
    with SandboxServer(sim) as server:
        cfg = sandbox_config({"autotask": server}, f"duckdb:///{tmp_path / 'w.duckdb'}", tmp_path)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url)
        ensure_schema(engine)
        sync_connection(cfg, conn, engine, run_id="sync-1")
        with engine.connect() as c:
            ids = [
                r[0]
                for r in c.execute(
                    text("SELECT source_id FROM oppsync.opportunities WHERE connection = :c ORDER BY 1 LIMIT 4"),
                    {"c": conn.name},
                )
            ]
        upsert_rows(engine, [revenue_row(conn.name, i, NOW) for i in ids])
        result = run_writeback(cfg, engine, conn.name, run_id="wb-1", now=NOW, sleep=lambda s: None)
        assert result.error and "Opportunities: View and Edit" in result.error
        # each refused row fails on its own; three refusals in a row stop the run before the fourth
        assert [str(r.status) for r in result.rows] == ["failed"] * 3 + ["not_attempted"]
        assert result.api_requests <= 8  # zone, threshold, then one read and one PATCH per row: no retries


def test_autotasks_error_shapes_reach_the_row(tmp_path: Path):
    with sandbox(tmp_path) as box:
        oid = box.opportunity("quarterly")
        current = box.writer.read_current(oid)

        # a field the entity does not have: 500 {"errors": [...]}, permanent, not retried, Autotask's text kept
        box.sent.clear()
        with pytest.raises(CrmError) as unknown:
            box.writer.write(oid, {"twoTimeRevenue": 1.0}, current)
        assert "Unable to find twoTimeRevenue in the Opportunity entity" in str(unknown.value)
        assert unknown.value.permanent and "Revenue write-back" in str(unknown.value)
        assert len(box.writes()) == 1

        # a value of the wrong type, and null for a field that cannot be null
        with pytest.raises(CrmError, match="not valid for field amount"):
            box.writer.write(oid, {"amount": "lots"}, current)
        with pytest.raises(CrmError, match="cost field is required"):
            box.writer.write(oid, {"cost": None}, current)

        # an opportunity deleted in Autotask since the sync: the read says so, permanent
        box.sim.world.delete(oid)
        with pytest.raises(CrmError, match="no opportunity") as gone:
            box.writer.read_current(oid)
        assert gone.value.permanent

        # the read refused (403 in Autotask's shape): the run would stop, naming the right (the sync needs View)
        readable = box.opportunity("yearly")
        box.sim.faults = FaultPlan([FaultRule("forbidden", method="GET", path=r"(?i)/opportunities/\d+$")])
        with pytest.raises(CrmError) as refused:
            box.writer.read_current(readable)
        explained = box.writer.explain(refused.value)
        assert isinstance(explained, WritePermissionError) and "read the opportunity" in str(explained)
        assert "Opportunities: View and Edit" in str(explained)
        box.sim.faults = FaultPlan()

        # a 200 that is not {"itemId": N}: the write is not taken as confirmed
        other = box.opportunity("monthly")
        box.sim.faults = FaultPlan([FaultRule("wrong_shape", method="PATCH")])
        with pytest.raises(CrmError, match="not confirmed"):
            box.writer.write(other, {"amount": 5.0}, box.writer.read_current(other))


def test_the_patch_contract_on_the_wire(tmp_path: Path):
    """What the sandbox holds Autotask to (notes §5.1), as any client meets it."""
    with sandbox(tmp_path) as box:
        oid = int(box.opportunity("monthly"))

        def patch(body: Any) -> requests.Response:
            return requests.patch(box.api + "Opportunities", data=json.dumps(body), headers=HEADERS, timeout=10)

        r = patch({"amount": 1.0})  # no id in the body
        assert r.status_code == 500 and "id" in r.json()["errors"][0]
        r = patch({"id": 1, "amount": 1.0})
        assert r.status_code == 500 and "not found" in r.json()["errors"][0]
        before = box.raw(str(oid))
        r = patch({"id": oid, "createDate": "2001-01-01T00:00:00Z", "onetimeRevenue": 7})
        assert r.status_code == 200 and r.json() == {"itemId": oid}
        after = box.raw(str(oid))
        assert after["createDate"] == before["createDate"]  # read-only: ignored
        assert after["onetimeRevenue"] == 7.0 and after["amount"] == before["amount"]
        # PUT replaces the record (why the writer never uses it): the required fields must all be there, and
        # the revenue fields left out are nulled
        r = requests.put(box.api + "Opportunities", json={"id": oid, "amount": 1.0}, headers=HEADERS, timeout=10)
        assert r.status_code == 500 and "Missing required field(s): title" in r.json()["errors"][0]
        full = {k: after[k] for k in (*at.REQUIRED, "cost", "useQuoteTotals")}
        r = requests.put(box.api + "Opportunities", json={"id": oid, **full}, headers=HEADERS, timeout=10)
        assert r.status_code == 200
        replaced = box.raw(str(oid))
        assert replaced["onetimeRevenue"] is None and replaced["monthlyRevenue"] is None
        assert replaced["amount"] == after["amount"] and replaced["cost"] == after["cost"]

        # field names without regard to case, as Autotask's own samples send them
        assert patch({"Id": str(oid), "MonthlyRevenue": 12.5}).status_code == 200
        assert box.raw(str(oid))["monthlyRevenue"] == 12.5
