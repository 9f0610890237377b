"""Everything the sync writes besides the reconcile itself: extract bookkeeping, staged pages,
the per-connection lease lock, CRM users and stages, internal users and their links.

Every statement uses bound parameters; table and column names come from schema.py, never from input.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Date, DateTime, Double, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from oppsync_pipeline.lib.record import (
    CANONICAL, FIELDS, MAPPING_VERSION, CanonicalField, TRACKED_FIELDS, CrmUser, Opportunity, StageInfo, clean_text, raw_json,
    row_hash, to_utc,
)
from oppsync_pipeline.lib.warehouse.engine import backend, bulk_insert, transaction
from oppsync_pipeline.lib.warehouse.runs import ExtractStatus, RunStats
from oppsync_pipeline.lib.warehouse.schema import extracts

S = "oppsync"
STAGE_COLUMNS = ["extract_id", "connection", "source_id", "seq", "in_open_set", "scope", *CANONICAL, "raw",
                 "row_hash"]

# Why a staged record is (not) in the connection's scope (scope.py): only `in` records are synced as such.
SCOPE_IN, SCOPE_FILTERED_OUT, SCOPE_BEFORE_STAGE = "in", "filtered_out", "before_stage"


class LockHeld(Exception):
    """Another run of the same connection holds the warehouse lock."""


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(holder: str) -> bool:
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell for another host: trust the lease expiry
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


# A starter that loses a race re-reads the lease and usually finds the winner there at once; the attempts
# cover DuckDB, where a loser's retry can still start before the winner's commit and conflict again.
LEASE_ATTEMPTS = 10
LEASE_RETRY_PAUSE = 0.01  # seconds, doubled per attempt up to LEASE_RETRY_PAUSE_MAX
LEASE_RETRY_PAUSE_MAX = 0.25


@dataclass(frozen=True)
class _Lease:
    connection: str
    run_id: str
    holder: str
    acquired_at: datetime
    expires_at: datetime


def acquire_lock(engine: Engine, connection: str, run_id: str, now: datetime, ttl: timedelta) -> None:
    """Take the connection's lease, or raise LockHeld. A lease whose holder died on this host, or whose
    expiry passed, is taken over: a crashed run never blocks the next one for long. The same run may take
    its lease again (reconcile after extract, retries).

    The lease is taken by statements that cannot both succeed: an insert that does nothing when the row
    exists, or an update conditional on the holder last seen (compare-and-swap). Of many starters exactly one
    wins; every other one re-reads the lease and gets LockHeld naming the winner."""
    lease = _Lease(connection, run_id, holder_id(), now, now + ttl)
    for attempt in range(LEASE_ATTEMPTS):
        try:
            with transaction(engine) as conn:
                if _take_lease(conn, lease):
                    return
        except DBAPIError as err:
            if not _lost_a_race(engine, err):
                raise
        _pause_after_lost_race(attempt)
    raise LockHeld(_still_contended_message(engine, lease))


def _pause_after_lost_race(attempt: int) -> None:
    time.sleep(min(LEASE_RETRY_PAUSE * 2 ** attempt, LEASE_RETRY_PAUSE_MAX))


def _take_lease(conn: Connection, lease: _Lease) -> bool:
    """One attempt, in one transaction: True when the lease is now ours, False when another starter changed
    it under us (try again); LockHeld when a live run of another id holds it."""
    if _insert_if_free(conn, lease):
        return True
    seen = _read_lease(conn, lease.connection)
    if seen is None:
        return False  # released since the insert found it taken
    if seen.run_id != lease.run_id and seen.expires_at > lease.acquired_at and _pid_alive(seen.holder):
        raise LockHeld(_held_message(lease.connection, seen))
    return _swap_if_unchanged(conn, lease, seen)


def _insert_if_free(conn: Connection, lease: _Lease) -> bool:
    inserted = conn.execute(text(
        f"INSERT INTO {S}.sync_locks (connection, run_id, holder, acquired_at, expires_at) "
        "VALUES (:c, :r, :h, :a, :e) ON CONFLICT (connection) DO NOTHING RETURNING run_id"), _lease_params(lease))
    return inserted.first() is not None


def _read_lease(conn: Connection, connection: str) -> Any:
    return conn.execute(text(f"SELECT run_id, holder, acquired_at, expires_at FROM {S}.sync_locks "
                             "WHERE connection = :c"), {"c": connection}).first()


def _swap_if_unchanged(conn: Connection, lease: _Lease, seen: Any) -> bool:
    """Take over the lease row as it was read. On Postgres a concurrent swap waits for the first to commit,
    then finds the row changed and updates nothing; on DuckDB it fails with a conflict (_lost_a_race)."""
    swapped = conn.execute(text(
        f"UPDATE {S}.sync_locks SET run_id = :r, holder = :h, acquired_at = :a, expires_at = :e "
        "WHERE connection = :c AND run_id = :seen_run AND holder = :seen_holder AND acquired_at = :seen_acquired "
        "RETURNING run_id"),
        {**_lease_params(lease), "seen_run": seen.run_id, "seen_holder": seen.holder,
         "seen_acquired": seen.acquired_at})
    return swapped.first() is not None


def _lease_params(lease: _Lease) -> dict[str, Any]:
    return {"c": lease.connection, "r": lease.run_id, "h": lease.holder, "a": lease.acquired_at,
            "e": lease.expires_at}


def _lost_a_race(engine: Engine, err: DBAPIError) -> bool:
    """DuckDB runs concurrent transactions optimistically: of two that write the lease row, the later one
    fails (a write-write conflict, or a duplicate key found at commit). Either way another starter got there
    first, and the lease must be read again."""
    if backend(engine) != "duckdb":
        return False
    import duckdb

    if isinstance(err.orig, duckdb.ConstraintException):
        # the insert meets the other starter's row, not yet committed (ON CONFLICT only skips committed ones)
        return "duplicate key" in str(err.orig).lower()
    return isinstance(err.orig, duckdb.TransactionException)


def _held_message(connection: str, seen: Any) -> str:
    host, _, pid = seen.holder.rpartition(":")
    return (f"connection '{connection}' is already running (run {seen.run_id}, since "
            f"{seen.acquired_at:%Y-%m-%d %H:%M:%S} UTC; holder {seen.holder}). If that run is dead, the next run "
            f"takes its lease over once it expires at {seen.expires_at:%Y-%m-%d %H:%M:%S} UTC, or at once if "
            f"started on host {host} after process {pid} has gone")


def _still_contended_message(engine: Engine, lease: _Lease) -> str:
    with transaction(engine) as conn:
        seen = _read_lease(conn, lease.connection)
    if seen is not None and seen.run_id != lease.run_id:
        return _held_message(lease.connection, seen)
    return (f"connection '{lease.connection}' is already running: run {lease.run_id} lost the race for its "
            f"lease {LEASE_ATTEMPTS} times to other runs starting at the same moment; start it again")


def assert_lock(conn: Connection, connection: str, run_id: str) -> None:
    """Inside the reconcile transaction: fail unless this run still holds the lease."""
    locked = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    row = conn.execute(text(f"SELECT run_id FROM {S}.sync_locks WHERE connection = :c{locked}"),
                       {"c": connection}).first()
    if row is None or row.run_id != run_id:
        raise LockHeld(f"run {run_id} lost the lock on connection '{connection}'")


def release_lock(engine: Engine, connection: str, run_id: str) -> None:
    """Give the lease back if this run still holds it. A run that outlived its lease may release it just as
    another takes it over: whichever commits second must see the first, never delete the new holder's row."""
    for attempt in range(LEASE_ATTEMPTS):
        try:
            with transaction(engine) as conn:
                _delete_own_lease(conn, connection, run_id)
            return
        except DBAPIError as err:
            if not _lost_a_race(engine, err) or attempt == LEASE_ATTEMPTS - 1:
                raise
        _pause_after_lost_race(attempt)


