"""What every benchmark shares: the figure it reports, timing, sandbox configurations, scratch Postgres databases."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.config import OppsyncConfig, parse_config
from oppsync_pipeline.lib.crm.http import CrmSession
from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.sandbox.cluster import sandbox_connection

PG_ADMIN_URL = os.environ.get(
    "OPPSYNC_BENCH_PG", os.environ.get("OPPSYNC_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
)
# The registry's test options (HubSpot's connector paces its calls to the portal's limits): benchmarks that count
# requests against in-process simulators built without limits turn such client-side pacing off; the latency and
# memory benchmarks keep it (their simulators enforce the documented limits) and state the real limit.
TEST_OPTIONS = {crm: {"options": dict(s.test_options)} for crm, s in REGISTRY.items() if s.test_options}


@dataclass
class Figure:
    """One row of the results table."""

    benchmark: str
    subject: str  # backend and/or CRM
    measured: str
    target: str
    verdict: str  # PASS | MISS | info
    notes: str = ""


def progress(message: str) -> None:
    """A timestamped line on stderr, so a long run shows where it is (the results table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """`with timed() as t: ...` then t["s"] holds the wall seconds."""
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def sandbox_config_dict(
    servers: dict[str, Any], warehouse_url: str, workdir: Path, extra: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An oppsync.yaml document for running SandboxServers ({crm: server} or {crm: url}), credentials in a
    secrets file written to `workdir` (the same shape as tests/conftest.sandbox_config, without pytest)."""
    secrets, connections = [], []
    for crm, server in servers.items():
        entry, values = sandbox_connection(crm, server if isinstance(server, str) else server.url)
        for key, value in (extra or {}).get(crm, {}).items():
            entry[key] = {**entry.get(key, {}), **value} if isinstance(value, dict) else value
        connections.append(entry)
        secrets += [f"{k}={v}" for k, v in values.items()]
    workdir.mkdir(parents=True, exist_ok=True)
    secrets_file = workdir / "sandbox.secrets.env"
    secrets_file.write_text("\n".join(secrets) + "\n", encoding="utf-8")
    return {"warehouse": {"url": warehouse_url}, "secrets_file": str(secrets_file), "connections": connections}


def sandbox_config(
    servers: dict[str, Any], warehouse_url: str, workdir: Path, extra: dict[str, dict[str, Any]] | None = None
) -> OppsyncConfig:
    return parse_config(sandbox_config_dict(servers, warehouse_url, workdir, extra))


def postgres_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


@contextmanager
def scratch_postgres() -> Iterator[str]:
    """A fresh Postgres database for one benchmark, dropped afterwards."""
    name = f"oppsync_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class PathCountingSession(CrmSession):
    """The connectors' session (CrmSession) that also tallies requests by a short label of their path (which calls a sync made)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_path: dict[str, int] = {}

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        path = url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        label = f"{method} /" + "/".join(
            "{id}" if part.isdigit() or len(part) > 24 else part for part in path.split("/")
        )
        self.by_path[label] = self.by_path.get(label, 0) + 1
        return super().request(method, url, *args, **kwargs)
