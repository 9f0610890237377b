"""The production topology in subprocesses: the sandbox CRMs, `dagster-webserver`, `dagster-daemon` and
`oppsync webhooks serve`, on one fresh Postgres database holding both the warehouse and Dagster's instance
storage (deploy/postgres/dagster.yaml, read through its DAGSTER_PG_* variables), as README "Production topology"
runs them. Run workers are the daemon's children (DefaultRunLauncher), as a K8s or Celery launcher would start
them elsewhere.

Each process runs in its own session (process group), so stopping it also stops what it started (code servers,
run workers); output goes to a log file per process, and `logs()` shows their tails when a test fails.

    with Topology(tmp_path, pg_url) as topo:
        topo.start_sandbox(["salesforce"], schedule={"salesforce": soon_cron()})
        topo.start_webserver(); topo.start_daemon(); topo.start_receiver()
        topo.graphql("{ version }")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.sandbox.test_serve_cli import free_port_base

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PYTHON = sys.executable
STARTUP_SECONDS = 120  # a code server imports dagster and builds the definitions; a loaded 2-core machine is slow


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """`sig` to the whole process group: the process, its code servers and run workers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def gone(self) -> bool:
        if self.popen.poll() is None:
            return False
        return not _group_exists(self.popen.pid)

    def stop(self, grace: float = 10.0) -> None:
        stop_all([self], grace)

    def tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return text[-chars:] if chars else ""


def stop_all(processes: list[Process], grace: float = 10.0) -> None:
    """SIGTERM to every group at once, SIGKILL to what is left after `grace` seconds; reap the leaders."""
    for p in processes:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(p.gone() for p in processes):
        time.sleep(0.2)
    for p in processes:
        if not p.gone():
            p.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=10)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def soon_cron(lead_seconds: float = 30.0, now: datetime | None = None) -> str:
    """A UTC cron that fires once soon (the first whole minute at least `lead_seconds` away: the daemon must be
    up before it), then every 30 minutes. Not "* * * * *": the sync asset's freshness policy (defs/crm/assets.py)
    needs a schedule interval over 15 minutes (warn = interval + 15 min must stay under fail = 2 x interval)."""
    now = now or datetime.now(UTC)
    earliest = now + timedelta(seconds=lead_seconds)
    first = earliest.replace(second=0, microsecond=0)
    if first < earliest:
        first += timedelta(minutes=1)
    return f"{first.minute},{(first.minute + 30) % 60} * * * *"


def free_port() -> int:
    """A port for one listener, drawn like the sandbox's (below the kernel's ephemeral range)."""
    return free_port_base(1)


