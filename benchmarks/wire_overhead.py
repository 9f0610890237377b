"""Overhead over the wire (issue 21, item 6): a full sync of N opportunities per CRM (extract, mapping, staging
and reconcile into DuckDB, through the real connector over real HTTP, as `oppsync run` syncs) against the time
to just download and JSON-decode the same pages.

The sync runs with a session that records every request it sends (method, URL, headers, body); the wire time
is those requests sent again, in the same order, by a plain requests.Session, each body decoded with orjson
(no mapping, no staging). The simulator serves from another process (`oppsync sandbox serve`), so neither
measurement shares its interpreter (the GIL) with the server; both include the server's own CPU on the same
cores, which is fair to both. ConnectWise has no bulk forecast endpoint (one forecast request per
opportunity), so it runs at a smaller N.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import re
import subprocess
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import requests

from benchmarks.common import Figure, progress, sandbox_config, timed, verdict
from benchmarks.memory import free_port, wait_until_serving
from benchmarks.reconcile_throughput import top_lines
from oppsync_pipeline.lib.crm.http import CrmSession
from oppsync_pipeline.lib.sync import build_connector, sync_connection
from oppsync_pipeline.lib.warehouse.engine import ensure_schema, make_engine
from oppsync_pipeline.sandbox.cluster import CRMS, DEFAULT_PORTS

NAME = "overhead over the wire"
TARGET = 1.5
# `--wire-profile` on the code before issue 21's mapping changes (commit 37bfed7; 10,000 opportunities, 500 for
# ConnectWise; load average ~22 on 2 cores, 2026-12-05), shown beside a profiled run's own lines
PROFILE_BEFORE: dict[str, str] = {
    "salesforce": (
        "cProfile, own CPU time (all threads), of 6.9s profiled: 0.39s __init__.py:130(execute); "
        "0.36s __init__.py:107(close); 0.36s record.py:272(parse_datetime); "
        "0.33s __init__.py:285(connect); 0.28s fields.py:74(read_fields); "
        "0.27s salesforce.py:1002(_map); 0.26s record.py:336(format_address); "
        "0.25s salesforce.py:1234(_get)"
    ),
    "hubspot": (
        "cProfile, own CPU time (all threads), of 8.4s profiled: 0.47s hubspot.py:892(_map); "
        "0.45s record.py:272(parse_datetime); 0.36s __init__.py:285(connect); "
        "0.36s ~:0(<method 'get' of 'dict' objects>); 0.35s __init__.py:130(execute); "
        "0.34s __init__.py:107(close); 0.29s fields.py:74(read_fields); "
        "0.26s record.py:336(format_address)"
    ),
    "dynamics": (
        "cProfile, own CPU time (all threads), of 7.2s profiled: 0.68s __init__.py:107(close); "
        "0.45s __init__.py:130(execute); 0.42s __init__.py:285(connect); 0.41s dynamics.py:1013(_map); "
        "0.31s decoder.py:406(raw_decode); 0.30s record.py:336(format_address); "
        "0.30s fields.py:74(read_fields); 0.28s ~:0(<method 'get' of 'dict' objects>)"
    ),
    "connectwise": (
        "cProfile, own CPU time (all threads), of 5.6s profiled: 0.27s __init__.py:285(connect); "
        "0.22s <frozen _collections_abc>:859(__iter__); 0.21s <frozen os>:674(__getitem__); "
        "0.20s <frozen os>:760(decode); 0.17s __init__.py:130(execute); 0.17s <frozen os>:756(encode); "
        "0.15s ~:0(<built-in method builtins.isinstance>); 0.13s __init__.py:107(close)"
    ),
    "autotask": (
        "cProfile, own CPU time (all threads), of 9.0s profiled: 0.50s record.py:272(parse_datetime); "
        "0.43s ~:0(<method 'get' of 'dict' objects>); 0.41s autotask.py:832(_map); "
        "0.35s __init__.py:285(connect); 0.33s __init__.py:107(close); 0.32s __init__.py:130(execute); "
        "0.31s fields.py:74(read_fields); 0.28s decoder.py:406(raw_decode)"
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("overhead over the wire")
    g.add_argument("--wire-opportunities", type=int, default=100_000, help="opportunities per CRM")
    g.add_argument(
        "--wire-connectwise",
        type=int,
        default=1_000,
        help="ConnectWise tenant size (one forecast request per opportunity)",
    )
    g.add_argument("--wire-crm", action="append", choices=CRMS, help="only these CRMs (repeatable)")
    g.add_argument(
        "--wire-profile",
        action="store_true",
        help="cProfile each sync (its top lines in the details, beside those before issue 21's changes)",
    )


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    out = []
    for crm in args.wire_crm or CRMS:
        n = args.wire_connectwise if crm == "connectwise" else args.wire_opportunities
        out += measure(crm, n, workdir / f"wire-{crm}", args.wire_profile)
    return out


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | str | None
    status: int


@dataclass
class RecordingSession(CrmSession):
    """The connectors' session (CrmSession) that keeps every request it sends, as sent (after auth, before the wire)."""

    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        response = super().send(request, **kwargs)
        self.sent.append(Sent(request.method or "GET", request.url or "", dict(request.headers), request.body, 0))
        self.sent[-1].status = response.status_code
        return response


