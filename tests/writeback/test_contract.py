"""The write-back input table's contract: per-row validation (pure) and the table's columns (real DuckDB)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.lib.writeback import contract
from oppsync_pipeline.lib.writeback.example import revenue_row, upsert_rows

NOW = datetime(2026, 12, 1, 9, 30)


def raw(**overrides):
    return revenue_row("crm-a", "OPP-1", NOW, **overrides)


def test_a_valid_row_is_typed():
    rows, problems = contract.validate([raw(billing_method="T&M", payment_frequency=" Quarterly ")])
    assert problems == []
    (row,) = rows
    assert row.billing_method == "time_and_materials" and row.payment_frequency == "quarterly"
    assert isinstance(row.total_contract_revenue, float) and row.approval_state == "approved"


@pytest.mark.parametrize(
    ("overrides", "column", "words"),
    [
        ({"ps_cost": -1.0}, "ps_cost", "negative amount"),
        ({"total_contract_revenue": -0.01}, "total_contract_revenue", "negative amount"),
        ({"payment_frequency": "weekly"}, "payment_frequency", "unknown value 'weekly'"),
        ({"billing_method": "retainer"}, "billing_method", "unknown billing method"),
        ({"approval_state": "pending"}, "approval_state", "unknown value 'pending'"),
        ({"total_contract_revenue": None}, "total_contract_revenue", "required"),
        ({"approval_changed_at": None}, "approval_changed_at", "required"),
        ({"total_contract_revenue": "12k"}, "total_contract_revenue", "not a valid double"),
        ({"total_contract_revenue": float("nan")}, "total_contract_revenue", "not a valid double"),
        ({"mrr_term_months": 12.5}, "mrr_term_months", "not a valid integer"),
        ({"mrr_term_months": -3}, "mrr_term_months", "negative"),
        ({"include_expenses": "maybe"}, "include_expenses", "not a valid boolean"),
    ],
)
def test_a_bad_row_is_reported_with_its_column(overrides, column, words):
    rows, problems = contract.validate([raw(**overrides), revenue_row("crm-a", "OPP-2", NOW)])
    assert [r.opportunity_id for r in rows] == ["OPP-2"], "the other rows go on"
    (problem,) = problems
    assert (problem.opportunity_id, problem.column) == ("OPP-1", column)
    assert words in problem.reason


def test_unknown_opportunities_and_repeated_rows_are_refused():
    rows, problems = contract.validate(
        [raw(), raw(), revenue_row("crm-a", "OPP-9", NOW), revenue_row("crm-a", "OPP-2", NOW)],
        known_ids={"OPP-1", "OPP-2"},
    )
    assert [r.opportunity_id for r in rows] == ["OPP-2"]
    assert sorted((p.opportunity_id, p.reason.split(":")[0]) for p in problems) == [
        ("OPP-1", "appears more than once; one row per opportunity"),
        ("OPP-1", "appears more than once; one row per opportunity"),
        ("OPP-9", "unknown opportunity"),
    ]


def test_none_means_not_given_and_strings_parse():
    rows, _ = contract.validate(
        [raw(ps_revenue=None, include_expenses="yes", approval_changed_at="2026-12-01T10:00:00+01:00")]
    )
    row = rows[0]
    assert row.ps_revenue is None and row.include_expenses is True
    assert row.approval_changed_at == datetime(2026, 12, 1, 9, 0), "time zones are read and stored as UTC"


def test_aware_datetimes_become_naive_utc():
    aware = datetime(2026, 12, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    rows, _ = contract.validate([raw(approval_changed_at=aware)])
    assert rows[0].approval_changed_at == aware.astimezone(UTC).replace(tzinfo=None)


def test_the_table_exists_after_migration_and_round_trips(duckdb_url):
    engine = make_engine(duckdb_url)
    ensure_schema(engine)
    upsert_rows(engine, [raw(), raw(total_contract_revenue=5.0)])  # the second replaces the first
    rows = contract.read_rows(engine, contract.INPUT_TABLE, "crm-a")
    assert len(rows) == 1 and rows[0]["total_contract_revenue"] == 5.0
    assert contract.read_rows(engine, contract.INPUT_TABLE, "crm-b") == []


def test_a_table_missing_a_column_is_refused_naming_it(duckdb_url):
    engine = make_engine(duckdb_url)
    ensure_schema(engine)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE writeback.mine AS SELECT 'a' AS connection, 'b' AS opportunity_id"))
    with pytest.raises(contract.ContractError, match=r"lacks column\(s\) \['total_contract_revenue'"):
        contract.read_rows(engine, "writeback.mine")
    with pytest.raises(contract.ContractError, match="does not exist"):
        contract.read_rows(engine, "writeback.nothing_here")
