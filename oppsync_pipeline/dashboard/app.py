"""The outcomes dashboard (Streamlit): `oppsync dashboard` / `make dashboard` start it.

Reads only the `marts` schema, through lib/dashboard (queries.py holds every SQL statement; source.py opens the
warehouse read-only for one page's queries and closes it, so syncs are never kept out of the DuckDB file).
The configuration comes from $OPPSYNC_CONFIG or ./oppsync.yaml, as for every other command.
"""

from __future__ import annotations

from datetime import date

import pandas as pd
import streamlit as st
from sqlalchemy.exc import ProgrammingError

from oppsync_pipeline.lib.config import ConfigError, load_config
from oppsync_pipeline.lib.dashboard import queries
from oppsync_pipeline.lib.dashboard.charts import outcomes_chart
from oppsync_pipeline.lib.dashboard.filters import (
    GRAINS,
    Filters,
    chosen_users,
    next_period_start,
    partial_period,
    period_start,
    team_members,
)
from oppsync_pipeline.lib.dashboard.source import WarehouseBusy, read_only

CACHE_SECONDS = 30  # a page load reads the warehouse at most this often per view; "Refresh" reads it now
DEFAULT_PERIODS = 12

st.set_page_config(page_title="Outcomes · oppsync", page_icon="📈", layout="wide")

try:
    cfg = load_config()
except ConfigError as err:
    st.error(f"oppsync.yaml: {err}")
    st.stop()
URL = cfg.warehouse.url
TZ = cfg.reporting.timezone


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_choices(url: str) -> tuple[dict, object]:
    with read_only(url) as conn:
        return queries.choices(conn), queries.as_of(conn)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_view(url: str, f: Filters) -> dict:
    # one short read-only connection for the whole page: DuckDB's file is free again when it returns
    with read_only(url) as conn:
        return {
            "totals": queries.totals(conn, f),
            "periods": queries.per_period(conn, f),
            "users": queries.per_user(conn, f),
            "user_periods": queries.per_user_period(conn, f),
        }


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_drill(url: str, f: Filters, activity: str, user_id: str | None, period: date | None) -> pd.DataFrame:
    with read_only(url) as conn:
        return queries.opportunities(conn, f, activity, user_id=user_id, period=period)


def periods_between(grain: str, first: date, last: date) -> list[date]:
    out, p = [], period_start(grain, first)
    while p <= last:
        out.append(p)
        p = next_period_start(grain, p)
    return out


def fmt_amount(value: float | None, currency: str | None) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    return f"{value:,.0f} {currency or ''}".strip()


st.title("Outcomes")
try:
    options, as_of = load_choices(URL)
except FileNotFoundError as err:
    st.error(str(err))
    st.stop()
except WarehouseBusy as err:
    st.warning(f"A sync is writing the warehouse: {err}")
    st.stop()
except ProgrammingError:
    st.error("marts.outcomes was not found: build the mart first (`oppsync run`, or `make run` on the sandbox).")
    st.stop()
if not options["bounds"]:
    st.info("marts.outcomes is empty: sync a connection and build the mart (`oppsync run`).")
    st.stop()

# -- filters ----------------------------------------------------------------------------------------------------
with st.sidebar:
    st.header("Filters")
    grain = st.radio("Period", GRAINS, index=GRAINS.index("week"), horizontal=True, key="grain")
    first, last = options["bounds"][grain]
    all_periods = periods_between(grain, first, last)
    start, end = st.select_slider(
        "Period range",
        options=all_periods,
        value=(all_periods[max(0, len(all_periods) - DEFAULT_PERIODS)], all_periods[-1]),
        format_func=lambda d: f"{d:%Y-%m-%d}",
        key=f"range_{grain}",
    )
    connections = st.multiselect("Connection", options["connections"], placeholder="all connections", key="conn")
    teams = st.multiselect(
        "Team",
        list(cfg.teams),
        placeholder="all teams" if cfg.teams else "no teams: add teams: to oppsync.yaml",
        disabled=not cfg.teams,
        key="team",
    )
    users = st.multiselect(
        "User",
        list(options["users"]),
        format_func=lambda u: options["users"].get(u) or u,
        placeholder="all users",
        key="user",
    )
    qualified = st.toggle(
        "Qualified only",
        help="Seed 004: count only opportunities that are or were in a qualified stage (the connection's "
        "`qualification:`). Amounts are shown for all opportunities only.",
        key="qualified",
    )
    if st.button("Refresh", help="read the warehouse again now"):
        st.cache_data.clear()

user_ids = chosen_users(tuple(users), team_members(cfg, teams) if teams else None)
if user_ids is None:
    st.warning("No user is both in the chosen teams and among the chosen users.")
    st.stop()
