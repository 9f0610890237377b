"""End to end (issue 9): the wall time of one scheduled hourly run for five connections of N opportunities
with 1% activity in the hour, through the same code path as `oppsync run` (cli.cmd_run): load the Dagster
definitions, execute each connection's sync job (extract, quality checks, reconcile) in process, then the
build_mart job (dbt build of the outcomes mart).

Not timed: building the tenants and the initial full sync of each connection (run through the sync layer
directly, without Dagster, to save time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from benchmarks.common import Figure, progress, sandbox_config_dict, timed
from oppsync_pipeline.lib.config import load_config
from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer

NAME = "end to end"
ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("end to end")
    g.add_argument("--e2e-opportunities", type=int, default=100_000, help="opportunities per connection")
    g.add_argument(
        "--e2e-connectwise",
        type=int,
        default=None,
        help="ConnectWise tenant size (its initial sync costs one request per opportunity); "
        "default: the same as the others",
    )
    g.add_argument(
        "--e2e-crm", action="append", choices=CRMS, help="only these CRMs' connections (repeatable; default: all five)"
    )


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    n = args.e2e_opportunities
    crms = args.e2e_crm or CRMS
    sizes = {crm: (args.e2e_connectwise or n) if crm == "connectwise" else n for crm in crms}
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"end to end: building {len(sizes)} tenants ({', '.join(f'{c} {k:,}' for c, k in sizes.items())})")
    servers = {crm: SandboxServer(build_simulator(crm, seed=17, opportunities=k)).start() for crm, k in sizes.items()}
    try:
        cfg_file = workdir / "oppsync.yaml"
        doc = sandbox_config_dict(servers, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir)
        cfg_file.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        cfg = load_config(cfg_file)
        engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
        ensure_schema(engine)
        for conn in cfg.connections:
            progress(f"end to end: initial full sync of {conn.name} (not timed)")
            sync_connection(cfg, conn, engine, run_id=f"initial-{conn.crm}", mode="full")
        engine.dispose()
        for server in servers.values():
            server.simulator.world.advance(hours=1, rate=0.01)
        progress("end to end: the hourly run through Dagster (timed)")
        saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "OPPSYNC_CONFIG")}
        try:
            return [hourly_run(cfg_file, workdir, sizes)]
        finally:  # the caller (a test session, say) keeps its own Dagster home and config
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        for server in servers.values():
            server.stop()


@contextmanager
def _stdout_to(path: Path) -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    with path.open("w") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def hourly_run(cfg_file: Path, workdir: Path, sizes: dict[str, int]) -> Figure:
    home = workdir / "dagster"
    home.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import dagster as dg

    from oppsync_pipeline.cli import _load_defs, _prepare_dagster, run_connection
    from oppsync_pipeline.defs.crm.schedules import quiet

    parts: dict[str, float] = {}
    ok = True
    # dbt (a subprocess) writes its progress to our stdout: send it to a log file so the run prints one table
    with _stdout_to(workdir / "dagster-run.log"), timed() as total:
        _, cfg = _prepare_dagster(str(cfg_file))
        with timed() as t:
            defs = _load_defs()
        parts["load defs"] = t["s"]
        with dg.DagsterInstance.get() as instance:
            for conn in cfg.connections:
                with timed() as t:
                    result = run_connection(defs, instance, conn, "auto")
                parts[conn.crm] = t["s"]
                ok = ok and result.success
            with timed() as t:
                mart = defs.resolve_job_def("build_mart").execute_in_process(
                    run_config=quiet({}), instance=instance, tags={"oppsync/trigger": "benchmark"}, raise_on_error=False
                )
            parts["build_mart"] = t["s"]
            ok = ok and mart.success
    breakdown = ", ".join(f"{k} {v:.1f}s" for k, v in parts.items())
    subject = f"{len(sizes)} connections x " + ("/".join(sorted({f"{k:,}" for k in sizes.values()})))
    return Figure(
        NAME,
        subject,
        f"{total['s']:.1f}s",
        "(no target: figure for issue 9)",
        "info" if ok else "MISS",
        f"{'all jobs succeeded' if ok else 'A JOB FAILED'}; {breakdown}",
    )