def _delete_own_lease(conn: Connection, connection: str, run_id: str) -> None:
    # DuckDB (2.0) does not always see a DELETE and a concurrent UPDATE of the same row as a conflict: with a
    # bare UPDATE in the other transaction both committed and the updated row was gone. Rewriting the columns
    # a takeover writes makes the two conflict whatever else the taker's transaction did, and _lost_a_race
    # retries. Postgres needs none of it (the row lock orders them); the rewrite costs it nothing.
    params = {"c": connection, "r": run_id}
    conn.execute(text(f"UPDATE {S}.sync_locks SET run_id = run_id, holder = holder, acquired_at = acquired_at, "
                      "expires_at = expires_at WHERE connection = :c AND run_id = :r"), params)
    conn.execute(text(f"DELETE FROM {S}.sync_locks WHERE connection = :c AND run_id = :r"), params)


@dataclass
class SyncState:
    cursor: datetime | None = None
    last_full_sync_at: datetime | None = None
    last_success_at: datetime | None = None
    resume_token: str | None = None
    scope_fingerprint: str | None = None   # the scope of the last successful sync (scope.py)
    scope: str | None = None


def get_state(engine: Engine, connection: str) -> SyncState:
    with transaction(engine) as conn:
        row = conn.execute(text(f"SELECT cursor, last_full_sync_at, last_success_at, resume_token, "
                                f"scope_fingerprint, scope FROM {S}.sync_state WHERE connection = :c"),
                           {"c": connection}).first()
    return SyncState(*row) if row else SyncState()


