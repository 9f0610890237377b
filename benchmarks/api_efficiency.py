"""API efficiency (issue 9 / issue 5): the requests an hourly incremental sync makes, per CRM, on a sandbox
tenant of N opportunities with 1% activity in the hour (world.advance(hours=1, rate=0.01)).

Compared with
  minimum:   the dictionary calls a run needs (token, discovery, stages, statuses, users: measured on a fresh
             connector), plus per set (open, not open) ceil(changed rows / the API's largest page), at least one
             request per set, plus one delete-feed request where the CRM has one, plus the lookups the records
             need that the API does not embed (`lookup_minimum`, from the tenant's ground truth, never from what
             our connector did): the dictionary entries the changed records name that the previous run did not
             keep (`oppsync.crm_lookups`), read by the API's largest batch (HubSpot companies batch/read 100 ids,
             Autotask `in` 500 ids, ConnectWise one GET per site: it has no cross-company site list), HubSpot's
             deal->company associations (v4 batch read, 1,000 deals a request: search does not return them),
             one change-cursor read of the companies (a renamed company must reach its records on the next
             sync) and, for the companies renamed, the re-read of their opportunities. Reads tied to records
             (associations, re-reads) count per set, as pages do: the open and the not-open set are read and
             mapped one after the other; dictionary batches count once for both sets. ConnectWise has no bulk
             forecast endpoint, so one forecast request per changed opportunity is part of its minimum (the
             amount lives there).
  full read: re-reading both sets every hour at the largest page (what the seed's product does), computed.

The initial full sync is replaced by setting the bookmark to the tenant's latest change (what a full sync
leaves) and running one untimed incremental sync (the previous hour's run, which also leaves Dynamics' delta
link): the requests of an incremental run depend only on what the previous run left and the changes since.
That previous run kept only the dictionary entries its few hundred records named, so most of the companies
this hour's records name are unknown to it: the cold case. After a nightly full sync (which keeps every entry
its records name) an hourly run knows nearly all of them and both ours and the minimum are lower.
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

        known = kept_lookups(engine, conn.name)
        lookups, lookup_notes = lookup_minimum(crm, sim, world, bookmark, known)
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
    minimum = dictionary + sum(max(1, math.ceil(k / page)) for k in changed.values()) + feed + forecasts + lookups
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
        + f" + lookups {lookups} ({lookup_notes})"
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


def kept_lookups(engine, connection: str) -> dict[str, set[str]]:
    """The dictionary keys the previous run left in the warehouse (kind -> keys)."""
    out: dict[str, set[str]] = {}
    with transaction(engine) as c:
        for kind, key in c.execute(
            text("SELECT kind, lookup_key FROM oppsync.crm_lookups WHERE connection = :c"), {"c": connection}
        ):
            out.setdefault(kind, set()).add(key)
    return out


def lookup_minimum(crm: str, sim, world, bookmark, known: dict[str, set[str]]) -> tuple[int, str]:
    """The fewest lookup requests the API allows for this hour's changes (ground truth from the tenant, before
    the hour's run): see the module docstring. Returns (requests, what they are)."""
    changed = [o for o in world.live() if o.modified_at > bookmark]
    renamed = {a.idx for a in world.accounts if a.modified_at is not None and a.modified_at > bookmark}
    changed_ids = {o.native_id for o in changed}
    reread = [o for o in world.live() if o.account in renamed and o.native_id not in changed_ids]
    named = [world.accounts[o.account] for o in changed + reread if o.account is not None]

    def batches(n: int, size: int) -> int:
        return math.ceil(n / size)

    # one change-cursor read of the companies; when some were renamed, their opportunities read again
    def per_set(rows: list, size: int) -> int:
        """The open and the not-open set are read (and their records mapped) one after the other, as the
        pages are: a set with records needs its own batched request(s)."""
        return sum(batches(sum(1 for o in rows if (world.status(o) == "open") == s), size) for s in (True, False))

    if crm == "hubspot":
        unknown = {a.native_id for a in named if a.idx not in renamed} - known.get("companies", set())
        associations = per_set(changed + reread, 1000)
        n = associations + batches(len(unknown), 100) + 1
        if renamed:
            n += batches(len(renamed), 1000) + per_set(reread, 100)
        return n, (
            f"{associations} association read(s) (per set) for {len(changed) + len(reread)} deals, {len(unknown)} unknown "
            f"companies, {len(renamed)} renamed with {len(reread)} deals re-read, 1 company change read"
        )
    if crm == "autotask":
        unknown = {a.native_id for a in named if a.idx not in renamed} - known.get("companies", set())
        contacts = {str(c) for o in changed + reread if (c := sim.contact_for(o))} - known.get("contacts", set())
        countries = 0 if known.get("countries") else 1
        n = batches(len(unknown), 500) + batches(len(contacts), 500) + countries + 1
        if renamed:
            n += per_set(reread, 500)
        return n, (
            f"{len(unknown)} unknown companies, {len(contacts)} unknown contacts, countries {countries}, "
            f"{len(renamed)} renamed with {len(reread)} opportunities re-read, 1 company change read"
        )
    if crm == "connectwise":
        sites = {f"{a.native_id}:{a.site_id}" for a in named if a.site_id}
        gone = {world.accounts[i].native_id for i in renamed}  # their kept sites are dropped and read again
        unknown = {k for k in sites if k not in known.get("sites", set()) or k.split(":")[0] in gone}
        n = len(unknown) + 1 + (per_set(reread, 1000) if renamed else 0) + len(reread)
        return n, (
            f"{len(unknown)} unknown sites, {len(renamed)} renamed companies with {len(reread)} opportunities "
            "re-read (and their forecasts), 1 company change read"
        )
    return 0, "none: the records carry what they need"
