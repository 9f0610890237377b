"""Reconcile one completed extract of one connection into current state, events and history.

Set-based: a handful of statements over the staged rows, in ONE transaction, so a run commits whole or
not at all, and re-running the same extract changes nothing.

Membership (what the record is to the connection), decided per staged id against the warehouse:
  unknown id, in scope                    -> created (at the CRM's created date), plus closed_won/lost if closed
  unknown id, not in scope                -> ignored (filtered out, or before the stage trigger)
  deleted id seen again                   -> restored
  out-of-scope id in scope again          -> entered_scope
  tracked id that no longer matches the
  connection's filters (read by id)       -> left_scope (kept, values frozen, no longer tracked)
  full run, known id not found at all     -> deleted (refused above max_delete_share); native delete feed -> deleted
One event per KIND of change of an observed edit, never overlapping (they share a change_id):
  status transition                       -> closed_won / closed_lost (at the CRM's close time) or reopened
  stage move, status unchanged            -> stage_changed (old / new stage name)
  any other tracked field                 -> updated (listing those fields only)
  nothing changed                         -> no event, no new history version, row not rewritten
A re-baseline run (mapping version change) records no updated / stage_changed events (see _needs_rebaseline).

The statements are in sql/*.sql next to this module; the column lists in them come from record.FIELDS.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib.resources import files

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from oppsync_pipeline.lib.record import CANONICAL, MAPPING_VERSION, TRACKED_FIELDS, EventKind
from oppsync_pipeline.lib.warehouse import dialect
from oppsync_pipeline.lib.warehouse.engine import configured_memory, set_memory_limit, single_thread, transaction
from oppsync_pipeline.lib.warehouse.lease import assert_lock
from oppsync_pipeline.lib.warehouse.runs import ExtractStatus, RunStats, RunStatus, SyncRun, record_run
from oppsync_pipeline.lib.warehouse.schema import (
    SCHEMA,
    extracts,
    opportunities,
    stage_deletes,
    stage_opportunities,
    sync_runs,
    sync_state,
)

log = logging.getLogger(__name__)

DATA_COLUMNS = list(CANONICAL)  # the canonical record's columns (record.FIELDS)

# The reconcile's working tables (temporary: private to its transaction's connection)
_TEMP_TABLES = ("rc_dup", "rc_src", "rc_cls", "rc_fields", "rc_diff", "rc_act", "rc_del", "rc_upd")

# Tracked fields owned by an event kind other than `updated` (reconcile's event model, dbt/README.md):
# a status transition owns the status and the stage it moved to, and the CRM's close time; a stage move owns
# the stage (its name, its id, and the status label that moved with it).
STATUS_FIELDS = ("status", "stage", "stage_id", "crm_status", "crm_closed_at")
STAGE_FIELDS = ("stage", "stage_id", "crm_status")
OTHER_FIELDS = tuple(f for f in TRACKED_FIELDS if f not in STATUS_FIELDS)


def _changed(names: tuple[str, ...]) -> str:
    """The names of the fields whose staged value differs from the warehouse's, comma-separated."""
    return "concat_ws(',', " + ", ".join(f"CASE WHEN s.{f} IS DISTINCT FROM o.{f} THEN '{f}' END" for f in names) + ")"


_STATUS_MOVED = "s.status IS DISTINCT FROM o.status"
_STAGE_MOVED = "(s.stage IS DISTINCT FROM o.stage OR s.stage_id IS DISTINCT FROM o.stage_id)"
_SRC_COLUMNS = ("source_id", "seq", "in_open_set", "scope", *DATA_COLUMNS, "row_hash")

