"""Crash recovery (issue 8): a sync process killed with SIGKILL anywhere in extract or reconcile leaves a
warehouse that the next run (a new process) brings to exactly what a fault-free run produces.

The simulators are served from this process; the sync runs in a child process (crash_child.py) that
either kills itself at a chosen point (the n-th call of a step: a page request, a staged page, a statement
inside the reconcile transaction, the lock release after commit) or is killed by this process after a
random delay. After each kill a second child syncs again (mode auto, as the next scheduled run would);
it must take over the dead run's lock and converge to the reference: a fault-free sync of the same CRM
state into a fresh warehouse (current rows, (source_id, event_type) multiset, history versions).

Full mode (`make reliability`): 30 kill points per warehouse, DuckDB and Postgres. Normal suite: a few.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer
from tests.conftest import _drop_database, _new_database, require_postgres, sandbox_config
from tests.reliability.crash_child import KILL_POINTS
from tests.reliability.harness import FULL, invariants, snapshot

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 72 if FULL else 2          # per warehouse; a few finish before their kill point (64 gave 51 kills)
MIN_KILLS = 50 if FULL else 1       # the issue: at least 50 kill points, on DuckDB and on Postgres
SIZE = 150
PAGE_SIZE = 30
EXTRA = {"hubspot": {"options": {"search_requests_per_second": 0}}}


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
            extra = {crm: {"page_size": PAGE_SIZE, **EXTRA.get(crm, {})}}
            cfg = sandbox_config({crm: servers[crm]}, f"duckdb:///{folder / 'unused.duckdb'}", folder, extra=extra)
            config_file = folder / "config.json"
            config_file.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")
            out[crm] = {"cfg": cfg, "file": config_file, "reference": {}}
        yield out
    finally:
        for server in servers.values():
            server.stop()


def child(config_file: Path, url: str, run_id: str, kill: tuple[str, int, str] | None = None,
          kill_after: float | None = None) -> tuple[int, str]:
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


def kill_plan(rng: random.Random) -> tuple[tuple[str, int, str] | None, float | None]:
    """A kill point: usually a chosen call of a chosen step, sometimes a plain timer."""
    if rng.random() < 0.2:
        return None, rng.uniform(1.0, 4.0)   # a few seconds in: interpreter start-up, extract or reconcile
    point = rng.choice(sorted(KILL_POINTS))
    # every tenant here has an open and a not-open set, so at least two pages; a third may not exist (the
    # Salesforce tenant's 150 records fit one page per set). Staging batches flush once at these sizes.
    nth = {"extract.request": rng.randint(1, 12), "extract.stage_page": rng.randint(1, 2)}.get(point, 1)
    return (point, nth, rng.choice(["before", "after"])), None


@pytest.mark.parametrize("backend", ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_sync_converges_on_rerun(backend: str, crms: dict, tmp_path: Path):
    if backend == "postgres":
        require_postgres()
    rng = random.Random(f"crash-{backend}")
    killed, report = 0, []
    for trial in range(TRIALS):
        crm = CRMS[trial % len(CRMS)]
        plan, timer = kill_plan(rng)
        url, drop = warehouse(backend, tmp_path, f"trial{trial}")
        try:
            engine = make_engine(url)
            ensure_schema(engine)
            config_file = crms[crm]["file"]
            code, output = child(config_file, url, f"killed-{trial}", plan, timer)
            was_killed = code == -signal.SIGKILL
            if plan is not None:
                assert was_killed, f"trial {trial} {crm} {plan}: the child was not killed (exit {code}): {output}"
            elif not was_killed:
                assert code == 0, f"trial {trial} {crm}: the child failed (exit {code}): {output}"
            killed += was_killed
            # the next run: a new process, which must take over the dead run's lock and finish the job
            code, output = child(config_file, url, f"rerun-{trial}")
            assert code == 0, f"trial {trial} {crm} after kill {plan or timer}: re-run failed: {output}"
            conn_name = crms[crm]["cfg"].connections[0].name
            got = snapshot(engine, conn_name)
            want = reference(crms, crm, backend, tmp_path)
            diff = got.differences(want)
            assert diff == [], f"trial {trial} {crm} after kill {plan or timer}: {diff}"
            problems = invariants(engine, conn_name)
            assert problems == [], f"trial {trial} {crm} after kill {plan or timer}: {problems}"
            report.append(f"{crm}:{plan[0] + '#' + str(plan[1]) + ':' + plan[2] if plan else f'timer {timer:.1f}s'}"
                          f"{'' if was_killed else ' (finished first)'}")
            engine.dispose()
        finally:
            drop()
    print(f"\ncrash recovery on {backend}: {killed} kills of {TRIALS} trials, all converged: " + "; ".join(report))
    assert killed >= max(MIN_KILLS, TRIALS * 0.6), f"only {killed} of {TRIALS} trials killed the child"
