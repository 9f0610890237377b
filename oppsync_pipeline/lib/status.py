"""Each connection's status, as Airbyte's and Fivetran's connection pages show it: the last sync (time, status,
mode, rows), its API use, the next scheduled run, freshness and health. `oppsync status` prints it; the
reconcile asset's metadata carries the same names.

Read from the warehouse (`oppsync.sync_runs`, `sync_state`, `sync_locks`) and the configuration; what only the
Dagster instance knows (a schedule switched off, the scheduler daemon, a run that failed before it reached the
warehouse) is passed in as a `SchedulerView` by the caller, so this module stays Dagster-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.config import ConnectionConfig, OppsyncConfig
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import sync_locks, sync_runs, sync_state

# The reconcile's count of fetched rows it found unchanged is stored as `sync_runs.skipped` (a column the dbt
# staging model and older warehouses read); everywhere it is shown it is `unchanged`, so that it cannot be
# mistaken for a run *skipped* for quota.
SHOWN_NAMES = {"skipped": "unchanged"}


def shown_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """The reconcile's counts under the names they are shown by (metadata, CLI, JSON)."""
    return {SHOWN_NAMES.get(k, k): v for k, v in counts.items()}


def schedule_interval(cron: str) -> timedelta:
    """The time between two runs of a cron schedule (the first two after now)."""
    it = croniter(cron)
    first = it.get_next(float)
    return timedelta(seconds=it.get_next(float) - first)


def freshness_windows(cron: str) -> tuple[timedelta, timedelta]:
    """(warn, fail): how old a connection's last successful sync may be. Late by a quarter hour warns, however
    short the schedule (a warn window must stay below the fail one); two missed runs fail. The reconcile
    asset's freshness policy uses the same windows."""
    interval = schedule_interval(cron)
    return interval + min(timedelta(minutes=15), interval / 2), 2 * interval


def next_run(cron: str, timezone: str, now: datetime) -> datetime:
    """The next time `cron` fires after `now` (naive UTC), in the schedule's time zone, returned as naive UTC."""
    local = now.replace(tzinfo=UTC).astimezone(ZoneInfo(timezone))
    return croniter(cron, local).get_next(datetime).astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class SchedulerView:
    """What the Dagster instance says, read by the caller. `schedules`: connection -> (its hourly schedule is
    running, its nightly full sync is running); False: switched off in the UI; `daemon_running`: None when unknown; `latest_runs`: connection -> (run id, Dagster status,
    time) of its newest run; `note`: why the instance could not be read."""

    schedules: Mapping[str, tuple[bool, bool]] = field(default_factory=dict)
    daemon_running: bool | None = None
    latest_runs: Mapping[str, tuple[str, str, datetime]] = field(default_factory=dict)
    note: str | None = None


@dataclass(frozen=True)
class LastSync:
    run_id: str
    status: str  # success | failed | skipped (quota) | refused (a blocking check)
    mode: str
    started_at: datetime
    finished_at: datetime | None
    fetched: int | None
    created: int | None
    updated: int | None
    unchanged: int | None
    closed: int | None
    deleted: int | None
    api_requests: int | None
    token_requests: int | None
    quota_used: int | None
    quota_limit: int | None
    error: str | None

    @property
    def quota_remaining(self) -> int | None:
        if self.quota_used is None or self.quota_limit is None:
            return None
        return self.quota_limit - self.quota_used


@dataclass(frozen=True)
class ConnectionStatus:
    connection: str
    crm: str
    last_sync: LastSync | None
    last_success: LastSync | None  # its rows are the ones shown
    last_success_at: datetime | None
    age_seconds: float | None  # since the last successful sync
    warn_after_seconds: float
    fail_after_seconds: float
    freshness: str  # fresh | late | stale | never synced
    health: str  # ok | late | stale | failing | never synced | syncing
    failing_since: datetime | None
    running_since: datetime | None
    schedule: str
    timezone: str
    schedule_on: bool | None  # None: the instance was not read
    next_run_at: datetime | None  # None: the schedule is off
    next_full_sync_at: datetime | None
    requests_24h: int
    detail: str | None = None  # the failure's message, or what the Dagster instance knows beyond the warehouse

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: _json_value(v) for k, v in out.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC).isoformat()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


_LAST_SYNC_COLUMNS = (
    "run_id",
    "status",
    "mode",
    "started_at",
    "finished_at",
    "fetched",
    "created",
    "updated",
    "skipped",
    "closed",
    "deleted",
    "api_requests",
    "token_requests",
    "quota_used",
    "quota_limit",
    "error",
)


