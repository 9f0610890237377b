"""Every query of the outcomes dashboard, over the `marts` schema only, the same SQL on DuckDB and Postgres.

Numbers are sums of marts.outcomes rows, so totals equal the mart's by construction; the drill-down lists
marts.opportunities rows with the mart's own crediting rule (int_outcome_activities: created -> the creator at
created_at; won / lost -> the owner at close at closed_at; deleted and out-of-scope opportunities excluded).
Values come in as bound parameters; the only text written into SQL is taken from the fixed tables below.
New mart columns (base-currency amounts, expected revenue, ...) are one entry in METRICS / DRILL_COLUMNS.
"""

from __future__ import annotations

from datetime import date, datetime

import pandas as pd
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from oppsync_pipeline.lib.dashboard.filters import Filters

ACTIVITIES = ("created", "won", "lost")

# activity -> the marts.outcomes count column, for all opportunities and for qualified ones only (seed 004)
COUNTS = {
    False: {a: f"opportunities_{a}" for a in ACTIVITIES},
    True: {a: f"opportunities_{a}_qualified" for a in ACTIVITIES},
}
# activity -> amount column; the mart has no qualified amounts, so they are shown for "all" only
AMOUNTS = {a: f"amount_{a}" for a in ACTIVITIES}

# what a drill-down row shows from marts.opportunities
DRILL_COLUMNS = (
    "connection",
    "source_id",
    "project_name",
    "client_name",
    "stage",
    "status",
    "amount",
    "currency",
    "is_qualified",
    "created_at_local",
    "created_by_user_id",
    "created_by_user_name",
    "closed_at_local",
    "owner_at_close_user_id",
    "owner_at_close_user_name",
)
# activity -> (user column credited, local time column, extra condition), as int_outcome_activities credits them
CREDIT = {
    "created": ("created_by_user_id", "created_at_local", "created_at IS NOT NULL"),
    "won": ("owner_at_close_user_id", "closed_at_local", "stage_category = 'won' AND closed_at IS NOT NULL"),
    "lost": ("owner_at_close_user_id", "closed_at_local", "stage_category = 'lost' AND closed_at IS NOT NULL"),
}


def _where(f: Filters) -> tuple[str, dict]:
    """The WHERE clause over marts.outcomes for a view, and its parameters."""
    clauses, params = ["period_grain = :grain"], {"grain": f.grain}
    if f.start is not None:
        clauses.append("period_start >= :start")
        params["start"] = f.start
    if f.end is not None:
        clauses.append("period_start <= :end")
        params["end"] = f.end
    if f.connections:
        clauses.append("connection IN :connections")
        params["connections"] = list(f.connections)
    if f.user_ids:
        clauses.append("user_id IN :user_ids")
        params["user_ids"] = list(f.user_ids)
    return " AND ".join(clauses), params


def _statement(sql: str, params: dict):
    stmt = text(sql)
    expanding = [bindparam(k, expanding=True) for k, v in params.items() if isinstance(v, list)]
    return stmt.bindparams(*expanding) if expanding else stmt


def _metrics(f: Filters) -> str:
    """SUMs of counts (qualified or all) and amounts, win rate by count, and the amounts' currency."""
    counts = COUNTS[f.qualified]
    parts = [f"CAST(coalesce(sum({counts[a]}), 0) AS BIGINT) AS {a}" for a in ACTIVITIES]
    won, lost = f"sum({counts['won']})", f"sum({counts['lost']})"
    parts.append(
        f"CAST(CASE WHEN {won} + {lost} > 0 THEN 1.0 * {won} / ({won} + {lost}) END AS DOUBLE PRECISION) AS win_rate"
    )
    for a in ACTIVITIES:
        amount = "NULL" if f.qualified else f"coalesce(sum({AMOUNTS[a]}), 0)"
        parts.append(f"CAST({amount} AS DOUBLE PRECISION) AS amount_{a}")
    # rows of one currency keep it; rows of several are MIXED, as the mart itself marks them
    parts.append(
        "CASE WHEN min(currency) = max(currency) THEN min(currency) WHEN min(currency) IS NOT NULL THEN 'MIXED' "
        "END AS currency"
    )
    return ", ".join(parts)


def _frame(conn: Connection, sql: str, params: dict) -> pd.DataFrame:
    result = conn.execute(_statement(sql, params), params)
    return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def totals(conn: Connection, f: Filters) -> dict:
    """One set of numbers for the whole view: created, won, lost, win rate, amounts."""
    where, params = _where(f)
    frame = _frame(conn, f"SELECT {_metrics(f)} FROM marts.outcomes WHERE {where}", params)
    return frame.iloc[0].to_dict()