# What the statements in sql/ take besides bound parameters: column lists and expressions made from the field
# spec and the constants above, never from input.
_FRAGMENTS = {
    "data_columns": ", ".join(DATA_COLUMNS),
    "s_data_columns": ", ".join(f"s.{c}" for c in DATA_COLUMNS),
    "r_data_columns": ", ".join(f"r.{c}" for c in DATA_COLUMNS),
    "set_data_columns": ", ".join(f"{c} = u.{c}" for c in DATA_COLUMNS),
    "src_columns": ", ".join(_SRC_COLUMNS),
    "s_src_columns": ", ".join(f"s.{c}" for c in _SRC_COLUMNS),
    "changed_fields": _changed(TRACKED_FIELDS),
    "status_fields": _changed(STATUS_FIELDS),
    "stage_fields": _changed(STAGE_FIELDS),
    # `updated` lists the fields no other kind owns, and the CRM's status label / close time when they
    # changed without a status or stage move
    "updated_fields": _changed(OTHER_FIELDS)[:-1]
    + f", CASE WHEN s.crm_status IS DISTINCT FROM o.crm_status AND NOT ({_STATUS_MOVED}) "
    f"AND NOT {_STAGE_MOVED} THEN 'crm_status' END"
    + f", CASE WHEN s.crm_closed_at IS DISTINCT FROM o.crm_closed_at AND NOT ({_STATUS_MOVED}) "
    "THEN 'crm_closed_at' END)",
    "status_moved": _STATUS_MOVED,
    "stage_moved": _STAGE_MOVED,
}


@cache
def _statement_text(name: str) -> str:
    """The file's statement without its comment lines (they document the file, not the statement sent)."""
    text_ = (files(__package__) / "sql" / f"{name}.sql").read_text(encoding="utf-8")
    return "\n".join(line for line in text_.splitlines() if not line.lstrip().startswith("--"))


def sql(name: str, **fragments: str):
    """The statement in sql/<name>.sql, its column lists filled in (values stay bound parameters)."""
    return text(_statement_text(name).format_map({**_FRAGMENTS, **fragments}))


class DeleteGuardRefused(Exception):
    """A full run would delete more than the allowed share of a connection's opportunities."""


@dataclass
class ReconcileResult:
    fetched: int = 0
    created: int = 0
    updated: int = 0
    closed: int = 0
    reopened: int = 0
    deleted: int = 0
    restored: int = 0
    skipped: int = 0
    stage_changed: int = 0
    left_scope: int = 0
    entered_scope: int = 0
    events: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def reconcile(
    engine: Engine,
    *,
    extract_id: str,
    connection: str,
    crm: str,
    mode: str,
    run_id: str,
    observed_at: datetime,
    recorded_at: datetime,
    max_delete_share: float = 0.5,
    new_cursor: datetime | None = None,
    started_at: datetime | None = None,
    stats: RunStats | None = None,
    check_lock: bool = True,
) -> ReconcileResult:
    """Apply a completed extract. `observed_at` (the run's start) stamps history versions and inferred deletes;
    `recorded_at` stamps events. All or nothing.

    On DuckDB it runs under a lean memory limit (engine.LEAN_MEMORY_LIMIT_MB; its working tables spill past it at
    the same speed). Should a statement still need more than that (a tenant's records far wider than any measured),
    DuckDB refuses it, the transaction rolls back whole, and the reconcile runs once more under the configured
    limit: the same result, some seconds later, and a warning in the log."""

    def attempt(lean: bool) -> ReconcileResult:
        with transaction(engine) as conn:
            dialect.tune_reconcile(conn)
            if lean:
                set_memory_limit(conn, lean=True)
            if check_lock:
                assert_lock(conn, connection, run_id)
            x = extracts.c
            row = conn.execute(
                select(x.status, x.scope_fingerprint, x.deletes_inferable, x.quarantined).where(
                    x.extract_id == extract_id
                )
            ).first()
            status = row[0] if row else None
            if status == ExtractStatus.RECONCILED:
                return _already(conn, run_id)
            if status != ExtractStatus.COMPLETE:
                raise RuntimeError(f"extract {extract_id} is '{status}', not complete: nothing to reconcile")
            p = {"x": extract_id, "c": connection, "crm": crm, "run": run_id, "obs": observed_at, "rec": recorded_at}
            rebaseline = _needs_rebaseline(conn, p)
            p["scope_changed"] = _scope_changed(conn, p, row[1])
            # A full read that delivered fewer records than the CRM counts (sync.py) proves nothing about the ids
            # it did not see: no delete is inferred from it (the delete feed still counts).
            infer_deletes = mode == "full" and row[2] is not False
            _build_diff(conn, p, full=infer_deletes)
            o = opportunities.c
            live = (
                conn.execute(select(func.count()).where(o.connection == connection, o.deleted_at.is_(None))).scalar()
                or 0
            )
            inferred = conn.execute(text("SELECT count(*) FROM rc_del WHERE inferred")).scalar() or 0
            if mode == "full" and live and inferred > max_delete_share * live:
                raise DeleteGuardRefused(
                    f"full sync of '{connection}' would delete {inferred} of {live} opportunities "
                    f"({inferred / live:.0%}), more than max_delete_share={max_delete_share:.0%}; nothing was changed. "
                    "They were not found by id either (not merely out of the connection's scope). "
                    "If the CRM really lost them, raise connections[].max_delete_share for one run."
                )
            result, rewrites = _count(conn)
            written = _write_events(conn, p, rebaseline, _kinds_to_write(result, rewrites))
            result.events = sum(written.values())
            result.updated, result.stage_changed = written["updated"], written["stage_changed"]
            _write_history(conn, p)
            _write_current(
                conn, p, rebaseline, scope_moves=result.left_scope + result.entered_scope, lean=lean, new=result.created
            )
            conn.execute(
                update(extracts).where(extracts.c.extract_id == extract_id).values(status=ExtractStatus.RECONCILED)
            )
            _advance_state(conn, p, mode, new_cursor)
            run_stats = stats if stats is not None else RunStats.unknown()
            notes = list(run_stats.warnings)
            if rebaseline:
                notes.append(
                    f"re-baselined: values rewritten under mapping version {MAPPING_VERSION} without update events"
                )
            record_run(
                conn,
                SyncRun(
                    run_id,
                    connection,
                    crm,
                    mode,
                    started_at or observed_at,
                    recorded_at,
                    RunStatus.SUCCESS,
                    result.fetched,
                    run_stats,
                    counts=result.as_dict(),
                    warnings="\n".join(notes) or None,
                    scope_fingerprint=row[1],
                    quarantined=row[3],
                ),
            )
            for t in _TEMP_TABLES:
                conn.execute(text(f"DROP TABLE IF EXISTS {t}"))
            _clear_staging(conn, extract_id)  # last: on Postgres it may hold the staging tables until the commit
            return result

    try:
        return attempt(lean=dialect.is_duckdb(engine))  # a memory limit to lower: DuckDB only
    except DBAPIError as err:
        # a caller's transaction (a Connection given) is aborted with it: nothing to run again in
        if isinstance(engine, Connection) or not dialect.out_of_memory(engine, err):
            raise
        log.warning(
            "the reconcile of extract %s ran out of DuckDB's lean memory limit; running it again under the "
            "configured limit (warehouse.duckdb.memory_limit)",
            extract_id,
            exc_info=True,
        )
        return attempt(lean=False)