view = Filters(
    grain=grain, start=start, end=end, connections=tuple(connections), user_ids=user_ids, qualified=qualified
)
data = load_view(URL, view)
partial = partial_period(grain, as_of, TZ)
if as_of is not None:
    st.caption(
        f"Data as of the last sync the mart has seen: {as_of:%Y-%m-%d %H:%M} UTC. Periods in {TZ}"
        + (", weeks start Monday" if grain == "week" else "")
        + (f"; the {grain} of {partial:%Y-%m-%d} is partial (not over yet)." if partial else ".")
    )

# -- totals -----------------------------------------------------------------------------------------------------
t = data["totals"]
cols = st.columns(5)
cols[0].metric("Created", f"{int(t['created']):,}")
cols[1].metric("Won", f"{int(t['won']):,}")
cols[2].metric("Lost", f"{int(t['lost']):,}")
cols[3].metric("Win rate", "n/a" if pd.isna(t["win_rate"]) else f"{t['win_rate']:.1%}")
amount_label = "Amount won" + ("" if t["currency"] in (None, "MIXED") else f" ({t['currency']})")
cols[4].metric(
    amount_label,
    fmt_amount(t["amount_won"], None),
    help="Sums in each opportunity's own currency"
    + (": several currencies are mixed here (no conversion)." if t["currency"] == "MIXED" else "."),
)

# -- chart ------------------------------------------------------------------------------------------------------
periods = data["periods"]
st.subheader(f"Opportunities per {grain}")
picked = st.altair_chart(outcomes_chart(periods, partial), width="stretch", on_select="rerun", key="chart", theme=None)
with st.expander(f"Numbers per {grain}"):
    table = periods.assign(
        period=[f"{p:%Y-%m-%d}" + (" (partial)" if p == partial else "") for p in periods["period_start"]]
    )
    st.dataframe(
        table[["period", "created", "won", "lost", "win_rate", "amount_created", "amount_won", "currency"]],
        hide_index=True,
        column_config={"win_rate": st.column_config.NumberColumn("win rate", format="percent")},
        key="period_table",
    )

# -- per user ---------------------------------------------------------------------------------------------------
st.subheader("Per user")
per_user = data["users"]
trend = queries.trends(data["user_periods"], list(periods["period_start"]))
per_user = per_user.assign(trend=[trend.get(u, []) for u in per_user["user_id"]])
picked_user = st.dataframe(
    per_user[["user_name", "created", "won", "lost", "win_rate", "amount_created", "amount_won", "currency", "trend"]],
    hide_index=True,
    on_select="rerun",
    selection_mode="single-row",
    key="user_table",
    column_config={
        "user_name": st.column_config.TextColumn("user"),
        "win_rate": st.column_config.NumberColumn("win rate", format="percent"),
        "amount_created": st.column_config.NumberColumn("amount created", format="localized"),
        "amount_won": st.column_config.NumberColumn("amount won", format="localized"),
        "trend": st.column_config.BarChartColumn(f"created per {grain}", y_min=0),
    },
)

# -- drill-down -------------------------------------------------------------------------------------------------
st.subheader("Opportunities behind a number")
st.caption("Select a user in the table, or click a bar in the chart, or choose below.")
chart_pick = (picked.selection.get("pick") or [{}])[0] if picked else {}
if chart_pick:
    st.caption(f"Picked in the chart: {chart_pick.get('outcome')} in the {grain} of {chart_pick.get('period')}")
rows = picked_user.selection.rows if picked_user else []
default_user = per_user["user_id"].iloc[rows[0]] if rows else None
period_labels = {None: "every period in range"} | {p: f"{p:%Y-%m-%d}" for p in periods["period_start"]}
default_period = next((p for p, label in period_labels.items() if label == chart_pick.get("period", "")[:10]), None)
c1, c2, c3 = st.columns(3)
activity = c1.radio(
    "Outcome",
    queries.ACTIVITIES,
    index=queries.ACTIVITIES.index(chart_pick.get("outcome", "created")),
    horizontal=True,
    key=f"drill_activity_{chart_pick.get('outcome')}",
)
user_keys = [None, *per_user["user_id"]]
drill_user = c2.selectbox(
    "User",
    user_keys,
    index=user_keys.index(default_user),
    format_func=lambda u: "every user in view" if u is None else (options["users"].get(u) or u),
    key=f"drill_user_{default_user}",
)
drill_period = c3.selectbox(
    "Period",
    list(period_labels),
    index=list(period_labels).index(default_period),
    format_func=period_labels.get,
    key=f"drill_period_{default_period}",
)
drill = load_drill(URL, view, activity, drill_user, drill_period)
st.markdown(f"**{len(drill):,}** {'opportunity' if len(drill) == 1 else 'opportunities'} {activity}")
st.dataframe(drill, hide_index=True, key="drill_table")
