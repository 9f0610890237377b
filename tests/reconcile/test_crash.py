"""A reconcile killed (SIGKILL) at any point converges, on re-run, to the uninterrupted result.

What "re-run" means for the engine: reconcile the SAME completed extract again (new process, same run,
taking over the lock its dead holder left). That is possible because a reconcile is one transaction:
until it commits, the extract stays 'complete' and its staged rows stay; after it commits, the extract is
'reconciled' and the re-run changes nothing. So no re-extract is ever needed after a crash in reconcile;
the test checks both halves of that claim at every kill point.

Kill points per backend: before / after / during single statements spread over the whole transaction
(diff tables, events, history, current rows, bookkeeping), just before COMMIT, and after COMMIT but before
the lock is released. "During" on DuckDB: a thread in the child kills it while the driver runs the
statement. "During" on Postgres: the test holds a table lock that statement N needs, waits until the
child's backend is blocked on it (so the statement is provably in flight), then kills the child.

Each case starts from a copy of one prepared warehouse (DuckDB: a file copy; Postgres: the prepared
database restored table by table; the reference run gets a database of its own), holding a reconciled
first sync and a staged, complete second extract that creates, updates, closes, reopens, deletes
(inferred and from the delete feed) and restores.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction
from tests.conftest import PG_ADMIN_URL, _drop_database, require_postgres
from tests.reconcile import crash_child
from tests.reconcile.crash_child import RECONCILED_AT
from tests.reconcile.harness import (
    CONNECTION,
    LOCK_TTL,
    T0,
    TABLES,
    Extract,
    open_engine,
    opp,
    reconcile_extract,
    snapshot,
    stage_extract,
    sync,
)

RUN = "r2"
AT = datetime.fromisoformat(RECONCILED_AT)
N = 400  # enough rows that the set-based statements take measurable time to be killed in


def first_sync() -> Extract:
    records = [
        opp(
            f"o{i:05d}",
            status=("open", "open", "won", "lost")[i % 4],
            amount=float(i),
            modified_at=T0 - timedelta(days=1),
        )
        for i in range(N)
    ]
    return Extract(
        "full",
        [(True, [r for r in records if r.status == "open"]), (False, [r for r in records if r.status != "open"])],
    )


def second_extract() -> Extract:
    """Every kind of change at once; ~10% inferred deletes stay under the guard."""
    later = T0 + timedelta(hours=2)
    records = []
    for i in range(N):
        sid, status = f"o{i:05d}", ("open", "open", "won", "lost")[i % 4]
        if i % 10 == 0:
            continue  # deleted in the CRM: inferred delete
        if i % 10 == 1:
            records.append(opp(sid, status=status, amount=float(i) + 0.5, modified_at=later))  # updated
        elif i % 10 == 2 and status == "open":
            records.append(opp(sid, status="won", amount=float(i), modified_at=later))  # closed
        elif i % 10 == 3 and status != "open":
            records.append(opp(sid, status="open", amount=float(i), modified_at=later))  # reopened
        else:
            records.append(opp(sid, status=status, amount=float(i), modified_at=T0 - timedelta(days=1)))
    records += [opp(f"n{i:05d}", status="open" if i % 3 else "won", modified_at=later) for i in range(N // 10)]
    duplicates = records[: N // 20]
    return Extract(
        "full",
        [
            (True, [r for r in records if r.status == "open"]),
            (False, [r for r in records if r.status != "open"]),
            (True, [r for r in duplicates if r.status == "open"]),
        ],
        deletes=[(f"o{i:05d}", later) for i in range(0, N, 50)],
    )


@dataclass
class Warehouse:
    """Copies of one prepared warehouse, one per case, for one backend."""

    backend: str
    tmp: Path
    base: str = ""
    made: list[str] | None = None

    def prepare(self) -> None:
        self.made = []
        url = self.new_url("base") if self.backend == "duckdb" else self._create_pg("base")
        engine = open_engine(url)
        sync(engine, "r1", first_sync(), T0)
        # o00002 (won) is deleted by a second sync; the extract under test brings it back (restored)
        open_page, closed_page = (page for _, page in first_sync().pages)
        sync(
            engine,
            "r1b",
            Extract("full", [(True, open_page), (False, [r for r in closed_page if r.source_id != "o00002"])]),
            T0 + timedelta(hours=1),
        )
        stage_extract(engine, RUN, second_extract(), AT)
        if self.backend == "postgres":
            with transaction(engine) as conn:  # kept to restore the database between cases
                conn.execute(text("CREATE SCHEMA crash_base"))
                for table in TABLES:
                    conn.execute(text(f"CREATE TABLE crash_base.{table} AS SELECT * FROM oppsync.{table}"))
        engine.dispose()
        self.base = url

    def new_url(self, name: str) -> str:
        return f"duckdb:///{self.tmp / f'{name}.duckdb'}"

    def copy(self, name: str) -> str:
        """The prepared warehouse, fresh. The reference gets a database of its own; on Postgres the kill
        cases then reuse the prepared database, restored table by table (CREATE DATABASE per case is slow)."""
        if self.backend == "duckdb":
            src = Path(make_url(self.base).database)
            dst = self.tmp / f"{name}.duckdb"
            shutil.copyfile(src, dst)
            return self.new_url(name)
        if name == "reference":
            return self._create_pg(name, template=make_url(self.base).database)
        engine = make_engine(self.base)
        with transaction(engine) as conn:  # waits for a killed child's backend to give up its locks
            for table in TABLES:
                conn.execute(text(f"DELETE FROM oppsync.{table}"))
                conn.execute(text(f"INSERT INTO oppsync.{table} SELECT * FROM crash_base.{table}"))
        engine.dispose()
        return self.base

    def _create_pg(self, name: str, template: str | None = None) -> str:
        db = f"oppsync_crash_{name}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{db}"' + (f' TEMPLATE "{template}"' if template else "")))
        admin.dispose()
        self.made.append(db)
        return make_url(PG_ADMIN_URL).set(database=db).render_as_string(hide_password=False)

    def cleanup(self) -> None:
        for db in reversed(self.made or []):
            if self.backend == "postgres":
                _drop_database(db)


# Children are forked from the test process: a fresh interpreter (spawn, forkserver) re-imports the engine
# and the test's main module per kill point, which took most of the test's time. Forking is safe here: the
# child opens its own engine and never touches a connection it inherited (they stay the parent's), and a
# SIGKILL or os._exit at its end runs no cleanup that could close them. Each child has its own pid, so the
# lock it leaves behind names a dead holder, as a real crash would.
CHILDREN = multiprocessing.get_context("fork")


def start_child(url: str, point: str, log: Path) -> multiprocessing.process.BaseProcess:
    child = CHILDREN.Process(target=crash_child.main, args=(url, RUN, point, str(log)), daemon=True)
    child.start()
    return child


def run_child(url: str, point: str, log: Path, *, blocked_on: str | None = None) -> int:
    """Run the child to its end (or its death); returns its exit code (-9: killed)."""
    if blocked_on is None:
        child = start_child(url, point, log)
        child.join(120)
        return child.exitcode
    # Postgres, mid-statement: hold a lock the child's statement needs, kill it while it waits inside it.
    engine = create_engine(url)
    holder, watcher = engine.connect(), engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    trans = holder.begin()
    holder.execute(text(f"LOCK TABLE oppsync.{blocked_on} IN ACCESS EXCLUSIVE MODE"))
    child = start_child(url, point, log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # its own autocommit connection: pg_stat_activity is a snapshot fixed for a whole transaction
            waiting = watcher.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar()
            if waiting:
                break
            if not child.is_alive():
                raise AssertionError(f"child ended ({child.exitcode}) before blocking: {log.read_text()}")
            time.sleep(0.02)
        else:
            raise AssertionError("child never blocked on the table lock")
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        trans.rollback()
        holder.close()
        watcher.close()
        engine.dispose()
    return child.exitcode


def statement_index(log: Path, starts_with: str) -> int:
    for line in log.read_text().splitlines():
        if line.startswith("begin ") and line.split(" ", 2)[2].startswith(starts_with):
            return int(line.split()[1])
    raise AssertionError(f"no statement starting {starts_with!r} in the reconcile")


def last_begun(log: Path) -> tuple[int, bool]:
    """The last statement begun in the child's log, and whether it ended."""
    lines = log.read_text().splitlines()
    begun = [int(line.split()[1]) for line in lines if line.startswith("begin ")]
    ended = {int(line.split()[1]) for line in lines if line.startswith("end ")}
    return (begun[-1], begun[-1] in ended) if begun else (0, False)