def missing_ids(engine: Engine, extract_id: str, connection: str) -> list[str]:
    """The connection's opportunities not deleted in the warehouse that this extract did not stage: a full
    sync reads them by id to tell the ones that left its scope from the ones the CRM no longer has."""
    with transaction(engine) as conn:
        return list(conn.execute(text(f"""
            SELECT o.source_id FROM {S}.opportunities o
            WHERE o.connection = :c AND o.deleted_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM {S}.stage_opportunities s
                              WHERE s.extract_id = :x AND s.source_id = o.source_id)
              AND NOT EXISTS (SELECT 1 FROM {S}.quarantine q
                              WHERE q.extract_id = :x AND q.source_id = o.source_id)
            ORDER BY o.source_id"""), {"c": connection, "x": extract_id}).scalars())


def save_quarantine(engine: Engine, extract_id: str, connection: str, entries: Sequence[Any], now: datetime) -> int:
    """Set records aside (quarantine.Quarantined): they stay out of staging; the reconcile neither updates nor
    deletes them."""
    if not entries:
        return 0
    with transaction(engine) as conn:
        return bulk_insert(conn, f"{S}.quarantine", ["extract_id", "connection", "crm", "source_id", "field",
                                                     "reason", "value", "quarantined_at"],
                           [(extract_id, connection, q.crm, q.source_id, q.field, q.reason, q.value, now)
                            for q in entries])


def quarantined(engine: Engine, extract_id: str, limit: int = 20) -> tuple[int, list[dict[str, Any]]]:
    """How many distinct records an extract quarantined, and the first entries (id, field, reason)."""
    with transaction(engine) as conn:
        n = conn.execute(text(f"SELECT count(DISTINCT COALESCE(source_id, '')) FROM {S}.quarantine "
                              "WHERE extract_id = :x"), {"x": extract_id}).scalar() or 0
        rows = conn.execute(text(f"SELECT source_id, field, reason FROM {S}.quarantine WHERE extract_id = :x "
                                 "ORDER BY source_id, field LIMIT :n"), {"x": extract_id, "n": limit}).mappings()
        return n, [dict(r) for r in rows]


def staged_count(engine: Engine, extract_id: str) -> int:
    """Distinct records an extract staged."""
    with transaction(engine) as conn:
        return conn.execute(text(f"SELECT count(DISTINCT source_id) FROM {S}.stage_opportunities "
                                 "WHERE extract_id = :x"), {"x": extract_id}).scalar() or 0


