"""A small input table for the embedded sandbox, and a loader tests and users can call.

On the embedded default nobody has a revenue model yet: `make run` fills `writeback.opportunity_revenue` with one
approved row per sandbox connection (its first open opportunity), so the write-back can be shown end to end.
Rows a user put in the table are never replaced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.writeback.contract import COLUMNS, INPUT_TABLE


def revenue_row(connection: str, opportunity_id: str, now: datetime, **overrides: Any) -> dict[str, Any]:
    """A plausible project's numbers for one opportunity, the same for the same id (deterministic)."""
    n = int(hashlib.sha256(f"{connection}/{opportunity_id}".encode()).hexdigest()[:8], 16)
    ps = 5_000 + (n % 40) * 500.0
    ms = 500 + (n // 40 % 20) * 100.0
    term = (12, 24, 36)[n % 3]
    frequency = ("monthly", "quarterly", "yearly")[n // 3 % 3]
    periods = {"monthly": term, "quarterly": term // 3, "yearly": term // 12}[frequency]
    product = (n // 800 % 10) * 250.0
    row = {
        "connection": connection,
        "opportunity_id": opportunity_id,
        "total_contract_revenue": ps + ms * periods + product,
        "total_contract_cost": round((ps + ms * periods) * 0.6 + product * 0.8, 2),
        "ps_revenue": ps,
        "ps_cost": round(ps * 0.55, 2),
        "ms_revenue": ms,
        "ms_cost": round(ms * 0.65, 2),
        "product_revenue": product,
        "payment_frequency": frequency,
        "mrr_term_months": term,
        "include_expenses": bool(n & 1),
        "include_materials": bool(n & 2),
        "billing_method": "fixed_fee" if n & 4 else "time_and_materials",
        "approval_state": "approved",
        "approval_changed_at": now,
        "skip_crm_update": False,
    }
    row.update(overrides)
    return row


def upsert_rows(engine: Engine, rows: Iterable[Mapping[str, Any]], table: str = INPUT_TABLE) -> int:
    """Insert rows, replacing the row of the same (connection, opportunity_id): what a user's loader does."""
    latest = {(r.get("connection"), r.get("opportunity_id")): {c: r.get(c) for c in COLUMNS} for r in rows}
    rows = list(latest.values())  # the last row of a key wins, as a loader's upsert does
    if not rows:
        return 0
    names = ", ".join(COLUMNS)
    values = ", ".join(f":{c}" for c in COLUMNS)
    with transaction(engine) as c:
        for r in rows:
            c.execute(
                text(f"DELETE FROM {table} WHERE connection = :connection AND opportunity_id = :opportunity_id"), r
            )
        c.execute(text(f"INSERT INTO {table} ({names}) VALUES ({values})"), rows)
    return len(rows)


def seed_example(engine: Engine, connections: Sequence[str], now: datetime, table: str = INPUT_TABLE) -> list[dict]:
    """One approved row per connection that has none yet: its first open opportunity (by id)."""
    added = []
    with transaction(engine) as c:
        have = {r[0] for r in c.execute(text(f"SELECT DISTINCT connection FROM {table}"))}
        for name in connections:
            if name in have:
                continue
            first = c.execute(
                text(
                    "SELECT source_id FROM oppsync.opportunities WHERE connection = :c AND deleted_at IS NULL "
                    "AND status = 'open' AND (in_scope IS NULL OR in_scope) ORDER BY source_id LIMIT 1"
                ),
                {"c": name},
            ).scalar()
            if first is not None:
                added.append(revenue_row(name, first, now))
    upsert_rows(engine, added, table)
    return added
