"""The process whose memory the memory benchmark measures: it runs ONLY one full sync of one sandbox CRM into
DuckDB, then prints its own peak RSS (VmHWM) as JSON. Usage:
    python -m benchmarks.memory_child --crm salesforce --url http://127.0.0.1:PORT --workdir DIR [--via dagster]

`--via library` (the default) calls the sync layer; `--via dagster` runs the connection's sync job the way
`oppsync sync` does (the syncs code location's definitions, the job executed in process with its checks), on an
instance whose storage `--prepare-dagster` created beforehand in another process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import yaml

from benchmarks.common import sandbox_config, sandbox_config_dict
from benchmarks.memory import LEAN
from oppsync_pipeline.lib.memory import limit_malloc_arenas
from oppsync_pipeline.lib.progress import DONE, PageProgress
from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# Autotask's 10,000 requests an hour at the default 25% run share pause a 1,000,000-opportunity full read (it goes
# on in the next run, lib/resume.py): the benchmark measures the whole read in one run, as a connection whose
# operator raised its share (quota.run_share) would sync it. Smaller tenants never reach the share.
WHOLE_READ = {"autotask": {"quota": {"run_share": 1.0}}}


def options(crm: str) -> dict[str, dict]:
    """No per-record reads (LEAN). HubSpot keeps its pacing: `oppsync sandbox serve` enforces the portal's
    documented limits, and an unpaced sync of 100,000 deals spent its retry budget on 429s (the sync this
    benchmark measures is the one a user runs)."""
    entry = {"options": dict(LEAN[crm])} if crm in LEAN else {}
    entry.update(WHOLE_READ.get(crm, {}))
    return {crm: entry} if entry else {}


class Sampler:
    """Where the peak happened: VmRSS sampled every `interval` seconds by a thread, with the sync's phase
    (its last progress event: set and page, or reconcile after the read ended) at the highest sample."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.phase, self.peak = interval, "before the read", (0.0, "")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def progress(self, event: PageProgress) -> None:
        self.phase = (
            "after the read (deletes, reconcile)" if event.phase == DONE else f"{event.phase} page {event.page}"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_mb()
            if rss > self.peak[0]:
                self.peak = (rss, self.phase)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def through_library(crm: str, url: str, workdir: Path) -> dict:
    cfg = sandbox_config({crm: url}, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir, options(crm))
    engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
    ensure_schema(engine)
    before_run = rss_mb()
    with Sampler() as sampler:
        summary = sync_connection(
            cfg, cfg.connections[0], engine, run_id="memory", mode="full", progress=sampler.progress
        )
    return {
        "sampled_peak_mb": sampler.peak[0],
        "sampled_peak_phase": sampler.peak[1],
        "fetched": summary.result.fetched if summary.result else 0,
        "requests": summary.extract.stats.get("api_requests"),
        # a sync that did not complete measured less than a whole one: its figure must not pass
        "status": str(getattr(summary.extract.status, "value", summary.extract.status)),
        "error": summary.extract.error,
        "rss_before_run_mb": before_run,
    }


def dagster_home(workdir: Path) -> Path:
    """The Dagster instance's home of a `--via dagster` child: the embedded default's dagster.yaml (SQLite)."""
    home = workdir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def prepare_dagster_home(workdir: Path) -> None:
    """Create the instance's storage (`--prepare-dagster`, in a process of its own before the measured one): an
    hourly run opens storage an earlier run or `oppsync init-db` created; creating and migrating it (alembic over
    the SQLite storages) happens once per deployment, and is not what a run costs."""
    os.environ["DAGSTER_HOME"] = str(dagster_home(workdir))
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)


def through_dagster(crm: str, url: str, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_file = workdir / "oppsync.yaml"
    doc = sandbox_config_dict({crm: url}, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir, options(crm))
    cfg_file.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(dagster_home(workdir))
    import dagster as dg

    from oppsync_pipeline.cli import _load_defs, _prepare_dagster, run_connection

    _, cfg = _prepare_dagster(str(cfg_file))
    defs = _load_defs("syncs")  # as `oppsync sync` and a deployment's sync run worker load them: no dbt
    with dg.DagsterInstance.get() as instance:
        before_run = rss_mb()  # Dagster, the syncs location's definitions, the instance
        result = run_connection(defs, instance, cfg.connections[0], "full")
    if not result.success:
        raise RuntimeError(f"the Dagster sync job of {cfg.connections[0].name} failed")
    extract = next(
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.asset_key.path[-1] == "extract"
    )
    return {
        "fetched": extract["rows_fetched_open"].value + extract["rows_fetched_not_open"].value,
        "requests": extract["api_requests"].value,
        "rss_before_run_mb": before_run,
    }


def main() -> None:
    limit_malloc_arenas()  # as `oppsync` does first (lib/memory.py): this child stands for `oppsync sync`
    p = argparse.ArgumentParser()
    p.add_argument("--crm", default="salesforce")
    p.add_argument("--url")
    p.add_argument("--workdir", required=True)
    p.add_argument("--via", choices=["library", "dagster"], default="library")
    p.add_argument("--prepare-dagster", action="store_true", help="only create the Dagster instance's storage")
    args = p.parse_args()
    if args.prepare_dagster:
        prepare_dagster_home(Path(args.workdir))
        return
    if not args.url:
        p.error("--url is required")
    sync = through_dagster if args.via == "dagster" else through_library
    t0 = time.perf_counter()
    figures = sync(args.crm, args.url, Path(args.workdir))
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0, **figures}))


if __name__ == "__main__":
    main()
