"""`oppsync.writeback_log`: every field a write-back planned, wrote, refused or failed to write."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import writeback_log


class WriteStatus(StrEnum):
    PLANNED = "planned"  # a dry run would write it
    WRITTEN = "written"  # written and read back equal
    NOT_APPLIED = "not_applied"  # written, but the CRM kept another value (read back)
    CONFLICT = "conflict"  # changed in the CRM since our last write: not overwritten without --force
    FAILED = "failed"  # the CRM refused or did not answer
    INVALID = "invalid"  # the input row breaks the contract: never written
    NOT_ATTEMPTED = "not_attempted"  # the run stopped first (quota spent, write right missing)
    UNCHANGED = "unchanged"  # the CRM already holds every value: nothing written (one row, no field)
    SKIPPED = "skipped"  # not eligible for this trigger (approval state, opt-out): the reason in `error`


@dataclass
class LogEntry:
    connection: str
    crm: str
    opportunity_id: str | None
    field: str | None
    before: Any
    after: Any
    status: WriteStatus
    error: str | None = None

    def row(self, run_id: str, trigger: str, now: datetime) -> dict[str, Any]:
        return {
            # sortable: the audit's order is the order of writes, whatever the clock's resolution
            "log_id": f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}",
            "run_id": run_id,
            "connection": self.connection,
            "crm": self.crm,
            "opportunity_id": self.opportunity_id,
            "field": self.field,
            "before": _json(self.before),
            "after": _json(self.after),
            "status": str(self.status),
            "error": self.error,
            "trigger": trigger,
            "logged_at": now,
        }


def save(engine: Engine, entries: Iterable[LogEntry], run_id: str, trigger: str, now: datetime) -> int:
    rows = [e.row(run_id, trigger, now) for e in entries]
    if rows:
        with transaction(engine) as c:
            c.execute(writeback_log.insert(), rows)
    return len(rows)


def last_written(engine: Engine, connection: str) -> dict[tuple[str, str], Any]:
    """(opportunity, field) -> the value our last successful write set: the baseline for conflicts."""
    sql = text(
        """SELECT opportunity_id, field, after FROM (
             SELECT opportunity_id, field, after,
                    row_number() OVER (PARTITION BY opportunity_id, field ORDER BY log_id DESC) AS n
             FROM oppsync.writeback_log WHERE connection = :c AND status = 'written') w
           WHERE n = 1"""
    )
    with transaction(engine) as c:
        return {(r.opportunity_id, r.field): json.loads(r.after) for r in c.execute(sql, {"c": connection})}


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, sort_keys=True)
