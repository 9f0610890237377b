"""Latency floor (issue 9): with the simulator adding 50 ms to every request, the wall time of a full sync of
N opportunities per CRM against the time the requests alone must take.

  floor = requests x 50 ms / the concurrency the CRM's API allows (docs/crm-api-notes.md), and for HubSpot
  no less than its documented request rates. Our connectors page sequentially (concurrency 1), so the
  sequential floor (requests x 50 ms) is reported beside it.

HubSpot keeps its connector's real search throttle here (options.search_requests_per_second, default 4/s):
the real API needs it. ConnectWise pays one forecast request per opportunity, so it runs at a smaller N.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Figure, PathCountingSession, progress, sandbox_config, timed, verdict
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import FaultPlan, SandboxServer

NAME = "latency floor"
TARGET = 1.3
LATENCY_MS = 50


@dataclass(frozen=True)
class ApiConcurrency:
    concurrency: int
    source: str
    requests_per_second: float | None = None  # an overall rate cap, where documented
    search_requests_per_second: float | None = None  # HubSpot search


ALLOWED = {
    "salesforce": ApiConcurrency(25, "25 concurrent long-running requests (no lower cap documented for short ones)"),
    "hubspot": ApiConcurrency(
        10,
        "100 requests / 10 s (private app, Free/Starter), search 5/s",
        requests_per_second=10,
        search_requests_per_second=5,
    ),
    "dynamics": ApiConcurrency(52, "fewer than 52 concurrent requests per user"),
    "connectwise": ApiConcurrency(1, "no documented concurrency (community: ~60 requests/min, unverified); taken as 1"),
    "autotask": ApiConcurrency(3, "3 concurrent threads per object endpoint"),
}
# a CRM whose limits are not written down above is measured as if its API allowed one request at a time
UNDOCUMENTED = ApiConcurrency(1, "not documented here: taken as 1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("latency floor")
    g.add_argument("--latency-opportunities", type=int, default=20_000, help="opportunities per CRM")
    g.add_argument(
        "--latency-connectwise",
        type=int,
        default=1_000,
        help="ConnectWise tenant size (one forecast request per opportunity)",
    )
    g.add_argument("--latency-crm", action="append", choices=CRMS, help="only these CRMs (repeatable)")


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    out = []
    for crm in args.latency_crm or CRMS:
        n = args.latency_connectwise if crm == "connectwise" else args.latency_opportunities
        out.append(measure(crm, n, workdir / f"latency-{crm}"))
    return out


def floor_seconds(crm: str, requests: int, search_requests: int) -> float:
    allowed = ALLOWED.get(crm, UNDOCUMENTED)
    floor = requests * LATENCY_MS / 1000 / allowed.concurrency
    if allowed.requests_per_second:
        floor = max(floor, requests / allowed.requests_per_second)
    if allowed.search_requests_per_second:
        floor = max(floor, search_requests / allowed.search_requests_per_second)
    return floor


def measure(crm: str, n: int, workdir: Path) -> Figure:
    progress(f"latency floor: {crm}, {n:,} opportunities, {LATENCY_MS} ms per request")
    sim = build_simulator(crm, seed=13, opportunities=n, faults=FaultPlan(latency_ms=LATENCY_MS))
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
        ensure_schema(engine)
        session = PathCountingSession()
        connector = build_connector(cfg, conn, session=session)
        with timed() as t:
            summary = sync_connection(cfg, conn, engine, run_id="full", mode="full", connector=connector)
        engine.dispose()
    requests = connector.stats.requests
    searches = sum(v for k, v in session.by_path.items() if k.endswith("/search"))
    floor = floor_seconds(crm, requests, searches)
    sequential = requests * LATENCY_MS / 1000
    wall = t["s"]
    fetched = summary.result.fetched if summary.result else 0
    allows = ALLOWED.get(crm, UNDOCUMENTED).source
    notes = (
        f"N={n:,} (fetched {fetched:,}); {requests} requests; API allows: {allows}; "
        f"sequential floor {sequential:.1f}s ({wall / sequential:.1f}x); latency is "
        f"{sequential / wall:.0%} of the wall time"
    )
    return Figure(
        NAME,
        crm,
        f"{wall:.1f}s = {wall / floor:.1f}x floor",
        f"<= {TARGET}x floor ({floor:.1f}s)",
        verdict(wall <= TARGET * floor),
        notes,
    )