def _clear_staging(conn: Connection, extract_id: str) -> None:
    """Remove the reconciled extract's staged rows. On Postgres, when they are the only ones staged and no other
    transaction is using the staging tables, TRUNCATE them: deleting a million rows one by one was the reconcile's
    largest statement after the writes (and left as many dead rows for vacuum). The lock is taken NOWAIT and
    kept to the commit, a few statements away; a connection staging at that moment waits for it, and any other
    use of the tables makes this the plain DELETE."""
    if not dialect.is_duckdb(conn) and _lock_staging_alone(conn, extract_id):
        conn.execute(text(f"TRUNCATE {SCHEMA}.stage_opportunities, {SCHEMA}.stage_deletes"))
        return
    conn.execute(delete(stage_opportunities).where(stage_opportunities.c.extract_id == extract_id))
    conn.execute(delete(stage_deletes).where(stage_deletes.c.extract_id == extract_id))


def _lock_staging_alone(conn: Connection, extract_id: str) -> bool:
    """Postgres: the staging tables locked exclusively (NOWAIT) and holding no other extract's rows."""
    try:
        with conn.begin_nested():  # a refused lock aborts only this savepoint
            conn.execute(
                text(f"LOCK TABLE {SCHEMA}.stage_opportunities, {SCHEMA}.stage_deletes IN ACCESS EXCLUSIVE MODE NOWAIT")
            )
    except OperationalError:
        return False  # in use (another run stages or reads): the plain DELETE
    for table in (stage_opportunities, stage_deletes):
        other = conn.execute(select(table.c.extract_id).where(table.c.extract_id != extract_id).limit(1)).first()
        if other is not None:
            return False
    return True


