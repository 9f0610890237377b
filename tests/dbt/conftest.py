"""Fixtures for tests/dbt: a filled warehouse (DuckDB file in tmp_path, or a fresh Postgres database that
is dropped afterwards) and a dbt runner pointed at it. Postgres tests skip with a reason when Postgres is
unreachable, and fail instead when CI=true."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from mart_world import Dbt, World, dbt_env, fill_warehouse, pg_admin_url


@pytest.fixture
def duckdb_dbt(tmp_path: Path) -> Iterator[tuple[Dbt, World]]:
    path = tmp_path / "warehouse.duckdb"
    url = f"duckdb:///{path}"
    world = fill_warehouse(url)
    yield Dbt("duckdb", dbt_env(tmp_path, OPPSYNC_DUCKDB_PATH=str(path)), url), world


def _pg_reachable() -> bool:
    import psycopg2

    from sqlalchemy.engine import make_url
    u = make_url(pg_admin_url())
    try:
        psycopg2.connect(host=u.host, port=u.port or 5432, user=u.username, password=u.password or "",
                         dbname=u.database or "postgres", connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


@pytest.fixture
def postgres_dbt(tmp_path: Path) -> Iterator[tuple[Dbt, World]]:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    admin_url = make_url(pg_admin_url())
    if not _pg_reachable():
        where = admin_url.render_as_string(hide_password=True)
        if os.environ.get("CI") == "true":
            pytest.fail(f"Postgres at {where} is unreachable (required when CI=true)")
        pytest.skip(f"Postgres at {where} is unreachable; set OPPSYNC_TEST_PG_URL to run these tests")
    dbname = f"oppsync_test_dbt_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{dbname}"'))
    url = admin_url.set(database=dbname).render_as_string(hide_password=False)
    try:
        world = fill_warehouse(url)
        env = dbt_env(tmp_path, OPPSYNC_PG_HOST=admin_url.host or "127.0.0.1",
                       OPPSYNC_PG_PORT=str(admin_url.port or 5432), OPPSYNC_PG_USER=admin_url.username or "postgres",
                       OPPSYNC_PG_PASSWORD=admin_url.password or "", OPPSYNC_PG_DBNAME=dbname)
        yield Dbt("postgres", env, url), world
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()
