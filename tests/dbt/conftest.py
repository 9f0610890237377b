"""Fixtures for tests/dbt: a filled warehouse (DuckDB file in tmp_path, or a fresh Postgres database from the
shared `pg_url` fixture, dropped afterwards) and a dbt runner pointed at it. Postgres tests skip with a reason
when Postgres is unreachable, and fail instead when CI=true (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mart_world import Dbt, World, dbt_env, fill_warehouse
from sqlalchemy.engine import make_url


@pytest.fixture
def duckdb_dbt(tmp_path: Path) -> Iterator[tuple[Dbt, World]]:
    path = tmp_path / "warehouse.duckdb"
    url = f"duckdb:///{path}"
    world = fill_warehouse(url)
    yield Dbt("duckdb", dbt_env(tmp_path, OPPSYNC_DUCKDB_PATH=str(path)), url), world


@pytest.fixture
def postgres_dbt(pg_url: str, tmp_path: Path) -> Iterator[tuple[Dbt, World]]:
    world = fill_warehouse(pg_url)
    u = make_url(pg_url)
    env = dbt_env(
        tmp_path,
        OPPSYNC_PG_HOST=u.host or "127.0.0.1",
        OPPSYNC_PG_PORT=str(u.port or 5432),
        OPPSYNC_PG_USER=u.username or "postgres",
        OPPSYNC_PG_PASSWORD=u.password or "",
        OPPSYNC_PG_DBNAME=u.database,
    )
    yield Dbt("postgres", env, pg_url), world
