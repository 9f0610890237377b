"""A run's accounting: the extract's bookkeeping (`oppsync.extracts`), the connection's state between runs
(`sync_state`), the statuses both go through, what a run cost and found (`RunStats`), and the `sync_runs`
audit row (`SyncRun.to_row`), built in one place."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from oppsync_pipeline.lib.record import MAPPING_VERSION
from oppsync_pipeline.lib.warehouse.dialect import Bind, tune_reconcile
from oppsync_pipeline.lib.warehouse.engine import set_memory_limit, transaction
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S
from oppsync_pipeline.lib.warehouse.schema import (
    extracts,
    opportunities,
    quarantine,
    stage_deletes,
    stage_opportunities,
    sync_runs,
    sync_state,
)


class ExtractStatus(StrEnum):
    """`oppsync.extracts.status` (values as stored)."""

    RUNNING = "running"
    COMPLETE = "complete"  # read whole, staged, waiting for its checks and reconcile
    FAILED = "failed"
    SKIPPED = "skipped"  # the quota budget was spent: nothing changed, the bookmark did not move
    # A full read stopped by its share of the CRM's quota where the connector can resume it: its staged records
    # and `resume_state` wait for the connection's next run, which reads on from there (sync.ResumeState).
    PAUSED = "paused"
    RESUMED = "resumed"  # a paused extract whose staged records a later run took over
    REFUSED = "refused"  # a blocking check (quality, delete guard) stopped it
    RECONCILED = "reconciled"
    SUPERSEDED = "superseded"  # a later extract of the connection started before this one was reconciled


class RunStatus(StrEnum):
    """`oppsync.sync_runs.status` (values as stored)."""

    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    PAUSED = "paused"  # a full sync that continues in the next run (ExtractStatus.PAUSED)
    REFUSED = "refused"


# The fields a run has only when it did that part of the work (a full read's completeness, its read by id):
# absent from the mapping, not None, when it did not.
_REQUESTS = (
    "api_requests",
    "token_requests",
    "warnings",
    "retries",
    "rate_limited_responses",
    "seconds_waited_on_rate_limits",
    "seconds_paced_to_rate_limits",
    "token_refreshes",
    "quota_used",
    "quota_limit",
)
_WHEN_DONE = (
    "quarantined",
    "deletes_inferable",
    "crm_count_open",
    "crm_count_closed",
    "received_open",
    "received_closed",
    "read_by_id",
    "found_by_id",
    "out_of_scope_by_id",
)


@dataclass
class RunStats(Mapping[str, Any]):
    """What an extract cost the CRM (the HTTP layer's RequestStats) and what it found. Read as a mapping by
    the names of the run's metadata (Dagster's materialization, tests), written to `extracts` / `sync_runs`."""

    api_requests: int | None = 0
    token_requests: int | None = 0
    warnings: list[str] = field(default_factory=list)
    retries: int | None = 0
    rate_limited_responses: int | None = 0
    seconds_waited_on_rate_limits: float | None = 0.0
    seconds_paced_to_rate_limits: float | None = 0.0  # slept before sending to stay within the limit (not stored)
    token_refreshes: int | None = 0
    quota_used: int | None = None
    quota_limit: int | None = None
    # a full read's completeness against the CRM's own counts (sync._check_completeness)
    quarantined: int | None = None
    deletes_inferable: bool | None = None
    crm_count_open: int | None = None
    crm_count_closed: int | None = None
    received_open: int | None = None
    received_closed: int | None = None
    # a full read's read by id of the ids it expected and did not see (sync._read_missing_by_id)
    read_by_id: int | None = None
    found_by_id: int | None = None
    out_of_scope_by_id: int | None = None

    @classmethod
    def unknown(cls) -> RunStats:
        """A run whose cost was never counted (it failed before it had a connector): NULL, not 0."""
        return cls(
            **dict.fromkeys(
                (
                    "api_requests",
                    "token_requests",
                    "retries",
                    "rate_limited_responses",
                    "seconds_waited_on_rate_limits",
                    "seconds_paced_to_rate_limits",
                    "token_refreshes",
                )
            )
        )

    @classmethod
    def from_metadata(cls, values: Mapping[str, Any]) -> RunStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def with_requests(self, requests: Mapping[str, Any]) -> RunStats:
        """These stats with the cost the HTTP layer counted and its warnings (RequestStats.as_metadata())."""
        return replace(self, **{k: v for k, v in requests.items() if k in _REQUESTS})

    def update(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        for name, value in {**(values or {}), **more}.items():
            if name not in self.__dataclass_fields__:
                raise KeyError(name)
            setattr(self, name, value)

    def warnings_text(self) -> str | None:
        """The run's warnings (optional reads refused, fallbacks used), one a line, for the audit tables."""
        return "\n".join(self.warnings) or None

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__ or (key in _WHEN_DONE and getattr(self, key) is None):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in fields(self) if not (f.name in _WHEN_DONE and getattr(self, f.name) is None))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class SyncRun:
    """One row of `oppsync.sync_runs`: a run that ended, whatever its status."""

    run_id: str
    connection: str
    crm: str
    mode: str
    started_at: datetime
    finished_at: datetime
    status: RunStatus | str
    fetched: int = 0
    stats: RunStats = field(default_factory=RunStats)
    counts: Mapping[str, int] = field(default_factory=dict)  # the reconcile's counts (ReconcileResult)
    error: str | None = None
    warnings: str | None = None  # default: the stats' warnings
    scope_fingerprint: str | None = None
    quarantined: int | None = None

    def to_row(self) -> dict[str, Any]:
        s = self.stats
        row = {
            "run_id": self.run_id,
            "connection": self.connection,
            "crm": self.crm,
            "mode": self.mode,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": str(self.status),
            "fetched": self.fetched,
            "api_requests": s.api_requests,
            "retries": s.retries,
            "seconds_waited": s.seconds_waited_on_rate_limits,
            "quota_used": s.quota_used,
            "quota_limit": s.quota_limit,
            "token_requests": s.token_requests,
            "warnings": self.warnings if self.warnings is not None else s.warnings_text(),
            "error": self.error,
            "scope_fingerprint": self.scope_fingerprint,
            "quarantined": self.quarantined,
        }
        columns = set(sync_runs.c.keys())
        row.update({k: v for k, v in self.counts.items() if k in columns})
        return row


