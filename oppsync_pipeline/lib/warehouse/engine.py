"""Engines for the two warehouses, and transactions on them (bulk loading: dialect.py).

DuckDB allows one writing process per file: connections are opened per unit of work (NullPool) and
opening retries while another process holds the file, so Dagster runs of different connections can
share the embedded warehouse one transaction at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from oppsync_pipeline.lib.config import DuckDBSettings
from oppsync_pipeline.lib.warehouse import dialect
from oppsync_pipeline.lib.warehouse.schema import migrate

# Rows per DuckDB row group in the warehouse file (DuckDB's default is 122,880). A statement that writes many
# rows fills one row group per thread in memory before compressing it to disk; with raw CRM payloads of 1-2.5 kB
# that is 110-320 MB per thread, more than the memory limit below allows, and the first full sync of a large
# tenant failed with "Out of Memory". At 16,384 it is 15-45 MB per thread; scans barely notice.
DUCKDB_ROW_GROUP_SIZE = 16_384
DUCKDB_CATALOG = "warehouse"


def make_engine(url: str, duckdb: DuckDBSettings | None = None) -> Engine:
    """An engine for the warehouse at `url`; `duckdb` = the configuration's `warehouse.duckdb` settings."""
    if dialect.is_duckdb_url(url):
        return _duckdb_engine(url, duckdb or DuckDBSettings())
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)


def _duckdb_engine(url: str, settings: DuckDBSettings) -> Engine:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    # DuckDB's buffer pool may otherwise grow to 80% of RAM; past this limit it spills to disk. With ART-free
    # fact tables (schema migration 3) and small row groups a full sync of 1,000,000 Salesforce opportunities
    # fits (benchmarks/RESULTS.md, memory); raise it for speed where memory is plentiful. The environment
    # overrides the configuration for one process (a benchmark, a one-off backfill).
    config: dict[str, Any] = {
        "memory_limit": os.environ.get("OPPSYNC_DUCKDB_MEMORY_LIMIT", settings.memory_limit),
        "preserve_insertion_order": False,
    }
    threads = os.environ.get("OPPSYNC_DUCKDB_THREADS") or settings.threads
    if threads:
        config["threads"] = int(threads)
    if not path or path == ":memory:":
        return create_engine(url, poolclass=NullPool, connect_args={"config": config})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # The row group size is an option of ATTACH, not of opening a file: open an in-memory database and attach
    # the warehouse file as the default catalog. Spill files go where DuckDB puts them for a file database.
    config["temp_directory"] = f"{path}.tmp"
    engine = create_engine("duckdb:///:memory:", poolclass=NullPool, connect_args={"config": config})

    @event.listens_for(engine, "connect")
    def attach_warehouse(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"ATTACH ? AS {DUCKDB_CATALOG} (ROW_GROUP_SIZE {DUCKDB_ROW_GROUP_SIZE})", [path])
        dbapi_connection.execute(f"USE {DUCKDB_CATALOG}")

    return engine


@contextmanager
def transaction(engine: Engine, attempts: int = 60) -> Iterator[Connection]:
    """A connection in a transaction, retrying the connect while another process holds the DuckDB file."""
    for attempt in range(attempts):
        try:
            conn = engine.connect()
            break
        except OperationalError as err:
            if not dialect.file_busy(engine, err) or attempt == attempts - 1:
                raise
            time.sleep(min(0.2 * (attempt + 1), 2.0))
    try:
        with conn.begin():
            yield conn
    finally:
        conn.close()


def ensure_schema(engine: Engine) -> list[int]:
    with transaction(engine) as conn:
        return migrate(conn)
