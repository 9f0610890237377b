"""python -m benchmarks [--only NAME ...] [sizes]: run the benchmarks, print one table, rewrite RESULTS.md.

Default sizes are the brief's where a default run fits in ~25 minutes on 2 shared cores, and smaller where it
does not (DEFAULT_NOTES says which and why); pass the brief's sizes explicitly to run them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import (
    api_efficiency,
    end_to_end,
    fail_fast,
    freshness,
    latency_floor,
    memory,
    reconcile_throughput,
    scale,
    simulator_scale,
    wire_overhead,
)
from benchmarks.common import Figure, progress
from benchmarks.report import RESULTS, table, write_results

BENCHMARKS = {
    "reconcile": reconcile_throughput,
    "api": api_efficiency,
    "latency": latency_floor,
    "memory": memory,
    "e2e": end_to_end,
    "fail-fast": fail_fast,  # seconds from a permanent error to a failed run, per CRM (no Dagster retry)
    "simulators": simulator_scale,  # the simulators serving 100,000-opportunity tenants
    "freshness": freshness,  # seconds from a CRM change to the mart row, webhooks and daemon in the loop
    "wire": wire_overhead,  # a full sync per CRM against downloading and decoding the same pages
    "scale": scale,  # 500 connections: definitions load, memory, ticks, DuckDB refused, syncs/hour on Celery
}
# Where the default differs from the brief's size, to keep `make bench` within ~25 minutes (measured, with the
# machine shared): dlt's merge runs at ~500 rows/s on DuckDB (a million rows would take ~35 min on its own),
# a million-opportunity Salesforce tenant takes ~4 min to generate before the sync starts, and each full sync
# costs ~1-3 ms per opportunity, which the end-to-end run pays five times before the timed hour.
SMALLER_DEFAULTS = {
    "rows": 50_000,  # brief: 1,000,000; the dlt comparison's size (dlt's merge of a million: 10-25 min a backend)
    "floor_rows": 1_000_000,  # the brief's size: the engine against the floor (~4 min for both backends)
    "latency_opportunities": 10_000,  # brief: 100,000
    "latency_connectwise": 500,
    "e2e_opportunities": 5_000,  # brief: 100,000
    "e2e_connectwise": 1_000,
    # brief: 1,000,000; five tenants of a million take ~4 min each to generate and 3-25 min each to sync
    "memory_opportunities": 100_000,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", choices=list(BENCHMARKS), help="run only these benchmarks (repeatable)"
    )
    parser.add_argument("--workdir", help="keep scratch files here (default: a temp dir, removed)")
    parser.add_argument("--results", default=str(RESULTS), help="where to write the results (markdown)")
    for module in BENCHMARKS.values():
        module.add_arguments(parser)
    parser.set_defaults(**SMALLER_DEFAULTS)
    return parser.parse_args(argv)


def sizes(args: argparse.Namespace, names: list[str]) -> list[str]:
    brief = {
        "rows": 1_000_000,
        "floor_rows": 1_000_000,
        "latency_opportunities": 100_000,
        "memory_opportunities": 1_000_000,
        "e2e_opportunities": 100_000,
        "wire_opportunities": 100_000,
    }
    shown = {
        "reconcile": ["floor_rows", "rows"],
        "api": ["api_opportunities"],
        "latency": ["latency_opportunities", "latency_connectwise"],
        "memory": ["memory_opportunities", "memory_dagster_opportunities"],
        "e2e": ["e2e_opportunities", "e2e_connectwise"],
        "fail-fast": ["fail_fast_opportunities"],
        "simulators": [],
        "freshness": ["freshness_changes"],
        "scale": ["scale_connections", "scale_sync_tenants"],
        "wire": ["wire_opportunities", "wire_connectwise"],
    }
    out = []
    for name in names:
        parts = []
        for key in shown[name]:
            value = getattr(args, key)
            note = f" (brief: {brief[key]:,}; smaller to fit ~25 min)" if key in brief and value < brief[key] else ""
            parts.append(f"{key}={value:,}{note}" if value is not None else f"{key}=same")
        out.append(f"{name}: " + ", ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    names = args.only or list(BENCHMARKS)
    figures: list[Figure] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="oppsync-bench-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        for name in names:
            started = time.monotonic()
            try:
                figures += BENCHMARKS[name].run(args, root / name)
            except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
                figures.append(Figure(name, "-", "FAILED", "-", "MISS", f"{type(err).__name__}: {err}"[:500]))
            progress(f"{name}: {time.monotonic() - started:.0f}s")
    seconds = time.monotonic() - t0
    print(table(figures))
    command = "python -m benchmarks" + ("".join(" " + shlex.quote(a) for a in argv))
    path = write_results(figures, command, seconds, sizes(args, names), Path(args.results))
    print(f"\n{len(figures)} figures in {seconds / 60:.1f} min; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
