"""Twenty runs of one connection starting at the same moment: exactly one takes the lease, on DuckDB and
Postgres, whether the lease was free, held by a dead process on this host, or expired; every other run gets
LockHeld naming the winner, and no other error. And a run releasing its expired lease just as another takes
it over leaves the lease to the taker, whichever commits first.

Threads each with their own engine, released together by a Barrier; on Postgres also twenty processes. The
threads race a few rounds per test. Against the check-then-act lease this replaces (read, decide in Python,
then insert or update), in two measurements of 20 rounds of each race: DuckDB threads failed 13 to 18 rounds
of 20 (a loser's IntegrityError or transaction conflict), Postgres threads 20 of 20 (free: a loser's
IntegrityError; dead or expired holder: 3 to 20 winners), Postgres processes 15 to 19 of 20.

DuckDB lets one process at a time open a warehouse file, so runs in different processes are serialised by
the file lock before they reach the lease. Its in-process race is between connections to one database
(plain `duckdb:///` engines sharing the instance the module's engine keeps open; the production engine's
ATTACH would refuse a second attach in the same process), where DuckDB resolves concurrent writes
optimistically: the race the lease must win against.
"""

from __future__ import annotations

import multiprocessing
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import make_engine, transaction
from tests.reconcile.harness import CONNECTION, LOCK_TTL, T0, empty_tables, migrated_engine
from tests.reliability.report import reported

STARTERS = 20
ROUNDS = 3
STARTED = T0 + timedelta(minutes=1)
HELD = re.compile(
    r"^connection 'c1' is already running \(run (?P<run>r\d+), since 2026-03-01 09:01:00 UTC; "
    r"holder (?P<holder>[^;()]+:\d+)\)\. If that run is dead, "
)


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def module_engine(request, tmp_path_factory):
    with migrated_engine(request.param, tmp_path_factory.mktemp("lease")) as engine:
        yield engine


@pytest.fixture
def engine(module_engine):
    empty_tables(module_engine)
    return module_engine


def dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(child.stdout)


def no_lease(engine: Engine) -> None:
    pass


def lease_of_a_dead_process(engine: Engine) -> None:
    """A crashed run: its lease has not expired, but its pid on this host is gone."""
    leave_lease(engine, "crashed", f"{socket.gethostname()}:{dead_pid()}", T0 + LOCK_TTL)


def expired_lease(engine: Engine) -> None:
    """A run on another host (its pid cannot be checked) whose lease expired before the starters came."""
    leave_lease(engine, "expired", "elsewhere:1", STARTED - timedelta(seconds=1))


def leave_lease(engine: Engine, run_id: str, holder: str, expires_at: datetime) -> None:
    with transaction(engine) as conn:
        conn.execute(
            text("INSERT INTO oppsync.sync_locks VALUES (:c, :r, :h, :a, :e)"),
            {"c": CONNECTION, "r": run_id, "h": holder, "a": T0, "e": expires_at},
        )


PREVIOUS = [no_lease, lease_of_a_dead_process, expired_lease]


@dataclass
class Outcomes:
    won: list[str]
    held: dict[str, str]  # run -> LockHeld message
    errors: list[str]


@contextmanager
def starter_engines(url: str) -> Iterator[list[Engine]]:
    engines = [starter_engine(url) for _ in range(STARTERS)]
    try:
        yield engines
    finally:
        for e in engines:
            e.dispose()


