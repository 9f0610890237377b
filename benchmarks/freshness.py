"""Freshness (issue 18): seconds from a change in the CRM to the changed row in `marts.opportunities`, with the
whole production loop in it: the sandbox's simulators notify `oppsync webhooks serve`, the `dagster-daemon`'s
`syncs_on_webhooks` sensor starts the connection's sync, its `mart_follows_syncs` sensor rebuilds the mart.
Everything runs as in production (separate processes, Postgres for the warehouse and for Dagster's storage,
tests/topology/harness.py starts them); nothing is launched by the benchmark.

Changes are made every few seconds across the four CRMs with webhooks, so bursts coalesce as they would in a
live tenant; each change is timed on its own (p50, p95, max over `--freshness-changes`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from benchmarks.common import Figure, postgres_available, progress, scratch_postgres, verdict
from oppsync_pipeline.lib.crm.registry import REGISTRY

NAME = "freshness"
TARGET_P95_SECONDS = 60.0
CRMS = [crm for crm, s in REGISTRY.items() if s.webhooks]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("freshness")
    g.add_argument("--freshness-changes", type=int, default=20, help="changes timed to the mart (>= 20)")
    g.add_argument("--freshness-interval", type=float, default=3.0, help="seconds between two changes")


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    if not postgres_available():
        return [Figure(NAME, "postgres", "-", f"p95 < {TARGET_P95_SECONDS:.0f}s", "MISS", "Postgres unreachable")]
    from tests.topology.harness import Topology  # the deployment's processes (shared with the topology test)

    workdir.mkdir(parents=True, exist_ok=True)
    with scratch_postgres() as pg_url, Topology(workdir, pg_url) as topo:
        topo.start_sandbox(CRMS, opportunities=200, webhooks={"sensor_interval_seconds": 1})
        topo.start_receiver()
        topo.start_daemon()
        for crm in CRMS:
            topo.subscribe(crm)
        ids = warm_up(topo)
        changes = measure(topo, ids, args.freshness_changes, args.freshness_interval)
        stages = breakdown(changes, run_times(topo))
        workers = worker_starts(topo)
    seconds = [c.seconds for c in changes]
    p50, p95 = statistics.median(seconds), percentile(seconds, 95)
    notes = (
        f"{len(seconds)} changes over {', '.join(CRMS)}, one every {args.freshness_interval:g}s; p50 {p50:.1f}s, "
        f"max {max(seconds):.1f}s; receiver -> inbox -> sensor (1 s) -> sync run -> mart sensor (5 s) -> dbt run "
        "(the build after a sync; dbt's tests run hourly in mart_tests). Where the time went (median / p95 over "
        f"the changes, from the Dagster runs that carried each change): {stages}. Run workers: {workers}"
    )
    return [
        Figure(
            NAME,
            "postgres, daemon",
            f"p95 {p95:.1f}s",
            f"< {TARGET_P95_SECONDS:.0f}s",
            verdict(p95 < TARGET_P95_SECONDS),
            notes,
        )
    ]


def connection(crm: str) -> str:
    return f"sandbox-{crm}"


def touch(topo, crm: str, opp: str, name: str) -> None:
    r = requests.post(f"{topo.sandbox_urls[crm]}/__sandbox/touch", json={"id": opp, "name": name}, timeout=10)
    r.raise_for_status()


def mart_names(topo) -> dict[tuple[str, str], str]:
    if not topo.query("SELECT to_regclass('marts.opportunities')")[0][0]:
        return {}
    return {
        (r[0], r[1]): r[2] for r in topo.query("SELECT connection, source_id, project_name FROM marts.opportunities")
    }


def warm_up(topo) -> dict[str, list[str]]:
    """One change per CRM, waited for: the first notified sync of a connection is its full sync, and the mart's
    first build creates its tables. Returns some opportunity ids per CRM to change next."""
    progress("freshness: warming up (first syncs and mart build through the daemon)")
    first = {}
    for crm in CRMS:
        first[crm] = requests.get(f"{topo.sandbox_urls[crm]}/__sandbox/ids", timeout=10).json()["ids"][:25]
        touch(topo, crm, first[crm][0], "warm-up")
    topo.poll(
        lambda: mart_names(topo),
        lambda names: all(names.get((connection(crm), first[crm][0])) == "warm-up" for crm in CRMS),
        "every connection's first notified sync in the mart",
        seconds=600,
    )
    return {crm: ids[1:] for crm, ids in first.items()}


@dataclass
class Change:
    connection: str
    made: float  # epoch seconds: the sandbox changed the opportunity
    seen: float  # epoch seconds: the changed row was read from marts.opportunities

    @property
    def seconds(self) -> float:
        return self.seen - self.made


@dataclass
class Run:
    connection: str | None  # None: a mart build
    created: float
    started: float
    ended: float


def measure(topo, ids: dict[str, list[str]], changes: int, interval: float) -> list[Change]:
    pending: dict[tuple[str, str], tuple[str, float]] = {}
    done: list[Change] = []
    made = 0
    next_at = time.monotonic()
    deadline = time.monotonic() + changes * interval + 300
    while (made < changes or pending) and time.monotonic() < deadline:
        now = time.monotonic()
        if made < changes and now >= next_at:
            crm = CRMS[made % len(CRMS)]
            opp = ids[crm][made // len(CRMS)]
            name = f"fresh-{made}"
            touch(topo, crm, opp, name)
            pending[(connection(crm), opp)] = (name, time.time())
            made += 1
            next_at = now + interval
        names = mart_names(topo)
        for key, (name, t0) in list(pending.items()):
            if names.get(key) == name:
                done.append(Change(key[0], t0, time.time()))
                del pending[key]
        time.sleep(0.5)
    if pending:
        raise AssertionError(f"{len(pending)} change(s) never reached the mart: {sorted(pending)[:5]}")
    progress(f"freshness: {len(done)} changes timed")
    return done


def run_times(topo) -> list[Run]:
    """The finished sync runs (by connection) and the builds after syncs, from Dagster's run storage."""
    rows = topo.query(
        "SELECT (SELECT value FROM run_tags t WHERE t.run_id = r.run_id AND t.key = 'oppsync/connection'), "
        "(SELECT value FROM run_tags t WHERE t.run_id = r.run_id AND t.key = 'oppsync/mart'), "
        "extract(epoch FROM r.create_timestamp), r.start_time, r.end_time "
        "FROM runs r WHERE r.status = 'SUCCESS' AND r.start_time IS NOT NULL AND r.end_time IS NOT NULL"
    )
    return [
        Run(conn, float(created), float(started), float(ended))
        for conn, mart, created, started, ended in rows
        if conn or mart == "after-sync"
    ]