def live_count(engine: Engine, connection: str) -> int:
    """The connection's opportunities the warehouse holds as not deleted."""
    with transaction(engine) as conn:
        return conn.execute(text(f"SELECT count(*) FROM {S}.opportunities WHERE connection = :c "
                                 "AND deleted_at IS NULL"), {"c": connection}).scalar() or 0


def save_completeness(engine: Engine, extract_id: str, *, counts: dict[bool, int | None],
                      received: dict[bool, int], inferable: bool, quarantined: int,
                      crm_clock: datetime | None) -> None:
    """A full read's completeness against the CRM's own counts (sync.py decides `inferable`)."""
    with transaction(engine) as conn:
        conn.execute(text(f"UPDATE {S}.extracts SET crm_count_open = :co, crm_count_closed = :cc, "
                          "received_open = :ro, received_closed = :rc, deletes_inferable = :ok, quarantined = :q, "
                          "crm_clock = :clock WHERE extract_id = :x"),
                     {"co": counts.get(True), "cc": counts.get(False), "ro": received.get(True),
                      "rc": received.get(False), "ok": inferable, "q": quarantined, "clock": crm_clock,
                      "x": extract_id})


def begin_extract(engine: Engine, *, extract_id: str, connection: str, crm: str, mode: str,
                  started_at: datetime, since: datetime | None, scope_fingerprint: str | None = None,
                  scope: str | None = None) -> None:
    with transaction(engine) as conn:
        # A new extract supersedes every earlier one of the connection that was not reconciled (crashed runs,
        # or a completed extract whose reconcile never happened): their staged rows are garbage.
        p = {"c": connection, "x": extract_id}
        conn.execute(text(f"UPDATE {S}.extracts SET status = 'failed', error = 'abandoned (process ended)' "
                          "WHERE connection = :c AND status = 'running' AND extract_id <> :x"), p)
        conn.execute(text(f"UPDATE {S}.extracts SET status = 'superseded' "
                          "WHERE connection = :c AND status = 'complete' AND extract_id <> :x"), p)
        conn.execute(text(f"DELETE FROM {S}.stage_opportunities WHERE connection = :c"), p)
        conn.execute(text(f"DELETE FROM {S}.stage_deletes WHERE connection = :c"), p)
        conn.execute(text(f"DELETE FROM {S}.extracts WHERE extract_id = :x"), {"x": extract_id})
        conn.execute(text(f"INSERT INTO {S}.extracts (extract_id, connection, crm, mode, status, started_at, "
                          "since_cursor, scope_fingerprint, scope) "
                          "VALUES (:x, :c, :crm, :m, 'running', :s, :since, :fp, :scope)"),
                     {"x": extract_id, "c": connection, "crm": crm, "m": mode, "s": started_at, "since": since,
                      "fp": scope_fingerprint, "scope": scope})


# How DuckDB computes record.row_hash itself while it inserts a staged batch: the same text of each value,
# the same separator and digest (tests/test_row_hash_sql.py holds the two to each other). Hashing in Python
# was a fifth of staging time (4.5 us a record); vectorised in DuckDB it is a small part of the insert.
# DuckDB rounds halves away from zero where Python rounds the exact binary value, so the few records with a
# number of more than 6 decimals (or not a float, or a date-time before year 1000) keep their Python hash,
# passed in the row_hash column, which the expression keeps. Postgres stages through COPY, which cannot
# compute, and keeps the Python hash for every record.
def _duckdb_hash_text(field: CanonicalField) -> str:
    """The text record.row_hash gives a value of this field, as DuckDB writes it (NULL is chr(0))."""
    name = field.name
    if field.sql_type is Double:
        text_of = f"CAST(CAST({name} AS DOUBLE) AS VARCHAR)"   # shortest round-trip form, as repr()
    elif field.sql_type is Date:
        text_of = f"CAST(CAST({name} AS DATE) AS VARCHAR)"
    elif field.sql_type is DateTime:
        text_of = f"strftime(CAST({name} AS TIMESTAMP), '%Y-%m-%dT%H:%M:%S.%f')"
    else:
        text_of = f"CAST({name} AS VARCHAR)"
    return f"coalesce({text_of}, chr(0))"


