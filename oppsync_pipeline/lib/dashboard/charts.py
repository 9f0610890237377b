"""The outcomes chart (created / won / lost per period) as Altair, for the web page and, rendered to PNG by
vl-convert, for the Dagster UI (a data URI in markdown metadata: the UI shows images that way, and a PNG needs
no JavaScript there)."""

from __future__ import annotations

import base64
from datetime import date

import altair as alt
import pandas as pd

from oppsync_pipeline.lib.dashboard.queries import ACTIVITIES

COLORS = {"created": "#4c78a8", "won": "#54a24b", "lost": "#e45756"}


def long_form(per_period: pd.DataFrame, partial: date | None) -> pd.DataFrame:
    """per_period rows (period_start, created, won, lost, ...) as one row per (period, outcome), with the
    partial period flagged and labelled."""
    rows = []
    for row in per_period.itertuples(index=False):
        is_partial = partial is not None and row.period_start == partial
        label = f"{row.period_start:%Y-%m-%d}" + (" (partial)" if is_partial else "")
        for activity in ACTIVITIES:
            rows.append(
                {
                    "period_start": f"{row.period_start:%Y-%m-%d}",  # text: Vega-Lite specs are JSON
                    "period": label,
                    "outcome": activity,
                    "opportunities": int(getattr(row, activity)),
                    "partial": bool(is_partial),
                }
            )
    return pd.DataFrame(rows, columns=["period_start", "period", "outcome", "opportunities", "partial"])


def outcomes_chart(per_period: pd.DataFrame, partial: date | None, title: str = "") -> alt.Chart:
    """Grouped bars: created, won and lost side by side per period; the partial period drawn faded."""
    data = long_form(per_period, partial)
    selection = alt.selection_point(name="pick", fields=["period", "outcome"])
    return (
        alt.Chart(data, title=title or alt.Undefined)
        .mark_bar()
        .encode(
            x=alt.X("period:N", title=None, sort=None, axis=alt.Axis(labelAngle=-45)),
            xOffset=alt.XOffset("outcome:N", sort=list(ACTIVITIES)),
            y=alt.Y("opportunities:Q", title="opportunities"),
            color=alt.Color(
                "outcome:N",
                sort=list(ACTIVITIES),
                scale=alt.Scale(domain=list(COLORS), range=list(COLORS.values())),
                legend=alt.Legend(title=None, orient="top"),
            ),
            opacity=alt.condition("datum.partial", alt.value(0.45), alt.value(1.0)),
            tooltip=["period:N", "outcome:N", "opportunities:Q"],
        )
        .add_params(selection)
        .properties(height=280)
    )


def png_data_uri(chart: alt.Chart, scale: float = 1.0) -> str:
    """The chart as a base64 PNG data URI (vl-convert renders Vega-Lite without a browser)."""
    import vl_convert  # imported here: its module loads a JavaScript engine (~0.3 s)

    png = vl_convert.vegalite_to_png(chart.to_json(), scale=scale)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