def _needs_rebaseline(conn: Connection, p: dict) -> bool:
    """A connection last synced under an older record.MAPPING_VERSION (or before versions were recorded):
    this run's value changes come from the new mapping (stage names for ids, one address form, close times
    ...), not from the CRM, so they are written as new versions without `updated` / `stage_changed` events.
    Status changes (closes, reopens), creations and deletes are still recorded: the mapping never changes
    open/won/lost. Close events already in the log are re-dated where the CRM's close time corrects them."""
    row = conn.execute(select(sync_state.c.mapping_version).where(sync_state.c.connection == p["c"])).first()
    if row is None:
        return False
    has_rows = conn.execute(select(func.count()).where(opportunities.c.connection == p["c"])).scalar()
    return bool(has_rows) and (row[0] is None or row[0] < MAPPING_VERSION)


def _scope_changed(conn: Connection, p: dict, fingerprint: str | None) -> bool:
    """Whether this run read under another scope than the last successful one (scope.py). Scope events of such
    a run are dated by the run (the configuration changed, not the record)."""
    row = conn.execute(select(sync_state.c.scope_fingerprint).where(sync_state.c.connection == p["c"])).first()
    return row is not None and fingerprint is not None and row[0] is not None and row[0] != fingerprint


_RESULT_COLUMNS = (
    "fetched",
    "created",
    "updated",
    "closed",
    "reopened",
    "deleted",
    "restored",
    "skipped",
    "stage_changed",
    "left_scope",
    "entered_scope",
)


def _already(conn: Connection, run_id: str) -> ReconcileResult:
    row = conn.execute(
        select(*(sync_runs.c[name] for name in _RESULT_COLUMNS)).where(sync_runs.c.run_id == run_id)
    ).first()
    return ReconcileResult(*(v or 0 for v in row)) if row else ReconcileResult()


def _build_diff(conn: Connection, p: dict, full: bool) -> None:
    for t in _TEMP_TABLES:
        conn.execute(text(f"DROP TABLE IF EXISTS {t}"))
    # One row per id: a record seen twice (duplicated across pages, or moving between the open and the
    # not-open set during the sync) counts once, as its latest version. Only the ids staged more than once
    # go through the window (a third of the cost of ranking every row; most extracts have few or none).
    # The raw payload stays in staging (joined back by seq when rows are written): carrying it through the
    # window would hold every staged JSON document in memory at once.
    conn.execute(sql("dup"), p)
    _analyze(conn, "rc_dup", "source_id")
    conn.execute(sql("src"), p)
    _analyze(conn, "rc_src", "source_id")
    # Classify on the narrow columns first; name the changed fields only where the hash differs (or the id
    # comes back from a delete or into scope). The hash is taken over the record as the CRM sent it, the
    # values as stored (NUL bytes cleaned): a different hash with no stored value different is not a change
    # (no version, no rewrite). Comparing every field of every row inside the one big join made that join's
    # build side wide: 2.6 s of a 1,000,000-row reconcile, against 0.9 s in three narrow steps.
    conn.execute(sql("cls"), p)
    _analyze(conn, "rc_cls", "source_id", "membership", "hash_differs")
    conn.execute(sql("fields"), p)
    _analyze(conn, "rc_fields", "source_id")
    conn.execute(sql("diff"))
    _analyze(conn, "rc_diff", "source_id", "membership", "rewrite")
    # The rows that write anything (events, a version, the current row) with their staged values: most of a
    # full extract is unchanged, and each event statement joined the whole staged copy to find its few rows.
    conn.execute(sql("act"))
    _analyze(conn, "rc_act", *_ACT_FILTERS)
    # Deletes: inferred in full runs (a known live id the extract did not see at all), and the delete feed.
    conn.execute(sql("deletes_full" if full else "deletes_native"), p)
    _analyze(conn, "rc_del", "source_id", "inferred")


# the columns the statements over rc_act join and filter on
_ACT_FILTERS = ("source_id", "seq", "membership", "rewrite", "status_moved", "stage_moved", "new_status")


def _analyze(conn: Connection, table: str, *columns: str) -> None:
    dialect.analyze(conn, table, columns)  # statistics for the temporary table (Postgres' planner needs them)


def _count(conn: Connection) -> tuple[ReconcileResult, int]:
    """The membership counts (the value-change counts come from the events written), and how many rows take
    new values."""
    row = conn.execute(sql("count")).one()
    deleted = conn.execute(text("SELECT count(*) FROM rc_del")).scalar() or 0
    return ReconcileResult(
        fetched=row[0],
        created=row[1],
        closed=row[2],
        reopened=row[3],
        restored=row[4],
        skipped=row[5],
        left_scope=row[6],
        entered_scope=row[7],
        deleted=deleted,
    ), row[8]