def record_run(conn: Connection, run: SyncRun) -> None:
    """Insert or replace the sync_runs audit row (inside the caller's transaction)."""
    conn.execute(delete(sync_runs).where(sync_runs.c.run_id == run.run_id))
    conn.execute(insert(sync_runs).values(run.to_row()))


# -- the connection's state between runs -------------------------------------------------------------------------


@dataclass
class SyncState:
    cursor: datetime | None = None
    last_full_sync_at: datetime | None = None
    last_success_at: datetime | None = None
    resume_token: str | None = None
    scope_fingerprint: str | None = None  # the scope of the last successful sync (scope.py)
    scope: str | None = None


def get_state(engine: Bind, connection: str) -> SyncState:
    s = sync_state.c
    with transaction(engine) as conn:
        row = conn.execute(
            select(
                s.cursor, s.last_full_sync_at, s.last_success_at, s.resume_token, s.scope_fingerprint, s.scope
            ).where(s.connection == connection)
        ).first()
    return SyncState(*row) if row else SyncState()


def state_mapping_version(engine: Bind, connection: str) -> tuple[bool, int | None]:
    """(whether the warehouse holds opportunities of the connection from an earlier sync, the
    record.MAPPING_VERSION it was last synced with). The same test as the reconcile's re-baseline."""
    with transaction(engine) as conn:
        row = conn.execute(select(sync_state.c.mapping_version).where(sync_state.c.connection == connection)).first()
        if row is None:
            return False, None
        has_rows = conn.execute(
            select(func.count()).select_from(opportunities).where(opportunities.c.connection == connection)
        ).scalar()
    return bool(has_rows), row[0]


# -- an extract's bookkeeping ---------------------------------------------------------------------------------


