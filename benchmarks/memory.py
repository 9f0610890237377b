"""Memory (issue 9): peak RSS of a full sync of N Salesforce opportunities into DuckDB, in a child process
that runs only the sync. The simulator serves from another process (`oppsync sandbox serve`), so its
in-memory tenant is not counted. Peak RSS is the child's own VmHWM (/proc/self/status, read as it ends):
getrusage(RUSAGE_CHILDREN) would mix in every child the benchmark run waited for before (dlt's workers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from benchmarks.common import Figure, progress, verdict

NAME = "memory"
TARGET_MB = 500
CRM = "salesforce"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory")
    g.add_argument("--memory-opportunities", type=int, default=1_000_000, help="Salesforce tenant size")


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
    n = args.memory_opportunities
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    oppsync = Path(sys.executable).with_name("oppsync")
    progress(f"memory: serving {n:,} Salesforce opportunities from a separate process")
    server = subprocess.Popen([str(oppsync), "sandbox", "serve", "--crm", CRM, "--opportunities", str(n),
                               "--port-base", str(port)], cwd=workdir, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until_serving(url, server, timeout=900)
        progress("memory: sandbox ready, syncing in a child process")
        child = subprocess.run([sys.executable, "-m", "benchmarks.memory_child", "--crm", CRM, "--url", url,
                                "--workdir", str(workdir / "child")], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            lines = child.stderr.strip().splitlines() or ["(no output)"]
            # the exception itself is the last line; the traceback before it is context
            raise RuntimeError(f"the sync child failed: {lines[-1][:400]}\n" + "\n".join(lines[-40:-1]))
        figures = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=60)
    peak = figures["peak_rss_mb"]
    limit = os.environ.get("OPPSYNC_DUCKDB_MEMORY_LIMIT", "256MB (default)")
    notes = (f"N={n:,}, fetched {figures['fetched']:,} in {figures['seconds']:.0f}s with {figures['requests']} "
             f"requests; VmHWM of the sync process; DuckDB memory limit {limit}")
    return [Figure(NAME, f"{CRM} -> duckdb", f"{peak:.0f} MB peak RSS", f"< {TARGET_MB} MB",
                   verdict(peak < TARGET_MB), notes)]
