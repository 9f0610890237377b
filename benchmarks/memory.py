"""Memory (issues 9 and 21): peak RSS of a full sync of N opportunities into DuckDB, for each of the five CRMs'
record shapes, each in a child process that runs only the sync. Each simulator serves from another process
(`oppsync sandbox serve --crm X`), so its in-memory tenant is not counted. Peak RSS is the child's own VmHWM
(/proc/self/status, read as it ends): getrusage(RUSAGE_CHILDREN) would mix in every child the benchmark run
waited for before (dlt's workers). ConnectWise runs with its lean options (no forecast read: one extra request
per opportunity, a million of them at the brief size; the forecast is read and dropped page by page).

Issue 22: the same full sync of M opportunities through the library and through Dagster (the sync job with
its checks, as `oppsync sync` runs it); Dagster's peak must stay within 10% of the library's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from benchmarks.common import Figure, progress, verdict
from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.sandbox.cluster import serve_ports

NAME = "memory"
TARGET_MB = 500
DAGSTER_OVERHEAD = 0.10  # Dagster's peak may exceed the library's by this share
CRM = "salesforce"  # the library-vs-Dagster comparison's
CRMS = tuple(REGISTRY)


# ConnectWise reads a forecast per opportunity (no bulk endpoint): a million requests at the brief size
LEAN = {crm: dict(s.lean_options) for crm, s in REGISTRY.items() if s.lean_options}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory")
    g.add_argument("--memory-opportunities", type=int, default=1_000_000, help="tenant size of each CRM")
    g.add_argument(
        "--memory-crm", action="append", choices=CRMS, help="measure only these CRMs (repeatable; default: all five)"
    )
    g.add_argument(
        "--memory-dagster-opportunities",
        type=int,
        default=100_000,
        help="tenant size of the library-vs-Dagster comparison (0: skip it)",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the sandbox server exited with {server.returncode}")
        try:
            requests.get(url + "/__sandbox/state", timeout=2)
            return
        except requests.RequestException:
            time.sleep(1)
    raise TimeoutError(f"the sandbox at {url} did not answer within {timeout:.0f}s")


def run(args: argparse.Namespace, workdir: Path) -> list[Figure]:
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.memory_opportunities
    limit = os.environ.get("OPPSYNC_DUCKDB_MEMORY_LIMIT", "256MB (default)")
    out = []
    for crm in args.memory_crm or CRMS:
        with serving(crm, n, workdir / crm) as url:
            progress(f"memory: {crm} sandbox ready, syncing in a child process")
            figures = measure(crm, url, workdir / crm / "child", "library")
        peak = figures["peak_rss_mb"]
        notes = (
            f"N={n:,}, fetched {figures['fetched']:,} in {figures['seconds']:.0f}s with {figures['requests']} "
            f"requests; VmHWM of the sync process ({figures['rss_before_run_mb']:.0f} MB before the sync "
            f"started; highest sample during {figures.get('sampled_peak_phase') or '?'}); DuckDB memory limit {limit}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        if crm in LEAN:
            notes += f"; options {LEAN[crm]} (one request per opportunity less)"
        if figures.get("reconciled_again"):
            notes += "; the reconcile ran out of DuckDB's lean limit and ran again under the configured one"
        complete = figures.get("status", "complete") == "complete"
        if not complete:
            notes = f"the sync did not complete ({figures.get('status')}: {figures.get('error')}); " + notes
        out.append(
            Figure(
                NAME,
                f"{crm} -> duckdb",
                f"{peak:.0f} MB peak RSS" + ("" if complete else ", sync FAILED"),
                f"< {TARGET_MB} MB",
                verdict(complete and peak < TARGET_MB),
                notes,
            )
        )
    if args.memory_dagster_opportunities:
        out.append(dagster_against_library(args.memory_dagster_opportunities, workdir / "dagster-vs-library"))
    return out


def dagster_against_library(n: int, workdir: Path) -> Figure:
    """The same full sync through the library and through Dagster, each in a fresh child and warehouse."""
    workdir.mkdir(parents=True, exist_ok=True)
    with serving(CRM, n, workdir) as url:
        progress("memory: syncing through the library, then through Dagster")
        library = measure(CRM, url, workdir / "library", "library")
        dagster = measure(CRM, url, workdir / "dagster", "dagster")
    ratio = dagster["peak_rss_mb"] / library["peak_rss_mb"]
    notes = (
        f"N={n:,}; library {library['peak_rss_mb']:.0f} MB in {library['seconds']:.0f}s, Dagster "
        f"{dagster['peak_rss_mb']:.0f} MB in {dagster['seconds']:.0f}s (sync job: extract, blocking quality "
        f"check, reconcile, checks; the instance's SQLite storage created beforehand by another process); "
        f"fetched {dagster['fetched']:,}; before the sync started "
        f"{library['rss_before_run_mb']:.0f} MB (library) and {dagster['rss_before_run_mb']:.0f} MB (Dagster, "
        f"definitions loaded): the sync itself added {growth(library):.0f} MB and {growth(dagster):.0f} MB"
    )
    return Figure(
        NAME,
        f"{CRM} -> duckdb, Dagster / library",
        f"{dagster['peak_rss_mb']:.0f} MB, {ratio:.2f}x",
        f"<= {1 + DAGSTER_OVERHEAD:.2f}x",
        verdict(ratio <= 1 + DAGSTER_OVERHEAD),
        notes,
    )


def growth(figures: dict) -> float:
    return figures["peak_rss_mb"] - figures["rss_before_run_mb"]


@contextmanager
def serving(crm: str, n: int, workdir: Path) -> Iterator[str]:
    """A tenant of n opportunities of one CRM served by another process (its memory is not the sync's)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # `--port-base` shifts every CRM's port alike: the base that puts this CRM's on the free port
    base = port - serve_ports((crm,), 0)[crm]
    oppsync = Path(sys.executable).with_name("oppsync")
    progress(f"memory: serving {n:,} {crm} opportunities from a separate process")
    with (workdir / "sandbox.log").open("w") as log:
        server = subprocess.Popen(
            [str(oppsync), "sandbox", "serve", "--crm", crm, "--opportunities", str(n), "--port-base", str(base)],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            wait_until_serving(url, server, timeout=900)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a server slow to stop (the clean-clone CI, once) costs no figure
                server.kill()
                server.wait()


def measure(crm: str, url: str, workdir: Path, via: str) -> dict:
    """Run one full sync in a child process (`benchmarks.memory_child`) and return what it reports. Through
    Dagster, the instance's storage is created first by another child, as a deployment's runs find it."""
    if via == "dagster":
        prepare = [sys.executable, "-m", "benchmarks.memory_child", "--workdir", str(workdir), "--prepare-dagster"]
        subprocess.run(prepare, capture_output=True, text=True, check=True)
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.memory_child",
            "--crm",
            crm,
            "--url",
            url,
            "--workdir",
            str(workdir),
            "--via",
            via,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or ["(no output)"]
        # the exception itself is the last line; the traceback before it is context
        raise RuntimeError(f"the sync child ({via}) failed: {lines[-1][:400]}\n" + "\n".join(lines[-40:-1]))
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    # reconcile/apply.py's warning: the peak then is the configured limit's, said so in the details
    figures["reconciled_again"] = "ran out of DuckDB's lean memory limit" in child.stderr
    return figures