@dataclass(frozen=True)
class Limit:
    """A documented request rate the replay keeps to, as any client of the API must: `count` requests per
    `seconds`, for the requests whose path matches `path` (and no other limit listed before it)."""

    path: str
    count: int
    seconds: float


# HubSpot: search 5 requests/s per portal, other calls 190 per 10 s (Professional; the simulator's default).
# The sync keeps the connector's own search pacing (options.search_requests_per_second, default 4.5/s).
LIMITS = {"hubspot": (Limit(r"/search$", 5, 1.0), Limit("", 190, 10.0))}


class Pacer:
    def __init__(self, limits: tuple[Limit, ...]):
        self.limits = limits
        self.sent: dict[Limit, deque[float]] = {limit: deque() for limit in limits}
        self.waited = 0.0

    def wait(self, url: str) -> None:
        path = url.split("?", 1)[0]
        limit = next((x for x in self.limits if re.search(x.path, path)), None)
        if limit is None:
            return
        times = self.sent[limit]
        now = time.monotonic()
        while times and times[0] <= now - limit.seconds:
            times.popleft()
        if len(times) >= limit.count:
            pause = times[0] + limit.seconds - now + 0.005
            time.sleep(pause)
            self.waited += pause
        times.append(time.monotonic())


@dataclass
class Wire:
    seconds: float
    cpu_seconds: float  # this process's CPU time (the server's not included)
    decode_seconds: float  # of which orjson.loads
    megabytes: float
    statuses_differ: int
    paced: float  # seconds waited to keep to the API's documented rates
    rate_limited: int  # 429s met anyway (each waited 1 s and sent again)


def replay(sent: list[Sent], limits: tuple[Limit, ...] = ()) -> Wire:
    """The requests the sync sent, in order, by a plain session: every body decoded (orjson). The sync's own
    retries of a 429 are not sent again (the page they asked for is); the replay keeps to the API's documented
    rates (`limits`), and waits 1 s and repeats a request that meets a 429 all the same."""
    decode = 0.0
    size = differ = limited = 0
    pacer = Pacer(limits)
    with requests.Session() as s:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for r in sent:
            if r.status == 429:
                continue
            while True:
                pacer.wait(r.url)
                response = s.request(r.method, r.url, headers=r.headers, data=r.body, timeout=(10, 120))
                if response.status_code != 429:
                    break
                limited += 1
                time.sleep(1.0)
            d0 = time.perf_counter()
            orjson.loads(response.content)
            decode += time.perf_counter() - d0
            differ += response.status_code != r.status
            size += len(response.content)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Wire(seconds, cpu, decode, size / 1e6, differ, pacer.waited, limited)


