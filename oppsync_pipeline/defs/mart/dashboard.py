"""Something to look at in the Dagster UI: opportunities created, won and lost per week over ALL users (a PNG
chart in markdown metadata, the way the UI shows images), and the latest week's totals and busiest users.
The queries and the chart are lib/dashboard's, shared with the web page (`oppsync dashboard`)."""

from datetime import timedelta

import dagster as dg

from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.warehouse.engine import transaction

# lib/dashboard (pandas, Altair: ~1 CPU-s to import) is imported when the asset runs, not when the mart's code
# location loads: every build after a sync starts a run worker that loads the location and never draws a chart
# (make bench, freshness; tests/dagster/test_locations.py)

WEEKS = 12
TOP_USERS = 20


def latest_week_markdown(totals: dict, users, week) -> str:
    """The week's totals (every user) and its busiest users; the table says how many users it leaves out."""
    win_rate = "" if totals["win_rate"] is None else f"{totals['win_rate']:.0%}"
    lines = [
        f"Week of {week:%Y-%m-%d}: **{totals['created']}** created, **{totals['won']}** won, "
        f"**{totals['lost']}** lost{f', win rate {win_rate}' if win_rate else ''} (all {len(users)} users).",
        "",
        "| user | created | won | lost | win rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in users.head(TOP_USERS).itertuples(index=False):
        rate = "" if row.win_rate is None or row.win_rate != row.win_rate else f"{row.win_rate:.0%}"
        lines.append(f"| {row.user_name} | {row.created} | {row.won} | {row.lost} | {rate} |")
    if len(users) > TOP_USERS:
        lines.append(f"\n{len(users) - TOP_USERS} more users not listed; the totals above include them.")
    return "\n".join(lines)


@dg.asset(
    key=["marts", "outcomes_dashboard"],
    deps=[dg.AssetKey(["marts", "outcomes"])],
    group_name="mart",
    kinds={"python"},
    automation_condition=dg.AutomationCondition.on_cron("*/5 * * * *"),  # with marts.outcomes (mart/assets.py)
    description="A glance at marts.outcomes: created, won and lost per week (all users), and the latest week.",
)
def outcomes_dashboard(oppsync: OppsyncResource) -> dg.MaterializeResult:
    from oppsync_pipeline.lib.dashboard import queries
    from oppsync_pipeline.lib.dashboard.charts import outcomes_chart, png_data_uri
    from oppsync_pipeline.lib.dashboard.filters import Filters, partial_period

    cfg = oppsync.app_config()
    with transaction(oppsync.engine()) as conn:
        bounds = queries.choices(conn)["bounds"]
        if "week" not in bounds:
            return dg.MaterializeResult(metadata={"note": "marts.outcomes is empty"})
        latest = bounds["week"][1]
        weeks = Filters(grain="week", start=latest - timedelta(weeks=WEEKS - 1), end=latest)
        per_week = queries.per_period(conn, weeks)
        last = Filters(grain="week", start=latest, end=latest)
        last_totals = queries.totals(conn, last)
        last_users = queries.per_user(conn, last)
        partial = partial_period("week", queries.as_of(conn), cfg.reporting.timezone)
    chart = outcomes_chart(per_week, partial, title=f"Opportunities per week, last {WEEKS} weeks, all users")
    return dg.MaterializeResult(
        metadata={
            "outcomes_per_week": dg.MetadataValue.md(f"![created, won and lost per week]({png_data_uri(chart)})"),
            "latest_week": dg.MetadataValue.md(latest_week_markdown(last_totals, last_users, latest)),
            "opportunities_created_latest_week": int(last_totals["created"]),
            "opportunities_won_latest_week": int(last_totals["won"]),
            "opportunities_lost_latest_week": int(last_totals["lost"]),
            "latest_week_is_partial": partial == latest,
        }
    )
