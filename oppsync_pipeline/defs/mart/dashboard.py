"""Something to look at in the Dagster UI: opportunities created per user per week (12 weeks) and the
latest period, rendered as markdown on the dashboard asset's materialization."""

from datetime import date, timedelta

import dagster as dg
from sqlalchemy import text

from oppsync_pipeline.defs.resources import OppsyncResource
from oppsync_pipeline.lib.warehouse.engine import transaction

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    top = max(values) or 1
    return "".join(BARS[round(v / top * (len(BARS) - 1))] for v in values)


def weekly_table(rows: list[tuple], weeks: list[date]) -> str:
    """rows: (user_name, connection, period_start, created). Markdown, one line per user."""
    per_user: dict[tuple[str, str], dict[date, int]] = {}
    for user, conn, start, created in rows:
        per_user.setdefault((user, conn), {})[start] = int(created)
    lines = [
        f"| user | connection | last 12 weeks ({weeks[0]:%d %b} – {weeks[-1]:%d %b}) | total |",
        "|---|---|---|---:|",
    ]
    ranked = sorted(per_user.items(), key=lambda kv: -sum(kv[1].values()))
    for (user, conn), by_week in ranked[:25]:
        series = [by_week.get(w, 0) for w in weeks]
        lines.append(f"| {user} | {conn} | `{sparkline(series)}` {series} | {sum(series)} |")
    return "\n".join(lines)


@dg.asset(
    key=["marts", "outcomes_dashboard"],
    deps=[dg.AssetKey(["marts", "outcomes"])],
    group_name="mart",
    kinds={"python"},
    automation_condition=dg.AutomationCondition.on_cron("*/5 * * * *"),  # with marts.outcomes (mart/assets.py)
    description="A glance at marts.outcomes: created per user per week, and the latest week's results.",
)
def outcomes_dashboard(oppsync: OppsyncResource) -> dg.MaterializeResult:
    with transaction(oppsync.engine()) as conn:
        latest = conn.execute(text("SELECT max(period_start) FROM marts.outcomes WHERE period_grain = 'week'")).scalar()
        if latest is None:
            return dg.MaterializeResult(metadata={"note": "marts.outcomes is empty"})
        latest = latest if isinstance(latest, date) else latest.date()
        weeks = [latest - timedelta(weeks=i) for i in range(11, -1, -1)]
        rows = conn.execute(
            text(
                "SELECT user_name, connection, CAST(period_start AS DATE), opportunities_created FROM marts.outcomes "
                "WHERE period_grain = 'week' AND period_start >= :first"
            ),
            {"first": weeks[0]},
        ).fetchall()
        last = conn.execute(
            text(
                "SELECT user_name, connection, opportunities_created, opportunities_won, opportunities_lost, win_rate "
                "FROM marts.outcomes WHERE period_grain = 'week' AND period_start = :p "
                "ORDER BY opportunities_created DESC LIMIT 20"
            ),
            {"p": latest},
        ).fetchall()
    latest_md = "\n".join(
        ["| user | connection | created | won | lost | win rate |", "|---|---|---:|---:|---:|---:|"]
        + [
            f"| {u} | {c} | {cr} | {w} | {lo} | {'' if wr is None else f'{float(wr):.0%}'} |"
            for u, c, cr, w, lo, wr in last
        ]
    )
    return dg.MaterializeResult(
        metadata={
            "created_per_user_per_week": dg.MetadataValue.md(weekly_table([tuple(r) for r in rows], weeks)),
            "latest_week": dg.MetadataValue.md(f"Week of {latest:%Y-%m-%d}\n\n{latest_md}"),
            "opportunities_created_latest_week": sum(int(r[2]) for r in last),
        }
    )