def per_period(conn: Connection, f: Filters) -> pd.DataFrame:
    """One row per period of the view (periods without activity included, as zeros, when the mart has them)."""
    where, params = _where(f)
    sql = (
        f"SELECT period_start, {_metrics(f)} FROM marts.outcomes WHERE {where} "
        "GROUP BY period_start ORDER BY period_start"
    )
    frame = _frame(conn, sql, params)
    frame["period_start"] = pd.to_datetime(frame["period_start"]).dt.date
    return frame


def per_user(conn: Connection, f: Filters) -> pd.DataFrame:
    """One row per internal user across the chosen connections ('unmapped' collects CRM users without a link),
    most opportunities created first."""
    where, params = _where(f)
    sql = (
        f"SELECT user_id, max(user_name) AS user_name, {_metrics(f)} FROM marts.outcomes WHERE {where} "
        "GROUP BY user_id ORDER BY created DESC, won DESC, user_id"
    )
    return _frame(conn, sql, params)


def per_user_period(conn: Connection, f: Filters) -> pd.DataFrame:
    """Counts per user and period: the per-user table's trend."""
    where, params = _where(f)
    counts = COUNTS[f.qualified]
    sums = ", ".join(f"CAST(sum({counts[a]}) AS BIGINT) AS {a}" for a in ACTIVITIES)
    sql = (
        f"SELECT user_id, period_start, {sums} FROM marts.outcomes WHERE {where} "
        "GROUP BY user_id, period_start ORDER BY user_id, period_start"
    )
    frame = _frame(conn, sql, params)
    frame["period_start"] = pd.to_datetime(frame["period_start"]).dt.date
    return frame


def trends(per_user_period_frame: pd.DataFrame, periods: list[date], activity: str = "created") -> dict[str, list]:
    """user_id -> the activity's count in each of `periods` (0 where the user has no row): a sparkline's data."""
    series: dict[str, dict[date, int]] = {}
    for row in per_user_period_frame.itertuples(index=False):
        series.setdefault(row.user_id, {})[row.period_start] = int(getattr(row, activity))
    return {user: [by_period.get(p, 0) for p in periods] for user, by_period in series.items()}


def opportunities(
    conn: Connection, f: Filters, activity: str, user_id: str | None = None, period: date | None = None
) -> pd.DataFrame:
    """The opportunities behind a number: those credited with `activity` to `user_id` (any user of the view
    when None) in `period` (every period of the view when None). Their count is the number shown."""
    if activity not in CREDIT:
        raise ValueError(f"activity must be one of {ACTIVITIES}, not {activity!r}")
    user_col, local_col, condition = CREDIT[activity]
    period_of = f"CAST(date_trunc('{f.grain}', {local_col}) AS DATE)"
    clauses = ["NOT is_deleted", "is_in_scope", condition]
    params: dict = {}
    bounds = (period, period) if period is not None else (f.start, f.end)
    if bounds[0] is not None:
        clauses.append(f"{period_of} >= :start")
        params["start"] = bounds[0]
    if bounds[1] is not None:
        clauses.append(f"{period_of} <= :end")
        params["end"] = bounds[1]
    if f.connections:
        clauses.append("connection IN :connections")
        params["connections"] = list(f.connections)
    users = [user_id] if user_id is not None else list(f.user_ids)
    if users:
        clauses.append(f"{user_col} IN :user_ids")
        params["user_ids"] = users
    if f.qualified:
        clauses.append("is_qualified")
    sql = (
        f"SELECT {', '.join(DRILL_COLUMNS)}, {period_of} AS period_start FROM marts.opportunities "
        f"WHERE {' AND '.join(clauses)} ORDER BY {local_col}, connection, source_id"
    )
    return _frame(conn, sql, params)


def choices(conn: Connection) -> dict:
    """What the filters offer: connections, users (id -> name) and the first / last period of each grain."""
    connections = [r[0] for r in conn.execute(text("SELECT DISTINCT connection FROM marts.outcomes ORDER BY 1"))]
    users = dict(
        conn.execute(text("SELECT user_id, max(user_name) FROM marts.outcomes GROUP BY user_id ORDER BY 2, 1")).all()
    )
    bounds = {
        grain: (_as_date(lo), _as_date(hi))
        for grain, lo, hi in conn.execute(
            text("SELECT period_grain, min(period_start), max(period_start) FROM marts.outcomes GROUP BY 1")
        )
    }
    return {"connections": connections, "users": users, "bounds": bounds}


def as_of(conn: Connection) -> datetime | None:
    """The time the mart's data is current to (naive UTC): the latest successful sync it saw."""
    value = conn.execute(text("SELECT max(last_synced_at) FROM marts.opportunities")).scalar()
    return pd.Timestamp(value).to_pydatetime() if value is not None else None


def _as_date(value) -> date:
    return value if isinstance(value, date) and not isinstance(value, datetime) else pd.Timestamp(value).date()