def begin_extract(
    engine: Engine,
    *,
    extract_id: str,
    connection: str,
    crm: str,
    mode: str,
    started_at: datetime,
    since: datetime | None,
    scope_fingerprint: str | None = None,
    scope: str | None = None,
    resumes: str | None = None,
) -> None:
    """Record a new extract of the connection, and discard what earlier ones left unreconciled; `resumes`: a
    paused extract whose staged records (and quarantined ones) this one takes over and reads on from."""
    x = extracts.c
    others = and_(x.connection == connection, x.extract_id != extract_id)
    with transaction(engine) as conn:
        if resumes is not None:
            for table in (stage_opportunities, stage_deletes, quarantine):
                conn.execute(update(table).where(table.c.extract_id == resumes).values(extract_id=extract_id))
            conn.execute(
                update(extracts)
                .where(x.extract_id == resumes)
                .values(status=ExtractStatus.RESUMED, error="resumed by extract " + extract_id)
            )
        # A new extract supersedes every earlier one of the connection that was not reconciled (crashed runs,
        # or a completed extract whose reconcile never happened): their staged rows are garbage.
        conn.execute(
            update(extracts)
            .where(others, x.status == ExtractStatus.RUNNING)
            .values(status=ExtractStatus.FAILED, error="abandoned (process ended)")
        )
        conn.execute(
            update(extracts)
            .where(others, x.status.in_([ExtractStatus.COMPLETE, ExtractStatus.PAUSED]))
            .values(status=ExtractStatus.SUPERSEDED)
        )
        for table in (stage_opportunities, stage_deletes):  # what this one took over stays
            conn.execute(delete(table).where(table.c.connection == connection, table.c.extract_id != extract_id))
        conn.execute(delete(extracts).where(x.extract_id == extract_id))
        conn.execute(
            insert(extracts).values(
                extract_id=extract_id,
                connection=connection,
                crm=crm,
                mode=mode,
                status=ExtractStatus.RUNNING,
                started_at=started_at,
                since_cursor=since,
                scope_fingerprint=scope_fingerprint,
                scope=scope,
            )
        )


def save_completeness(
    engine: Engine,
    extract_id: str,
    *,
    counts: dict[bool, int | None],
    received: dict[bool, int],
    inferable: bool,
    quarantined: int,
    crm_clock: datetime | None,
) -> None:
    """A full read's completeness against the CRM's own counts (sync.py decides `inferable`)."""
    with transaction(engine) as conn:
        conn.execute(
            update(extracts)
            .where(extracts.c.extract_id == extract_id)
            .values(
                crm_count_open=counts.get(True),
                crm_count_closed=counts.get(False),
                received_open=received.get(True),
                received_closed=received.get(False),
                deletes_inferable=inferable,
                quarantined=quarantined,
                crm_clock=crm_clock,
            )
        )


def finish_extract(
    engine: Engine,
    extract_id: str,
    *,
    status: str,
    finished_at: datetime,
    new_cursor: datetime | None = None,
    counts: dict[str, int] | None = None,
    stats: RunStats | None = None,
    error: str | None = None,
    resume_token: str | None = None,
    resume_state: str | None = None,
) -> None:
    """Record how the extract ended. Staged rows are kept for reconcile (complete) or for the next run (paused,
    with its `resume_state`), else dropped."""
    counts, stats = counts or {}, stats if stats is not None else RunStats.unknown()
    with transaction(engine) as conn:
        conn.execute(
            update(extracts)
            .where(extracts.c.extract_id == extract_id)
            .values(
                status=status,
                finished_at=finished_at,
                new_cursor=new_cursor,
                fetched_open=counts.get("open", 0),
                fetched_closed=counts.get("closed", 0),
                fetched_deleted=counts.get("deleted", 0),
                api_requests=stats.api_requests,
                retries=stats.retries,
                seconds_waited=stats.seconds_waited_on_rate_limits,
                quota_used=stats.quota_used,
                quota_limit=stats.quota_limit,
                error=error,
                new_resume_token=resume_token,
                resume_state=resume_state,
                token_requests=stats.token_requests,
                warnings=stats.warnings_text(),
                mapping_version=MAPPING_VERSION,
            )
        )
        if status == ExtractStatus.COMPLETE:
            # what the warehouse will hold after reconcile: the staged records, and the quarantined ones it
            # already has (kept as they were). A window over every staged row: under DuckDB's lean limit (it
            # spills), as the reconcile; under the configured one it raised a 1,000,000-record sync by ~215 MB.
            set_memory_limit(conn, lean=True)
            tune_reconcile(conn)  # Postgres: its sorts and hashes in memory, no JIT (they spilled at 4 MB)
            conn.execute(
                text(f"""
                UPDATE {S}.extracts SET
                    reported_open = latest.open_n + kept.open_n, reported_closed = latest.closed_n + kept.closed_n
                FROM ({_LATEST}) latest, ({_KEPT}) kept
                WHERE extract_id = :x"""),
                {"x": extract_id},
            )
        elif status != ExtractStatus.PAUSED:
            conn.execute(delete(stage_opportunities).where(stage_opportunities.c.extract_id == extract_id))
            conn.execute(delete(stage_deletes).where(stage_deletes.c.extract_id == extract_id))


