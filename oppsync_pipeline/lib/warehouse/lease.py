"""The per-connection lease: one run of a connection at a time, and a crashed holder never blocks the next
run for long. Every statement uses bound parameters."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from oppsync_pipeline.lib.warehouse import dialect
from oppsync_pipeline.lib.warehouse.engine import transaction
from oppsync_pipeline.lib.warehouse.schema import SCHEMA as S
from oppsync_pipeline.lib.warehouse.schema import sync_locks


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
            if not dialect.lost_a_race(engine, err):
                raise
        _pause_after_lost_race(attempt)
    raise LockHeld(_still_contended_message(engine, lease))


def _pause_after_lost_race(attempt: int) -> None:
    time.sleep(min(LEASE_RETRY_PAUSE * 2**attempt, LEASE_RETRY_PAUSE_MAX))


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
    inserted = conn.execute(
        text(
            f"INSERT INTO {S}.sync_locks (connection, run_id, holder, acquired_at, expires_at) "
            "VALUES (:c, :r, :h, :a, :e) ON CONFLICT (connection) DO NOTHING RETURNING run_id"
        ),
        _lease_params(lease),
    )
    return inserted.first() is not None


def _read_lease(conn: Connection, connection: str) -> Any:
    return conn.execute(
        select(sync_locks.c.run_id, sync_locks.c.holder, sync_locks.c.acquired_at, sync_locks.c.expires_at).where(
            sync_locks.c.connection == connection
        )
    ).first()


def _swap_if_unchanged(conn: Connection, lease: _Lease, seen: Any) -> bool:
    """Take over the lease row as it was read. On Postgres a concurrent swap waits for the first to commit,
    then finds the row changed and updates nothing; on DuckDB it fails with a conflict (dialect.lost_a_race)."""
    swapped = conn.execute(
        text(
            f"UPDATE {S}.sync_locks SET run_id = :r, holder = :h, acquired_at = :a, expires_at = :e "
            "WHERE connection = :c AND run_id = :seen_run AND holder = :seen_holder AND acquired_at = :seen_acquired "
            "RETURNING run_id"
        ),
        {
            **_lease_params(lease),
            "seen_run": seen.run_id,
            "seen_holder": seen.holder,
            "seen_acquired": seen.acquired_at,
        },
    )
    return swapped.first() is not None


def _lease_params(lease: _Lease) -> dict[str, Any]:
    return {"c": lease.connection, "r": lease.run_id, "h": lease.holder, "a": lease.acquired_at, "e": lease.expires_at}


def _held_message(connection: str, seen: Any) -> str:
    host, _, pid = seen.holder.rpartition(":")
    return (
        f"connection '{connection}' is already running (run {seen.run_id}, since "
        f"{seen.acquired_at:%Y-%m-%d %H:%M:%S} UTC; holder {seen.holder}). If that run is dead, the next run "
        f"takes its lease over once it expires at {seen.expires_at:%Y-%m-%d %H:%M:%S} UTC, or at once if "
        f"started on host {host} after process {pid} has gone"
    )


def _still_contended_message(engine: Engine, lease: _Lease) -> str:
    with transaction(engine) as conn:
        seen = _read_lease(conn, lease.connection)
    if seen is not None and seen.run_id != lease.run_id:
        return _held_message(lease.connection, seen)
    return (
        f"connection '{lease.connection}' is already running: run {lease.run_id} lost the race for its "
        f"lease {LEASE_ATTEMPTS} times to other runs starting at the same moment; start it again"
    )


def assert_lock(conn: Connection, connection: str, run_id: str) -> None:
    """Inside the reconcile transaction: fail unless this run still holds the lease."""
    locked = " FOR UPDATE" if dialect.locks_rows(conn) else ""
    row = conn.execute(
        text(f"SELECT run_id FROM {S}.sync_locks WHERE connection = :c{locked}"), {"c": connection}
    ).first()
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
            if not dialect.lost_a_race(engine, err) or attempt == LEASE_ATTEMPTS - 1:
                raise
        _pause_after_lost_race(attempt)


def _delete_own_lease(conn: Connection, connection: str, run_id: str) -> None:
    # DuckDB (2.0) does not always see a DELETE and a concurrent UPDATE of the same row as a conflict: with a
    # bare UPDATE in the other transaction both committed and the updated row was gone. Rewriting the columns
    # a takeover writes makes the two conflict whatever else the taker's transaction did, and dialect.lost_a_race
    # retries. Postgres needs none of it (the row lock orders them); the rewrite costs it nothing.
    params = {"c": connection, "r": run_id}
    conn.execute(
        text(
            f"UPDATE {S}.sync_locks SET run_id = run_id, holder = holder, acquired_at = acquired_at, "
            "expires_at = expires_at WHERE connection = :c AND run_id = :r"
        ),
        params,
    )
    conn.execute(delete(sync_locks).where(sync_locks.c.connection == connection, sync_locks.c.run_id == run_id))