def _kinds_to_write(result: ReconcileResult, rewrites: int) -> set[str]:
    """The event statements that can write rows this run: each is a join over the whole extract, and most
    runs have no restores, no scope moves and (incremental ones) few changes. Skipping the empty ones saves
    a third of a small reconcile."""
    kinds = {"created"} if result.created else set()
    kinds |= {"restored"} if result.restored else set()
    kinds |= {"entered_scope"} if result.entered_scope else set()
    kinds |= {"left_scope"} if result.left_scope else set()
    kinds |= {"changes"} if rewrites else set()
    return kinds


@dataclass(frozen=True)
class _Event:
    """One event statement (sql/event.sql): the kind it counts as, the membership it needs (_kinds_to_write),
    its type, time and rows, and what it records."""

    kind: str
    needs: str
    occurred: str
    where: str
    event_type: str | None = None  # an SQL expression; default: the kind
    changed: str = "NULL"
    old: str = "NULL"
    new: str = "NULL"
    values: str = "d"  # d: the staged values (rc_act); o: the warehouse's (a record that left)

    def statement(self, scope_at: str):
        return sql(
            "event",
            event_type=self.event_type or f"'{self.kind}'",
            occurred=self.occurred.format(scope_at=scope_at),
            where=self.where,
            changed=self.changed,
            old=self.old,
            new=self.new,
            values=self.values,
            join_current="JOIN oppsync.opportunities o ON o.connection = :c AND o.source_id = d.source_id"
            if self.values == "o"
            else "",
        )


_CLOSED_TYPE = "CASE WHEN d.new_status = 'won' THEN 'closed_won' ELSE 'closed_lost' END"
_TRACKED = "d.membership IN ('known', 'restored', 'entered')"
# In order: a run's count of each kind is its statement's row count. A scope change by configuration is dated
# by the run, one by an edit in the CRM by the edit ({scope_at}).
EVENTS = (
    _Event(EventKind.CREATED, "created", "COALESCE(d.created_at, :obs)", "d.membership = 'new'"),
    _Event(
        "closed",
        "created",
        "d.new_closed_at",
        "d.membership = 'new' AND d.new_status <> 'open'",
        event_type=_CLOSED_TYPE,
    ),
    _Event(EventKind.RESTORED, "restored", "d.changed_at", "d.membership = 'restored'"),
    _Event(EventKind.ENTERED_SCOPE, "entered_scope", "{scope_at}", "d.membership = 'entered'"),
    # the values the record had when it was last tracked (its staged values are not taken over)
    _Event(EventKind.LEFT_SCOPE, "left_scope", "{scope_at}", "d.membership = 'left'", values="o"),
    _Event(
        "closed",
        "changes",
        "d.new_closed_at",
        f"{_TRACKED} AND d.status_moved AND d.new_status <> 'open'",
        event_type=_CLOSED_TYPE,
        changed="d.status_fields",
        old="d.old_status",
        new="d.new_status",
    ),
    _Event(
        EventKind.REOPENED,
        "changes",
        "d.changed_at",
        f"{_TRACKED} AND d.status_moved AND d.new_status = 'open'",
        changed="d.status_fields",
        old="d.old_status",
        new="d.new_status",
    ),
    _Event(
        EventKind.STAGE_CHANGED,
        "changes",
        "d.changed_at",
        f"{_TRACKED} AND NOT d.status_moved AND d.stage_moved",
        changed="d.stage_fields",
        old="d.old_stage",
        new="d.new_stage",
    ),
    _Event(
        EventKind.UPDATED,
        "changes",
        "d.changed_at",
        f"{_TRACKED} AND d.updated_fields <> ''",
        changed="d.updated_fields",
    ),
)


def _write_events(
    conn: Connection, p: dict, rebaseline: bool = False, needed: set[str] | None = None
) -> dict[str, int]:
    scope_at = ":obs" if p.get("scope_changed") else "d.changed_at"
    written = dict.fromkeys(
        (
            "created",
            "closed",
            "restored",
            "entered_scope",
            "left_scope",
            "reopened",
            "stage_changed",
            "updated",
            "deleted",
        ),
        0,
    )
    for event in EVENTS:
        if (rebaseline and event.kind in (EventKind.UPDATED, EventKind.STAGE_CHANGED)) or (
            needed is not None and event.needs not in needed
        ):
            continue
        written[event.kind] += conn.execute(event.statement(scope_at), p).rowcount or 0
    written["deleted"] = conn.execute(sql("event_deleted"), p).rowcount or 0
    return written