_TRACKED = [f for f in FIELDS if f.tracked]
DUCKDB_ROW_HASH = f"coalesce(row_hash, md5(concat_ws(chr(31), {', '.join(map(_duckdb_hash_text, _TRACKED))})))"
RAW = STAGE_COLUMNS.index("raw")

# How staged_rows reads a record: the canonical values in column order, which of them are CRM text (NUL
# bytes cleaned), date-times (to naive UTC), and the numbers and date-times whose DuckDB hash text can differ
# from Python's (_hash_needs_python).
_CANONICAL_VALUES = attrgetter(*CANONICAL)
_TRACKED_SLICE = slice(CANONICAL.index(TRACKED_FIELDS[0]), CANONICAL.index(TRACKED_FIELDS[-1]) + 1)
assert CANONICAL[_TRACKED_SLICE] == TRACKED_FIELDS, "the tracked fields must be contiguous in record.FIELDS"
_CLEANED = tuple(i for i, f in enumerate(FIELDS) if f.cleaned)
_DATETIMES = tuple(i for i, f in enumerate(FIELDS) if f.sql_type is DateTime)
_HASHED_NUMBERS = tuple(i for i, f in enumerate(FIELDS) if f.tracked and f.sql_type is Double)
_HASHED_DATETIMES = tuple(i for i, f in enumerate(FIELDS) if f.tracked and f.sql_type is DateTime)


def _hash_needs_python(values: Sequence[Any]) -> bool:
    for i in _HASHED_NUMBERS:
        v = values[i]
        # whole numbers first: round(v, 6) is a decimal conversion (~1 us), is_integer a comparison
        if v is not None and (type(v) is not float or not (v.is_integer() or round(v, 6) == v)):
            return True
    return any(values[i] is not None and values[i].year < 1000 for i in _HASHED_DATETIMES)


def staged_rows(extract_id: str, page: Sequence[Opportunity], in_open_set: bool, seq0: int, *,
                with_hash: bool = True, scopes: Sequence[str] | None = None) -> list[tuple]:
    """One page of extracted records as staging rows (STAGE_COLUMNS order). With with_hash=False the
    row_hash is None where DUCKDB_ROW_HASH computes it the same, during the insert. `scopes`: each record's
    scope verdict (SCOPE_*), all `in` when None.

    The row hash is taken over the values as they will be stored (NUL bytes cleaned), so a record whose
    stored values are unchanged always hashes the same."""
    rows = []
    add = rows.append
    for i, o in enumerate(page):
        values = list(_CANONICAL_VALUES(o))
        for j in _CLEANED:
            values[j] = clean_text(values[j])
        for j in _DATETIMES:
            if values[j] is not None:
                values[j] = to_utc(values[j])
        digest = row_hash(*values[_TRACKED_SLICE]) if with_hash or _hash_needs_python(values) else None
        add((extract_id, o.connection, o.source_id, seq0 + i, in_open_set,
             scopes[i] if scopes is not None else SCOPE_IN, *values, raw_json(o.raw), digest))
    return rows


def hashes_in_database(engine: Engine) -> bool:
    return backend(engine) == "duckdb"


def write_staged(engine: Engine, rows: Sequence[tuple]) -> int:
    """Write staging rows (from staged_rows) in one short transaction. On DuckDB the insert computes the
    row hashes the rows leave as None."""
    with transaction(engine) as conn:
        computed = {"row_hash": DUCKDB_ROW_HASH} if hashes_in_database(engine) else None
        return bulk_insert(conn, f"{S}.stage_opportunities", STAGE_COLUMNS, rows, computed=computed)


def stage_page(engine: Engine, extract_id: str, page: Sequence[Opportunity], in_open_set: bool, seq0: int) -> int:
    """Write one page of extracted records to staging at once (its own short transaction)."""
    writer = StagingWriter(engine, extract_id)
    writer.add(page, in_open_set, seq0)
    writer.flush()
    return writer.written


# A staging batch is written once it holds this many rows or this many characters of raw payload.
STAGING_BATCH_ROWS = 50_000
STAGING_BATCH_CHARS = 16_000_000


