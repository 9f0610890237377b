"""The shared field map (lib/crm/fields.py): pure functions, no CRM, no network."""

from __future__ import annotations

from datetime import date, datetime

import pytest

from oppsync_pipeline.lib.config import OVERRIDABLE_FIELDS, ConnectionConfig, RecordFilter
from oppsync_pipeline.lib.crm.autotask import AutotaskConnector
from oppsync_pipeline.lib.crm.connectwise import ConnectWiseConnector
from oppsync_pipeline.lib.crm.dynamics import DynamicsConnector
from oppsync_pipeline.lib.crm.fields import KINDS, FieldMap, as_id, configured_fields, fields_to_read, read_fields
from oppsync_pipeline.lib.crm.hubspot import HubSpotConnector
from oppsync_pipeline.lib.crm.salesforce import SalesforceConnector
from oppsync_pipeline.lib.record import BadValue

CONNECTORS = (SalesforceConnector, HubSpotConnector, DynamicsConnector, ConnectWiseConnector, AutotaskConnector)

MAP = FieldMap(
    project_name="Name",
    client_name=None,
    sales_executive="Owner.Name",
    stage="StageName",
    amount="Amount",
    close_date="CloseDate",
    probability="Probability",
    created_at="CreatedDate",
    created_by_crm_id="CreatedById",
)
RECORD = {
    "Name": "Deal\x00 1",
    "Owner": {"Name": "Dana"},
    "Amount": "1250.5",
    "CloseDate": "2026-03-31",
    "Probability": 40,
    "CreatedDate": "2026-01-02T03:04:05.000+0000",
    "CreatedById": 5,
    "Custom_Created__c": "2025-12-01T00:00:00Z",
    "Empty__c": "",
}


def dotted(record: dict, path: str):
    for part in path.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def test_every_overridable_field_has_a_kind_or_is_the_stage():
    assert set(KINDS) | {"stage"} == set(OVERRIDABLE_FIELDS)


@pytest.mark.parametrize("connector", CONNECTORS, ids=lambda c: c.crm)
def test_every_connector_declares_a_complete_field_map(connector):
    field_map = connector.field_map
    assert set(field_map) == set(OVERRIDABLE_FIELDS)
    assert all(v is None or isinstance(v, str) and v for v in field_map.values())


def test_a_field_map_must_name_every_overridable_field_once():
    with pytest.raises(ValueError, match="missing"):
        FieldMap(project_name="Name")
    with pytest.raises(ValueError, match="unknown.*creator"):
        FieldMap(**dict(MAP), creator="CreatedById")


def test_defaults_are_read_and_converted_by_kind():
    got = read_fields(RECORD, MAP, {}, value=dotted)
    assert got == {
        "project_name": "Deal 1",
        "sales_executive": "Dana",
        "amount": 1250.5,
        "close_date": date(2026, 3, 31),
        "probability": 40.0,
        "created_at": datetime(2026, 1, 2, 3, 4, 5),
        "created_by_crm_id": "5",
    }
    assert "client_name" not in got and "stage" not in got  # derived without a derivation; the stage: the connector's


def test_an_override_replaces_the_default_and_a_derivation():
    calls = []

    def derive():
        calls.append(1)
        return "from enrichment"

    got = read_fields(
        RECORD,
        MAP,
        {"created_at": "Custom_Created__c", "client_name": "Owner.Name"},
        value=dotted,
        derived={"client_name": derive},
    )
    assert got["created_at"] == datetime(2025, 12, 1) and got["client_name"] == "Dana" and calls == []
    got = read_fields(RECORD, MAP, {}, value=dotted, derived={"client_name": derive})
    assert got["client_name"] == "from enrichment" and calls == [1]


def test_a_derivation_for_a_field_the_map_reads_is_refused():
    with pytest.raises(TypeError, match="amount"):
        read_fields(RECORD, MAP, {}, value=dotted, derived={"amount": lambda: 1.0})


def test_text_and_ids_read_as_the_connector_says():
    got = read_fields(RECORD, MAP, {}, value=dotted, text=lambda r, n: f"<{n}>", ident=lambda v: f"user-{v}")
    assert (got["project_name"], got["sales_executive"], got["created_by_crm_id"]) == (
        "<Name>",
        "<Owner.Name>",
        "user-5",
    )
    assert as_id("") is None and as_id(None) is None and as_id(7) == "7"


def test_missing_and_empty_values_read_as_none():
    got = read_fields({}, MAP, {"amount": "Empty__c"}, value=dotted)
    assert set(got.values()) == {None}


def test_an_unreadable_value_raises_for_the_quarantine_and_the_input_is_untouched():
    record = dict(RECORD, CreatedDate="31/12/2025 10:00")
    before = repr(record)
    with pytest.raises(BadValue):
        read_fields(record, MAP, {}, value=dotted)
    assert repr(record) == before


def conn(**kwargs) -> ConnectionConfig:
    return ConnectionConfig(
        name="x",
        crm="salesforce",
        base_url="https://example.my.salesforce.com",
        credentials={"client_id": "${A}", "client_secret": "${B}"},
        **kwargs,
    )


def test_configured_fields_name_their_config_keys():
    c = conn(
        fields={"created_at": "Original_Created_Date__c"},
        filters=[RecordFilter(field="Amount", op="at_least", value=1000)],
    )
    assert list(configured_fields(c)) == [
        ("fields.created_at", "Original_Created_Date__c"),
        ("filters[0].field", "Amount"),
    ]


def test_fields_to_read_adds_the_configured_fields_once():
    c = conn(
        fields={"created_at": "createddate", "client_name": "Partner__r.Name"},
        filters=[RecordFilter(field="Amount", op="at_least", value=1000)],
    )
    assert fields_to_read(["Id", "Amount", "CreatedDate"], c) == [
        "Id",
        "Amount",
        "CreatedDate",
        "createddate",
        "Partner__r.Name",
    ]
    assert fields_to_read(["Id", "Amount", "CreatedDate"], c, key=str.lower) == [
        "Id",
        "Amount",
        "CreatedDate",
        "Partner__r.Name",
    ]