def rerun(url: str) -> None:
    """The re-run: a new process (this one) reconciles the same extract, taking over the dead holder's lock."""
    engine = make_engine(url)
    with transaction(engine) as conn:
        holder = conn.execute(
            text("SELECT holder FROM oppsync.sync_locks WHERE connection = :c"), {"c": CONNECTION}
        ).scalar()
    assert holder is not None and holder != store.holder_id() and not store._pid_alive(holder), (
        f"the crashed child should have left its lock behind, held by a dead pid (holder {holder})"
    )
    # a new run of the connection would be let in too: the holder is dead
    store.acquire_lock(engine, CONNECTION, RUN, AT + timedelta(minutes=1), LOCK_TTL)
    try:
        reconcile_extract(engine, RUN, "full", AT)
    finally:
        store.release_lock(engine, CONNECTION, RUN)
    engine.dispose()


def read(url: str) -> dict:
    engine = open_engine(url)  # one connection for the whole snapshot
    try:
        return snapshot(engine)
    finally:
        engine.dispose()


# (kill point, where the kill lands, Postgres table to block on for a provable mid-statement kill)
KILL_POINTS = [
    ("before", "SELECT run_id FROM oppsync.sync_locks", None),  # first statement: the lock check
    ("after", "CREATE TEMPORARY TABLE rc_src", None),
    ("during", "CREATE TEMPORARY TABLE rc_cls", "opportunities"),
    ("after", "CREATE TEMPORARY TABLE rc_diff", None),
    ("after", "INSERT INTO oppsync.opportunity_events", None),
    ("during", "INSERT INTO oppsync.opportunity_events", "opportunity_events"),
    ("during", "UPDATE oppsync.opportunity_history", "opportunity_history"),
    ("before", "INSERT INTO oppsync.opportunities", None),
    ("during", "UPDATE oppsync.opportunities AS o SET crm", None),
    ("during", "SELECT cursor, last_full_sync_at", "sync_state"),
    ("after", "INSERT INTO oppsync.sync_runs", None),
    # the staged rows cleared, last: Postgres locks staging (NOWAIT) and truncates it, DuckDB deletes them
    ("after", {"duckdb": "DELETE FROM oppsync.stage_opportunities", "postgres": "LOCK TABLE oppsync.stage"}, None),
    ("after", {"duckdb": "DELETE FROM oppsync.stage_deletes", "postgres": "TRUNCATE oppsync.stage"}, None),
    ("commit", "", None),
    ("returned", "", None),
]


