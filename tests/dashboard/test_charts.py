"""The outcomes chart and the Dagster asset's latest-week text: totals over every user, partial period marked."""

from __future__ import annotations

import base64
import struct
from datetime import date

import pandas as pd

from oppsync_pipeline.defs.mart.dashboard import TOP_USERS, latest_week_markdown
from oppsync_pipeline.lib.dashboard.charts import long_form, outcomes_chart, png_data_uri

WEEKS = [date(2026, 3, 2), date(2026, 3, 9), date(2026, 3, 16)]
PER_WEEK = pd.DataFrame({"period_start": WEEKS, "created": [5, 0, 2], "won": [1, 2, 0], "lost": [0, 1, 1]})


def test_long_form_keeps_every_count_and_flags_only_the_partial_period():
    data = long_form(PER_WEEK, partial=WEEKS[-1])
    assert len(data) == 9
    assert data.groupby("outcome")["opportunities"].sum().to_dict() == {"created": 7, "won": 3, "lost": 2}
    assert data.loc[data["partial"], "period"].unique().tolist() == ["2026-03-16 (partial)"]


def test_the_chart_renders_to_a_png_data_uri():
    uri = png_data_uri(outcomes_chart(PER_WEEK, WEEKS[-1], title="t"))
    assert uri.startswith("data:image/png;base64,")
    png = base64.b64decode(uri.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width > 200 and height > 200


def test_latest_week_totals_count_every_user_not_only_the_listed_ones():
    # 25 users with 4 created each: the old table summed the top 20 (80); the week has 100
    users = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(25)],
            "user_name": [f"User {i}" for i in range(25)],
            "created": [4] * 25,
            "won": [1] * 25,
            "lost": [1] * 25,
            "win_rate": [0.5] * 25,
        }
    )
    totals = {"created": 100, "won": 25, "lost": 25, "win_rate": 0.5}
    text = latest_week_markdown(totals, users, date(2026, 3, 16))
    assert "**100** created" in text and "(all 25 users)" in text
    assert text.count("| User ") == TOP_USERS
    assert f"{25 - TOP_USERS} more users not listed; the totals above include them" in text
