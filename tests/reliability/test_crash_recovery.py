"""Crash recovery (issue 8): a sync process killed with SIGKILL anywhere in extract or reconcile leaves a
warehouse that the next run (a new process) brings to exactly what a fault-free run produces.

The simulators are served from this process; the sync runs in a child process (crash_child.py) that
either kills itself at a chosen point (the n-th call of a step: a page request, a staged page, a statement
inside the reconcile transaction, the lock release after commit) or is killed by this process after a
random delay. After each kill a second child syncs again (mode auto, as the next scheduled run would);
it must take over the dead run's lock and converge to the reference: a fault-free sync of the same CRM
state into a fresh warehouse (current rows, (source_id, event_type) multiset, history versions).

Full mode (`make reliability`): every kill point, before and after, once per warehouse (DuckDB and Postgres),
plus a few timer kills, CRMs in rotation, two trials at a time; the normal suite: two.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import _drop_database, _new_database, require_postgres, sandbox_config
from tests.reliability.crash_child import KILL_POINTS
from tests.reliability.harness import FULL, connection_extra, invariants, snapshot
from tests.reliability.report import reported

ROOT = Path(__file__).resolve().parents[2]
TIMER_TRIALS = 4 if FULL else 0  # plain timers: interpreter start-up, somewhere in extract or reconcile
PARALLEL = 2 if FULL else 1  # trials at a time (each is two child processes; the CRMs are shared, read-only)
SIZE = 150
PAGE_SIZE = 30


@pytest.fixture(scope="module")
def crms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """All five simulators, served from this process for the whole module; the CRM state stays fixed."""
    servers, out = {}, {}
    base = tmp_path_factory.mktemp("crash")
    try:
        for crm in CRMS:
            servers[crm] = SandboxServer(build_simulator(crm, seed=5, opportunities=SIZE)).start()
            folder = base / crm
            folder.mkdir()
            extra = {crm: connection_extra(crm, page_size=PAGE_SIZE)}
            cfg = sandbox_config({crm: servers[crm]}, f"duckdb:///{folder / 'unused.duckdb'}", folder, extra=extra)
            config_file = folder / "config.json"
            config_file.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")
            out[crm] = {"cfg": cfg, "file": config_file, "reference": {}}
        yield out
    finally:
        for server in servers.values():
            server.stop()


def child(
    config_file: Path, url: str, run_id: str, kill: tuple[str, int, str] | None = None, kill_after: float | None = None
) -> tuple[int, str]:
    args = [sys.executable, "-m", "tests.reliability.crash_child", str(config_file), url, run_id]
    if kill:
        args += [kill[0], str(kill[1]), kill[2]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, (out + err)[-2000:]


def reference(crms: dict, crm: str, backend: str, tmp_path: Path):
    if backend not in crms[crm]["reference"]:
        url, drop = warehouse(backend, tmp_path, f"reference-{crm}")
        engine = make_engine(url)
        ensure_schema(engine)
        cfg = crms[crm]["cfg"]
        sync_connection(cfg, cfg.connections[0], engine, run_id="reference", mode="full")
        crms[crm]["reference"][backend] = snapshot(engine, cfg.connections[0].name)
        engine.dispose()
        drop()
    return crms[crm]["reference"][backend]


def warehouse(backend: str, tmp_path: Path, name: str):
    if backend == "duckdb":
        return f"duckdb:///{tmp_path / name}.duckdb", lambda: None
    db, url = _new_database()
    return url, lambda: _drop_database(db)


def kill_plans(rng: random.Random) -> list[tuple[tuple[str, int, str] | None, float | None]]:
    """Every kill point, before and after its call (full mode), and a few timers; the normal suite: two.
    The n-th call is chosen where a step runs many times (requests, staged pages), mid-paging."""
    points = [(p, w) for p in sorted(KILL_POINTS) for w in ("before", "after")]
    if not FULL:
        points = rng.sample(points, 2)
    plans: list[tuple[tuple[str, int, str] | None, float | None]] = []
    for point, when in points:
        # every tenant here has an open and a not-open set, so at least two pages; a third may not exist (the
        # Salesforce tenant's 150 records fit one page per set). Staging batches flush once at these sizes.
        nth = {"extract.request": rng.randint(1, 12), "extract.stage_page": rng.randint(1, 2)}.get(point, 1)
        plans.append(((point, nth, when), None))
    plans += [(None, rng.uniform(1.0, 4.0)) for _ in range(TIMER_TRIALS)]
    return plans


def trial(crms: dict, backend: str, tmp_path: Path, n: int, plan, timer) -> None:
    """One kill and the next run; the warehouse must converge to the reference."""
    crm = CRMS[n % len(CRMS)]
    label = f"{plan[0]}#{plan[1]}:{plan[2]}" if plan else f"timer {timer:.1f}s"
    with reported(f"crash_recovery_{backend}", crm) as row:
        url, drop = warehouse(backend, tmp_path, f"trial{n}")
        try:
            engine = make_engine(url)
            ensure_schema(engine)
            config_file = crms[crm]["file"]
            code, output = child(config_file, url, f"killed-{n}", plan, timer)
            was_killed = code == -signal.SIGKILL
            if plan is not None:
                assert was_killed, f"trial {n} {crm} {label}: the child was not killed (exit {code}): {output}"
            elif not was_killed:
                assert code == 0, f"trial {n} {crm}: the child failed (exit {code}): {output}"
            # the next run: a new process, which must take over the dead run's lock and finish the job
            code, output = child(config_file, url, f"rerun-{n}")
            assert code == 0, f"trial {n} {crm} after kill {label}: re-run failed: {output}"
            conn_name = crms[crm]["cfg"].connections[0].name
            got = snapshot(engine, conn_name)
            want = reference(crms, crm, backend, tmp_path)
            row.lost_events = sum((want.events - got.events).values())
            row.duplicated_events = sum((got.events - want.events).values())
            row.note = label + ("" if was_killed else " (finished first)")
            diff = got.differences(want)
            assert diff == [], f"trial {n} {crm} after kill {label}: {diff}"
            problems = invariants(engine, conn_name)
            assert problems == [], f"trial {n} {crm} after kill {label}: {problems}"
            engine.dispose()
        finally:
            drop()


@pytest.mark.parametrize("backend", ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_sync_converges_on_rerun(backend: str, crms: dict, tmp_path: Path):
    if backend == "postgres":
        require_postgres()
    plans = kill_plans(random.Random(f"crash-{backend}"))
    for crm in dict.fromkeys(CRMS[n % len(CRMS)] for n in range(len(plans))):
        reference(crms, crm, backend, tmp_path)  # first: trials running in parallel then only read them
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(trial, crms, backend, tmp_path, n, plan, timer) for n, (plan, timer) in enumerate(plans)]
        errors = [f.exception() for f in futures if f.exception() is not None]
    assert not errors, f"{len(errors)} of {len(plans)} crash trials failed; first: {errors[0]}"
