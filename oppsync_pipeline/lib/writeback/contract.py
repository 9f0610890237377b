"""The write-back input table: one row per (connection, opportunity) with the project's revenue.

The user feeds it (their own dbt model, a table they load; on the embedded default `example.py` fills it). Its
columns are enforced like the marts' contracts: a missing column fails the run naming it; a row whose values
break the contract (unknown opportunity, negative amount, unknown payment frequency ...) is reported on its own
and never written, and the other rows go on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Boolean, Column, DateTime, Double, Integer, MetaData, String, Table, text
from sqlalchemy.engine import Connection, Engine

from oppsync_pipeline.lib.warehouse.engine import transaction

INPUT_SCHEMA = "writeback"
INPUT_TABLE = f"{INPUT_SCHEMA}.opportunity_revenue"

Frequency = Literal["monthly", "quarterly", "yearly"]
BillingMethod = Literal["fixed_fee", "time_and_materials"]
ApprovalState = Literal["draft", "submitted", "approved", "rejected"]

FREQUENCIES: tuple[str, ...] = ("monthly", "quarterly", "yearly")
BILLING_METHODS: tuple[str, ...] = ("fixed_fee", "time_and_materials")
APPROVAL_STATES: tuple[str, ...] = ("draft", "submitted", "approved", "rejected")
# How users write the two billing methods (seed 000: "Fixed Fee or T&M Payment Term Selection").
_BILLING_ALIASES = {
    "fixed_fee": "fixed_fee",
    "fixed fee": "fixed_fee",
    "fixed": "fixed_fee",
    "fixed_price": "fixed_fee",
    "fixed price": "fixed_fee",
    "time_and_materials": "time_and_materials",
    "time and materials": "time_and_materials",
    "time_and_material": "time_and_materials",
    "time and material": "time_and_materials",
    "t&m": "time_and_materials",
    "tm": "time_and_materials",
}

# column -> (SQL type, required, what it means); README "Revenue write-back" prints this table.
COLUMNS: dict[str, tuple[Any, bool, str]] = {
    "connection": (String, True, "the oppsync connection name (oppsync.yaml `connections[].name`)"),
    "opportunity_id": (String, True, "the CRM's opportunity id (`oppsync.opportunities.source_id`)"),
    "total_contract_revenue": (Double, True, "total contract revenue, >= 0"),
    "total_contract_cost": (Double, False, "total contract cost, >= 0"),
    "ps_revenue": (Double, False, "professional-services revenue (one-time, not amortised), >= 0"),
    "ps_cost": (Double, False, "professional-services cost (not amortised), >= 0"),
    "ms_revenue": (Double, False, "managed-services revenue per payment period, >= 0"),
    "ms_cost": (Double, False, "managed-services cost per payment period, >= 0"),
    "product_revenue": (Double, False, "product revenue, >= 0"),
    "payment_frequency": (String, False, "managed-services payment frequency: monthly, quarterly or yearly"),
    "mrr_term_months": (Integer, False, "managed-services term in months, >= 0"),
    "include_expenses": (Boolean, False, "the quote includes expenses (Dynamics msdyn_includeexpense)"),
    "include_materials": (Boolean, False, "the quote includes products/materials (Dynamics msdyn_includematerial)"),
    "billing_method": (String, False, "fixed_fee or time_and_materials (also 'Fixed Fee', 'T&M')"),
    "approval_state": (String, True, "draft, submitted, approved or rejected"),
    "approval_changed_at": (DateTime, True, "when approval_state last changed (UTC); the sensor's cursor"),
    "skip_crm_update": (Boolean, False, "true: the automatic update skips this row (a manual run still writes)"),
}
AMOUNT_COLUMNS = ("total_contract_revenue", "total_contract_cost", "ps_revenue", "ps_cost", "ms_revenue", "ms_cost")
AMOUNT_COLUMNS += ("product_revenue",)

input_metadata = MetaData(schema=INPUT_SCHEMA)
opportunity_revenue = Table(
    "opportunity_revenue",
    input_metadata,
    *[Column(name, type_, nullable=not required) for name, (type_, required, _) in COLUMNS.items()],
)


class ContractError(Exception):
    """The input table itself breaks the contract (missing, or a column missing): nothing can be written."""


@dataclass(frozen=True)
class RevenueRow:
    """One validated row of the input table. None means "not given": the field it feeds is left as it is."""

    connection: str
    opportunity_id: str
    total_contract_revenue: float
    approval_state: str
    approval_changed_at: datetime
    total_contract_cost: float | None = None
    ps_revenue: float | None = None
    ps_cost: float | None = None
    ms_revenue: float | None = None
    ms_cost: float | None = None
    product_revenue: float | None = None
    payment_frequency: str | None = None
    mrr_term_months: int | None = None
    include_expenses: bool | None = None
    include_materials: bool | None = None
    billing_method: str | None = None
    skip_crm_update: bool = False


@dataclass(frozen=True)
class RowProblem:
    """A row that breaks the contract: reported (and audited) per row, never written."""

    connection: str | None
    opportunity_id: str | None
    column: str
    reason: str

    def __str__(self) -> str:
        return f"{self.connection}/{self.opportunity_id}: {self.column}: {self.reason}"


def create_input_table(conn: Connection) -> None:
    """The empty input table, where none exists (a user's dbt model or loader may own it instead)."""
    conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {INPUT_SCHEMA}"))
    opportunity_revenue.create(conn, checkfirst=True)


def check_columns(engine: Engine, table: str) -> None:
    """The table exists and has every contracted column (extra columns are allowed and ignored)."""
    schema, _, name = table.rpartition(".")
    with transaction(engine) as c:
        found = {
            r[0].lower()
            for r in c.execute(
                text(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = :t"
                    + (" AND table_schema = :s" if schema else "")
                ),
                {"t": name, "s": schema},
            )
        }
    if not found:
        raise ContractError(
            f"write-back input table {table} does not exist: create it (README: Revenue write-back, input table) "
            "or point `writeback.table` in oppsync.yaml at yours"
        )
    missing = [c for c in COLUMNS if c not in found]
    if missing:
        raise ContractError(
            f"write-back input table {table} lacks column(s) {missing}; the contract is in README "
            "(Revenue write-back, input table)"
        )


def read_rows(
    engine: Engine,
    table: str,
    connection: str | None = None,
    opportunity_ids: Sequence[str] | None = None,
    changed_after: datetime | None = None,
) -> list[dict[str, Any]]:
    """The table's raw rows (of one connection, of some opportunities, whose approval changed after a moment),
    contracted columns only."""
    check_columns(engine, table)
    where, params = [], {}
    if changed_after is not None:
        where.append("approval_changed_at > :changed_after")
        params["changed_after"] = changed_after
    if connection is not None:
        where.append("connection = :c")
        params["c"] = connection
    if opportunity_ids:
        names = [f":o{i}" for i in range(len(opportunity_ids))]
        where.append(f"opportunity_id IN ({', '.join(names)})")
        params.update({f"o{i}": v for i, v in enumerate(opportunity_ids)})
    sql = f"SELECT {', '.join(COLUMNS)} FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
    with transaction(engine) as c:
        return [dict(r._mapping) for r in c.execute(text(sql + " ORDER BY connection, opportunity_id"), params)]


def validate(
    raw_rows: Iterable[dict[str, Any]], known_ids: set[str] | None = None
) -> tuple[list[RevenueRow], list[RowProblem]]:
    """Rows that keep the contract, and one problem per row that does not (its first broken column).
    `known_ids`: the connection's live opportunities (oppsync.opportunities); an id not among them is refused."""
    rows, problems = [], []
    raw_rows = list(raw_rows)
    seen = Counter((r.get("connection"), r.get("opportunity_id")) for r in raw_rows)
    repeated = {k for k, n in seen.items() if n > 1}
    for raw in raw_rows:
        key = (raw.get("connection"), raw.get("opportunity_id"))
        if key in repeated:
            problems.append(RowProblem(*key, "opportunity_id", "appears more than once; one row per opportunity"))
            continue
        try:
            row = _row(raw)
        except _Bad as bad:
            problems.append(RowProblem(*key, bad.column, bad.reason))
            continue
        if known_ids is not None and row.opportunity_id not in known_ids:
            problems.append(
                RowProblem(
                    *key,
                    "opportunity_id",
                    "unknown opportunity: not a live opportunity of this connection in oppsync.opportunities "
                    "(sync the connection first, or fix the id)",
                )
            )
            continue
        rows.append(row)
    return rows, problems


class _Bad(Exception):
    def __init__(self, column: str, reason: str):
        self.column, self.reason = column, reason


def _row(raw: dict[str, Any]) -> RevenueRow:
    values: dict[str, Any] = {}
    for name, (type_, required, _) in COLUMNS.items():
        v = raw.get(name)
        if v is None or (isinstance(v, str) and not v.strip()):
            if required:
                raise _Bad(name, "is required")
            continue
        values[name] = _typed(name, type_, v)
    for name in AMOUNT_COLUMNS:
        if name in values and values[name] < 0:
            raise _Bad(name, f"negative amount {values[name]:g}; amounts are >= 0")
    if values.get("mrr_term_months", 0) < 0:
        raise _Bad("mrr_term_months", f"{values['mrr_term_months']} is negative")
    if "payment_frequency" in values:
        values["payment_frequency"] = _one_of("payment_frequency", values["payment_frequency"], FREQUENCIES)
    if "billing_method" in values:
        method = _BILLING_ALIASES.get(values["billing_method"].strip().lower())
        if method is None:
            raise _Bad(
                "billing_method", f"unknown billing method {values['billing_method']!r}; one of {BILLING_METHODS}"
            )
        values["billing_method"] = method
    values["approval_state"] = _one_of("approval_state", values["approval_state"], APPROVAL_STATES)
    values["skip_crm_update"] = bool(values.get("skip_crm_update", False))
    return RevenueRow(**values)


def _one_of(column: str, value: str, allowed: tuple[str, ...]) -> str:
    v = value.strip().lower()
    if v not in allowed:
        raise _Bad(column, f"unknown value {value!r}; one of {list(allowed)}")
    return v


def _typed(name: str, type_: Any, v: Any) -> Any:
    try:
        if type_ is Double:
            f = float(v)
            if not math.isfinite(f):
                raise ValueError
            return round(f, 2)
        if type_ is Integer:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            return int(v)
        if type_ is Boolean:
            if isinstance(v, str):
                lowered = v.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            return bool(v)
        if type_ is DateTime:
            parsed = v if isinstance(v, datetime) else datetime.fromisoformat(str(v).replace("Z", "+00:00"))
            return parsed if parsed.tzinfo is None else parsed.astimezone(UTC).replace(tzinfo=None)
        return str(v)
    except (TypeError, ValueError):
        raise _Bad(name, f"{v!r} is not a valid {type_.__name__.lower()}") from None
