"""Child process of test_crash: take the lock, reconcile one staged extract, and die by SIGKILL at a point.

    python -m tests.reconcile.crash_child URL RUN_ID POINT LOG

POINT: none | before:N | after:N | during:N | commit | returned   (N counts the reconcile's SQL statements
from 1). `during` starts a thread that kills the process as soon as statement N has been handed to the
driver, i.e. while the database executes it. Every statement is logged to LOG as it begins and ends, so
the parent knows where the process died. The lock is taken with this process's pid as the holder, so a
crash leaves a lock whose holder is dead, as a real crash would.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading

from sqlalchemy import event

from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import make_engine
from tests.reconcile.harness import CONNECTION, LOCK_TTL, reconcile_extract

RECONCILED_AT = "2026-03-01T10:00:00"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(url: str, run_id: str, point: str, log_path: str) -> None:
    from datetime import datetime

    # Forked from a test worker whose earlier tests left engines behind: no garbage collection of what came along
    # (a DuckDB object finalized here, without its parent's threads, can crash the child). The child lives seconds.
    gc.disable()
    at = datetime.fromisoformat(RECONCILED_AT)
    engine = make_engine(url)
    store.acquire_lock(engine, CONNECTION, run_id, at, LOCK_TTL)
    where, _, n = point.partition(":")
    kill_at = int(n) if n else -1
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open until the parent's SIGKILL
    count = 0

    @event.listens_for(engine, "before_cursor_execute")
    def before(conn, cursor, statement, parameters, context, executemany):
        nonlocal count
        count += 1
        log.write(f"begin {count} {' '.join(statement.split())[:90]}\n")
        if count == kill_at and where == "before":
            die()
        if count == kill_at and where == "during":
            threading.Thread(target=die, daemon=True).start()

    @event.listens_for(engine, "after_cursor_execute")
    def after(conn, cursor, statement, parameters, context, executemany):
        log.write(f"end {count}\n")
        if count == kill_at and where == "after":
            die()

    @event.listens_for(engine, "commit")
    def commit(conn):
        log.write("commit\n")
        if where == "commit":
            die()

    reconcile_extract(engine, run_id, "full", at)
    log.write("returned\n")
    if where == "returned":
        die()
    store.release_lock(engine, CONNECTION, run_id)
    log.write("released\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