def worker_starts(topo) -> str:
    """How the runs' workers started (locations/run_launcher.py's engine event): forked warm or cold."""
    forked, cold = topo.query(
        "SELECT count(*) FILTER (WHERE event LIKE '%forked from the warm process%'), "
        "count(*) FILTER (WHERE event LIKE '%Run worker started%cold:%') FROM event_logs"
    )[0]
    return f"{forked} forked from a warm process, {cold} started cold"


STAGES = [
    ("notification to sync run queued", "to_sync"),
    ("sync queued to started (queue, run worker start)", "sync_wait"),
    ("sync run", "sync_run"),
    ("sync done to mart build queued (automation tick, a build in progress)", "to_mart"),
    ("mart queued to started (queue, run worker start)", "mart_wait"),
    ("mart build (dbt run)", "mart_run"),
    ("build done to row read", "to_seen"),
]


def breakdown(changes: list[Change], runs: list[Run]) -> str:
    """For each change: the first sync run of its connection that started after the change, then the first build
    after a sync that started after that sync ended; the stages between, summarised as median / p95."""
    parts: dict[str, list[float]] = {key: [] for _, key in STAGES}
    for c in changes:
        sync = min(
            (r for r in runs if r.connection == c.connection and r.started >= c.made and r.ended <= c.seen),
            key=lambda r: r.started,
            default=None,
        )
        mart = sync and min(
            (r for r in runs if r.connection is None and r.started >= sync.ended and r.ended <= c.seen),
            key=lambda r: r.started,
            default=None,
        )
        if sync is None or mart is None:
            continue  # carried by runs this reading cannot tell apart (e.g. a sync already reading at the change)
        for key, value in {
            "to_sync": sync.created - c.made,
            "sync_wait": sync.started - sync.created,
            "sync_run": sync.ended - sync.started,
            "to_mart": mart.created - sync.ended,
            "mart_wait": mart.started - mart.created,
            "mart_run": mart.ended - mart.started,
            "to_seen": c.seen - mart.ended,
        }.items():
            parts[key].append(value)
    n = len(parts["to_sync"])
    if not n:
        return "no change could be matched to its runs"
    text = "; ".join(
        f"{label} {statistics.median(parts[key]):.1f}/{percentile(parts[key], 95):.1f}s" for label, key in STAGES
    )
    return f"{text} ({n} of {len(changes)} changes matched)"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]