class StagingWriter:
    """Stages an extract's pages in batches: one short warehouse transaction per batch, not per page.

    A transaction has a fixed cost that a page does not repay: on DuckDB, opening the file, committing and
    the checkpoint when it is closed take ~50 ms, more than writing 10,000 rows (a 1,000,000-row extract
    spent 14 of its 37 staging seconds there). The warehouse file stays free between batches, so other
    connections' runs get their transactions in, and memory stays bounded by the batch limits (about
    16 MB of raw payload, whatever the CRM's page size). Rows are converted as pages arrive; nothing is
    written until `flush` (or a full batch), and a failed extract simply never flushes the rest: its
    staging is discarded anyway."""

    def __init__(self, engine: Engine, extract_id: str, *, batch_rows: int = STAGING_BATCH_ROWS,
                 batch_chars: int = STAGING_BATCH_CHARS) -> None:
        self.engine, self.extract_id = engine, extract_id
        self.batch_rows, self.batch_chars = batch_rows, batch_chars
        self.written = 0
        self._with_hash = not hashes_in_database(engine)
        self._rows: list[tuple] = []
        self._chars = 0

    def add(self, page: Sequence[Opportunity], in_open_set: bool, seq0: int,
            scopes: Sequence[str] | None = None) -> int:
        rows = staged_rows(self.extract_id, page, in_open_set, seq0, with_hash=self._with_hash, scopes=scopes)
        self._rows.extend(rows)
        self._chars += sum(len(r[RAW]) for r in rows)  # the raw JSON dominates a row's size
        if len(self._rows) >= self.batch_rows or self._chars >= self.batch_chars:
            self.flush()
        return len(rows)

    def flush(self) -> int:
        rows, self._rows, self._chars = self._rows, [], 0
        n = write_staged(self.engine, rows) if rows else 0
        self.written += n
        return n


def stage_deletes(engine: Engine, extract_id: str, connection: str,
                  page: Iterable[tuple[str, datetime | None]]) -> int:
    rows = [(extract_id, connection, str(sid), to_utc(at) if at else None) for sid, at in page]
    with transaction(engine) as conn:
        return bulk_insert(conn, f"{S}.stage_deletes", ["extract_id", "connection", "source_id", "deleted_at"], rows)


def finish_extract(engine: Engine, extract_id: str, *, status: str, finished_at: datetime,
                   new_cursor: datetime | None = None, counts: dict[str, int] | None = None,
                   stats: RunStats | None = None, error: str | None = None,
                   resume_token: str | None = None) -> None:
    counts, stats = counts or {}, stats if stats is not None else RunStats.unknown()
    with transaction(engine) as conn:
        conn.execute(update(extracts).where(extracts.c.extract_id == extract_id).values(
            status=status, finished_at=finished_at, new_cursor=new_cursor, fetched_open=counts.get("open", 0),
            fetched_closed=counts.get("closed", 0), fetched_deleted=counts.get("deleted", 0),
            api_requests=stats.api_requests, retries=stats.retries,
            seconds_waited=stats.seconds_waited_on_rate_limits, quota_used=stats.quota_used,
            quota_limit=stats.quota_limit, error=error, new_resume_token=resume_token,
            token_requests=stats.token_requests, warnings=stats.warnings_text(), mapping_version=MAPPING_VERSION))
        if status == ExtractStatus.COMPLETE:
            # what the warehouse will hold after reconcile: the staged records, and the quarantined ones it
            # already has (kept as they were)
            conn.execute(text(f"""
                UPDATE {S}.extracts SET
                    reported_open = (SELECT count(*) FROM ({_LATEST}) t WHERE status = 'open')
                                    + ({_KEPT} AND o.status = 'open'),
                    reported_closed = (SELECT count(*) FROM ({_LATEST}) t WHERE status <> 'open')
                                    + ({_KEPT} AND o.status <> 'open')
                WHERE extract_id = :x"""), {"x": extract_id})
        else:
            conn.execute(text(f"DELETE FROM {S}.stage_opportunities WHERE extract_id = :x"), {"x": extract_id})
            conn.execute(text(f"DELETE FROM {S}.stage_deletes WHERE extract_id = :x"), {"x": extract_id})


