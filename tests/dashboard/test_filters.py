"""The dashboard's pure rules: period boundaries as the mart cuts them, the partial period, teams."""

from __future__ import annotations

from datetime import date, datetime

import pytest

from oppsync_pipeline.lib.config import ConfigError, parse_config
from oppsync_pipeline.lib.dashboard.filters import (
    Filters,
    chosen_users,
    next_period_start,
    partial_period,
    period_start,
    team_members,
)


def test_periods_start_on_the_day_monday_and_the_first():
    wednesday = date(2026, 3, 4)
    assert period_start("day", wednesday) == wednesday
    assert period_start("week", wednesday) == date(2026, 3, 2)
    assert period_start("week", date(2026, 3, 1)) == date(2026, 2, 23)  # a Sunday belongs to the week before
    assert period_start("month", wednesday) == date(2026, 3, 1)
    assert next_period_start("month", date(2026, 12, 1)) == date(2027, 1, 1)
    assert next_period_start("month", date(2026, 1, 1)) == date(2026, 2, 1)
    assert next_period_start("week", date(2026, 3, 2)) == date(2026, 3, 9)


def test_the_partial_period_is_the_one_of_the_last_sync_in_the_reporting_time_zone():
    # Sunday 23:30 UTC is already Monday in Berlin: the new week is the partial one there, not in UTC
    synced = datetime(2026, 3, 1, 23, 30)
    assert partial_period("week", synced, "UTC") == date(2026, 2, 23)
    assert partial_period("week", synced, "Europe/Berlin") == date(2026, 3, 2)
    assert partial_period("month", datetime(2026, 3, 31, 22, 30), "Europe/Berlin") == date(2026, 4, 1)
    assert partial_period("day", None, "UTC") is None  # an empty mart has no partial period


def test_an_unknown_grain_is_refused_before_it_reaches_sql():
    with pytest.raises(ValueError, match="grain must be one of"):
        Filters(grain="week'; drop table x; --")


def _cfg(teams):
    users = [{"id": u, "name": u.title()} for u in ("ana", "ben", "cy")]
    return parse_config({"users": users, "teams": teams})


def test_teams_resolve_to_their_members_once_each():
    cfg = _cfg({"East": ["ana", "ben"], "West": ["ben", "cy"]})
    assert team_members(cfg, ["East"]) == ("ana", "ben")
    assert team_members(cfg, ["East", "West"]) == ("ana", "ben", "cy")
    with pytest.raises(ValueError, match="no team named 'North'"):
        team_members(cfg, ["North"])


def test_a_team_member_must_be_a_configured_user_and_the_error_names_the_key():
    with pytest.raises(ConfigError) as err:
        _cfg({"East": ["ana", "dan"]})
    assert "teams.East[1]: 'dan' is not a user id" in str(err.value)


def test_users_and_teams_narrow_the_view_together():
    assert chosen_users((), None) == ()  # nothing picked: everyone
    assert chosen_users((), ("ana", "ben")) == ("ana", "ben")
    assert chosen_users(("ben", "cy"), ("ana", "ben")) == ("ben",)
    assert chosen_users(("cy",), ("ana", "ben")) is None  # nobody, which must not read as "all"
