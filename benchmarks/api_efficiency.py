"""API efficiency (issue 9 / issue 5): the requests an hourly incremental sync makes, per CRM, on a sandbox
tenant of N opportunities with 1% activity in the hour (world.advance(hours=1, rate=0.01)).

Compared with
  minimum:   the dictionary calls a run needs (token, stages, users: measured on a fresh connector), plus per
             set (open, not open) ceil(changed rows / the API's largest page), at least one request per set,
             plus one delete-feed request where the CRM has one; ConnectWise has no bulk forecast endpoint, so
             one forecast request per changed opportunity is part of its minimum (the amount lives there).
  full read: re-reading both sets every hour at the largest page (what the seed's product does), computed.

The initial full sync is replaced by setting the bookmark to the tenant's latest change (what a full sync
leaves) and running one untimed incremental sync (the previous hour's run, which also leaves Dynamics' delta
link): the requests of an incremental run depend only on what the previous run left and the changes since.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from sqlalchemy import text

from benchmarks.common import TEST_OPTIONS, Figure, PathCountingSession, progress, sandbox_config, verdict
from oppsync_pipeline.lib.record import MAPPING_VERSION
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse import store
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine, transaction
from oppsync_pipeline.sandbox.cluster import CRMS, build_simulator
from oppsync_pipeline.sandbox.server import SandboxServer

NAME = "api efficiency"
TARGET = 1.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("api efficiency")
    g.add_argument("--api-opportunities", type=int, default=100_000, help="opportunities per sandbox tenant")
    g.add_argument("--api-crm", action="append", choices=CRMS, help="only these CRMs (repeatable)")


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    return [measure(crm, args.api_opportunities, workdir / f"api-{crm}") for crm in (args.api_crm or CRMS)]


def set_bookmark(engine, connection: str, cursor) -> None:
    with transaction(engine) as c:
        c.execute(text("DELETE FROM oppsync.sync_state WHERE connection = :c"), {"c": connection})
        c.execute(
            text(
                "INSERT INTO oppsync.sync_state (connection, cursor, last_full_sync_at, last_success_at, "
                "last_run_id, mapping_version) VALUES (:c, :cur, :cur, :cur, 'bench-bookmark', :mv)"
            ),
            {"c": connection, "cur": cursor, "mv": MAPPING_VERSION},
        )


def measure(crm: str, n: int, workdir: Path) -> Figure:
    progress(f"api efficiency: {crm}, {n:,} opportunities")
    sim = build_simulator(crm, seed=11, opportunities=n)
    world = sim.world
    with SandboxServer(sim) as server:
        cfg = sandbox_config({crm: server}, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir, extra=TEST_OPTIONS)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
        ensure_schema(engine)
        bookmark = max(o.modified_at for o in world.live())
        sizes = {"open": 0, "closed": 0}
        for o in world.live():
            sizes["open" if world.status(o) == "open" else "closed"] += 1
        set_bookmark(engine, conn.name, bookmark)
        # One untimed incremental run first, as the previous hour's run would have been: it leaves what a real
        # run carries to the next (the bookmark, and the Dataverse delta link whose first read is a baseline).
        sync_connection(cfg, conn, engine, run_id="previous-hour")
        bookmark = store.get_state(engine, conn.name).cursor

        world.advance(hours=1, rate=0.01)
        changed = {"open": 0, "closed": 0}
        for o in world.live():
            if o.modified_at > bookmark:
                changed["open" if world.status(o) == "open" else "closed"] += 1

        probe = build_connector(cfg, conn)
        probe.stages()
        list(probe.users())
        dictionary = probe.stats.requests
        page = type(probe).max_page_size

        session = PathCountingSession()
        connector = build_connector(cfg, conn, session=session)
        summary = sync_connection(cfg, conn, engine, run_id="hourly", connector=connector)
        engine.dispose()
    made = connector.stats.requests
    feed = 1 if type(probe).native_deletes else 0
    forecasts = sum(changed.values()) if crm == "connectwise" else 0
    minimum = dictionary + sum(max(1, math.ceil(k / page)) for k in changed.values()) + feed + forecasts
    full_read = (
        dictionary
        + sum(max(1, math.ceil(k / page)) for k in sizes.values())
        + (sum(sizes.values()) if crm == "connectwise" else 0)
    )
    ratio = made / minimum
    calls = ", ".join(f"{k} x{v}" for k, v in sorted(session.by_path.items(), key=lambda kv: -kv[1]))
    notes = (
        f"N={n:,}; changed since bookmark: {changed['open']} open + {changed['closed']} closed, "
        f"fetched {summary.result.fetched if summary.result else '-'} (overlap window included); "
        f"page {page}; minimum {minimum} = dictionary {dictionary} + pages "
        f"{sum(max(1, math.ceil(k / page)) for k in changed.values())} + delete feed {feed}"
        + (f" + forecasts {forecasts}" if forecasts else "")
        + f"; full read every hour {full_read:,} ({full_read / made:,.0f}x ours); calls: {calls}"
    )
    return Figure(
        NAME,
        crm,
        f"{made} requests = {ratio:.2f}x minimum",
        f"<= {TARGET}x minimum ({minimum})",
        verdict(ratio <= TARGET),
        notes,
    )