def race_threads(engines: list[Engine]) -> Outcomes:
    barrier = threading.Barrier(STARTERS)
    out = Outcomes([], {}, [])

    def start(i: int) -> None:
        run_id = f"r{i}"
        barrier.wait(timeout=30)
        try:
            store.acquire_lock(engines[i], CONNECTION, run_id, STARTED, LOCK_TTL)
            out.won.append(run_id)
        except store.LockHeld as err:
            out.held[run_id] = str(err)
        except Exception as err:  # noqa: BLE001 - any other failure is what the test looks for
            out.errors.append(f"{run_id}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(STARTERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return out


def starter_engine(url: str) -> Engine:
    """A starter's own engine, its connection opened before the start (see the module docstring for DuckDB)."""
    engine = create_engine(url, poolclass=NullPool) if url.startswith("duckdb:") else make_engine(url)
    if not url.startswith("duckdb:"):
        with engine.connect():
            pass
    return engine


def race_processes(url: str) -> Outcomes:
    """The same race between forked processes (forked, not spawned: twenty interpreters importing the
    package took 12-16 s). Each stays alive until all have tried: the winner's pid must not vanish, or a
    late loser would rightly take over a dead holder."""
    fork = multiprocessing.get_context("fork")
    barrier, all_tried, results = fork.Barrier(STARTERS), fork.Event(), fork.Queue()
    children = [
        fork.Process(target=start_in_process, args=(url, f"r{i}", barrier, all_tried, results)) for i in range(STARTERS)
    ]
    for child in children:
        child.start()
    try:
        out = Outcomes([], {}, [])
        for _ in range(STARTERS):
            run_id, outcome, message = results.get(timeout=30)
            {
                "won": lambda: out.won.append(run_id),
                "held": lambda: out.held.__setitem__(run_id, message),
                "error": lambda: out.errors.append(f"{run_id}: {message}"),
            }[outcome]()
        return out
    finally:
        all_tried.set()
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()


def start_in_process(url: str, run_id: str, barrier, all_tried, results) -> None:
    engine = starter_engine(url)  # its own engine: the parent's pooled connections are never used here
    barrier.wait(timeout=30)
    try:
        store.acquire_lock(engine, CONNECTION, run_id, STARTED, LOCK_TTL)
        results.put((run_id, "won", ""))
    except store.LockHeld as err:
        results.put((run_id, "held", str(err)))
    except Exception as err:  # noqa: BLE001 - any other failure is what the test looks for
        results.put((run_id, "error", f"{type(err).__name__}: {err}"))
    all_tried.wait(timeout=30)
    engine.dispose()


# the report's column per starting state
LABEL = {"no_lease": "free", "lease_of_a_dead_process": "dead holder", "expired_lease": "expired"}


def assert_one_winner(engine: Engine, out: Outcomes, row=None) -> None:
    if row is not None:  # the reliability report: a second winner is a duplicated run; any other message unclear
        row.duplicated_events += max(0, len(out.won) - 1)
        row.unclear_errors += len(out.errors) + sum(1 for m in out.held.values() if not HELD.match(m))
    assert out.errors == [], "a starter failed with something other than LockHeld"
    assert len(out.won) == 1, f"{len(out.won)} starters took the lease: {out.won}"
    assert len(out.held) == STARTERS - 1
    for run_id, message in out.held.items():
        named = HELD.match(message)
        assert named, f"{run_id} got an unclear message: {message}"
        assert named["run"] == out.won[0], f"{run_id} was told {named['run']} holds the lease, not the winner"
    with transaction(engine) as conn:
        assert (
            conn.execute(
                text("SELECT run_id FROM oppsync.sync_locks WHERE connection = :c"), {"c": CONNECTION}
            ).scalar()
            == out.won[0]
        )


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.mark.parametrize("previous", PREVIOUS, ids=lambda f: f.__name__)
def test_twenty_threads_starting_together_one_takes_the_lease(engine, previous: Callable[[Engine], None]):
    with (
        reported(f"lease_race_threads_{engine.dialect.name}", LABEL[previous.__name__]) as row,
        starter_engines(url_of(engine)) as engines,
    ):
        for _ in range(ROUNDS):
            empty_tables(engine)
            previous(engine)
            assert_one_winner(engine, race_threads(engines), row)


@pytest.mark.postgres
@pytest.mark.parametrize("module_engine", ["postgres"], indirect=True)  # DuckDB: see the module docstring
@pytest.mark.parametrize("previous", [no_lease, lease_of_a_dead_process], ids=lambda f: f.__name__)
def test_twenty_processes_starting_together_one_takes_the_lease(engine, previous: Callable[[Engine], None]):
    with reported("lease_race_processes_postgresql", LABEL[previous.__name__]) as row:
        previous(engine)
        assert_one_winner(engine, race_processes(url_of(engine)), row)


def test_the_winner_takes_its_lease_again_and_the_losers_still_cannot(engine):
    """Re-taking by the same run (reconcile after extract, a retried step) renews the lease."""
    lease_of_a_dead_process(engine)
    with starter_engines(url_of(engine)) as engines:
        out = race_threads(engines)
    winner, loser = out.won[0], next(iter(out.held))
    store.acquire_lock(engine, CONNECTION, winner, STARTED + timedelta(minutes=30), LOCK_TTL)
    with transaction(engine) as conn:
        renewed = conn.execute(text("SELECT run_id, acquired_at, expires_at FROM oppsync.sync_locks")).one()
    assert tuple(renewed) == (winner, STARTED + timedelta(minutes=30), STARTED + timedelta(minutes=30) + LOCK_TTL)
    with pytest.raises(store.LockHeld, match=rf"already running \(run {winner}, since 2026-03-01 09:31:00 UTC"):
        store.acquire_lock(engine, CONNECTION, loser, STARTED + timedelta(minutes=31), LOCK_TTL)


PAUSE_AT_COMMIT = 0.2  # seconds the first transaction waits at its commit while the second one runs


def first_pauses_at_commit_while_second_runs(
    url: str, first: Callable[[Engine], None], second: Callable[[Engine], None]
) -> None:
    """Run `first` on its own engine; when its transaction is about to commit, start `second` on another
    engine in a thread and let it run against the uncommitted change for a moment before committing."""
    first_engine, second_engine = starter_engine(url), starter_engine(url)
    failures: list[str] = []

    def run_second() -> None:
        try:
            second(second_engine)
        except Exception as err:  # noqa: BLE001 - reported by the test
            failures.append(f"{type(err).__name__}: {err}")

    racer = threading.Thread(target=run_second)

    @event.listens_for(first_engine, "commit")
    def start_second_then_commit(conn) -> None:
        if not racer.is_alive() and racer.ident is None:
            racer.start()
            time.sleep(PAUSE_AT_COMMIT)

    try:
        first(first_engine)
        racer.join(timeout=30)
    finally:
        first_engine.dispose()
        second_engine.dispose()
    assert failures == []


def take_over(engine: Engine) -> None:
    store.acquire_lock(engine, CONNECTION, "new", STARTED, LOCK_TTL)


def release_the_expired(engine: Engine) -> None:
    store.release_lock(engine, CONNECTION, "expired")


@pytest.mark.parametrize(
    "first, second",
    [(take_over, release_the_expired), (release_the_expired, take_over)],
    ids=["takeover_commits_first", "release_commits_first"],
)
def test_a_release_racing_a_takeover_leaves_the_lease_to_the_taker(engine, first, second):
    expired_lease(engine)  # its run is still alive on another host, finishing after its lease expired
    first_pauses_at_commit_while_second_runs(url_of(engine), first, second)
    with transaction(engine) as conn:
        holders = (
            conn.execute(text("SELECT run_id FROM oppsync.sync_locks WHERE connection = :c"), {"c": CONNECTION})
            .scalars()
            .all()
        )
    assert holders == ["new"]