def state_mapping_version(engine: Engine, connection: str) -> tuple[bool, int | None]:
    """(whether the warehouse holds opportunities of the connection from an earlier sync, the
    record.MAPPING_VERSION it was last synced with). The same test as the reconcile's re-baseline."""
    with transaction(engine) as conn:
        row = conn.execute(text(f"SELECT mapping_version FROM {S}.sync_state WHERE connection = :c"),
                           {"c": connection}).first()
        if row is None:
            return False, None
        has_rows = conn.execute(text(f"SELECT count(*) FROM {S}.opportunities WHERE connection = :c"),
                                {"c": connection}).scalar()
    return bool(has_rows), row[0]


# The latest staged version of each id the reconcile will track: in scope, or before the stage trigger but
# already tracked (once tracked, kept). Records read by id that left the filters, and untracked ones before
# the trigger stage, are not part of what the CRM reported for this connection.
_LATEST = f"""SELECT status FROM (
    SELECT status, source_id, connection, scope, row_number() OVER (
        PARTITION BY source_id ORDER BY modified_at DESC NULLS LAST, seq DESC) AS rn
    FROM {S}.stage_opportunities WHERE extract_id = :x) v
    WHERE rn = 1 AND (COALESCE(v.scope, 'in') = 'in' OR (v.scope = 'before_stage' AND EXISTS (
        SELECT 1 FROM {S}.opportunities o WHERE o.connection = v.connection AND o.source_id = v.source_id)))"""


# Quarantined records the warehouse holds (live, in scope) and the extract did not stage: kept unchanged.
_KEPT = f"""SELECT count(DISTINCT q.source_id) FROM {S}.quarantine q
    JOIN {S}.opportunities o ON o.connection = q.connection AND o.source_id = q.source_id
    WHERE q.extract_id = :x AND o.deleted_at IS NULL AND o.in_scope IS NOT FALSE
      AND NOT EXISTS (SELECT 1 FROM {S}.stage_opportunities s WHERE s.extract_id = :x AND s.source_id = q.source_id)"""


def save_users(engine: Engine, connection: str, users: Iterable[CrmUser], now: datetime) -> int:
    rows = {u.crm_user_id: u for u in users}
    with transaction(engine) as conn:
        conn.execute(text(f"DELETE FROM {S}.crm_users WHERE connection = :c"), {"c": connection})
        return bulk_insert(conn, f"{S}.crm_users",
                           ["connection", "crm_user_id", "name", "email", "kind", "active", "alt_ids", "updated_at"],
                           [(connection, u.crm_user_id, clean_text(u.name), clean_text(u.email), u.kind, u.active,
                             ",".join(u.alt_ids), now) for u in rows.values()])


def save_stages(engine: Engine, connection: str, stages: Iterable[StageInfo], categories: dict[str, str]) -> int:
    """The tenant's stages with their category; the connection's stage mapping overrides the CRM's flags."""
    rows = []
    for s in stages:
        category = categories.get(s.key) or categories.get(s.label) or s.category
        rows.append((connection, s.key, clean_text(s.label), s.pipeline, s.is_closed, s.is_won, s.sort_order,
                     s.probability, category))
    with transaction(engine) as conn:
        conn.execute(text(f"DELETE FROM {S}.crm_stages WHERE connection = :c"), {"c": connection})
        return bulk_insert(conn, f"{S}.crm_stages", ["connection", "stage_key", "label", "pipeline", "is_closed",
                                                     "is_won", "sort_order", "probability", "category"], rows)