class Topology:
    """The processes of one deployment, started on demand and stopped together (reverse order)."""

    def __init__(self, tmp_path: Path, pg_url: str):
        self.dir = tmp_path
        self.pg_url = pg_url
        self.home = tmp_path / "dagster_home"
        self.config = tmp_path / "oppsync.yaml"
        self.processes: dict[str, Process] = {}
        self.urls: dict[str, str] = {}
        self.sandbox_urls: dict[str, str] = {}
        self.started = time.monotonic()
        self.marks: list[tuple[str, float]] = []  # (what, seconds since start): where a slow run spent its time
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "deploy" / "postgres" / "dagster.yaml", self.home / "dagster.yaml")

    # -- environment ------------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """What every long-running process gets in production: DAGSTER_HOME, the instance's DAGSTER_PG_* (here
        the test's database), OPPSYNC_CONFIG. PYTHONPATH puts this checkout first (the venv may hold another)."""
        url = make_url(self.pg_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "OPPSYNC_", "PYTEST_"))}
        env.update(
            DAGSTER_HOME=str(self.home),
            DAGSTER_PG_HOST=url.host or "127.0.0.1",
            DAGSTER_PG_PORT=str(url.port or 5432),
            DAGSTER_PG_USER=url.username or "postgres",
            DAGSTER_PG_PASSWORD=url.password or "",
            DAGSTER_PG_DB=url.database or "",
            OPPSYNC_CONFIG=str(self.config),
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            GX_ANALYTICS_ENABLED="false",
            TQDM_DISABLE="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def spawn(self, name: str, argv: list[str]) -> Process:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=self.dir,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Process(name, popen, log)
        self.processes[name] = proc
        self.mark(f"{name} spawned")
        return proc

    def wait_for(self, proc: Process, ready: Callable[[], bool], what: str, seconds: float = STARTUP_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert proc.alive(), f"{proc.name} exited {proc.popen.returncode} before {what}:\n{proc.tail()}"
            try:
                if ready():
                    self.mark(f"{proc.name}: {what}")
                    return
            except (requests.RequestException, OSError, ValueError):
                pass
            assert time.monotonic() < deadline, f"{proc.name}: no {what} after {seconds:.0f}s:\n{proc.tail()}"
            time.sleep(0.5)

    # -- the processes ----------------------------------------------------------------------------------------

    def start_sandbox(
        self,
        crms: list[str],
        *,
        opportunities: int = 60,
        schedule: dict[str, str] | None = None,
        connection_extra: dict[str, dict[str, Any]] | None = None,
        **top: Any,
    ) -> Process:
        """`oppsync sandbox serve --write-config`, then the generated oppsync.yaml pointed at the test's Postgres
        warehouse, the receiver's port, and per CRM a `schedule` cron (soon_cron(): one tick 30-90 s away)
        and any other connection keys."""
        base = free_port_base(5)
        argv = [PYTHON, "-m", "oppsync_pipeline.cli", "sandbox", "serve", "--port-base", str(base)]
        argv += ["--opportunities", str(opportunities), "--write-config", str(self.config), "--webhooks-url", ""]
        for crm in crms:
            argv += ["--crm", crm]
        proc = self.spawn("sandbox", argv)
        self.wait_for(proc, self.config.exists, "oppsync.yaml written", seconds=60)
        time.sleep(0.2)  # written in one call after the secrets file; let the write finish
        cfg = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        receiver_port = free_port()
        cfg["warehouse"] = {"url": self.pg_url}
        cfg["webhooks"] = {"host": "127.0.0.1", "port": receiver_port, **top.pop("webhooks", {})}
        cfg.update(top)
        for conn in cfg["connections"]:
            self.sandbox_urls[conn["crm"]] = conn["base_url"]
            if schedule and conn["crm"] in schedule:
                conn["schedule"] = schedule[conn["crm"]]
            conn.update((connection_extra or {}).get(conn["crm"], {}))
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        self.urls["receiver"] = f"http://127.0.0.1:{receiver_port}"
        for url in self.sandbox_urls.values():
            self.wait_for(proc, lambda u=url: requests.get(f"{u}/__sandbox/state", timeout=2).ok, f"{url} answering")
        return proc

    def start_webserver(self) -> Process:
        port = free_port()
        self.urls["webserver"] = url = f"http://127.0.0.1:{port}"
        argv = [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")]
        proc = self.spawn("webserver", argv)
        self.wait_for(proc, lambda: requests.get(f"{url}/server_info", timeout=2).ok, "/server_info")
        return proc

    def start_daemon(self) -> Process:
        """`dagster-daemon run`: the scheduler, the sensors and the run queue (its heartbeats are in Postgres)."""
        return self.spawn("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")])

    def start_receiver(self) -> Process:
        argv = [PYTHON, "-m", "oppsync_pipeline.cli", "webhooks", "serve"]  # host and port from oppsync.yaml
        proc = self.spawn("receiver", argv)
        url = self.urls["receiver"]
        self.wait_for(proc, lambda: requests.get(f"{url}/healthz", timeout=2).ok, "/healthz")
        return proc

    # -- talking to them --------------------------------------------------------------------------------------

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        r = requests.post(
            f"{self.urls['webserver']}/graphql", json={"query": query, "variables": variables}, timeout=60
        )
        r.raise_for_status()
        body = r.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def poll(self, fetch: Callable[[], Any], done: Callable[[Any], bool], what: str, seconds: float) -> Any:
        """Call `fetch` until `done(value)`; every process must stay up meanwhile. Returns the last value."""
        deadline = time.monotonic() + seconds
        while True:
            value = fetch()
            if done(value):
                self.mark(what)
                return value
            dead = [p.name for p in self.processes.values() if not p.alive()]
            assert not dead, f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}"
            assert time.monotonic() < deadline, f"no {what} after {seconds:.0f}s (last: {value!r})\n{self.logs()}"
            time.sleep(1)

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.started))

    def subscribe(self, crm: str, faults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Point the `crm` simulator's webhook sender at the receiver (as `oppsync webhooks register` would),
        optionally with delivery faults (drop, duplicate, delay_seconds, reorder, seed)."""
        connection = f"sandbox-{crm}"
        body: dict[str, Any] = {"url": f"{self.urls['receiver']}/webhooks/{connection}"}
        if faults is not None:
            body["faults"] = faults
        r = requests.post(f"{self.sandbox_urls[crm]}/__sandbox/webhooks", json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def advance(self, crm: str, hours: float) -> Any:
        """Simulated CRM activity: `hours` of changes to the `crm` tenant (its webhook sender reports them)."""
        r = requests.post(f"{self.sandbox_urls[crm]}/__sandbox/advance", json={"hours": hours}, timeout=60)
        r.raise_for_status()
        return r.json()

    def query(self, sql: str, **params: Any) -> list[Any]:
        """Rows from the test's database (the warehouse and Dagster's storage)."""
        engine = create_engine(self.pg_url)
        try:
            with engine.connect() as c:
                return list(c.execute(text(sql), params))
        finally:
            engine.dispose()

    def logs(self, chars: int = 2500) -> str:
        marks = "".join(f"  {t:6.1f}s  {what}\n" for what, t in self.marks)
        return f"----- timeline -----\n{marks}" + "\n".join(
            f"----- {p.name} ({p.log}) -----\n{p.tail(chars)}" for p in self.processes.values()
        )

    def stop(self) -> None:
        stop_all(list(self.processes.values()))

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
