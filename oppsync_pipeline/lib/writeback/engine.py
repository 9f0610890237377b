"""One revenue write-back run of one connection.

  1. read the connection's rows from the input table and validate them (contract.py); bad rows are audited
     as `invalid` and never written;
  2. take the connection's lease (the one its syncs take: a write never races a sync's reconcile) unless dry;
  3. per row: the CRM's current values (read through the API), the diff with what the row asks for, and
     - nothing differs: nothing is written (a second run writes nothing);
     - a field differs from what our last write set (oppsync.writeback_log) and from what the row asks for:
       someone changed it in the CRM since; the row is a `conflict` and is not written unless `force`;
     - dry run: the diff is `planned`;
     - else the changed fields are written, read back and audited `written` (or `not_applied` when the CRM
       kept another value: Salesforce ignores Amount on an opportunity with products);
     a row that fails is audited `failed` and the others go on; a spent quota or a missing write right stops
     the run (the rest `not_attempted`).
The connector's HTTP client does the calls: the connection's auth, retries and quota budget apply.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from sqlalchemy import text
from sqlalchemy.engine import Engine

from oppsync_pipeline.lib.config import ConfigError, ConnectionConfig, OppsyncConfig
from oppsync_pipeline.lib.crm.http import CrmError, QuotaExhausted
from oppsync_pipeline.lib.scrub import Scrubber, redact, scrubbed_logger
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, transaction
from oppsync_pipeline.lib.warehouse.lease import acquire_lock, release_lock
from oppsync_pipeline.lib.writeback import audit, contract
from oppsync_pipeline.lib.writeback.audit import LogEntry, WriteStatus
from oppsync_pipeline.lib.writeback.contract import RevenueRow, RowProblem
from oppsync_pipeline.lib.writeback.writer import Current, RevenueWriter, WritePermissionError, diff, same

log = scrubbed_logger(__name__)
LEASE_TTL_MINUTES = 30
# Write refusals in a row (no write succeeding between them) after which the rest of the run is not attempted.
PERMISSION_STOP = 3
TRIGGERS = ("manual", "automatic")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class RowOutcome:
    opportunity_id: str
    status: WriteStatus
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (before, after)
    error: str | None = None
    refused: bool = False  # the CRM refused the write for want of a right (WritePermissionError)


@dataclass
class WritebackResult:
    run_id: str
    connection: str
    crm: str
    dry_run: bool
    trigger: str
    rows: list[RowOutcome] = field(default_factory=list)
    api_requests: int = 0
    seconds: float = 0.0
    error: str | None = None  # what stopped the run early (quota, write right), if anything

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(str(r.status) for r in self.rows))

    @property
    def fields_written(self) -> int:
        return sum(len(r.changes) for r in self.rows if r.status == WriteStatus.WRITTEN)

    @property
    def ok(self) -> bool:
        """No row failed, conflicted or was left unwritten (invalid rows are the input's problem, reported)."""
        bad = {WriteStatus.FAILED, WriteStatus.CONFLICT, WriteStatus.NOT_APPLIED, WriteStatus.NOT_ATTEMPTED}
        return self.error is None and not any(r.status in bad for r in self.rows)

    def metadata(self) -> dict[str, Any]:
        return {
            "connection": self.connection,
            "crm": self.crm,
            "dry_run": self.dry_run,
            "trigger": self.trigger,
            "rows": len(self.rows),
            **{f"rows_{k}": v for k, v in sorted(self.counts.items())},
            "fields_written": self.fields_written,
            "api_requests": self.api_requests,
            "seconds": round(self.seconds, 3),
        }

    def diff_table(self, limit: int = 50) -> str:
        """The per-field diff as a markdown table (dry run: what would be written)."""
        lines = ["| opportunity | status | field | before | after |", "|---|---|---|---|---|"]
        for r in self.rows:
            if not r.changes:
                lines.append(f"| {r.opportunity_id} | {r.status} | | | {r.error or ''} |")
            for f, (before, after) in r.changes.items():
                lines.append(f"| {r.opportunity_id} | {r.status} | {f} | {_show(before)} | {_show(after)} |")
        if len(lines) > limit + 2:
            lines = [
                *lines[: limit + 2],
                f"| ... {len(lines) - limit - 2} more lines in oppsync.writeback_log | | | | |",
            ]
        return "\n".join(lines)


def writer_for(connector: Any) -> RevenueWriter:
    from oppsync_pipeline.lib.crm.registry import spec

    return spec(connector.crm).writer_class()(connector)


def eligible(cfg: OppsyncConfig, conn: ConnectionConfig, row: RevenueRow, trigger: str) -> str | None:
    """Why a valid row is not written by this trigger (None: it is)."""
    if row.approval_state not in cfg.writeback.states:
        return f"approval_state '{row.approval_state}' is not one of writeback.states {list(cfg.writeback.states)}"
    if trigger == "automatic":
        if not conn.writeback.automatic:
            return f"connections.{conn.name}.writeback.automatic is false: the automatic update is skipped"
        if row.skip_crm_update:
            return "skip_crm_update is set on the row: the automatic update is skipped"
    return None


def run_writeback(
    cfg: OppsyncConfig,
    engine: Engine,
    connection: str,
    *,
    opportunity_ids: Sequence[str] | None = None,
    dry_run: bool = False,
    force: bool = False,
    trigger: str = "manual",
    run_id: str | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    now: datetime | None = None,
) -> WritebackResult:
    """Write the connection's approved revenue rows to its CRM (see the module docstring)."""
    from oppsync_pipeline.lib.sync import build_connector  # sync imports the reconcile layer: only when run

    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, not {trigger!r}")
    conn = cfg.connection(connection)
    if not conn.writeback.enabled:
        raise ConfigError(
            [f"connections.{conn.name}.writeback.enabled is false: nothing is written to this CRM; set it to true"]
        )
    t0 = time.monotonic()
    run_id = run_id or f"wb-{uuid.uuid4().hex[:12]}"
    now = now or utcnow()
    ensure_schema(engine)
    result = WritebackResult(run_id, conn.name, conn.crm, dry_run, trigger)
    raw = contract.read_rows(engine, cfg.writeback.table, conn.name, opportunity_ids)
    if opportunity_ids:
        missing = sorted(set(opportunity_ids) - {r["opportunity_id"] for r in raw})
        if missing:
            raise ConfigError(
                [f"--opportunity: no row for {missing} of connection '{conn.name}' in {cfg.writeback.table}"]
            )
    rows, problems = contract.validate(raw, _live_ids(engine, conn.name))
    entries = [_invalid(conn, p) for p in problems]
    result.rows += [
        RowOutcome(p.opportunity_id or "?", WriteStatus.INVALID, error=f"{p.column}: {p.reason}") for p in problems
    ]
    todo = []
    for row in rows:
        reason = eligible(cfg, conn, row, trigger)
        if reason:
            result.rows.append(RowOutcome(row.opportunity_id, WriteStatus.SKIPPED, error=reason))
            entries.append(_entry(conn, row.opportunity_id, None, None, None, WriteStatus.SKIPPED, reason))
        else:
            todo.append(row)
    connector = build_connector(cfg, conn, session=session, sleep=sleep)
    scrubber: Scrubber = connector.scrubber
    locked = False
    try:
        if todo and not dry_run:
            acquire_lock(engine, conn.name, run_id, now, _ttl())
            locked = True
        writer = writer_for(connector)
        baseline = audit.last_written(engine, conn.name)
        refusals = 0
        for i, row in enumerate(todo):
            try:
                outcome, row_entries = _write_row(writer, row, baseline, dry_run=dry_run, force=force)
            except QuotaExhausted as err:
                _stop(result, entries, conn, todo[i:], _clean(str(err), scrubber))
                break
            result.rows.append(outcome)
            entries.extend(_scrubbed(e, scrubber) for e in row_entries)
            refusals = refusals + 1 if outcome.refused else 0 if outcome.status == WriteStatus.WRITTEN else refusals
            if refusals >= PERMISSION_STOP and i + 1 < len(todo):
                _stop(result, entries, conn, todo[i + 1 :], _clean(outcome.error or "", scrubber))
                break
            if outcome.refused and result.error is None:
                result.error = _clean(outcome.error or "", scrubber)
    finally:
        result.api_requests = connector.stats.requests
        audit.save(engine, entries, run_id, trigger, utcnow())  # audit time is wall time, not the run's `now`
        if locked:
            release_lock(engine, conn.name, run_id)
        result.seconds = time.monotonic() - t0
    return result


def _stop(result: WritebackResult, entries: list[LogEntry], conn: ConnectionConfig, rest: list, message: str) -> None:
    """The run ends early (quota spent, write right missing): the remaining rows are audited `not_attempted`."""
    result.error = message
    for row in rest:
        result.rows.append(RowOutcome(row.opportunity_id, WriteStatus.NOT_ATTEMPTED, error=message))
        entries.append(_entry(conn, row.opportunity_id, None, None, None, WriteStatus.NOT_ATTEMPTED, message))


def _write_row(
    writer: RevenueWriter, row: RevenueRow, baseline: dict[tuple[str, str], Any], *, dry_run: bool, force: bool
) -> tuple[RowOutcome, list[LogEntry]]:
    conn = writer.connector.conn
    opp = row.opportunity_id
    changes: dict[str, Any] = {}
    before: dict[str, Any] = {}
    try:
        desired = writer.desired(row)
        current = writer.read_current(opp)
        changes = diff(current.values, desired)
        if not changes:
            return RowOutcome(opp, WriteStatus.UNCHANGED), [
                _entry(conn, opp, None, None, None, WriteStatus.UNCHANGED, None, writer.crm)
            ]
        before = {f: current.values.get(f) for f in changes}
        blocked = {f: current.blocked[f] for f in changes if f in current.blocked}
        ignored = [
            _entry(conn, opp, f, before[f], changes[f], WriteStatus.NOT_APPLIED, reason, writer.crm)
            for f, reason in blocked.items()
        ]
        if blocked:  # never spend a write on them, dry run or not
            changes = {f: v for f, v in changes.items() if f not in blocked}
            if not changes:
                error = "; ".join(f"{f}: {reason}" for f, reason in blocked.items())
                pairs = {f: (before[f], v) for f, v in diff(current.values, desired).items()}
                return RowOutcome(opp, WriteStatus.NOT_APPLIED, pairs, error), ignored
        conflicts = {
            f: (baseline[(opp, f)], current.values.get(f))
            for f in changes
            if (opp, f) in baseline and not same(current.values.get(f), baseline[(opp, f)])
        }
        if conflicts and not force:
            text_ = "; ".join(
                f"{f} was changed in the CRM since oppsync wrote {_show(ours)} (now {_show(now_)})"
                for f, (ours, now_) in conflicts.items()
            )
            error = f"{text_}: not overwritten; rerun with --force to overwrite"
            outcome = RowOutcome(opp, WriteStatus.CONFLICT, {f: (before[f], changes[f]) for f in changes}, error)
            return outcome, [
                _entry(conn, opp, f, before[f], changes[f], WriteStatus.CONFLICT, error, writer.crm) for f in conflicts
            ]
        pairs = {f: (before[f], changes[f]) for f in changes}
        if dry_run:
            return RowOutcome(opp, WriteStatus.PLANNED, pairs), [
                _entry(conn, opp, f, b, a, WriteStatus.PLANNED, None, writer.crm) for f, (b, a) in pairs.items()
            ] + ignored
        writer.write(opp, changes, current)
        after: Current = writer.read_current(opp)
    except CrmError as err:
        explained = writer.explain(err)
        if isinstance(explained, QuotaExhausted):
            raise explained from None
        message = str(explained)
        failed = {f: (before.get(f), v) for f, v in changes.items()}
        entries = [_entry(conn, opp, f, b, a, WriteStatus.FAILED, message, writer.crm) for f, (b, a) in failed.items()]
        outcome = RowOutcome(opp, WriteStatus.FAILED, failed, message, isinstance(explained, WritePermissionError))
        return outcome, entries or [_entry(conn, opp, None, None, None, WriteStatus.FAILED, message, writer.crm)]
    kept = {f: after.values.get(f) for f in changes if not same(after.values.get(f), changes[f])}
    entries = list(ignored)
    for f, (b, a) in pairs.items():
        if f in kept:
            entries.append(
                _entry(
                    conn,
                    opp,
                    f,
                    b,
                    a,
                    WriteStatus.NOT_APPLIED,
                    f"the CRM accepted the write but kept {_show(kept[f])}",
                    writer.crm,
                )
            )
        else:
            entries.append(_entry(conn, opp, f, b, a, WriteStatus.WRITTEN, None, writer.crm))
    if kept or blocked:
        error = "; ".join(
            [f"{f}: the CRM kept {_show(v)}" for f, v in kept.items()] + [f"{f}: {r}" for f, r in blocked.items()]
        )
        pairs.update({f: (before[f], desired[f]) for f in blocked})
        return RowOutcome(opp, WriteStatus.NOT_APPLIED, pairs, error), entries
    return RowOutcome(opp, WriteStatus.WRITTEN, pairs), entries


def _live_ids(engine: Engine, connection: str) -> set[str]:
    with transaction(engine) as c:
        return {
            r[0]
            for r in c.execute(
                text("SELECT source_id FROM oppsync.opportunities WHERE connection = :c AND deleted_at IS NULL"),
                {"c": connection},
            )
        }


def _ttl() -> timedelta:
    return timedelta(minutes=LEASE_TTL_MINUTES)


def _entry(
    conn: ConnectionConfig,
    opp: str | None,
    field_: str | None,
    before: Any,
    after: Any,
    status: WriteStatus,
    error: str | None,
    crm: str | None = None,
) -> LogEntry:
    return LogEntry(conn.name, crm or conn.crm, opp, field_, before, after, status, error)


def _invalid(conn: ConnectionConfig, p: RowProblem) -> LogEntry:
    return _entry(conn, p.opportunity_id, None, None, None, WriteStatus.INVALID, f"{p.column}: {p.reason}")


def _scrubbed(entry: LogEntry, scrubber: Scrubber) -> LogEntry:
    if entry.error:
        entry.error = _clean(entry.error, scrubber)
    return entry


def _clean(message: str, scrubber: Scrubber) -> str:
    return redact(scrubber(message))


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)
