"""Engines for the two warehouses and bulk loading into them.

DuckDB allows one writing process per file: connections are opened per unit of work (NullPool) and
opening retries while another process holds the file, so Dagster runs of different connections can
share the embedded warehouse one transaction at a time.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from oppsync_pipeline.lib.warehouse.schema import migrate


def make_engine(url: str) -> Engine:
    if url.startswith("duckdb:"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # DuckDB's buffer pool may otherwise grow to 80% of RAM during a large reconcile; past this limit it
        # spills to disk. At 192MB a 200k-opportunity sync peaked at 389 MB RSS (947 MB uncapped) but a 1M
        # sync failed inside DuckDB, so the default leaves room; lower it where memory matters more.
        limit = os.environ.get("OPPSYNC_DUCKDB_MEMORY_LIMIT", "1GB")
        engine = create_engine(url, poolclass=NullPool,
                               connect_args={"config": {"memory_limit": limit, "preserve_insertion_order": False}})
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
    return engine


def backend(engine: Engine) -> str:
    return "duckdb" if engine.dialect.name == "duckdb" else "postgres"


@contextmanager
def transaction(engine: Engine, attempts: int = 60) -> Iterator[Connection]:
    """A connection in a transaction, retrying the connect while another process holds the DuckDB file."""
    for attempt in range(attempts):
        try:
            conn = engine.connect()
            break
        except OperationalError as err:
            if backend(engine) != "duckdb" or "lock" not in str(err).lower() or attempt == attempts - 1:
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


def bulk_insert(conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
    """Insert many rows in one statement-level operation: DuckDB scans a DataFrame, Postgres uses COPY."""
    if not rows:
        return 0
    if conn.dialect.name == "duckdb":
        import pandas as pd

        frame = pd.DataFrame.from_records(rows, columns=list(columns))
        raw = conn.connection.dbapi_connection
        name = f"_bulk_{id(frame)}"
        raw.register(name, frame)
        try:
            cols = ", ".join(columns)
            raw.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name}")
        finally:
            raw.unregister(name)
    else:
        # Every value is quoted and NULL is the unquoted \N: in CSV mode a quoted field is never NULL, so a
        # CRM text that reads exactly \N survives (csv.writer left it unquoted, and it came back as \\N).
        buf = io.StringIO()
        for row in rows:
            buf.write(",".join("\\N" if v is None else _pg_csv_quoted(v) for v in row) + "\n")
        buf.seek(0)
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.copy_expert(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buf)
        finally:
            cursor.close()
    return len(rows)


def _pg_csv_quoted(v: Any) -> str:
    text = ("t" if v else "f") if isinstance(v, bool) else str(v)
    return '"' + text.replace('"', '""') + '"'