def _write_history(conn: Connection, p: dict) -> None:
    conn.execute(sql("history_close"), p)
    conn.execute(sql("history_insert"), p)


# New current rows per pass where memory is lean: each pass joins its slice of rc_act (a hash table of ~52 MiB for
# 1,000,000 new rows) while it writes raw payloads, and the whole of a first Salesforce sync of 1,000,000 did not fit
# in the lean limit. The passes run on one DuckDB thread: each thread fills a row group of its own (16,384 rows, ~40
# MB of Dataverse's 2.4 kB rows) and what a pass leaves unfinished stays in memory for the next; on two threads a
# first Dynamics reconcile of 1,000,000 ran out of the lean limit (and ran again under the configured one: 26 s,
# 477 MB) where one thread took 34 s and 320 MB (Salesforce's ~1 kB rows fitted on two).
NEW_ROWS_PER_PASS = 250_000


def _write_current(
    conn: Connection, p: dict, rebaseline: bool = False, scope_moves: int = 1, lean: bool = False, new: int = 0
) -> None:
    with single_thread(conn) if lean else nullcontext():
        _insert_new(conn, p, passes=max(1, math.ceil(new / NEW_ROWS_PER_PASS)) if lean else 1)
    conn.execute(text("DROP TABLE IF EXISTS rc_upd"))
    conn.execute(sql("current_gather"), p)
    _analyze(conn, "rc_upd", "source_id")
    # DuckDB keeps an UPDATE's old values in its transaction's undo buffers, which spill only in part: rewriting
    # 110,000 of 1,000,000 synthetic rows failed under 128 MiB and peaked at 388 MB RSS under 160 MiB. This one
    # statement runs under the configured limit.
    with configured_memory(conn) if lean else nullcontext():
        conn.execute(sql("current_update"), p)
    if rebaseline:
        conn.execute(sql("current_redate_closes"), p)
    conn.execute(text("DROP TABLE rc_upd"))
    if scope_moves:
        conn.execute(sql("current_scope"), p)
    conn.execute(sql("current_deleted"), p)


def _insert_new(conn: Connection, p: dict, passes: int) -> None:
    """The new records' current rows, in `passes` slices of their seq range (staged order: each slice is a run
    of row groups DuckDB's zone maps find without scanning the rest)."""
    if passes == 1:  # every reconcile on Postgres and every small one: no range to look up
        conn.execute(sql("current_insert"), {**p, "lo": -(2**31), "hi": 2**31})
        return
    lo, hi = conn.execute(text("SELECT min(seq), max(seq) FROM rc_act WHERE membership = 'new'")).one()
    if lo is None:
        return
    width = (hi - lo) // passes + 1
    for start in range(lo, hi + 1, width):
        conn.execute(sql("current_insert"), {**p, "lo": start, "hi": start + width})


def _advance_state(conn: Connection, p: dict, mode: str, new_cursor: datetime | None) -> None:
    s, x = sync_state.c, extracts.c
    row = conn.execute(
        text("SELECT cursor, last_full_sync_at, resume_token FROM oppsync.sync_state WHERE connection = :c"), p
    ).first()
    token = conn.execute(select(x.new_resume_token).where(x.extract_id == p["x"])).scalar()
    token = token or (row.resume_token if row else None)
    cursor = new_cursor if new_cursor is not None else (row.cursor if row else None)
    if row is not None and row.cursor is not None and cursor is not None and cursor < row.cursor:
        cursor = row.cursor  # the bookmark never moves backwards
    full_at = p["obs"] if mode == "full" else (row.last_full_sync_at if row else None)
    conn.execute(delete(sync_state).where(s.connection == p["c"]))
    extract = conn.execute(select(x.mapping_version, x.scope_fingerprint, x.scope).where(x.extract_id == p["x"])).one()
    conn.execute(
        insert(sync_state).values(
            connection=p["c"],
            cursor=cursor,
            last_full_sync_at=full_at,
            last_success_at=p["rec"],
            last_run_id=p["run"],
            resume_token=token,
            mapping_version=extract[0] or MAPPING_VERSION,
            scope_fingerprint=extract[1],
            scope=extract[2],
        )
    )
