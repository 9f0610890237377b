"""What the outcomes dashboard is asked for: the filters, teams resolved to users, and which period is partial.

Plain values and pure functions, shared by the Streamlit page (oppsync_pipeline/dashboard/app.py), the Dagster
dashboard asset and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from oppsync_pipeline.lib.config import OppsyncConfig

GRAINS = ("day", "week", "month")  # marts.outcomes.period_grain


@dataclass(frozen=True)
class Filters:
    """A dashboard view. Empty tuples mean "all"; `start` / `end` bound period_start, both inclusive."""

    grain: str = "week"
    start: date | None = None
    end: date | None = None
    connections: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    qualified: bool = False  # seed 004: count only qualified opportunities (the mart's *_qualified columns)

    def __post_init__(self) -> None:
        # the grain is written into SQL (date_trunc's unit): only the mart's own values pass
        if self.grain not in GRAINS:
            raise ValueError(f"grain must be one of {GRAINS}, not {self.grain!r}")


def team_members(cfg: OppsyncConfig, teams: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The user ids of the chosen teams (oppsync.yaml `teams:`), in configuration order, without repeats."""
    members: dict[str, None] = {}
    for team in teams:
        if team not in cfg.teams:
            raise ValueError(f"teams: no team named {team!r} (have: {sorted(cfg.teams)})")
        members.update(dict.fromkeys(cfg.teams[team]))
    return tuple(members)


def chosen_users(users: tuple[str, ...], team_users: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Users picked by name and by team together: both narrow the view (their intersection). None means the
    combination selects nobody (a team without any of the picked users), which is not the same as "all"."""
    if team_users is None:
        return users
    if not users:
        return team_users or None
    both = tuple(u for u in users if u in team_users)
    return both or None


def period_start(grain: str, day: date) -> date:
    """The first day of the period containing `day`, as the mart cuts it (weeks start Monday)."""
    if grain == "day":
        return day
    if grain == "week":
        return day - timedelta(days=day.weekday())
    if grain == "month":
        return day.replace(day=1)
    raise ValueError(f"grain must be one of {GRAINS}, not {grain!r}")


def next_period_start(grain: str, start: date) -> date:
    if grain == "day":
        return start + timedelta(days=1)
    if grain == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def local_date(utc_naive: datetime, timezone: str) -> date:
    """A naive-UTC warehouse timestamp as the local date in the reporting time zone."""
    return utc_naive.replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(timezone)).date()


def partial_period(grain: str, as_of_utc: datetime | None, timezone: str) -> date | None:
    """The period still filling up: the one containing the data's as-of time (the last sync that the mart saw,
    in the reporting time zone). Its counts are low only because the period is not over."""
    if as_of_utc is None:
        return None
    return period_start(grain, local_date(as_of_utc, timezone))
