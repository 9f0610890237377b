"""`extra_fields:` (issue 19 item 4): more CRM fields per connection, read by the connector with the record
(the same field selection and validation as `fields:` overrides) and stored raw as JSON for dbt to type
(marts.opportunity_fields, tested on both backends in tests/dbt/test_rich_marts.py). Here: the configuration's
clear errors, and the values read against the simulators' own data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oppsync_pipeline.lib.config import ConfigError, parse_config
from oppsync_pipeline.lib.crm.base import CrmError
from oppsync_pipeline.lib.crm.registry import connector_class
from oppsync_pipeline.lib.sync import build_connector
from oppsync_pipeline.sandbox.cluster import build_simulator
from oppsync_pipeline.sandbox.connectwise import REGIONS
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import sandbox_config


def _problems(*connections: dict[str, Any]) -> str:
    base = {"crm": "salesforce", "base_url": "https://x.my.salesforce.com"}
    with pytest.raises(ConfigError) as err:
        parse_config({"connections": [{**base, "name": f"c{i}", **c} for i, c in enumerate(connections)]})
    return "\n".join(err.value.problems)


@pytest.mark.parametrize(
    "extra, key, hint",
    [
        ({"Lead-Source": {"field": "LeadSource"}}, "connections[0].extra_fields", "lowercase letters"),
        ({"source_id": {"field": "LeadSource"}}, "connections[0].extra_fields", "fixed column"),
        ({"lead_source": {"field": "LeadSource", "type": "money"}}, "extra_fields.lead_source.type", "'text'"),
        ({"lead_source": {}}, "extra_fields.lead_source.field", ""),
        ({"lead_source": {"field": "LeadSource", "kind": "text"}}, "extra_fields.lead_source.kind", ""),
    ],
)
def test_bad_extra_fields_name_the_key(extra: dict, key: str, hint: str):
    problems = _problems({"extra_fields": extra})
    assert key in problems and hint in problems, problems


def test_one_column_has_one_type_across_connections():
    problems = _problems(
        {"extra_fields": {"seats": {"field": "Seats__c", "type": "integer"}}},
        {"extra_fields": {"seats": {"field": "Seats2__c", "type": "text"}}},
    )
    assert "connections[1].extra_fields.seats.type" in problems and "connections[0]" in problems, problems


def test_an_unknown_field_is_refused_before_any_request():
    cfg = parse_config(
        {
            "connections": [
                {
                    "name": "sf",
                    "crm": "salesforce",
                    "base_url": "https://x.my.salesforce.com",
                    "extra_fields": {"source": {"field": "NoSuchField"}},
                }
            ]
        }
    )
    problems = connector_class("salesforce").validate_connection(cfg.connections[0])
    assert any(p.startswith("extra_fields.source.field: unknown salesforce field 'NoSuchField'") for p in problems)


def _read(crm: str, sim: Any, extra_fields: dict[str, Any], tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    with SandboxServer(sim) as srv:
        extra = {crm: {"extra_fields": extra_fields}}
        if crm == "hubspot":
            extra[crm]["options"] = {"search_requests_per_second": 0}  # test speed only
        cfg = sandbox_config({crm: srv}, f"duckdb:///{tmp_path}/unused.duckdb", tmp_path, extra)
        connector = build_connector(cfg, cfg.connections[0], sleep=lambda s: None)
        connector.discover_tenant()
        got = {o.source_id: o for open_set in (True, False) for p in connector.opportunities(open_set, None) for o in p}
        return connector, got


def test_salesforce_reads_extra_fields_in_its_select_list(tmp_path: Path):
    sim = build_simulator("salesforce", seed=3, opportunities=20)
    want = {}
    for i, o in enumerate(sim.world.live()):  # the tenant's values: a lead source on every other record
        o.extra = {**(o.extra or {}), "LeadSource": "Web" if i % 2 else None}
        want[o.native_id] = {"lead_source": "Web"} if i % 2 else None
    connector, got = _read("salesforce", sim, {"lead_source": {"field": "LeadSource"}}, tmp_path)
    assert "LeadSource" in connector.opportunity_soql(True, None)
    assert {sid: o.extra_fields and json.loads(o.extra_fields) for sid, o in got.items()} == want


def test_a_field_the_tenant_lacks_is_named_by_its_key(tmp_path: Path):
    sim = build_simulator("salesforce", seed=3, opportunities=5)
    with pytest.raises(CrmError, match=r"extra_fields\.region\.field"):
        _read("salesforce", sim, {"region": {"field": "Region__c"}}, tmp_path)


def test_autotask_reads_a_user_defined_field(tmp_path: Path):
    sim = build_simulator("autotask", seed=3, opportunities=20)
    _, got = _read("autotask", sim, {"region": {"field": "udf:Region"}}, tmp_path)
    want = {o.native_id: sim._udf(o, "Region") for o in sim.world.live()}
    assert any(want.values()), "the tenant must hold values for this test to mean anything"
    assert {sid: json.loads(o.extra_fields or "{}").get("region") for sid, o in got.items()} == want


def test_hubspot_asks_for_the_extra_properties(tmp_path: Path):
    sim = build_simulator("hubspot", seed=3, opportunities=5)
    connector, got = _read("hubspot", sim, {"source": {"field": "hs_analytics_source"}}, tmp_path)
    assert got and "hs_analytics_source" in connector._properties()


def test_connectwise_reads_a_custom_field(tmp_path: Path):
    sim = build_simulator("connectwise", seed=3, opportunities=12)
    _, got = _read("connectwise", sim, {"region": {"field": "custom:Region"}}, tmp_path)
    want = {o.native_id: (o.extra or {}).get("Region", REGIONS[o.seq % len(REGIONS)]) for o in sim.world.live()}
    assert {sid: json.loads(o.extra_fields or "{}").get("region") for sid, o in got.items()} == want


def test_dynamics_selects_the_extra_column(tmp_path: Path):
    sim = build_simulator("dynamics", seed=3, opportunities=12)
    want = {}
    for i, o in enumerate(sim.world.live()):
        o.extra = {**(o.extra or {}), "description": f"note {i}" if i % 3 else None}
        want[o.native_id] = {"notes": f"note {i}"} if i % 3 else None
    connector, got = _read("dynamics", sim, {"notes": {"field": "description"}}, tmp_path)
    assert "description" in connector._select().split(",")
    assert {sid: o.extra_fields and json.loads(o.extra_fields) for sid, o in got.items()} == want
