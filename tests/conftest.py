"""Shared fixtures: warehouses (DuckDB file, fresh Postgres database) and sandbox-backed configurations.

Postgres tests run against OPPSYNC_TEST_PG (default postgresql+psycopg2://postgres@127.0.0.1:5432/postgres).
Each test gets its own database, dropped afterwards. Outside CI they skip, with the reason shown, when
Postgres does not answer; with CI=true an unreachable Postgres is a failure, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from oppsync_pipeline.lib.config import OppsyncConfig, parse_config
from oppsync_pipeline.sandbox.cluster import crm_module, env_var

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

PG_ADMIN_URL = os.environ.get("OPPSYNC_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def postgres_available() -> str | None:
    """None when Postgres answers, else why not."""
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "not available", with the reason
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def require_postgres() -> None:
    why = postgres_available()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but Postgres at {make_url(PG_ADMIN_URL).render_as_string()} is unreachable: {why}")
    pytest.skip(f"Postgres unreachable ({why}); these tests run in CI")


def _new_database() -> tuple[str, str]:
    name = f"oppsync_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_database(name: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database for this test (dropped afterwards)."""
    require_postgres()
    name, url = _new_database()
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture
def duckdb_url(tmp_path: Path) -> str:
    return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Both warehouses: every test using it runs once on DuckDB and once on Postgres."""
    with warehouse_database(request.param, tmp_path) as url:
        yield url


@contextmanager
def warehouse_database(backend: str, tmp_dir: Path) -> Iterator[str]:
    """A warehouse URL: a DuckDB file in `tmp_dir`, or a fresh Postgres database dropped afterwards."""
    if backend == "duckdb":
        yield f"duckdb:///{tmp_dir / 'warehouse.duckdb'}"
        return
    require_postgres()
    name, url = _new_database()
    try:
        yield url
    finally:
        _drop_database(name)


def live_client_names(engine: Any, connection: str) -> dict[str, str | None]:
    """source_id -> client_name of a connection's live opportunities in the warehouse."""
    with engine.connect() as c:
        rows = c.execute(text("SELECT source_id, client_name FROM oppsync.opportunities "
                              "WHERE connection = :c AND deleted_at IS NULL"), {"c": connection})
        return {r.source_id: r.client_name for r in rows}


def sandbox_config(servers: dict[str, Any], warehouse_url: str, tmp_path: Path,
                   extra: dict[str, dict[str, Any]] | None = None, **top: Any) -> OppsyncConfig:
    """An OppsyncConfig for running SandboxServers ({crm: server}), credentials in a secrets file.

    `extra` adds keys per connection (e.g. {"salesforce": {"open_statuses": [...]}}); `top` adds top-level keys.
    """
    secrets, connections = [], []
    for crm, server in servers.items():
        mod = crm_module(crm)
        name = f"sandbox-{crm}"
        entry: dict[str, Any] = {"name": name, "crm": crm, "base_url": server.url,
                                 "credentials": {k: "${" + env_var(name, k) + "}" for k in mod.SANDBOX_CREDENTIALS}}
        options = getattr(mod, "connection_options", lambda url: {})(server.url)
        if options:
            entry["options"] = options
        entry.update((extra or {}).get(crm, {}))
        connections.append(entry)
        secrets += [f"{env_var(name, k)}={v}" for k, v in mod.SANDBOX_CREDENTIALS.items()]
    secrets_file = tmp_path / "sandbox.secrets.env"
    secrets_file.write_text("\n".join(secrets) + "\n", encoding="utf-8")
    return parse_config({"warehouse": {"url": warehouse_url}, "secrets_file": str(secrets_file),
                         "connections": connections, **top})


# -- the reliability report (tests/reliability/report.py) ----------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    """The controller names a fresh results file before xdist starts its workers (they inherit it)."""
    if hasattr(config, "workerinput"):
        return
    from tests.reliability import report

    path = report.DEFAULT_RESULTS.with_name(f"results-{os.getpid()}.jsonl")
    path.unlink(missing_ok=True)
    os.environ["OPPSYNC_RELIABILITY_RESULTS"] = str(path)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    from tests.reliability import report

    rows = report.read_rows()
    if rows:
        terminalreporter.write_line(report.table(rows))
        report.results_path().unlink(missing_ok=True)