@pytest.mark.parametrize("backend", ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_killed_reconcile_converges_on_rerun_to_the_uninterrupted_result(backend, tmp_path):
    if backend == "postgres":
        require_postgres()
    wh = Warehouse(backend, tmp_path)
    try:
        wh.prepare()
        before = read(wh.base)
        assert before["extracts"][-1] == (RUN, "complete") and before["staged"] > 0

        reference_url, reference_log = wh.copy("reference"), tmp_path / "reference.log"
        assert run_child(reference_url, "none", reference_log) == 0, reference_log.read_text()
        reference = read(reference_url)
        assert reference["extracts"][-1] == (RUN, "reconciled") and reference["staged"] == 0
        assert len(reference["events"]) > len(before["events"])

        landed = []
        for i, (where, statement, block_table) in enumerate(KILL_POINTS):
            statement = statement[backend] if isinstance(statement, dict) else statement
            url, log = wh.copy(f"k{i}"), tmp_path / f"k{i}.log"
            point = where if where in ("commit", "returned") else f"{where}:{statement_index(reference_log, statement)}"
            if where == "during" and backend == "postgres" and block_table:
                crashed = run_child(url, "none", log, blocked_on=block_table)
            else:
                crashed = run_child(url, point, log)
            assert crashed == -signal.SIGKILL, (point, crashed, log.read_text()[-2000:])
            stmt, ended = last_begun(log)
            landed.append((point, stmt, "returned" if ended else "in flight"))

            after_crash = read(url)
            committed = where == "returned"
            expected = reference if committed else before
            for part in ("current", "events", "history", "sync_state", "sync_runs", "extracts", "staged"):
                assert after_crash[part] == expected[part], (point, part)

            rerun(url)
            assert read(url) == reference, point
        print(f"\n{backend} kill points (point, last statement begun, state):", *landed, sep="\n  ")
    finally:
        wh.cleanup()