def paused_extract(engine: Engine, connection: str) -> dict[str, Any] | None:
    """The connection's paused full extract (at most one: a new extract supersedes or resumes it)."""
    x = extracts.c
    with transaction(engine) as conn:
        row = (
            conn.execute(select(extracts).where(x.connection == connection, x.status == ExtractStatus.PAUSED))
            .mappings()
            .first()
        )
    return dict(row) if row else None


def load_extract(engine: Engine, extract_id: str) -> dict[str, Any] | None:
    """The extracts row of one run (the reconcile step picks up what the extract step recorded)."""
    with transaction(engine) as conn:
        row = conn.execute(select(extracts).where(extracts.c.extract_id == extract_id)).mappings().first()
    return dict(row) if row else None


# The latest staged version of each id the reconcile will track: in scope, or before the stage trigger but
# already tracked (once tracked, kept). Records read by id that left the filters, and untracked ones before
# the trigger stage, are not part of what the CRM reported for this connection.
# Counted by status in one pass over the staged rows; only the ids staged more than once go through the window, as in
# the reconcile (reconcile/sql/src.sql): ranking every row took 1.1 s of a 1,000,000-row DuckDB run, 1.6 s on Postgres.
_LATEST = f"""WITH dup AS (
        SELECT source_id FROM {S}.stage_opportunities WHERE extract_id = :x GROUP BY source_id HAVING count(*) > 1)
    SELECT count(*) FILTER (WHERE status = 'open') AS open_n,
    count(*) FILTER (WHERE status <> 'open') AS closed_n FROM (
    SELECT status, source_id, connection, scope FROM {S}.stage_opportunities s
    WHERE s.extract_id = :x AND NOT EXISTS (SELECT 1 FROM dup d WHERE d.source_id = s.source_id)
    UNION ALL
    SELECT status, source_id, connection, scope FROM (
        SELECT status, source_id, connection, scope, row_number() OVER (
            PARTITION BY source_id ORDER BY modified_at DESC NULLS LAST, seq DESC) AS rn
        FROM {S}.stage_opportunities WHERE extract_id = :x AND source_id IN (SELECT source_id FROM dup)) t
    WHERE rn = 1) v
    WHERE COALESCE(v.scope, 'in') = 'in' OR (v.scope = 'before_stage' AND EXISTS (
        SELECT 1 FROM {S}.opportunities o WHERE o.connection = v.connection AND o.source_id = v.source_id))"""


# Quarantined records the warehouse holds (live, in scope) and the extract did not stage: kept unchanged.
_KEPT = f"""SELECT count(DISTINCT q.source_id) FILTER (WHERE o.status = 'open') AS open_n,
    count(DISTINCT q.source_id) FILTER (WHERE o.status <> 'open') AS closed_n FROM {S}.quarantine q
    JOIN {S}.opportunities o ON o.connection = q.connection AND o.source_id = q.source_id
    WHERE q.extract_id = :x AND o.deleted_at IS NULL AND o.in_scope IS NOT FALSE
      AND NOT EXISTS (SELECT 1 FROM {S}.stage_opportunities s WHERE s.extract_id = :x AND s.source_id = q.source_id)"""
