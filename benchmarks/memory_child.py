"""The process whose memory the memory benchmark measures: it runs ONLY one full sync of one sandbox CRM into
DuckDB, then prints its own peak RSS (VmHWM) as JSON. Usage:
    python -m benchmarks.memory_child --crm salesforce --url http://127.0.0.1:PORT --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from oppsync_pipeline.lib.sync import sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine

from benchmarks.common import sandbox_config


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--crm", default="salesforce")
    p.add_argument("--url", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    workdir = Path(args.workdir)
    cfg = sandbox_config({args.crm: args.url}, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir)
    engine = make_engine(cfg.warehouse.url)
    ensure_schema(engine)
    t0 = time.perf_counter()
    summary = sync_connection(cfg, cfg.connections[0], engine, run_id="memory", mode="full")
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0,
                      "fetched": summary.result.fetched if summary.result else 0,
                      "requests": summary.extract.stats.get("api_requests")}))


if __name__ == "__main__":
    main()
