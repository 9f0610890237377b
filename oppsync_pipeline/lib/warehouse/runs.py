"""A run's accounting: the statuses an extract and a sync run go through, what a run cost and found
(`RunStats`), and the `sync_runs` audit row (`SyncRun.to_row`), built in one place."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.engine import Connection

from oppsync_pipeline.lib.warehouse.schema import sync_runs


class ExtractStatus(StrEnum):
    """`oppsync.extracts.status` (values as stored)."""

    RUNNING = "running"
    COMPLETE = "complete"          # read whole, staged, waiting for its checks and reconcile
    FAILED = "failed"
    SKIPPED = "skipped"            # the quota budget was spent: nothing changed, the bookmark did not move
    REFUSED = "refused"            # a blocking check (quality, delete guard) stopped it
    RECONCILED = "reconciled"
    SUPERSEDED = "superseded"      # a later extract of the connection started before this one was reconciled


class RunStatus(StrEnum):
    """`oppsync.sync_runs.status` (values as stored)."""

    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    REFUSED = "refused"


# The fields a run has only when it did that part of the work (a full read's completeness, its read by id):
# absent from the mapping, not None, when it did not.
_REQUESTS = ("api_requests", "token_requests", "warnings", "retries", "rate_limited_responses",
             "seconds_waited_on_rate_limits", "token_refreshes", "quota_used", "quota_limit")
_WHEN_DONE = ("quarantined", "deletes_inferable", "crm_count_open", "crm_count_closed", "received_open",
              "received_closed", "read_by_id", "found_by_id", "out_of_scope_by_id")


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
        return cls(**dict.fromkeys(("api_requests", "token_requests", "retries", "rate_limited_responses",
                                    "seconds_waited_on_rate_limits", "token_refreshes")))

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
    counts: Mapping[str, int] = field(default_factory=dict)   # the reconcile's counts (ReconcileResult)
    error: str | None = None
    warnings: str | None = None        # default: the stats' warnings
    scope_fingerprint: str | None = None
    quarantined: int | None = None

    def to_row(self) -> dict[str, Any]:
        s = self.stats
        row = {"run_id": self.run_id, "connection": self.connection, "crm": self.crm, "mode": self.mode,
               "started_at": self.started_at, "finished_at": self.finished_at, "status": str(self.status),
               "fetched": self.fetched, "api_requests": s.api_requests, "retries": s.retries,
               "seconds_waited": s.seconds_waited_on_rate_limits, "quota_used": s.quota_used,
               "quota_limit": s.quota_limit, "token_requests": s.token_requests,
               "warnings": self.warnings if self.warnings is not None else s.warnings_text(),
               "error": self.error, "scope_fingerprint": self.scope_fingerprint, "quarantined": self.quarantined}
        columns = set(sync_runs.c.keys())
        row.update({k: v for k, v in self.counts.items() if k in columns})
        return row


def record_run(conn: Connection, run: SyncRun) -> None:
    """Insert or replace the sync_runs audit row (inside the caller's transaction)."""
    conn.execute(delete(sync_runs).where(sync_runs.c.run_id == run.run_id))
    conn.execute(insert(sync_runs).values(run.to_row()))