def connection_status(
    engine: Engine, conn: ConnectionConfig, now: datetime, scheduler: SchedulerView | None = None
) -> ConnectionStatus:
    """One connection's status at `now` (naive UTC)."""
    scheduler = scheduler or SchedulerView()
    r, st = sync_runs.c, sync_state.c
    with transaction(engine) as c:
        recent = c.execute(
            select(*(r[name] for name in _LAST_SYNC_COLUMNS))
            .where(r.connection == conn.name)
            .order_by(r.started_at.desc())
            .limit(200)
        ).fetchall()
        state = c.execute(select(st.last_success_at).where(st.connection == conn.name)).first()
        lock = c.execute(
            select(sync_locks.c.acquired_at).where(sync_locks.c.connection == conn.name, sync_locks.c.expires_at > now)
        ).first()
    last = LastSync(*recent[0]) if recent else None
    last_success = next((LastSync(*x) for x in recent if x.status == "success"), None)
    success_at = (
        state[0] if state and state[0] else next((x.finished_at for x in recent if x.status == "success"), None)
    )
    # the failure streak: the runs since the last success, oldest first; skipped (quota) runs neither break nor
    # start it
    streak = []
    for x in recent:
        if x.status == "success":
            break
        if x.status in ("failed", "refused"):
            streak.append(x)
    failing_since = streak[-1].started_at if streak and last and last.status in ("failed", "refused") else None
    detail = last.error if failing_since and last else None
    latest = scheduler.latest_runs.get(conn.name)
    if latest and latest[1] == "FAILURE" and (last is None or latest[2] > (last.finished_at or last.started_at)):
        # the run failed before it reached the warehouse (configuration, the warehouse itself, a held lock)
        failing_since = failing_since or latest[2]
        detail = f"Dagster run {latest[0]} failed before it recorded a sync (see its log in the Dagster UI)"
    warn, fail = freshness_windows(conn.schedule)
    age = (now - success_at).total_seconds() if success_at else None
    freshness = (
        "never synced"
        if age is None
        else "stale"
        if age > fail.total_seconds()
        else "late"
        if age > warn.total_seconds()
        else "fresh"
    )
    running = lock[0] if lock else None
    if latest and latest[1] in ("STARTED", "STARTING", "QUEUED", "NOT_STARTED") and running is None:
        running = latest[2]
    health = "failing" if failing_since else ("syncing" if running and age is None else freshness)
    health = "ok" if health == "fresh" else health
    schedule_on, full_on = scheduler.schedules.get(conn.name, (None, None))
    day_ago = now - timedelta(hours=24)
    return ConnectionStatus(
        connection=conn.name,
        crm=conn.crm,
        last_sync=last,
        last_success=last_success,
        last_success_at=success_at,
        age_seconds=age,
        warn_after_seconds=warn.total_seconds(),
        fail_after_seconds=fail.total_seconds(),
        freshness=freshness,
        health=health,
        failing_since=failing_since,
        running_since=running,
        schedule=conn.schedule,
        timezone=conn.timezone,
        schedule_on=schedule_on,
        next_run_at=None if schedule_on is False else next_run(conn.schedule, conn.timezone, now),
        next_full_sync_at=None if full_on is False else next_run(conn.full_sync_schedule, conn.timezone, now),
        requests_24h=sum(x.api_requests or 0 for x in recent if x.started_at >= day_ago),
        detail=detail,
    )


def statuses(
    cfg: OppsyncConfig, engine: Engine, now: datetime, scheduler: SchedulerView | None = None
) -> list[ConnectionStatus]:
    return [connection_status(engine, conn, now, scheduler) for conn in cfg.connections]


# -- the table -------------------------------------------------------------------------------------------------

HEADER = ("connection", "crm", "last sync", "status", "mode", "rows", "api", "next run", "freshness", "health")


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(at: datetime | None, now: datetime) -> str:
    """A time as the table shows it: UTC, and how long ago or ahead."""
    if at is None:
        return "-"
    delta = (at - now).total_seconds()
    rel = f"in {age_text(delta)}" if delta >= 0 else f"{age_text(-delta)} ago"
    return f"{at:%Y-%m-%d %H:%M} ({rel})"


def row_of(s: ConnectionStatus, now: datetime) -> tuple[str, ...]:
    last, ok = s.last_sync, s.last_success
    rows = f"+{ok.created or 0} ~{ok.updated or 0} ={ok.unchanged or 0} -{ok.deleted or 0}" if ok else "-"
    api = "-"
    if last:
        api = f"{last.api_requests if last.api_requests is not None else '?'} req"
        if last.quota_limit is not None:
            remaining = last.quota_remaining
            api += (
                f", {remaining:,}/{last.quota_limit:,} left"
                if remaining is not None
                else f", limit {last.quota_limit:,}"
            )
    nxt = "schedule off" if s.schedule_on is False else _when(s.next_run_at, now)
    fresh = f"{s.freshness} ({age_text(s.age_seconds)} old, fails at {age_text(s.fail_after_seconds)})"
    if s.age_seconds is None:
        fresh = s.freshness
    health = s.health
    if s.failing_since:
        health = f"failing since {s.failing_since:%Y-%m-%d %H:%M}"
    elif s.running_since:
        health += f", syncing since {s.running_since:%H:%M}"
    return (
        s.connection,
        s.crm,
        _when(last.finished_at or last.started_at, now) if last else "never",
        last.status if last else "-",
        last.mode if last else "-",
        rows,
        api,
        nxt,
        fresh,
        health,
    )


def render_table(items: Sequence[ConnectionStatus], now: datetime, scheduler: SchedulerView | None = None) -> list[str]:
    """The status table, one line per connection, then one line per failing connection with its error."""
    scheduler = scheduler or SchedulerView()
    lines = [HEADER, *(row_of(s, now) for s in items)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
    out.append("rows: +created ~updated =unchanged -deleted (last successful sync); times UTC")
    for s in items:
        if s.detail:
            out.append(f"{s.connection}: {s.detail}")
    if scheduler.note:
        out.append(f"dagster: {scheduler.note}")
    elif scheduler.daemon_running is False:
        out.append("dagster: the scheduler daemon is not running, no scheduled run will start (`make dev` runs it)")
    return out