def serve(crm: str, n: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`oppsync sandbox serve` of one CRM on a free port (--port-base shifts the registry's ports: the base
    is chosen so that this CRM's port is the free one); its output in workdir/sandbox.log."""
    port = free_port()
    base = port - (DEFAULT_PORTS[crm] - min(DEFAULT_PORTS.values()))
    oppsync = Path(sys.executable).with_name("oppsync")
    with open(workdir / "sandbox.log", "wb") as log:
        server = subprocess.Popen(
            [str(oppsync), "sandbox", "serve", "--crm", crm, "--opportunities", str(n), "--port-base", str(base)],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return server, f"http://127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(crm: str, n: int, workdir: Path, profile: bool = False) -> list[Figure]:
    workdir.mkdir(parents=True, exist_ok=True)
    progress(f"{NAME}: {crm}, {n:,} opportunities served by a separate process")
    server, url = serve(crm, n, workdir)
    try:
        wait_until_serving(url, server, timeout=900)
        # the connectors' real options: HubSpot keeps its search pacing (the simulator enforces the limit)
        cfg = sandbox_config({crm: url}, f"duckdb:///{workdir / 'warehouse.duckdb'}", workdir)
        conn = cfg.connections[0]
        engine = make_engine(cfg.warehouse.url, cfg.warehouse.duckdb)
        ensure_schema(engine)
        session = RecordingSession()
        connector = build_connector(cfg, conn, session=session)
        load_before = os.getloadavg()
        # CPU time of this process (the server's is not in it): what the sync spends beside the wire
        profiler = cProfile.Profile(time.process_time) if profile else None
        cpu0, server0 = time.process_time(), cpu_seconds(server.pid)
        with profiler or nullcontext(), timed() as t:
            summary = sync_connection(cfg, conn, engine, run_id="wire", mode="full", connector=connector)
        cpu, server_sync = time.process_time() - cpu0, cpu_seconds(server.pid) - server0
        engine.dispose()
        if summary.result is None:
            raise RuntimeError(f"the full sync of {crm} did not complete: {summary.extract.status}")
        # the simulators keep a query's evaluation for its paging; the sync's left the replay's queries answered
        # for free (Salesforce: the simulator's CPU 3.5 s replaying 100,000 against 5.4 s serving the sync)
        requests.post(f"{url}/__sandbox/forget-queries", timeout=30).raise_for_status()
        server0 = cpu_seconds(server.pid)
        wire = replay(session.sent, LIMITS.get(crm, ()))
        server_wire = cpu_seconds(server.pid) - server0
        load_after = os.getloadavg()
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a server slow to stop (seen once under make bench) costs no figure
            server.kill()
            server.wait()
    ours = t["s"]
    ratio = ours / wire.seconds
    notes = (
        f"N={n:,} (fetched {summary.result.fetched:,}); ours {ours:.1f}s, {cpu:.1f}s CPU (full sync into DuckDB: "
        f"extract, mapping, staging, reconcile{', under cProfile: slower' if profiler else ''}); wire "
        f"{wire.seconds:.1f}s, {wire.cpu_seconds:.1f}s CPU (the same {len(session.sent)} requests replayed, "
        f"{wire.megabytes:.0f} MB, orjson decode {wire.decode_seconds:.1f}s of it)"
        + (f", {wire.paced:.1f}s of it paced to the API's documented rates" if wire.paced else "")
        + (f", {wire.rate_limited} 429s met and waited on" if wire.rate_limited else "")
        + (f"; {wire.statuses_differ} replayed statuses differ" if wire.statuses_differ else "")
        + (
            f"; the sync waited {connector.stats.seconds_waited:.1f}s on retries"
            if connector.stats.seconds_waited
            else ""
        )
        + f"; the simulator's CPU {server_sync:.1f}s during the sync, {server_wire:.1f}s during the replay: in CPU "
        f"time (both processes) ours / wire = {(cpu + server_sync) / (wire.cpu_seconds + server_wire):.2f}x"
        + f"; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    out = [
        Figure(
            NAME,
            crm,
            f"{ours:.1f}s = {ratio:.2f}x wire",
            f"<= {TARGET}x wire ({wire.seconds:.1f}s)",
            verdict(ratio <= TARGET),
            notes,
        )
    ]
    if profiler:
        before = PROFILE_BEFORE.get(crm)
        lines = f"now: {top_lines(profiler)}" + (f". Before issue 21's mapping changes: {before}" if before else "")
        out.append(Figure(NAME, f"{crm} sync profile", "-", "-", "info", lines))
    return out