def save_directory(engine: Engine, cfg: Any, now: datetime) -> None:
    """Internal users, their links to CRM users (in configured order: first linked wins), and connection
    settings the mart needs. Replaced wholesale from configuration; attribution is computed at read time,
    so a link added later credits past opportunities too (retroactive)."""
    with transaction(engine) as conn:
        conn.execute(text(f"DELETE FROM {S}.user_links"))
        conn.execute(text(f"DELETE FROM {S}.users"))
        bulk_insert(conn, f"{S}.users", ["user_id", "name", "email"], [(u.id, u.name, u.email) for u in cfg.users])
        links, order = [], 0
        for u in cfg.users:
            for connection, ids in u.crm_ids.items():
                for crm_id in ids:
                    order += 1
                    links.append((u.id, connection, str(crm_id), order, now))
        bulk_insert(conn, f"{S}.user_links", ["user_id", "connection", "crm_user_id", "link_order", "linked_at"],
                    links)
        conn.execute(text(f"DELETE FROM {S}.connections"))
        bulk_insert(conn, f"{S}.connections",
                    ["name", "crm", "qualified_stages", "qualified_min_probability", "updated_at"],
                    [(c.name, c.crm,
                      "\x1f".join(c.qualification.stages) if c.qualification else None,
                      c.qualification.min_probability if c.qualification else None, now)
                     for c in cfg.connections])


def load_extract(engine: Engine, extract_id: str) -> dict[str, Any] | None:
    """The extracts row of one run (the reconcile step picks up what the extract step recorded)."""
    with transaction(engine) as conn:
        row = conn.execute(text(f"SELECT * FROM {S}.extracts WHERE extract_id = :x"), {"x": extract_id}).mappings().first()
    return dict(row) if row else None


def warehouse_counts(engine: Engine, connection: str) -> dict[str, int]:
    """Live, in-scope opportunities of a connection by status (for the post-reconcile count check)."""
    with transaction(engine) as conn:
        rows = conn.execute(text(f"SELECT status, count(*) FROM {S}.opportunities WHERE connection = :c "
                                 "AND deleted_at IS NULL AND in_scope IS NOT FALSE GROUP BY status"),
                            {"c": connection}).fetchall()
    return {status: n for status, n in rows}


def attribution_gaps(engine: Engine, connection: str) -> dict[str, Any]:
    """Share of live opportunities whose creator links to no internal user, and stages the tenant's stage
    list does not know (WARN checks: visible, never blocking)."""
    with transaction(engine) as conn:
        total = conn.execute(text(f"SELECT count(*) FROM {S}.opportunities WHERE connection = :c "
                                  "AND deleted_at IS NULL"), {"c": connection}).scalar() or 0
        # A link names any id of the person (ConnectWise: the member id or its identifier; HubSpot: the owner
        # id or the user id): both sides are matched through crm_users' alt_ids, as the mart's attribution does.
        unmapped = conn.execute(text(f"""
            SELECT count(*) FROM {S}.opportunities o
            WHERE o.connection = :c AND o.deleted_at IS NULL AND NOT EXISTS (
                SELECT 1 FROM {S}.user_links l WHERE l.connection = o.connection
                  AND l.crm_user_id = o.created_by_crm_id)
              AND NOT EXISTS (
                SELECT 1 FROM {S}.user_links l
                JOIN {S}.crm_users u ON u.connection = l.connection
                  AND (u.crm_user_id = l.crm_user_id
                       OR ',' || COALESCE(u.alt_ids, '') || ',' LIKE '%,' || l.crm_user_id || ',%')
                WHERE l.connection = o.connection AND (u.crm_user_id = o.created_by_crm_id
                      OR ',' || COALESCE(u.alt_ids, '') || ',' LIKE '%,' || o.created_by_crm_id || ',%'))"""),
            {"c": connection}).scalar() or 0
        unknown = conn.execute(text(f"""
            SELECT o.stage, count(*) FROM {S}.opportunities o
            WHERE o.connection = :c AND o.deleted_at IS NULL AND NOT EXISTS (
                SELECT 1 FROM {S}.crm_stages s WHERE s.connection = o.connection
                  AND s.stage_key = COALESCE(o.stage_id, o.stage))
            GROUP BY o.stage ORDER BY 2 DESC"""), {"c": connection}).fetchall()
    return {"total": total, "unmapped_creators": unmapped,
            "unknown_stages": {str(stage): n for stage, n in unknown}}
